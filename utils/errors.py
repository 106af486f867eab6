"""The exceptions the command line turns into a one-line error."""


class KitError(Exception):
    """Bad input or an unusable model/dataset.

    main.py prints it as one line and exits with ``exit_status`` (2), so
    everything that can go wrong because of what the user asked for is raised
    as a KitError, before any work where it can be checked before.
    """

    exit_status = 2


class WriteError(KitError):
    """An output could not be written (disk full, read-only): the work is lost, the files written stay intact."""

    exit_status = 1


class Interrupted(KitError):
    """The user interrupted the run (SIGINT); the message says what was kept and how to continue."""

    exit_status = 130


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


OFFLINE_HINT = ("the machine may be offline: pass a local directory written by save_pretrained as --model "
                "and a local text file as --dataset")
