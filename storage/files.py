"""Storage step: durable files on disk (atomic writes, where received instances and results live)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_UID_CHARS = re.compile(r"[^0-9.]")

Writer = Callable[[BinaryIO], object]


class DiskFull(OSError):  # noqa: N818 - the name is fixed in docs/contracts.md
    """The file system is full (ENOSPC) or the quota is exhausted (EDQUOT)."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsync'ing each parent so the new entries persist."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent writer made it first
            path.mkdir()
        _fsync_dir(path.parent)


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
        if isinstance(exc, OSError) and not isinstance(exc, DiskFull) and exc.errno in _DISK_FULL_ERRNOS:
            raise DiskFull(exc.errno, f"disk full while writing {final}: {exc.strerror}", str(final)) from exc
        raise
    return final


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
