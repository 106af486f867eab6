"""Logging set-up for the command line: messages go to stderr, results to stdout."""

import logging
import os
import warnings


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", force=True)
    # transformers and datasets are chatty about things the kit handles itself
    # (long token streams, generation flags); keep their errors only.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # its retry messages would bury our one-line error
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


# Seconds between progress-bar updates when stderr is a file (a batch job's log), where every update
# is a new line: a sweep then writes a line every this many seconds, not hundreds.
LOG_FILE_INTERVAL = 30.0


def progress_bar(*args, **kwargs):
    """A tqdm progress bar on stderr that redraws at most every LOG_FILE_INTERVAL seconds in a log file."""
    import sys

    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_FILE_INTERVAL)
    return tqdm(*args, **kwargs)
