"""Incoming: the files pynetdicom's chunked receive streams each dataset into, in ``<data_dir>/incoming/``.

pynetdicom's DIMSE layer creates each C-STORE's file with ``dimse_messages.NamedTemporaryFile`` (a
module-level name) when ``_config.STORE_RECV_CHUNKED_DATASET`` is on, writes the file meta and the
data set's fragments into it, and after the C-STORE handler has run closes it and unlinks its name.
:func:`receive_into` has it create a :class:`ReceiveFile` in ``<data_dir>/incoming/`` instead (on the
file system of the instances, so the intake moves the file into place instead of copying it). A
write that fails is answered by the handler (:func:`receive_error`) rather than raised in
pynetdicom's reactor. The files an association leaves behind (it ended mid-dataset, or before its
handler ran) are removed when it ends (``node.transport.AssociationEnd``), and those a killed process
left are removed at start (:func:`remove_stale_incoming`).

This reaches into pynetdicom's internals: guarded by ``pynetdicom<4`` in pyproject.toml and by
``tests/test_pynetdicom_contract.py``.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pynetdicom import dimse_messages
from pynetdicom.dul import DULServiceProvider

INCOMING_DIR = "incoming"  # in data_dir: datasets being received (see ReceiveFile)
STALE_INCOMING_S = 3600.0  # files left in incoming/ (e.g. by a killed process) are removed at start after this


class FileTracker(Protocol):
    """What an association does with the files received on it (``node.transport.AssociationEnd``)."""

    def track(self, part: ReceiveFile) -> None: ...

    def forget(self, part: ReceiveFile) -> None: ...


_receive_errors: dict[str, OSError] = {}  # ReceiveFile.name -> the write error, taken by the handler


class ReceiveFile:
    """The file pynetdicom's chunked receive streams a dataset into, in ``folder``.

    Stands in for the ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` that pynetdicom
    makes (it uses ``name``, ``write``, ``file.flush`` and ``close``). The first failing write (e.g.
    ENOSPC) is recorded for the C-STORE handler (:func:`receive_error`) and later writes are dropped:
    raised in pynetdicom's DUL thread it would abort the association instead of being answered.
    pynetdicom unlinks ``name`` after the handler has run (the intake will have moved it by then).
    """

    def __init__(self, folder: Path) -> None:
        self.name = str(folder / f"{uuid.uuid4().hex}.part")
        self.file = self  # pynetdicom flushes through ``.file``
        self.error: OSError | None = None
        self._raw: BinaryIO | None = None
        owner = threading.current_thread()  # pynetdicom's DUL thread of the association receiving it
        # node.transport.BulkDULServiceProvider carries its association's tracker; pynetdicom's own DUL none
        self._end: FileTracker | None = (getattr(owner, "association_end", None)
                                         if isinstance(owner, DULServiceProvider) else None)
        if self._end is not None:
            self._end.track(self)  # removed when the association ends, unless handled (closed) before
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._raw = open(self.name, "xb", buffering=0)  # noqa: SIM115 - closed by pynetdicom via close()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        _receive_errors[self.name] = exc

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view and self._raw is not None and self.error is None:
            try:
                view = view[self._raw.write(view):]
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        """Nothing to do: writes are unbuffered."""

    def close(self) -> None:
        """Close the file: pynetdicom does so after the C-STORE handler ran, then unlinks ``name``."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._end is not None:
            self._end.forget(self)

    def discard(self) -> bool:
        """Close and remove the file unless it was moved into place; whether there was one to remove."""
        self.close()
        _receive_errors.pop(self.name, None)
        try:
            Path(self.name).unlink()
        except FileNotFoundError:
            return False
        return True


def receive_into(folder: Path) -> None:
    """Have pynetdicom's chunked receive (process-wide) create its files in ``folder`` (see ReceiveFile)."""
    def named_temporary_file(*args: Any, **kwargs: Any) -> ReceiveFile:
        return ReceiveFile(folder)

    dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[assignment]


def receive_error(payload: bytes | Path) -> OSError | None:
    """The error a :class:`ReceiveFile` met while the dataset was being received, if any."""
    return None if isinstance(payload, bytes) else _receive_errors.pop(str(payload), None)


def remove_stale_incoming(folder: Path, older_than_s: float = STALE_INCOMING_S) -> int:
    """Remove what aborted associations left in ``folder`` (older than ``older_than_s``); how many."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in folder.glob("*.part") if folder.is_dir() else ():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed

