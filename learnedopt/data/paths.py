"""Where the data readers look for files when no path is given, and the output folders the
commands write to."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "LEARNEDOPT_DATA"


def _repo_sibling_root() -> Path | None:
    """``<dir>/shared/data`` for a source checkout at ``<dir>/<repo>/learnedopt/`` (one with
    ``pyproject.toml`` beside the package, as an editable install is), else None: an installed
    package's ``<dir>`` is a folder of the Python installation or virtual environment
    (``<venv>/lib/python3.X``), no place for data."""
    package = Path(__file__).resolve().parent.parent  # .../learnedopt
    if not (package.parent / "pyproject.toml").is_file():
        return None
    return package.parent.parent / "shared" / "data"


def _cwd_root() -> Path:
    """``../shared/data`` from the working directory, resolved."""
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def _searched() -> str:
    """The folders :func:`default_data_root` looks in after ``LEARNEDOPT_DATA``, each named by
    its exact path, for error messages."""
    repo_root = _repo_sibling_root()
    beside = (f"{repo_root} (shared/data beside the source checkout)" if repo_root is not None
              else "no shared/data beside the repository, since learnedopt is installed, not a source checkout")  # fmt: skip
    return f"{_cwd_root()} (../shared/data from the working directory); {beside}"


def default_data_root() -> Path | None:
    """The data root used when a loader is given no path, or None when there is none.

    In order: the directory named by the environment variable ``LEARNEDOPT_DATA`` (returned
    even if it does not exist, so that a wrong setting is reported rather than ignored);
    ``../shared/data`` relative to the current working directory if it exists; for a source
    checkout (``pyproject.toml`` beside the ``learnedopt`` package), the folder ``shared/data``
    beside the repository (``<dir>/shared/data`` for ``<dir>/<repo>/``) if it exists. An
    installed package has no repository, and so no such folder to look in.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    cwd_root = _cwd_root()
    if cwd_root.is_dir():
        return cwd_root
    repo_root = _repo_sibling_root()
    if repo_root is not None and repo_root.is_dir():
        return repo_root
    return None


def resolve_data_dir(path: str | os.PathLike[str] | None, subdir: str) -> Path:
    """``path`` if given (the folder itself, or a data root holding ``subdir/``), else
    ``default_data_root() / subdir``; it must be an existing directory.

    Raises:
        FileNotFoundError: the directory is missing, or ``path`` is a file (the message names
            where it looked and the ``LEARNEDOPT_DATA`` environment variable, with its value and
            what is wrong with it where it is set: a file, missing, or without ``subdir/``).
    """
    if path is not None:
        directory = Path(path).expanduser()
        if directory.is_file():
            raise FileNotFoundError(
                f"data directory {str(directory)!r} is a file: pass the folder that holds it"
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"data directory {str(directory)!r} does not exist")
        return directory / subdir if (directory / subdir).is_dir() else directory
    root = default_data_root()
    if root is None:
        raise FileNotFoundError(
            f"no data root found for {subdir!r}: set {DATA_ENV_VAR} to a folder containing "
            f"{subdir}/, or pass the directory explicitly (looked in {_searched()})"
        )
    directory = root / subdir
    env = os.environ.get(DATA_ENV_VAR)
    if env and not directory.is_dir():  # name the setting the user made, not only the folder it led to
        problem = ("is a file, not a folder" if root.is_file() else "does not exist" if not root.is_dir()
                   else f"holds no {subdir}/ folder")  # fmt: skip
        raise FileNotFoundError(
            f"{DATA_ENV_VAR}={env} {problem}: set {DATA_ENV_VAR} to a folder containing {subdir}/, "
            "or pass the directory explicitly"
        )
    if not directory.is_dir():
        raise FileNotFoundError(
            f"data directory {str(directory)!r} does not exist: set {DATA_ENV_VAR} to a folder "
            f"containing {subdir}/, or pass the directory explicitly"
        )
    return directory


def create_output_folder(out: str | os.PathLike[str]) -> Path:
    """Create the folder ``out`` (and its parents) now, so that one that cannot be written fails
    before any work is done; returns it.

    Raises:
        ValueError: ``out`` is a file, cannot be created, or is not writable (the message names it).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    return out

