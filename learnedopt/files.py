"""Writing a file so that a reader never sees a partial one: a temporary file beside it, then
``os.replace``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it to ``path``.

    If ``write`` or the rename fails (a full disk, ``path`` a folder), the temporary file is
    removed and the error raised; ``path`` is unchanged. The file gets the permissions a new file
    gets from the umask (``safetensors`` writes owner-only files).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it; restored at once
    os.umask(mask)
    return mask
