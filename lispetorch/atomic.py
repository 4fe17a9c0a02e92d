"""Atomic file and directory writes: a crash leaves the previous version or the new one, never half of one.

A write goes to a hidden temporary beside its final place (``.NAME.XXXXXXXX.tmp``), which is then renamed over
it. While it is being written the temporary holds a shared ``flock``; a temporary that nobody holds is the
leftover of a writer that was killed, and the next write to the same place removes it. Files and directories
written here get the permissions the process's umask gives (like any file it creates), not the temporaries'
private ones. A write that fails (a full disk, a quota, no permission) raises :class:`~lispetorch.errors.WriteError`
naming the final path; the previous version stays and nothing is left under the final name.

:func:`write_manifest` / :func:`check_manifest`: a directory's file sizes and SHA-256 checksums, written last, so
that a reader can tell a complete directory from one cut short or changed since.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import WriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no locks, no clean-up of leftovers
    fcntl = None  # type: ignore[assignment]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = "lispetorch-manifest"


# --- permissions, locks, leftovers -----------------------------------------------------------------------------
def umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux's /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Gives the file ``path`` the permissions the umask gives a new file (for writers that make theirs private,
    as safetensors' ``save_file`` does)."""
    os.chmod(path, 0o666 & ~umask())


def _leftover_re(name: str) -> re.Pattern:
    """The names of this module's temporaries for ``name`` (tempfile's 8 random characters)."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(?:tmp|old)")


@contextlib.contextmanager
def _parent_lock(parent: Path, exclusive: bool) -> Iterator[bool]:
    """A lock on the directory that holds the temporaries: shared while a temporary is created and locked,
    exclusive (tried once, never waited for) while leftovers are removed, so that a temporary is never taken for a
    leftover between its creation and its lock. Yields whether it is held (not where the system has no locks or
    the directory cannot be opened; not exclusively while a temporary is created there, or while the directory is
    itself a temporary being written)."""
    fd, held = -1, False
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
            held = True
    try:
        yield held
    finally:
        if fd >= 0:
            os.close(fd)


def _lock(path: Path, fd: int | None = None) -> int:
    """A shared lock on the new temporary ``path`` (its open ``fd``, or a new one), held until the fd is closed: it
    tells a write in progress from a leftover. Shared, so that writing inside a temporary directory (which takes
    a shared lock on it as a parent) does not wait for itself."""
    if fd is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Removes the temporaries of writes to ``path`` that no live writer holds (those of a killed process).

    Returns:
        list[Path]: the temporaries removed.
    """
    path = Path(path)
    if fcntl is None or not path.parent.is_dir():
        return []
    pattern = _leftover_re(path.name)
    removed = []
    with _parent_lock(path.parent, exclusive=True) as held:
        if not held:
            return []
        try:
            names = [n for n in os.listdir(path.parent) if pattern.fullmatch(n)]
        except OSError:
            return []
        for n in names:
            p = path.parent / n
            try:
                fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # held: a write in progress
                continue
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
                removed.append(p)
            finally:
                os.close(fd)
    return removed


def _write_error(path: Path, e: OSError) -> WriteError:
    where = f" (writing {Path(e.filename).name})" if e.filename else ""
    err = WriteError(f"{path}: cannot be written: {e.strerror or e}{where}; nothing was written under that name "
                     "(a previous version, if any, is unchanged)")
    err.errno = e.errno  # only the number: with strerror or filename set, OSError would print those instead
    return err


# --- files ---------------------------------------------------------------------------------------------------
def _temporary(path: Path, directory: bool) -> tuple[int, Path]:
    """The one way a write starts: ``path``'s parent made, the leftovers of killed writers to ``path`` removed,
    then a new hidden temporary beside it (a file or a directory), locked before anyone can take it for a
    leftover. Returns ``(fd, temporary)``; the lock is held until ``fd`` is closed.

    Raises:
        WriteError: the parent or the temporary cannot be made (names ``path``).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from e
    remove_leftovers(path)
    try:
        with _parent_lock(path.parent, exclusive=False):
            if directory:
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
                return _lock(tmp), tmp
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            return _lock(Path(name), fd), Path(name)
    except OSError as e:
        raise _write_error(path, e) from e


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory, fsync, then rename.

    Raises:
        WriteError: the file cannot be written (names ``path``); the previous version is unchanged.
    """
    path = Path(path)
    fd, tmp = _temporary(path, directory=False)
    try:
        with os.fdopen(fd, "wb") as f:  # closing it releases the lock, once the rename is done
            os.fchmod(fd, 0o666 & ~umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _write_error(path, e) from e
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes` for UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


# --- directories ---------------------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directory entries (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _sync_tree(root: Path) -> None:
    """fsync every file under ``root`` and ``root`` itself, so that the rename publishes written data."""
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling directory to fill; on success it replaces ``path`` in one step.

    An existing ``path`` is exchanged atomically with the new directory where the system allows it (Linux),
    otherwise moved aside and removed after the new one is in place. If the body raises, ``path`` is untouched
    and the temporary directory is removed. Leftover temporaries of earlier writes to ``path`` whose writer was
    killed are removed first.

    Raises:
        WriteError: writing (the body's ``OSError``) or renaming failed; names ``path``, which is unchanged.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    lock, tmp = _temporary(path, directory=True)
    try:
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~umask())
            _sync_tree(tmp)
            if not path.exists():
                os.rename(tmp, path)
                return
            if _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
                return
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and not isinstance(e, WriteError):
                raise _write_error(path, e) from e
            raise
    finally:
        os.close(lock)


# --- manifests -----------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str | os.PathLike, name: str = MANIFEST_NAME) -> Path:
    """Writes ``directory/name``: the size and SHA-256 of every other file under ``directory``. Written last, it
    says that the directory is complete; :func:`check_manifest` tells whether it still is.

    Returns:
        Path: the manifest.
    """
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if rel != name and p.is_file():
            files[rel] = {"size": p.stat().st_size, "sha256": _digest(p)}
    out = directory / name
    write_text(out, json.dumps({"format": _MANIFEST_FORMAT, "version": 1, "files": files}, indent=1) + "\n")
    return out


def check_manifest(directory: str | os.PathLike, name: str = MANIFEST_NAME) -> str | None:
    """Why ``directory`` does not match its manifest (a file missing, cut short, changed or unreadable; the manifest
    missing, empty or malformed), or None when every file it lists is there with its size and checksum."""
    directory = Path(directory)
    mpath = directory / name
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        return f"it has no {name} (written last: the directory is incomplete, or older than manifests)"
    except OSError as e:
        return f"its {name} cannot be read ({e.strerror or e})"
    if not raw.strip():
        return f"its {name} is empty"
    try:
        manifest = json.loads(raw)
    except UnicodeDecodeError:
        return f"its {name} is not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"its {name} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
    except RecursionError:
        return f"its {name} is nested too deeply"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict) \
            or not files:
        return f"its {name} is not a manifest (a JSON object with format {_MANIFEST_FORMAT!r} and a files list)"
    for rel, want in files.items():
        if not isinstance(want, dict) or type(want.get("size")) is not int or not isinstance(want.get("sha256"), str):
            return f"its {name} has a malformed entry for {rel!r}"
        p = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            return f"its {name} lists {rel!r}, outside the directory"
        try:
            st = p.stat()
            if not stat.S_ISREG(st.st_mode):
                return f"{rel} is not a regular file"
            if st.st_size != want["size"]:
                return f"{rel} has {st.st_size} bytes where {name} says {want['size']} (cut short or grown)"
            if _digest(p) != want["sha256"]:
                return f"{rel} does not match its checksum in {name} (changed since it was written)"
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or e})"
    return None
