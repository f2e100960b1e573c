"""Console users: roles, argon2id password hashes, logins with a lockout after repeated failures.

Roles: ``admin`` changes settings, retries and discards work; ``viewer`` reads everything the console shows (no
patient values anywhere) and changes nothing. Passwords are hashed with argon2id (``argon2-cffi``, its default
parameters, RFC 9106's second recommended option); a hash made with weaker parameters is replaced at the next good
login. ``LOCK_AFTER`` failed logins in a row lock the name for ``LOCK_S`` seconds (each further failure restarts
that time); every login and failed login is in the audit trail. An unknown name costs the same hash time as a known
one, so the answer does not tell which names exist.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
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

__all__ = ["LOCK_AFTER", "LOCK_S", "ROLES", "DuplicateUser", "LoginResult", "UserError", "add_user", "check_login"]


class UserError(ValueError):
    """A user that cannot be created as asked (name, role or password)."""


@dataclass(frozen=True)
class LoginResult:
    """A login's outcome: the user when it succeeded, else why not (``locked``: the name is locked)."""

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


def check_login(store: Store, name: str, password: str, audit: AuditTrail | None = None,
                address: str = "", now: dt.datetime | None = None) -> LoginResult:
    """Verify a name and password; counts failures and locks (see the module's doc); audited."""
    found = store.user_hash(name)
    if found is None:
        _verify(_DUMMY_HASH, password)
        result = LoginResult(None, "unknown user or wrong password")
    else:
        user, hashed = found
        now = now or store.clock()
        if user.locked_until is not None and user.locked_until > now:
            _verify(_DUMMY_HASH, password)
            store.record_login(name, False, LOCK_AFTER, LOCK_S)
            result = LoginResult(None, f"locked after {LOCK_AFTER} failed logins", locked=True)
        elif _verify(hashed, password):
            store.record_login(name, True, LOCK_AFTER, LOCK_S)
            if _HASHER.check_needs_rehash(hashed):
                store.rehash(name, hash_password(password))
            result = LoginResult(user)
        else:
            after = store.record_login(name, False, LOCK_AFTER, LOCK_S)
            locked = after is not None and after.locked_until is not None
            result = LoginResult(None, "unknown user or wrong password" + (
                f"; locked for {LOCK_S:.0f} s after {LOCK_AFTER} failed logins" if locked else ""), locked=locked)
    if audit is not None:
        audit.record("login", "success" if result.user else "failure", name[:64], address,
                     **({} if result.user else {"reason": result.reason}))
    return result


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
