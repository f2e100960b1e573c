"""The outbox of the store: results due for delivery per destination, claims and delivery outcomes."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import (
    OUTBOX_FAILED,
    OUTBOX_PENDING,
    OUTBOX_REJECTED,
    OUTBOX_SENT,
    OutboxItem,
    Result,
)
from storage.records import OutboxEntry, clip_error
from storage.store_base import StoreBase

log = logging.getLogger("storage.queue")  # the queue's log lines keep their logger name


class OutboxStore(StoreBase):
    """The outbox methods of ``storage.queue.Store``."""

    def due_outbox(
        self, now: dt.datetime | None = None, limit: int = 100, claim_s: float = 0.0, owner: str | None = None
    ) -> list[OutboxEntry]:
        """Outbox entries (pending or failed-retryable) whose ``next_attempt_at`` has come.

        Args:
            now: the time to compare with (None: the store's clock).
            limit: at most this many, oldest due first.
            claim_s: when > 0, push the returned entries' ``next_attempt_at`` to now + ``claim_s`` in
                the same transaction, so that other processes sharing the queue do not send them
                too; ``mark_*`` then sets the real outcome. A crashed sender's entries fall due again.
        """
        now = now or self.clock()
        with self._tx("due_outbox", read_only=claim_s <= 0) as s:
            rows = s.execute(
                select(OutboxItem, Result)
                .join(Result, OutboxItem.result_id == Result.id)
                .where(OutboxItem.state.in_((OUTBOX_PENDING, OUTBOX_FAILED)))
                .where(OutboxItem.next_attempt_at <= now)
                .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=OutboxItem)
            ).all()
            entries = [
                OutboxEntry(
                    id=item.id, destination=item.destination, result_id=res.id, kind=res.kind,
                    sop_instance_uid=res.sop_instance_uid, path=Path(res.path), state=item.state,
                    attempts=item.attempts, next_attempt_at=item.next_attempt_at, last_error=item.last_error,
                )
                for item, res in rows
            ]
            if claim_s > 0:
                for item, _res in rows:
                    item.next_attempt_at = now + dt.timedelta(seconds=claim_s)
                    item.claimed_by = owner
            return entries

    def _outbox_item(self, s: Session, outbox_id: int, what: str) -> OutboxItem:
        item = s.get(OutboxItem, outbox_id, with_for_update=True)
        if item is None:
            raise ValueError(f"{what}: outbox entry {outbox_id} not found")
        return item

    def mark_sent(self, outbox_id: int) -> None:
        """Record a successful delivery."""
        now = self.clock()
        with self._tx("mark_sent") as s:
            item = self._outbox_item(s, outbox_id, "mark_sent")
            item.state, item.sent_at, item.updated_at, item.claimed_by = OUTBOX_SENT, now, now, None
            item.attempts += 1
            item.last_error = None

    def mark_send_failed(self, outbox_id: int, error: str, retry_at: dt.datetime) -> int:
        """Record a retryable delivery failure; the entry falls due again at ``retry_at``.

        An entry already sent (by a concurrent sender) stays sent.

        Returns:
            The number of attempts so far.
        """
        with self._tx("mark_send_failed") as s:
            item = self._outbox_item(s, outbox_id, "mark_send_failed")
            if item.state == OUTBOX_SENT:
                return item.attempts
            item.state, item.next_attempt_at, item.claimed_by = OUTBOX_FAILED, retry_at, None
            item.attempts += 1
            item.last_error, item.updated_at = clip_error(error), self.clock()
            return item.attempts

    def mark_rejected(self, outbox_id: int, error: str) -> None:
        """Record a permanent refusal by the destination; the entry is never retried."""
        with self._tx("mark_rejected") as s:
            item = self._outbox_item(s, outbox_id, "mark_rejected")
            if item.state == OUTBOX_SENT:
                return
            item.state, item.claimed_by = OUTBOX_REJECTED, None
            item.attempts += 1
            item.last_error, item.updated_at = clip_error(error), self.clock()

    def release_claims(self, owner_is_dead: Callable[[str], bool]) -> int:
        """Make outbox entries claimed by senders that no longer exist due now (not after the claim runs out).

        Args:
            owner_is_dead: judge of claim owners (e.g. a process of this host that no longer exists).

        Returns:
            The number of entries released.
        """
        now = self.clock()
        with self._tx("release_claims") as s:
            items = s.scalars(
                select(OutboxItem)
                .where(OutboxItem.claimed_by.is_not(None), OutboxItem.state.in_((OUTBOX_PENDING, OUTBOX_FAILED)))
                .with_for_update(skip_locked=True)
            ).all()
            released = [item for item in items if owner_is_dead(str(item.claimed_by))]
            for item in released:
                log.warning("outbox %d: claim of %s released (sender gone)", item.id, item.claimed_by)
                item.next_attempt_at, item.claimed_by, item.updated_at = now, None, now
            return len(released)
