"""Storage step: durable files on disk (atomic writes, where received instances and results live)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_UID_CHARS = re.compile(r"[^0-9.]")
_COPY_CHUNK = 1 << 20

Writer = Callable[[BinaryIO], object]


class DiskFull(OSError):  # noqa: N818 - the name is fixed in docs/contracts.md
    """The file system is full (ENOSPC) or the quota is exhausted (EDQUOT)."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_unsynced_dirs: dict[Path, int] = {}  # folder -> writers of this process making it, its parent not fsync'd yet
_unsynced_lock = threading.Lock()


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsync'ing each parent so the new entries persist.

    A folder another thread of this process has just made counts as missing until that thread has
    fsync'd its parent: a writer that finds it must not report its own file durable before then.
    """
    missing: list[Path] = []
    current = folder
    while True:
        with _unsynced_lock:
            unsynced = current in _unsynced_dirs
        if not unsynced and current.exists():
            break
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with _unsynced_lock:
            _unsynced_dirs[path] = _unsynced_dirs.get(path, 0) + 1
        try:
            with contextlib.suppress(FileExistsError):  # a concurrent writer made it first
                path.mkdir()
            _fsync_dir(path.parent)
        finally:
            with _unsynced_lock:
                if _unsynced_dirs[path] == 1:
                    del _unsynced_dirs[path]
                else:
                    _unsynced_dirs[path] -= 1


def write_atomic(path: str | Path, data: bytes | Writer) -> Path:
    """Write a file so that it is either absent or complete, and durable once this returns.

    A temporary file in the same folder is written, flushed and fsync'd, renamed over ``path``
    (``os.replace``), and the folder is fsync'd. On any error the temporary file is removed and
    the error re-raised; nothing is left at ``path`` that was not there before.

    Args:
        path: the final file path (missing folders are created).
        data: the bytes, or a callable that writes to the binary file object it is given.

    Returns:
        The final path.

    Raises:
        DiskFull: the file system or quota is full (errno ENOSPC/EDQUOT).
        OSError: any other I/O error; whatever the writer callable raises.
    """
    final = Path(path)
    folder = final.parent
    tmp = folder / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        _make_dirs(folder)
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _raise_disk_full(exc, final)
        raise
    return final


def _raise_disk_full(exc: BaseException, final: Path) -> None:
    """Raise ``DiskFull`` (from ``exc``) when ``exc`` is an ENOSPC/EDQUOT ``OSError``; else return."""
    if isinstance(exc, OSError) and not isinstance(exc, DiskFull) and exc.errno in DISK_FULL_ERRNOS:
        raise DiskFull(exc.errno, f"disk full while writing {final}: {exc.strerror}", str(final)) from exc


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync through any descriptor flushes the file's data (Linux, POSIX)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_atomic(src: str | Path, path: str | Path) -> Path:
    """Move a complete file to ``path`` so that it is durable once this returns, without copying its data.

    The same guarantees as :func:`write_atomic` for a file that is already written (e.g. a received
    dataset streamed to disk): ``src`` is fsync'd, renamed over ``path`` (``os.replace``, atomic) and
    the folder of ``path`` is fsync'd (:func:`move_into_place` + :func:`fsync_dirs`). ``src`` must be
    on the same file system as ``path`` for the data not to be written twice; when it is not (EXDEV), it
    is copied with :func:`write_atomic` and left where it is.

    Args:
        src: the complete file (no one may write to it any more).
        path: the final file path (missing folders are created).

    Returns:
        The final path.

    Raises:
        DiskFull: the file system or quota is full (errno ENOSPC/EDQUOT).
        OSError: any other I/O error; before the rename, ``src`` is left as it was and ``path`` untouched.
    """
    final = Path(path)
    fsync_dirs(move_into_place(src, final), final)
    return final


def move_into_place(src: str | Path, path: str | Path) -> list[Path]:
    """The first half of :func:`move_atomic`: fsync ``src``, create missing folders, rename it to ``path``.

    Once this returns the complete file is visible at ``path`` and its data is durable; the rename
    (and any new folder) is durable only once :func:`fsync_dirs` has run on the folders returned. A
    caller may do other durable work meanwhile (e.g. commit a database row in another thread): each
    fsync costs a device cache flush, and concurrent flushes overlap (measured: bench/README.md,
    "What was changed to get here", item 2).

    Returns:
        The folders to fsync (empty when ``src`` was copied across file systems: already durable).

    Raises:
        DiskFull, OSError: as :func:`move_atomic`.
    """
    source, final = Path(src), Path(path)
    try:
        _fsync_file(source)
        _make_dirs(final.parent)
        try:
            os.replace(source, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            write_atomic(final, lambda dst: _copy(source, dst))  # durable, folder included
            return []
    except OSError as exc:
        _raise_disk_full(exc, final)
        raise
    return [final.parent]


def fsync_dirs(folders: list[Path], final: Path | None = None) -> None:
    """fsync each folder so that the entries made in it persist (see :func:`move_into_place`).

    Raises:
        DiskFull: the file system reports ENOSPC/EDQUOT (naming ``final`` when given).
        OSError: any other I/O error.
    """
    try:
        for folder in dict.fromkeys(folders):
            _fsync_dir(folder)
    except OSError as exc:
        _raise_disk_full(exc, final or folders[0])
        raise


def _copy(source: Path, dst: BinaryIO) -> None:
    with source.open("rb") as f:
        shutil.copyfileobj(f, dst, _COPY_CHUNK)


def safe_uid(uid: str) -> str:
    """A UID made safe as a file name: only digits and dots, no leading/trailing dot.

    A valid UID is returned unchanged. An invalid one keeps its digits and dots and gets a
    numeric suffix derived from its full text, so two different invalid UIDs never share a file.

    Raises:
        ValueError: the UID is empty.
    """
    text = uid.strip().rstrip("\x00")
    if not text:
        raise ValueError(f"UID: expected digits and dots, found {uid!r}")
    clean = _NOT_UID_CHARS.sub("", text).strip(".")
    if clean == text:
        return clean
    digest = int(hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12], 16)
    return f"{clean}.{digest}" if clean else str(digest)


def instance_path(data_dir: str | Path, study_uid: str, sop_uid: str) -> Path:
    """Where a received instance is stored: ``<data_dir>/instances/<study>/<sop>.dcm``."""
    return Path(data_dir) / "instances" / safe_uid(study_uid) / f"{safe_uid(sop_uid)}.dcm"


def result_path(data_dir: str | Path, study_uid: str, sop_uid: str) -> Path:
    """Where a produced result (SR, SC) is stored: ``<data_dir>/results/<study>/<sop>.dcm``."""
    return Path(data_dir) / "results" / safe_uid(study_uid) / f"{safe_uid(sop_uid)}.dcm"


def free_bytes(path: str | Path) -> int:
    """Bytes available to this process on the file system of ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize
