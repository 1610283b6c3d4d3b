"""Files: atomic writes, sha256 digests and paths that must stay inside a folder. No torch here, so
every room (targets, the on-device runtime) can use it without importing the training stack.

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary file in the same folder, flushes
it to disk and renames it onto ``path``: a reader sees the old file or the new one, never half of
one. While temporary a file has mode 0600 (another user of a shared machine cannot read a half
written model); the finished file gets the mode the process's umask implies (``0666 & ~umask``),
as ``open()`` would have given it.

``resolve_inside(root, rel)`` is the one check for every path a manifest or a checkpoint names: a
relative path (no ``..``, not absolute, no drive) whose real location, symlinks followed, is inside
``root``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable

from .errors import StdeployError


def umask() -> int:
    """The process's umask, read without changing it where Linux exposes it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # elsewhere: set and restore (not thread-safe, but only read here)
    os.umask(old)
    return old


def finished_mode(directory: bool = False) -> int:
    """The mode a file (0666) or folder (0777) created now would get from the umask."""
    return (0o777 if directory else 0o666) & ~umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a 0600 temporary file beside ``path``, flush it to disk, give it
    the umask's mode and rename it onto ``path``. Any error (a full disk included) removes the
    temporary file and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, finished_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class PathEscape(StdeployError):
    """A path named by a manifest or a checkpoint is absolute, climbs out with ``..`` or leads
    outside its folder through a symlink."""


def resolve_inside(root: str | os.PathLike, rel: object, what: str,
                   error: type[StdeployError] = PathEscape) -> Path:
    """The real path of ``root / rel``, refused (``error`` naming ``what``) unless ``rel`` is a
    non-empty relative string without ``..`` whose target, symlinks followed, lies inside ``root``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise error(f"{what} must be a non-empty relative path string, got {rel!r}")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive or rel.startswith("\\"):
        raise error(f"{what} = {rel!r} is an absolute path; only paths inside {root} are allowed")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise error(f"{what} = {rel!r} climbs out of its folder with '..'")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise error(f"{what} = {rel!r} leads outside {root} (to {target}, through a symlink)")
    return target


# ----------------------------------------------------------------------------- folder swap
_RENAME_EXCHANGE = 2
_libc = None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot (the caller then falls back to two renames)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
