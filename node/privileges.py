"""Privileges: bind the SCP port while privileged, then run as the configured unprivileged user.

A node started as root (to bind DICOM's port 104, or by a service manager) binds its listening
socket first, then switches to ``service.user`` (and ``service.group``, default the user's primary
group) before it opens the database, reads a received file or loads a model: every file it creates
belongs to that user, and a flaw in a decoder or in the network stack cannot act as root. The
switch is checked: after it, regaining root must fail. A node started as an ordinary user cannot
switch; it runs on if it already is ``service.user`` and refuses to start otherwise.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class PrivilegeError(RuntimeError):
    """The configured user or group cannot be used, or the switch to them did not hold."""


@dataclass(frozen=True)
class Identity:
    """A user and group to run as."""

    user: str
    uid: int
    gid: int
    home: str


def resolve(user: str, group: str = "") -> Identity:
    """Look up ``user`` (and ``group``, default the user's primary group).

    Raises:
        PrivilegeError: no such user or group on this machine.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError as exc:
        raise PrivilegeError(f"service.user: expected a user of this machine, found {user!r}") from exc
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise PrivilegeError(f"service.group: expected a group of this machine, found {group!r}") from exc
    return Identity(user=pw.pw_name, uid=pw.pw_uid, gid=gid, home=pw.pw_dir)


def drop_privileges(user: str, group: str = "") -> bool:
    """Run the rest of this process (and the processes it starts) as ``user``.

    Returns:
        True when the identity changed; False when the process already runs as ``user``.

    Raises:
        PrivilegeError: unknown user or group; started as another ordinary user (cannot switch);
            root could be regained after the switch.
    """
    who = resolve(user, group)
    if who.uid == 0:
        raise PrivilegeError(f"service.user: expected an unprivileged user, found {who.user!r} (uid 0)")
    if os.geteuid() != 0:
        if os.geteuid() == who.uid:
            return False
        raise PrivilegeError(f"service.user: expected to be started as root or as {who.user!r} "
                             f"(uid {who.uid}), found uid {os.geteuid()}")
    os.initgroups(who.user, who.gid)
    os.setgid(who.gid)
    os.setuid(who.uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - only a broken setuid implementation gets here
        raise PrivilegeError(f"service.user: switched to {who.user!r} but root could be regained")
    os.environ.update(HOME=who.home, USER=who.user, LOGNAME=who.user)
    log.info("running as user %s (uid %d, gid %d)", who.user, who.uid, who.gid)
    return True


def check_runtime_readable() -> None:
    """Check, as the user now running, that the interpreter and the node's code can be read.

    Python imports modules lazily; a node whose user cannot read them fails later, at the first
    import, with an obscure error.

    Raises:
        PrivilegeError: naming the folder this user cannot read.
    """
    import node

    for folder in (Path(sys.executable).resolve().parent, Path(os.__file__).resolve().parent,
                   Path(node.__file__).resolve().parent.parent):
        if not os.access(folder, os.R_OK | os.X_OK):
            raise PrivilegeError(f"service.user: expected uid {os.geteuid()} to read {folder}, found it "
                                 "cannot: install the node where that user can read it")


def bind_listening_socket(address: str, port: int) -> socket.socket:
    """Bind and listen on the SCP's address and port (as the SCP server would), before dropping root.

    Raises:
        OSError: the port is in use or may not be bound by this user.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def warn_if_root(user: str) -> None:
    """Log a warning when the node keeps running as root (no ``service.user`` configured)."""
    if os.geteuid() == 0 and not user:
        log.warning("running as root: set service.user so that the node drops its privileges after binding")
