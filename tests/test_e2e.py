"""The whole path with real peers: dcmsend (modality) -> cxr-node -> Orthanc (PACS), dciodvfy on every result.

Every frontal chest image must come back to the PACS as one SR and one Secondary Capture; the lateral
and the canine thorax yield nothing; the no-view file follows the policy. The crash test kills the
node with SIGKILL mid-work while the PACS is down, restarts it, brings the PACS up, and checks that
everything arrives and that no image gets two different SRs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import REPO, free_port, require_tool
from tests.peers import Orthanc, dcmsend, orthanc, pacs_and_model_toml, wait_for
from tests.pg_fixture import postgres_url  # noqa: F401 - the session fixture, used via getfixturevalue

pytestmark = [pytest.mark.integration, pytest.mark.shared_data]

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PREFIX = "AI CXR TRIAGE - NOT FOR DIAGNOSTIC USE"

FRONTAL = ["rsna_cr_pa_jpeg_baseline.dcm", "rsna_cr_pa_monochrome1_variant.dcm", "dx_pa_chest_j2k_lossless.dcm",
           "cr_pa_chest_jpegls_near_lossless.dcm", "rsna_cr_ap_jpeg_baseline.dcm"]
NO_VIEW = "cr_chest_monochrome1_jpeg_no_view_tags.dcm"
CANINE = "dx_thorax_canine_not_human.dcm"


def appears_as_value(value: str, text: str) -> bool:
    """Whether ``value`` occurs in ``text`` as a value of its own, not inside a longer run such as a UID.

    Two sample files have all-digit patient IDs (123456, 12345678); a random UID the node logs can
    contain those digits by chance, which says nothing about a leak.
    """
    return re.search(rf"(?<![\w.]){re.escape(value)}(?!\w|\.\d)", text) is not None


@pytest.fixture(scope="module")
def model_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real package made by the project's export code (tiny untrained members: this tests plumbing)."""
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("model") / "pkg", size=128)


def relabel(src: Path, dst: Path, **changes: Any) -> Path:
    """Copy a DICOM file with a new SOP Instance UID and the given attribute changes."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dst)
    return dst


@pytest.fixture(scope="module")
def corpus(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The files a modality sends, grouped by the outcome we expect."""
    src = data_dir / "dicom"
    out = tmp_path_factory.mktemp("corpus")
    frontal = [src / name for name in FRONTAL if name != "rsna_cr_pa_monochrome1_variant.dcm"]
    # The MONOCHROME1 variant shares its SOP Instance UID with the original: give it its own.
    frontal.append(relabel(src / "rsna_cr_pa_monochrome1_variant.dcm", out / "mono1.dcm"))
    try:
        from pydicom.data import get_testdata_file

        rg1 = get_testdata_file("RG1_UNCR.dcm")
        rg1_j2k = get_testdata_file("RG1_J2KR.dcm")
        if rg1 and rg1_j2k:
            frontal.append(Path(rg1))
            # the JPEG 2000 copy carries the same SOP Instance UID as the uncompressed one
            frontal.append(relabel(Path(rg1_j2k), out / "rg1_j2k.dcm"))
    except ImportError:
        pass
    lateral = relabel(src / "rsna_cr_pa_jpeg_baseline.dcm", out / "lateral.dcm", ViewPosition="LL")
    return {"frontal": frontal, "no_view": [src / NO_VIEW], "skipped": [src / CANINE, lateral]}


def node_config(tmp: Path, pacs_port: int, package: Path, **extra: str) -> Path:
    """A node.toml for a node beside a PACS on ``pacs_port``. ``extra``: ``database_url``, ``lease_s``, ``gate``
    (default the bundled one) and ``thresholds`` (the ``[thresholds]`` table's lines; default every image positive:
    ``Tuberculosis = 0.0``)."""
    port = free_port()
    text = f"""
[scp]
ae_title = "CXR-AI"
port = {port}
[storage]
data_dir = "var"
database_url = "{extra.get("database_url", "")}"
[worker]
lease_s = {extra.get("lease_s", "30")}
poll_s = 0.1
retry_initial_s = 1
[send]
retry_initial_s = 1
retry_max_s = 2
{pacs_and_model_toml(pacs_port, package, gate=extra.get("gate", ""))}[thresholds]
{extra.get("thresholds", "Tuberculosis = 0.0")}
"""
    cfg = tmp / "node.toml"
    cfg.write_text(text)
    return cfg


def scp_port(cfg: Path) -> int:
    from node.config import load_settings

    return load_settings(cfg, environ={}).scp.port


class NodeProcess:
    """`cxr-node serve` as a real process (what an administrator runs)."""

    def __init__(self, cfg: Path, role: str = "all", name: str = "node", env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.log_path = cfg.parent / f"{name}.log"
        self.log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(cfg), "--role", role],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        if role == "worker":
            wait_for(lambda: self.alive() and "worker" in self.log_text() and "started" in self.log_text(),
                     timeout=60, what=f"{name} to start")
            return
        echoscu = require_tool("echoscu")
        port = scp_port(cfg)
        wait_for(lambda: self.alive() and subprocess.run(
            [echoscu, "-aec", "CXR-AI", "127.0.0.1", str(port)], capture_output=True, check=False).returncode == 0,
            timeout=60, what="the node to answer C-ECHO")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
        return True

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "ERROR", "status", "--config",
                              str(self.cfg), "--format", "json"], capture_output=True, text=True, check=True, cwd=REPO)
        return dict(json.loads(out.stdout))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


@pytest.fixture
def node_proc() -> Iterator[list[NodeProcess]]:
    procs: list[NodeProcess] = []
    yield procs
    for p in procs:
        p.stop(signal.SIGKILL)


def pacs_objects(pacs: Orthanc) -> list[dict[str, Any]]:
    return [pacs.tags(i["ID"]) for i in pacs.instances()]


def check_dciodvfy(paths: list[Path]) -> None:
    dciodvfy = require_tool("dciodvfy")
    for path in paths:
        out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_frontal_images_come_back_to_the_pacs_as_sr_and_overlay(
    tmp_path: Path, corpus: dict[str, list[Path]], model_package: Path, node_proc: list[NodeProcess]
) -> None:
    with orthanc(tmp_path / "pacs") as pacs:
        cfg = node_config(tmp_path, pacs.dicom_port, model_package)
        node = NodeProcess(cfg)
        node_proc.append(node)
        files = corpus["frontal"] + corpus["no_view"] + corpus["skipped"]
        result = dcmsend(files, scp_port(cfg))
        assert result.returncode == 0, result.stdout + result.stderr
        analysed = corpus["frontal"] + corpus["no_view"]  # no_view_policy = "analyse" (the default)
        wait_for(lambda: len(pacs.instances()) >= 2 * len(analysed), timeout=240,
                 what=f"{2 * len(analysed)} results at the PACS")
        objects = pacs_objects(pacs)
        sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in analysed}
        srs = [o for o in objects if o["SOPClassUID"] in SR_CLASSES]
        scs = [o for o in objects if o["SOPClassUID"] == SC_CLASS]
        assert len(srs) == len(analysed) and len(scs) == len(analysed), Counter(o["SOPClassUID"] for o in objects)
        for obj in objects:
            assert obj["SeriesDescription"].startswith(PREFIX)
        for sr in srs:
            assert sr["VerificationFlag"] == "UNVERIFIED" and sr["CompletionFlag"] == "COMPLETE"
            referenced = [uid for uid in sources if uid in json.dumps(sr)]
            assert len(referenced) == 1, "each SR references exactly one source image"
            src = pydicom.dcmread(sources[referenced[0]], stop_before_pixels=True)
            assert sr["StudyInstanceUID"] == src.StudyInstanceUID
        # The skipped images are stored but produce nothing, with a readable reason.
        status = node.status()
        assert status["jobs"].get("skipped", 0) == len(corpus["skipped"]), status
        assert status["jobs"].get("done", 0) == len(analysed), status
        node.stop()
        assert node.proc.returncode == 0, node.log_text()[-2000:]
        produced = sorted((tmp_path / "var").rglob("results/**/*.dcm"))
        assert len(produced) == 2 * len(analysed)
        check_dciodvfy(produced)
        log_text = node.log_text()
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for value in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))):
                if len(value) >= 4:
                    assert not appears_as_value(value, log_text), "a patient-identifying value reached the log"


def test_crash_with_pacs_down_loses_nothing_and_never_duplicates(
    tmp_path: Path, corpus: dict[str, list[Path]], model_package: Path, node_proc: list[NodeProcess]
) -> None:
    pacs_port = free_port()  # the PACS is down: nothing listens here yet
    cfg = node_config(tmp_path, pacs_port, model_package, lease_s="3")
    node = NodeProcess(cfg)
    node_proc.append(node)
    files = corpus["frontal"]
    assert dcmsend(files, scp_port(cfg)).returncode == 0
    # Let the worker get going, then kill -9 while it has work in hand and results are waiting to send.
    wait_for(lambda: node.status()["jobs"].get("done", 0) >= 1, timeout=120, what="a first analysed job")
    node.stop(signal.SIGKILL)
    before = {p.name for p in (tmp_path / "var").rglob("results/**/*.dcm")}
    node2 = NodeProcess(cfg)
    node_proc.append(node2)
    with orthanc(tmp_path / "pacs", dicom_port=pacs_port) as pacs:
        wait_for(lambda: len(pacs.instances()) >= 2 * len(files), timeout=240,
                 what=f"{2 * len(files)} results at the PACS after the restart")
        objects = pacs_objects(pacs)
        srs = [o for o in objects if o["SOPClassUID"] in SR_CLASSES]
        per_source = Counter(next(uid for uid in _source_uids(files) if uid in json.dumps(sr)) for sr in srs)
        assert len(per_source) == len(files) and set(per_source.values()) == {1}, per_source
    after = {p.name for p in (tmp_path / "var").rglob("results/**/*.dcm")}
    assert before <= after and len(after) == 2 * len(files), "a re-run produced results under new UIDs"
    status = node2.status()
    assert status["jobs"].get("done", 0) == len(files), status
    assert all(c.get("sent", 0) == 2 * len(files) for c in status["outbox"].values()), status


def _source_uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def test_node_refuses_to_start_on_a_corrupt_model(tmp_path: Path, model_package: Path) -> None:
    bad = tmp_path / "pkg"
    shutil.copytree(model_package, bad)
    member = next(bad.glob("*.onnx"))
    member.write_bytes(member.read_bytes()[:-100])
    cfg = node_config(tmp_path, free_port(), bad)
    out = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert out.returncode == 2
    assert member.name in out.stderr and "sha256" in out.stderr.lower(), out.stderr


@pytest.mark.postgres
def test_scale_out_one_scp_and_two_workers_share_a_postgresql_queue(
    tmp_path: Path, corpus: dict[str, list[Path]], model_package: Path, node_proc: list[NodeProcess],
    request: pytest.FixtureRequest,
) -> None:
    from sqlalchemy import create_engine, text

    url: str = request.getfixturevalue("postgres_url")
    name = f"scaleout_{os.getpid()}_{free_port()}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    db_url = url.replace("/postgres?", f"/{name}?")
    files = corpus["frontal"]
    with orthanc(tmp_path / "pacs") as pacs:
        cfg = node_config(tmp_path, pacs.dicom_port, model_package, database_url=db_url)
        node_proc.append(NodeProcess(cfg, role="scp", name="scp"))
        workers = [NodeProcess(cfg, role="worker", name=f"worker{i}") for i in range(2)]
        node_proc.extend(workers)
        assert dcmsend(files, scp_port(cfg)).returncode == 0
        wait_for(lambda: len(pacs.instances()) >= 2 * len(files), timeout=240,
                 what=f"{2 * len(files)} results at the PACS from two workers")
        objects = pacs_objects(pacs)
        srs = [o for o in objects if o["SOPClassUID"] in SR_CLASSES]
        per_source = Counter(next(uid for uid in _source_uids(files) if uid in json.dumps(sr)) for sr in srs)
        assert len(per_source) == len(files) and set(per_source.values()) == {1}, per_source
    done_by = [w.log_text().count(" done in ") for w in workers]
    assert sum(done_by) == len(files), done_by  # every job analysed exactly once
    assert all(n >= 1 for n in done_by), f"both workers should have taken jobs from the queue: {done_by}"


def test_the_bundled_model_is_served_and_its_sr_matches_offline_prediction(
    tmp_path: Path, corpus: dict[str, list[Path]], node_proc: list[NodeProcess]
) -> None:
    """The default configuration (empty [model] package, no threshold override) serves ai/models/default."""
    from ai.manifest import bundled_package_dir, load_manifest
    from node.report import read_report

    manifest = load_manifest(bundled_package_dir())
    source = corpus["frontal"][0]
    with orthanc(tmp_path / "pacs") as pacs:
        cfg = node_config(tmp_path, pacs.dicom_port, Path("BUNDLED"))
        text = cfg.read_text().replace('package = "BUNDLED"', 'package = ""  # empty: the bundled model')
        cfg.write_text(text.replace("[thresholds]\nTuberculosis = 0.0\n", ""))
        assert 'package = ""' in cfg.read_text() and "[thresholds]" not in cfg.read_text()
        node = NodeProcess(cfg)
        node_proc.append(node)
        assert dcmsend([source], scp_port(cfg)).returncode == 0
        wait_for(lambda: len(pacs.instances()) >= 2, timeout=120, what="SR and overlay at the PACS")
        node.stop()
    assert f"model package {manifest.name} {manifest.version}" in node.log_text()
    produced = sorted((tmp_path / "var").rglob("results/**/*.dcm"))
    check_dciodvfy(produced)
    srs = [pydicom.dcmread(p) for p in produced if pydicom.dcmread(p).SOPClassUID in SR_CLASSES]
    assert len(srs) == 1
    report = read_report(srs[0])
    assert report.algorithm.version == manifest.version == srs[0].SoftwareVersions
    assert [f.label for f in report.findings] == list(manifest.labels)  # one measurement group per label
    findings = {f.label: f for f in report.findings}
    offline = subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "ERROR", "predict", "--format", "jsonl",
                              "--config", str(cfg), str(source)], capture_output=True, text=True, check=True, cwd=REPO)
    offline_result = json.loads(offline.stdout)
    for label, threshold in manifest.thresholds.items():
        result = findings[label]
        assert result.threshold_method == threshold.method and result.threshold == float(f"{threshold.value:.6g}")
        if label in offline_result["not_applicable"]:  # a child-only label: no score, never positive
            assert result.not_applicable and result.probability is None and not result.positive
        else:
            assert result.probability == pytest.approx(offline_result["scores"][label], abs=2e-6)
    # This image's Patient's Age ('62') is no DICOM age string: the age is unknown, the pediatric label n/a.
    assert list(offline_result["not_applicable"]) == ["Pediatric_Pneumonia"]
    # informational labels are reported, but only the others set the triage flag, at the node as offline
    assert [f.label for f in report.findings if f.informational] == list(manifest.informational)
    assert report.triage is not None
    assert report.triage.positive == any(f.positive for f in report.findings if not f.informational)
    assert offline_result["triage"] == report.triage.positive
