"""A throw-away PostgreSQL server for the tests (session scope), started from the server binaries.

Import the fixture into a test module (``from tests.pg_fixture import postgres_url  # noqa: F401``)
and mark the tests ``@pytest.mark.postgres``. The server listens only on a unix socket in a temp
folder (named after a free port), runs with ``fsync=off`` (test data only) and is stopped in teardown.
It skips with the reason when the binaries are missing, or when running as root without a
``postgres`` system user (``initdb`` refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def pg_bin_dir() -> Path | None:
    """The newest PostgreSQL server binary folder, or None."""
    for folder in sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name), reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _as_postgres_prefix() -> list[str]:
    """Run server commands as the ``postgres`` user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' system user for initdb")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root and 'runuser' is missing (util-linux) to start PostgreSQL as postgres")
    return [runuser, "-u", "postgres", "--"]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {output}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(prefix: list[str], bin_dir: Path, root: Path) -> None:
    subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"],
                   capture_output=True, timeout=60, check=False)
    shutil.rmtree(root, ignore_errors=True)


def _stop_orphans(prefix: list[str], bin_dir: Path) -> None:
    """Stop servers left by test runs that were killed before their teardown (their pytest is gone)."""
    for owner in Path(tempfile.gettempdir()).glob("cxr-pg-*/owner.pid"):
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue
        if not _alive(pid):
            _stop(prefix, bin_dir, owner.parent)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh PostgreSQL server (database ``postgres``, user ``postgres``)."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN_GLOB} (Debian package postgresql)")
    prefix = _as_postgres_prefix()
    _stop_orphans(prefix, bin_dir)
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    (root / "owner.pid").write_text(str(os.getpid()))
    if prefix:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", free_port()
    _run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
          "-E", "UTF8", "--no-sync"], "initdb")
    options = (f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c shared_buffers=16MB -c max_connections=40")
    _run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
          "-w", "-t", "60", "start"], f"pg_ctl start (log: {root / 'server.log'})")
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={root}&port={port}"
    finally:
        _stop(prefix, bin_dir, root)
