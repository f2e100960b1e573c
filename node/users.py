"""Console users: roles, argon2id password hashes, logins with a lockout after repeated failures.

Roles: ``admin`` changes settings, retries and discards work; ``viewer`` reads everything the console shows (no
patient values anywhere) and changes nothing. Passwords are hashed with argon2id (``argon2-cffi``, its default
parameters, RFC 9106's second recommended option); a hash made with weaker parameters is replaced at the next good
login. ``LOCK_AFTER`` failed logins in a row lock the name for ``LOCK_S`` seconds; attempts while it is locked are
refused without a hearing and do not extend it (else anyone could keep an administrator locked out for good); after
it, the count starts afresh. Guesses for one name are judged one at a time. Logins of the page and every failure are
in the audit trail. An unknown name costs the same hash time and locks the same way as a known one (counted in
memory), so answers do not tell which names exist. ``cxr-node users unlock`` and ``passwd`` help a locked-out
administrator.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from node.audit import AuditTrail
from storage.queue import DuplicateUser, Store
from storage.records import UserRecord

log = logging.getLogger(__name__)

ROLES = ("admin", "viewer")
LOCK_AFTER = 5
LOCK_S = 300.0
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 10
_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))  # verified for unknown names: the same time as a known one

__all__ = ["LOCK_AFTER", "LOCK_S", "ROLES", "DuplicateUser", "LoginResult", "UserError", "add_user", "check_login",
           "set_password"]


class UserError(ValueError):
    """A user that cannot be created as asked (name, role or password)."""


@dataclass(frozen=True)
class LoginResult:
    """A login's outcome: the user when it succeeded, else why not. ``locked``: refused unheard because the name
    is locked (HTTP 429); the wrong password that sets the lock was heard, so it answers as a failed login (401) whose
    reason says the lock began, for known and unknown names alike."""

    user: UserRecord | None
    reason: str = ""
    locked: bool = False


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def add_user(store: Store, name: str, role: str, password: str, audit: AuditTrail | None = None,
             by: str = "command line") -> None:
    """Create a user.

    Raises:
        UserError: a bad name, an unknown role or a password shorter than ``MIN_PASSWORD``.
        DuplicateUser: the name is taken.
    """
    if not NAME_RE.match(name):
        raise UserError(f"user name: expected 1-64 letters, digits or _.@-, found {name!r}")
    if role not in ROLES:
        raise UserError(f"role: expected one of {', '.join(ROLES)}, found {role!r}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password: expected at least {MIN_PASSWORD} characters, found {len(password)}")
    store.add_user(name, role, hash_password(password))
    if audit is not None:
        audit.record("user_added", "success", by, user=name, role=role)


_NAME_LOCKS: dict[str, threading.Lock] = {}
_NAME_LOCKS_GUARD = threading.Lock()
_UNKNOWN: dict[str, tuple[int, float]] = {}  # unknown names: failures in a row, locked until (time.time())
MAX_UNKNOWN = 10_000


def _name_lock(name: str) -> threading.Lock:
    """One lock per name: concurrent guesses for a name are judged one after the other, so none passes a check
    that an earlier failure would have locked."""
    with _NAME_LOCKS_GUARD:
        if len(_NAME_LOCKS) > MAX_UNKNOWN:
            _NAME_LOCKS.clear()
        return _NAME_LOCKS.setdefault(name, threading.Lock())


def check_login(store: Store, name: str, password: str, audit: AuditTrail | None = None,
                address: str = "", now: dt.datetime | None = None, audit_success: bool = True) -> LoginResult:
    """Verify a name and password (see the module's doc for the lockout); failures are audited, successes when
    ``audit_success`` (a login of the page, not every API request with Basic credentials)."""
    with _name_lock(name):
        result = _check(store, name, password, now or store.clock())
    if audit is not None and (result.user is None or audit_success):
        actor = name if NAME_RE.match(name) else "(not a valid user name)"  # no control characters in the trail
        audit.record("login", "success" if result.user else "failure", actor, address,
                     **({} if result.user else {"reason": result.reason}))
    return result


def _check(store: Store, name: str, password: str, now: dt.datetime) -> LoginResult:
    found = store.user_hash(name)
    if found is None:
        return _check_unknown(name, password)
    user, hashed = found
    if user.locked_until is not None and user.locked_until > now:  # refused unheard; the lock is not extended
        _verify(_DUMMY_HASH, password)
        return LoginResult(None, f"locked after {LOCK_AFTER} failed logins", locked=True)
    if user.locked_until is not None:  # the lock ran out: a fresh count
        store.unlock_user(name)
    if _verify(hashed, password):
        if user.failed_logins or user.locked_until is not None:
            store.record_login(name, True, LOCK_AFTER, LOCK_S)
        if _HASHER.check_needs_rehash(hashed):
            store.rehash(name, hash_password(password))
        return LoginResult(user)
    after = store.record_login(name, False, LOCK_AFTER, LOCK_S)
    locked = after is not None and after.locked_until is not None
    return LoginResult(None, "unknown user or wrong password" + (
        f"; locked for {LOCK_S:.0f} s after {LOCK_AFTER} failed logins" if locked else ""))


def _check_unknown(name: str, password: str) -> LoginResult:
    """An unknown name answers as a known one would, lockout included, so answers do not tell which names exist."""
    _verify(_DUMMY_HASH, password)
    count, until = _UNKNOWN.get(name, (0, 0.0))
    clock = time.time()
    if until > clock:
        return LoginResult(None, f"locked after {LOCK_AFTER} failed logins", locked=True)
    if until:
        count = 0
    count += 1
    if len(_UNKNOWN) > MAX_UNKNOWN:
        _UNKNOWN.clear()
    _UNKNOWN[name] = (count, clock + LOCK_S if count >= LOCK_AFTER else 0.0)
    return LoginResult(None, "unknown user or wrong password" + (
        f"; locked for {LOCK_S:.0f} s after {LOCK_AFTER} failed logins" if count >= LOCK_AFTER else ""))


def set_password(store: Store, name: str, password: str) -> None:
    """Replace a user's password (and unlock it).

    Raises:
        UserError: no such user, or a password shorter than ``MIN_PASSWORD``.
    """
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password: expected at least {MIN_PASSWORD} characters, found {len(password)}")
    if not store.set_password(name, hash_password(password)):
        raise UserError(f"no user named {name!r}")


FIRST_ADMIN = "admin"
FIRST_PASSWORD_FILE = "initial-admin-password"


def first_admin(store: Store, data_dir: Path, audit: AuditTrail | None = None) -> Path | None:
    """With no user at all, create ``admin`` with a random password written to ``<data_dir>/initial-admin-password``
    (mode 0600, for whoever can read the node's files) and say where in the log; the password itself is never
    logged. Returns that file's path, or None when users exist already."""
    if store.users():
        return None
    password = secrets.token_urlsafe(18)
    path = data_dir / FIRST_PASSWORD_FILE
    path.unlink(missing_ok=True)  # made anew, owner-only, never through a link someone left there
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    try:
        add_user(store, FIRST_ADMIN, "admin", password, audit, by="first start")
    except DuplicateUser:  # another process made it first
        path.unlink(missing_ok=True)
        return None
    log.warning("console: no users, so user %r (role admin) was created; its password is in %s (readable by the "
                "node's user only). Log in, then replace it: cxr-node users add NAME --role admin --password-stdin, "
                "cxr-node users remove admin", FIRST_ADMIN, path)
    return path


def _verify(hashed: str, password: str) -> bool:
    try:
        return bool(_HASHER.verify(hashed, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
