"""Privileges: the node binds its port as root, then runs as ``service.user`` and cannot regain root."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")


def free_privileged_port() -> int:
    """A free TCP port below 1024 on the loopback interface (binding it needs root)."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)


@needs_root
def test_the_port_is_bound_as_root_then_the_process_runs_as_the_user_and_cannot_regain_root() -> None:
    port = free_privileged_port()
    nobody = pwd.getpwnam("nobody")
    out = run_python(f"""
        import encodings.idna, json, os, socket  # the interpreter's files may be out of nobody's reach here
        from node.privileges import bind_listening_socket, drop_privileges
        sock = bind_listening_socket("127.0.0.1", {port})
        changed = drop_privileges("nobody")
        result = {{"changed": changed, "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                   "groups": os.getgroups(), "home": os.environ["HOME"]}}
        try:
            os.setuid(0)
            result["regained"] = True
        except PermissionError:
            result["regained"] = False
        try:
            socket.socket().bind(("127.0.0.1", {port} - 1))
            result["binds_low_port"] = True
        except PermissionError:
            result["binds_low_port"] = False
        probe = socket.create_connection(("127.0.0.1", {port}), timeout=5)
        conn, _ = sock.accept()
        probe.sendall(b"ping")
        result["accepts"] = conn.recv(4).decode()
        print(json.dumps(result))
    """)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["changed"] is True
    assert (result["uid"], result["euid"], result["gid"]) == (nobody.pw_uid, nobody.pw_uid, nobody.pw_gid)
    assert 0 not in result["groups"]
    assert result["home"] == nobody.pw_dir
    assert result["regained"] is False
    assert result["binds_low_port"] is False
    assert result["accepts"] == "ping"  # the socket bound as root still serves


@needs_root
def test_an_ordinary_user_cannot_switch_to_another_user() -> None:
    out = run_python("""
        from node.privileges import PrivilegeError, drop_privileges
        drop_privileges("nobody")
        assert drop_privileges("nobody") is False  # already that user: nothing to do
        try:
            drop_privileges("daemon")
        except PrivilegeError as exc:
            print(exc)
    """)
    assert out.returncode == 0, out.stderr
    assert "service.user: expected to be started as root or as 'daemon'" in out.stdout


def test_serve_refuses_an_unknown_user_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[service]\nuser = "no-such-user-cxr"\n')
    out = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg), "--role", "scp"],
                         capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert out.returncode == 2
    assert "service.user: expected a user of this machine, found 'no-such-user-cxr'" in out.stderr
    assert not (tmp_path / "var").exists()  # refused before creating anything


@needs_root
def test_serve_says_when_the_user_cannot_read_the_node_or_its_interpreter(tmp_path: Path) -> None:
    """Where the interpreter lies under /root (mode 0700), nobody cannot read it, and serve says so."""
    as_nobody = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", "import node"],
                               capture_output=True, cwd=REPO, check=False)
    if as_nobody.returncode == 0:
        pytest.skip("nobody can run the node here: nothing to refuse")
    data = tmp_path / "var"
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[scp]\nport = {free_privileged_port()}\n[storage]\ndata_dir = "{data}"\n'
                   '[service]\nuser = "nobody"\n')
    out = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg), "--role", "scp"],
                         capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "service.user: expected uid 65534 to read" in out.stderr
    assert not data.exists()
