"""Confinement of the files that a checkpoint, a data file or a request names.

`confined` keeps a named file inside its folder: an absolute name, a '..' part or a symlink that leads out
is refused, as is a name that cannot be a file at all (a NUL byte, too long, a symlink loop).
`open_regular` opens a file for reading only if it is a regular one: a FIFO would block the read forever
and a device (/dev/zero) never end it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


class OutsideFolder(ValueError):
    """A named file that leads out of the folder it must stay in."""


def _unusable(name: str | Path, e: Exception) -> ValueError:
    """Why `name` cannot be opened or resolved, as a ValueError naming it (at most 200 characters of it)."""
    if isinstance(e, RuntimeError) or (isinstance(e, OSError) and e.errno == errno.ELOOP):
        reason = "a symlink loop"
    elif isinstance(e, OSError):  # ENAMETOOLONG and the like
        reason = e.strerror or str(e)
    else:  # os functions raise ValueError for an embedded NUL
        reason = "it contains a NUL byte" if "\0" in str(name) else str(e)
    return ValueError(f"{str(name)[:200]!r} is not a usable file name: {reason}")


def confined(folder: Path, name: str | Path, also_under: tuple[Path, ...] = (), allow_absolute: bool = False) -> Path:
    """`folder / name` with its symlinks resolved; OutsideFolder where it lies outside `folder` (and each of
    `also_under`), ValueError where it is no usable file name.

    `name` may be neither absolute nor hold a '..' part, even where it would resolve inside, unless
    `allow_absolute` (a `file://` URL): then only where it resolves decides."""
    try:
        relative = Path(name)
        if not allow_absolute and (relative.is_absolute() or ".." in relative.parts):
            raise OutsideFolder(f"{str(name)!r} lies outside the folder {folder}")
        target = (Path(folder) / relative).resolve()
        roots = [Path(folder).resolve(), *(r.resolve() for r in also_under)]
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, OutsideFolder):
            raise
        raise _unusable(name, e) from None
    if not any(target.is_relative_to(r) for r in roots):
        raise OutsideFolder(f"{str(name)!r} lies outside the folder {folder}")
    return target


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """`path` opened for binary reading; ValueError naming it (as `what`) unless it is a regular file.

    Opened non-blocking (a FIFO's open would wait for a writer) and checked on the open descriptor, so a
    file swapped for a FIFO between a check and the read is refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {_unusable(path, e)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"{what} {path} is {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def named_by_data_file(data_file: str | Path, name: str, media_root: str | Path | None = None) -> Path:
    """The file a data file's row names (an image): inside the data file's folder (relative to it, or an
    absolute path that lies there), or, where the user allowed `media_root`, anywhere under that folder.
    A downloaded data file may not make us open /etc/passwd or ../../secrets."""
    base = Path(data_file).parent
    if media_root is None:  # an absolute name (or one with '..') is fine where it still lands inside
        return confined(base, name, allow_absolute=True)
    root = Path(media_root).expanduser()
    relative = Path(name) if Path(name).is_absolute() else base / name
    try:
        return confined(root, relative, allow_absolute=True)
    except OutsideFolder:
        raise OutsideFolder(f"{str(name)!r} lies outside the allowed media path {root}") from None


def cache_dir() -> Path:
    """Where cultengine keeps what it builds or remembers between runs (the demo checkpoint, the default
    benchmark, file hashes): `$CULTENGINE_CACHE`, else ~/.cache/cultengine."""
    return Path(os.environ.get("CULTENGINE_CACHE") or Path.home() / ".cache" / "cultengine")
