"""Uploaded images: checked with the one image loader, then kept as files only while their request lives.

Predictors read ``Post.image`` as a path, so each accepted upload is written, as received, to
the server's own folder (``mkdtemp``: readable by this user only) under a random name, and deleted
when its request ends, answered or not; the folder goes when the server stops. Before that,
:func:`check_image` decodes it through :func:`sentilens.data.images.load_image` with the server's
limits. The loader says which rule refused an image (``ImageError.kind``): 413 over the byte or
pixel cap, 415 for a format outside the allow-list, 422 for an extreme aspect ratio or a corrupt
(or empty) file.

A server that is killed (SIGKILL, the OOM killer) cannot remove its folder, so each folder holds a
marker naming its server's process id, start time and PID namespace, and a starting server removes
the folders of servers that are gone: only folders named like its own, owned by this user, not
symbolic links, whose marker names a process of this PID namespace that no longer runs (or a reused
id: another start time). A folder without a readable marker, of a live server, or of another
namespace (a container sharing the temporary folder) is never touched.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from sentilens.data.images import ImageError, ImageLimits, load_image
from sentilens.data.records import Post
from sentilens.serve.errors import ApiError

STATUS = {"too_large": (413, "payload_too_large"), "too_many_pixels": (413, "too_many_pixels"),
          "unsupported": (415, "unsupported_image"), "extreme_aspect_ratio": (422, "extreme_aspect_ratio")}
"""HTTP status and error code of each kind of loader refusal; any other kind is a corrupt image (422)."""


def check_image(data: bytes, limits: ImageLimits, field: str) -> None:
    """Decode ``data`` fully (as the predictor will); raise the fitting :class:`ApiError` if it cannot be used."""
    try:
        load_image(data, limits)
    except ImageError as err:
        status, code = STATUS.get(err.kind, (422, "corrupt_image"))
        raise ApiError(status, code, f"{field}: {err.problem}", field) from None


PREFIX = "sentilens-serve-"
MARKER = "server.pid"


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where /proc cannot say."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]  # field 22; the name before ')' may hold spaces


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return started is None or process_start(pid) in (None, started)


def pid_namespace() -> str:
    """This process's PID namespace ('-' where /proc cannot say): a process id means something only inside it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"


def marker_text() -> str:
    pid = os.getpid()
    return f"{pid} {process_start(pid) or '-'} {pid_namespace()}\n"


def dead_server_folders(parent: Path) -> list[Path]:
    """Upload folders in ``parent`` left by servers of this user that no longer run (see module doc)."""
    dead = []
    here = pid_namespace()
    for folder in parent.glob(PREFIX + "*"):
        try:
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            pid_text, started, namespace = (folder / MARKER).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if namespace != here:
            continue  # a server in another container sharing this folder: its ids are not ours to check
        if pid > 0 and not process_alive(pid, None if started == "-" else started):
            dead.append(folder)
    return dead


class UploadStore:
    """The server's private folder holding the images of the requests in flight."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = Path(parent or tempfile.gettempdir())
        for folder in dead_server_folders(parent):
            shutil.rmtree(folder, ignore_errors=True)
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        staged = self.root / f".{MARKER}.tmp"
        staged.write_text(marker_text())
        staged.replace(self.root / MARKER)  # a sweeper sees a whole marker or none

    def store(self, posts: Sequence[tuple[str, str, bytes | None]]) -> list[Post]:
        """``(id, text, image bytes)`` -> posts whose images are files here; pair with :meth:`release`."""
        stored: list[Post] = []
        try:
            for post_id, text, image in posts:
                path = None if image is None else self.root / f"{uuid.uuid4().hex}.upload"
                stored.append(Post(id=post_id, text=text, image=None if path is None else str(path)))
                if path is not None:
                    path.write_bytes(image)
        except BaseException:
            self.release(stored)
            raise
        return stored

    def release(self, posts: Sequence[Post]) -> None:
        for post in posts:
            if post.image is not None:
                Path(post.image).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
