"""Writing outputs without losing anything the user has: every file sentilens writes goes through here.

- :func:`check_output` refuses, in one line, an output that is one of the command's inputs, also
  through a symbolic link or a hard link (same device and inode), before anything is opened;
  :func:`path_problem` gives the accurate reason a path cannot be written (a name too long for
  the file system, a folder, a named pipe or device, a file where a folder should be, a read-only
  folder), so a FIFO is refused instead of blocking forever and ``/dev/full`` or ``/dev/null``
  is never opened, let alone renamed over.
- Whole files (:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_writer`,
  :func:`save_figure`) are written to a temporary file beside the target, flushed to disk and
  renamed over it: a reader sees the old file or the new one, never half of one, and a failed
  write (full disk, read-only file system, a file-size limit) is a one-line error that removes
  the temporary file and leaves the old file as it was (no 0-byte PNG).
- Growing files (:class:`RowAppender`, ``predict --output``) are appended to under an exclusive
  lock, so a second writer is refused in one line instead of interleaving rows; rows are written
  whole: a failed write cuts the file back to its last complete row and says how many are kept,
  so ``--resume`` continues from there once there is room.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sentilens.errors import SentilensError
from sentilens.jsonio import dumps

PATH_MAX = 4096
"""Linux's limit on a whole path, in bytes."""
NAME_MAX = 255
"""The limit on one name in a path, in bytes, where the file system cannot be asked (ext4, xfs, tmpfs, btrfs)."""


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is, in words ("a folder", "a named pipe (FIFO)"...); None for a
    regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def name_problem(path: str | Path) -> str | None:
    """Why the file system would refuse ``path``'s name (a part over its name limit, the whole over
    :data:`PATH_MAX`), else None."""
    path = Path(path)
    whole = len(os.fsencode(str(path)))
    if whole >= PATH_MAX:
        return f"the path is {whole} bytes long, over the {PATH_MAX}-byte limit"
    existing = next((p for p in path.parents if _exists(p)), Path("."))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = NAME_MAX
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            return f"a name in it is {size} bytes long, over the file system's limit of {limit}"
    return None


def _exists(path: Path) -> bool:
    """``path.exists()`` that is False, not an error, for a name the file system refuses (too long)."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def input_problem(path: str | Path, what: str = "a file", missing: str = "no such file") -> str | None:
    """Why ``path`` cannot be read as ``what`` (``missing`` when it does not exist; a folder, a FIFO, a device, a
    name too long), else None. A FIFO is never opened: reading one blocks until something writes to it."""
    problem = name_problem(path)
    if problem:
        return problem
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return missing
    except OSError as err:
        return f"cannot be opened ({err.strerror or err})"
    kind = file_kind(mode)
    return None if kind is None else f"is {kind}, not {what}"


def path_problem(path: str | Path, append: bool = False) -> str | None:
    """Why an output cannot be written at ``path``, in words, else None.

    Missing parent folders are no problem (the writers create them) unless a file stands where one
    should be, or the nearest existing one is read-only. ``append``: the file itself must be writable too
    (a whole-file write replaces it, which its folder's permission decides).
    """
    path = Path(path)
    problem = name_problem(path)
    if problem:
        return problem
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # the second: a file above it, named below
        mode = None
    except OSError as err:
        return f"cannot be written ({err.strerror or err})"
    if mode is not None:
        kind = file_kind(mode)
        if kind == "a folder":
            return "names a folder; give the path of a file to write"
        if kind is not None:
            return f"is {kind}, not a regular file: give the path of a file to write"
        if append and not os.access(path, os.W_OK):
            return "is read-only"
    for place in path.parents:
        if _exists(place):
            if not place.is_dir():
                return f"{place} is a file, so it cannot hold the output"
            if not os.access(place, os.W_OK | os.X_OK):
                return f"cannot be written: the folder {place} is read-only"
            break
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # follows symbolic links; hard links share device and inode
    except OSError:
        return a.resolve() == b.resolve()  # one does not exist (yet): the same only by name


def check_output(output: str | Path, *inputs: str | Path | None, append: bool = False) -> None:
    """A one-line :class:`SentilensError` when ``output`` cannot be written (:func:`path_problem`) or is one of
    ``inputs`` (None ones skipped), whatever links lead there."""
    output = Path(output)
    for source in inputs:
        if source is not None and _same_file(output, Path(source)):
            same = "" if Path(source) == output else f" (the same file as {source})"
            raise SentilensError(f"is also an input{same}: writing it would destroy what is read; give another "
                                 "output path", output)
    problem = path_problem(output, append=append)
    if problem:
        raise SentilensError(problem, output)


def write_error(err: OSError, path: str | Path, kept: str = "the file is as it was") -> SentilensError:
    """The one-line error of a failed write; ``kept`` says what is left."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return SentilensError(f"cannot write ({reason}); {kept}", path)


def _make_parents(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SentilensError(f"cannot create the folder {path.parent} ({err.strerror or err})", path) from None


def _mode_for(path: Path) -> int:
    """The permissions a rewritten file keeps: the old file's, else what a plain ``open`` would give (not
    ``mkstemp``'s 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        current = os.umask(0o022)
        os.umask(current)
        return 0o666 & ~current


@contextmanager
def atomic_writer(path: str | Path, binary: bool = False, fsync: bool = True) -> Iterator[IO]:
    """A file to write the whole of ``path`` into; renamed over ``path`` when the block ends without an error.

    The temporary file lies beside ``path`` (a rename never crosses file systems) and is removed on any
    failure. ``fsync``: flush to disk before the rename (off only for files regenerated from a seed)."""
    path = Path(path)
    check_output(path)
    if path.is_symlink():  # rewrite the file the link names; renaming over the link would replace the link
        path = Path(os.path.realpath(path))
        check_output(path)
    _make_parents(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=".tmp")
    except OSError as err:
        raise write_error(err, path) from None
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        _remove(temporary)
        raise write_error(err, path) from None
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` as the whole of ``path`` (see :func:`atomic_writer`)."""
    with atomic_writer(path, binary=True, fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8, the whole of ``path`` (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: object) -> Path:
    """``obj`` as indented strict JSON (:func:`sentilens.jsonio.dumps`), written whole."""
    return atomic_write_text(path, dumps(obj, indent=2, path=path) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[object]) -> Path:
    """One strict JSON row per line, written whole."""
    with atomic_writer(path) as f:
        for row in rows:
            f.write(dumps(row, path=path) + "\n")
    return Path(path)


def save_figure(fig, path: str | Path, **options) -> Path:
    """A matplotlib figure written whole (format from the suffix, PNG by default): a failed write leaves no
    0-byte or half-drawn image behind."""
    path = Path(path)
    with atomic_writer(path, binary=True) as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", **options)
    return path


class RowAppender:
    """Appends JSON rows to a file under an exclusive lock; use as a context manager.

    ``fresh``: the file is emptied once the lock is held (a new job), else rows are added to what is there
    (``--resume``). Each :meth:`write` appends whole rows: if the write fails, the file is cut back to the
    rows before it and the error says how many rows the file keeps.
    """

    def __init__(self, path: str | Path, fresh: bool):
        self.path = Path(path)
        self.fresh = fresh
        self.fd: int | None = None
        self.rows_before = 0

    def __enter__(self) -> RowAppender:
        check_output(self.path, append=not self.fresh)
        _make_parents(self.path)
        try:
            # O_NONBLOCK: a FIFO put there since the check would block the open; a regular file ignores it.
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise write_error(err, self.path) from None
        try:
            kind = file_kind(os.fstat(self.fd).st_mode)
            if kind is not None:
                raise SentilensError(f"is {kind}, not a regular file: give the path of a file to write", self.path)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SentilensError("is being written by another sentilens process; wait for it to finish, or "
                                     "write to another file", self.path) from None
            if self.fresh:
                os.ftruncate(self.fd, 0)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def write(self, rows: Iterable[object]) -> None:
        """Append ``rows`` (one strict JSON line each), all of them or none."""
        assert self.fd is not None, "RowAppender used outside its with block"
        data = "".join(dumps(row, path=self.path) + "\n" for row in rows).encode("utf-8")
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as err:
            try:
                os.ftruncate(self.fd, end)  # no half row: what was there before this write stays, whole
            except OSError:
                pass
            raise write_error(err, self.path, kept=self._kept(end)) from None

    def _kept(self, size: int) -> str:
        rows = offset = 0
        while offset < size:
            chunk = os.pread(self.fd, min(1 << 20, size - offset), offset)
            if not chunk:
                break
            rows += chunk.count(b"\n")
            offset += len(chunk)
        return (f"the {rows} complete rows written so far are kept: run again with --resume once the problem is "
                "fixed")
