"""Writing an output file in one step, without following links.

Every file the kit writes beside a results CSV (the report, the figures, the
sidecar) is written to a new temporary file in the same folder and then
renamed over its name. The rename replaces whatever has that name, a
symbolic link included, instead of writing through it: a link planted as
``r_report.md`` cannot make the kit overwrite the file it points to. A crash
or a full disk leaves the old file or the new one, and no temporary file.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def replace_file(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a fresh temporary file beside ``path``, then rename it to ``path``. OSError on failure,
    with the temporary file removed."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a report from the user's group
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_text(path: str, text: str) -> None:
    """``text`` as UTF-8 in ``path``, written by replace_file."""
    replace_file(path, lambda f: f.write(text.encode("utf-8")))
