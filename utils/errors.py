"""The one exception type the command line turns into a one-line error."""


class KitError(Exception):
    """Bad input or an unusable model/dataset.

    main.py prints it as one line and exits with status 2, so everything that
    can go wrong because of what the user asked for is raised as a KitError
    before any results file is created.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


OFFLINE_HINT = ("the machine may be offline: pass a local directory written by save_pretrained as --model "
                "and a local text file as --dataset")
