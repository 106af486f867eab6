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
