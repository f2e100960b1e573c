"""Shared test fixtures: where the real data lies, free ports, required external tools."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The console ([web], on by default on 127.0.0.1:8080) is off in every node the tests start, unless a test turns it
# on (CXR_WEB_ENABLED=true in that node's environment, with a port of its own): nodes started side by side would
# otherwise all take port 8080.
os.environ.setdefault("CXR_WEB_ENABLED", "false")


def shared_data_dir() -> Path | None:
    """``$CXR_DATA_DIR`` or ``../shared/data`` beside the repository; None when absent."""
    env = os.environ.get("CXR_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real chest X-ray data; the test skips with the reason when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set CXR_DATA_DIR or place shared/data beside the repository")
    return path


def system_tool(name: str) -> str | None:
    """Path of an external program on PATH, skipping Python console scripts of the same name.

    pynetdicom installs its own ``storescp``, ``storescu``, ``echoscu`` ... into the virtual environment's
    bin folder; with that folder first on PATH they would shadow dcmtk's programs of the same names,
    which take other options. The tests and benchmarks talk to dcmtk.
    """
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(folder or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with candidate.open("rb") as f:
            head = f.readline(200)
        if head.startswith(b"#!") and b"python" in head:
            continue
        return str(candidate)
    return None


def require_tool(name: str) -> str:
    """Path of an external program, or skip the test naming the Debian package that provides it."""
    path = system_tool(name)
    if path is None:
        pkg = {"dciodvfy": "dicom3tools", "Orthanc": "orthanc"}.get(name, "dcmtk")
        pytest.skip(f"{name} not installed (Debian package {pkg}; .ci/run installs it)")
    return path


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: the shared CPU stays free and the arithmetic reproducible. Modules that
    train use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    torch = pytest.importorskip("torch", reason="training needs the train extra")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def port() -> int:
    return free_port()


@contextmanager
def mounted_tmpfs(mnt: Path, size_mib: int) -> Iterator[Path]:
    """A real tmpfs of ``size_mib`` MiB at ``mnt`` to fill up (disk-full tests); skips when mounting is
    not allowed (needs root)."""
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {size_mib} MiB tmpfs to fill (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs to fill up (see mounted_tmpfs)."""
    with mounted_tmpfs(tmp_path / "tiny", 1) as mnt:
        yield mnt
