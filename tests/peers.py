"""Real DICOM peers for integration tests: Orthanc as the PACS, dcmtk as the modality, PixelMed's SR validator.

Each peer takes free loopback ports, runs in its own temporary folder and is stopped in teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, require_tool, system_tool

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise (~40 ms per C-STORE)


@dataclass
class Orthanc:
    """A running Orthanc: DICOM AE ``aet`` on ``dicom_port``, REST API on ``http_port``."""

    aet: str
    dicom_port: int
    http_port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    def rest(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance with its main tags (Orthanc's `expand` view)."""
        return list(self.rest("/instances?expand"))

    def tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.rest(f"/instances/{orthanc_id}/simplified-tags"))

    def file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance, as the PACS holds it."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{orthanc_id}/file",
                                    timeout=10) as r:
            return bytes(r.read())

    def start(self) -> None:
        binary = require_tool("Orthanc")
        config = {
            "Name": "cxr-test-pacs", "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "Plugins": [],
            "HttpServerEnabled": True, "DicomServerEnabled": True, "StableAge": 1,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.rest("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                if self.process.poll() is not None:
                    log_text = (self.folder / "orthanc.log").read_text()[-2000:]
                    raise RuntimeError(f"Orthanc exited: {log_text}") from exc
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer its REST API within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextmanager
def orthanc(folder: Path, aet: str = "PACS", dicom_port: int | None = None) -> Iterator[Orthanc]:
    """Start Orthanc in ``folder``; stop it on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    pacs = Orthanc(aet, dicom_port or free_port(), free_port(), folder)
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


def pacs_and_model_toml(pacs_port: int, package: Path | str, gate: str = "") -> str:
    """The node.toml tables every test or benchmark node shares: its one destination, the PACS "pacs"
    (AE title PACS) on this machine, the model package it runs and its input gate ("": the bundled one;
    "off" where a test's synthetic images stand in for chests)."""
    return f"""[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
[model]
package = "{package}"
gate = "{gate}"
"""


def dcmsend(files: Sequence[Path], port: int, called: str = "CXR-AI", calling: str = "MODALITY",
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Send files like a modality: dcmtk ``dcmsend`` proposes each file's own transfer syntax."""
    binary = require_tool("dcmsend")
    cmd = [binary, "-aet", calling, "-aec", called, "--no-halt", "-nuc", "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV, check=False)


def wait_for(predicate: Any, timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


PIXELMED_JAR = Path(os.environ.get("CXR_PIXELMED_JAR", "/usr/share/java/pixelmed.jar"))
#: The JDK's XPath limits (JDK 17+) stop PixelMed's template XSLT on any but the smallest SR.
_PIXELMED_JVM = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")


def require_pixelmed() -> list[str]:
    """The command that runs PixelMed's ``DicomSRValidator``, or skip the test naming the Debian package."""
    java = system_tool("java")
    if java is None or not PIXELMED_JAR.is_file():
        pytest.skip(f"PixelMed's DicomSRValidator needs java and {PIXELMED_JAR} (Debian package pixelmed-apps; "
                    ".ci/system-packages installs it)")
    return [java, *_PIXELMED_JVM, "-cp", str(PIXELMED_JAR), "com.pixelmed.validate.DicomSRValidator"]


def _pixelmed_result(text: str, returncode: int = 0) -> list[str]:
    """The Error/Warning lines of one validation; one more error line when it did not run to its end."""
    lines = [line for line in text.splitlines() if line.startswith(("Error", "Warning"))]
    if returncode != 0 or "IOD validation complete" not in text:
        lines.append(f"Error: DicomSRValidator did not complete (exit {returncode}): {text[-500:]!r}")
    return lines


def pixelmed_lines(path: Path, timeout: float = 300) -> list[str]:
    """The ``Error:`` and ``Warning:`` lines of PixelMed's ``DicomSRValidator`` on one SR file.

    PixelMed checks the content tree against its template tables (TID 1500 and what it includes, the
    context groups such as CID 100), which ``dciodvfy`` does not. A run that does not reach its last
    step ("IOD validation complete") is returned as one error line. Skips the test when java or the jar
    is missing (:func:`require_pixelmed`).
    """
    out = subprocess.run([*require_pixelmed(), str(path)], capture_output=True, text=True, timeout=timeout,
                         check=False)
    return _pixelmed_result(out.stdout + out.stderr, out.returncode)


# The validator's own main() takes one file, and each run spends ~4 s starting the JVM and compiling
# PixelMed's template stylesheets: many files go through one validator in one JVM instead.
_PIXELMED_BATCH = """
public class PixelmedBatch {
    public static void main(String[] files) throws Exception {
        com.pixelmed.validate.DicomSRValidator validator = new com.pixelmed.validate.DicomSRValidator();
        for (String file : files) {
            System.out.println("@@@FILE");
            try { System.out.print(validator.validate(file)); }
            catch (Exception e) { System.out.println("Error: " + e); }
        }
    }
}
"""


def pixelmed_many(paths: Sequence[Path], folder: Path, timeout: float = 900) -> dict[Path, list[str]]:
    """:func:`pixelmed_lines` of every file, in one JVM when the JDK's source launcher is there.

    ``java File.java`` needs the JDK's compiler module (Debian ``default-jdk-headless``); with a JRE
    only, each file gets its own run.
    """
    cmd = require_pixelmed()
    modules = subprocess.run([cmd[0], "--list-modules"], capture_output=True, text=True, check=False).stdout
    if "jdk.compiler" not in modules:
        return {path: pixelmed_lines(path) for path in paths}
    source = folder / "PixelmedBatch.java"
    source.write_text(_PIXELMED_BATCH)
    out = subprocess.run([*cmd[:-1], str(source), *map(str, paths)], capture_output=True, text=True,
                         timeout=timeout, check=False)
    chunks = out.stdout.split("@@@FILE\n")[1:]
    if len(chunks) != len(paths):
        failed = [f"Error: the batch validator ran {len(chunks)} of {len(paths)} files (exit {out.returncode}): "
                  f"{(out.stdout + out.stderr)[-500:]!r}"]
        return {path: failed for path in paths}
    return {path: _pixelmed_result(chunk) for path, chunk in zip(paths, chunks, strict=True)}


def pixelmed_errors(path: Path) -> list[str]:
    """The error lines of PixelMed's ``DicomSRValidator`` on one SR file (warnings left out)."""
    return [line for line in pixelmed_lines(path) if line.startswith("Error")]
