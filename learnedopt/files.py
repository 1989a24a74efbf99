"""Writing a file so that a reader never sees a partial one: a temporary file beside it, then
``os.replace``."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None], *, unique: bool = False) -> None:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is ``<name>.tmp``, so that the next write replaces what a killed one left
    (``.<hash of name>.tmp`` where that name would be too long for the file system).
    With ``unique`` it is ``<name>.<pid>-<random>.tmp``, for a file that several processes may
    write at once (an evaluation's worker processes, a stale one among them): each renames a whole
    file of its own, where with one name a writer would rename a file another is still writing.

    ``path`` a folder, or in a folder that does not exist, is an OSError naming it, before any
    write. If ``write`` or the rename fails (a full disk), the temporary file is removed and the
    error raised; ``path`` is unchanged. The file gets the permissions a new file
    gets from the umask (``safetensors`` writes owner-only files). The temporary file's contents
    reach the disk (``fsync``) before the rename, and the rename before this returns (the folder's
    ``fsync``, where the OS allows it), so that an OS crash or power loss right after leaves the old
    file or the new one, not an empty one under the new name (a killed process cannot, either way).
    """
    path = Path(path)
    # before the write: safetensors' own error named only the temporary file (".../.tmpXb3k"), and
    # a folder took a whole file's write before its rename failed
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder: {path.parent} (to write {path.name} in)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file")
    tmp = path.with_name(_temporary_name(path, unique))
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _sync(tmp, os.O_RDWR)  # writable: Windows syncs only a handle that may write
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync(path.parent, getattr(os, "O_DIRECTORY", 0), required=False)


def _temporary_name(path: Path, unique: bool) -> str:
    """The name of :func:`write_atomically`'s temporary file for ``path``: ``<name>.tmp`` (or
    ``<name>.<pid>-<random>.tmp``), or where that is longer than the folder's file system takes
    (a legal name within a few bytes of its limit, which then could not be written at all),
    ``.<hash of name>.tmp`` (likewise): as fixed for a name as the long form."""
    suffix = f".{os.getpid()}-{secrets.token_hex(4)}.tmp" if unique else ".tmp"
    try:
        most = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no such limit
        most = 255
    if len(os.fsencode(path.name + suffix)) <= most:
        return path.name + suffix
    return "." + hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16] + suffix


def _sync(path: Path, flags: int, required: bool = True) -> None:
    """``fsync`` the file or folder ``path``. For a folder (``required=False``) a failure is
    ignored: Windows cannot open one, and some file systems refuse to sync one."""
    try:
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if required:
            raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it; restored at once
    os.umask(mask)
    return mask
