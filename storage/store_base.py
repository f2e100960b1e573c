"""What every part of the store shares: the engine, the clock, the attempt limit and one transaction a call."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ai.errors import RetryableError
from storage.db import utcnow


class StoreBase:
    """The engine and the transactions of ``storage.queue.Store`` (its arguments are documented there)."""

    def __init__(
        self, engine: Engine, *, max_attempts: int = 5, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, found {max_attempts}")
        self.engine = engine
        self.max_attempts = max_attempts
        self.clock = clock
        self._write = sessionmaker(engine, expire_on_commit=False)
        self._read = sessionmaker(engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False)

    @contextmanager
    def _tx(self, what: str, read_only: bool = False) -> Iterator[Session]:
        """One transaction; transient database errors become ``RetryableError``."""
        maker = self._read if read_only else self._write
        try:
            with maker.begin() as session:
                yield session
        except OperationalError as exc:
            raise RetryableError(f"database unavailable in {what}: {exc.orig}") from exc
