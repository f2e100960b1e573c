"""Site adaptation through a running node (what an administrator sees): a modality sends 200 images through dcmtk,
`cxr-node sites` shows the site's drift and a suggestion, `accept` changes the threshold in the next SR at the
PACS (Orthanc), a restart keeps it and a new model version starts over."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from node.report import ReportContent, read_report
from tests.conftest import REPO
from tests.peers import Orthanc, dcmsend, orthanc, wait_for
from tests.test_e2e import NodeProcess, node_config, node_proc, scp_port  # noqa: F401 - node_proc: the fixture
from tests.test_sites import beta_reference

pytestmark = pytest.mark.integration

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}


def copies(folder: Path, n: int) -> list[Path]:
    """``n`` small synthetic frontal CR images (the input gate is off), each a new instance of a new study."""
    from tests.test_worker import chest

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for _ in range(n):
        ds = chest(rows=128, cols=112)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def config(tmp_path: Path, pacs: Orthanc, package: Path) -> Path:
    """The node beside the PACS, with the package's own thresholds and the input gate off (synthetic images)."""
    return node_config(tmp_path, pacs.dicom_port, package, gate="off", thresholds="")


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "ERROR", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)


def send_and_wait(pacs: Orthanc, cfg: Path, files: list[Path], before: int) -> dict[str, ReportContent]:
    """Send ``files`` from calling AE DX2, wait for their SR and overlay at the PACS; the SRs of the files sent
    (read from the PACS when a handful: downloading hundreds of overlays would only cost time)."""
    seen = {item["ID"] for item in pacs.instances()}
    result = dcmsend(files, scp_port(cfg), calling="DX2")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: len(pacs.instances()) >= before + 2 * len(files), timeout=240,
             what=f"{before + 2 * len(files)} objects at the PACS")
    reports: dict[str, ReportContent] = {}
    if len(files) > 5:
        return reports
    for item in pacs.instances():
        if item["ID"] in seen:
            continue
        ds = pydicom.dcmread(io.BytesIO(pacs.file(item["ID"])))
        if ds.SOPClassUID in SR_CLASSES:
            report = read_report(ds)
            reports[report.source_sop_instance_uids[0]] = report
    return reports


def test_a_site_is_watched_adapted_kept_across_a_restart_and_reset_by_a_new_model(
    tmp_path: Path, node_proc: list[NodeProcess]  # noqa: F811 - the fixture
) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    reference = {"Tuberculosis": beta_reference()}  # a trained model's spread; the tiny one scores far from it
    package = build_tiny_package(tmp_path / "pkg", size=64, members=1, reference=reference)
    with orthanc(tmp_path / "pacs") as pacs:
        cfg = config(tmp_path, pacs, package)
        node = NodeProcess(cfg)
        node_proc.append(node)
        send_and_wait(pacs, cfg, copies(tmp_path / "first", 200), 0)  # [sites] min_images: 200 by default

        sites = json.loads(cli(cfg, "sites", "--format", "json").stdout)
        assert [s["site"] for s in sites] == ["DX2"] and sites[0]["images"] == 200
        tb = sites[0]["labels"]["Tuberculosis"]
        assert tb["drift"]["alert"] is True and tb["suggested_threshold"] is not None
        assert "ALERT:   site DX2: Tuberculosis scores drift" in cli(cfg, "status").stdout
        accepted = cli(cfg, "sites", "accept", "DX2")
        assert accepted.returncode == 0, accepted.stderr

        after = copies(tmp_path / "after", 1)
        reports = send_and_wait(pacs, cfg, after, 400)
        source = str(pydicom.dcmread(after[0]).SOPInstanceUID)
        method = reports[source].finding("Tuberculosis").threshold_method
        assert method.startswith("site threshold v1 for DX2 (accepted by administrator")
        assert reports[source].finding("Tuberculosis").threshold == pytest.approx(tb["suggested_threshold"], abs=1e-6)

        node.stop()
        node = NodeProcess(cfg)  # a restart keeps the accepted threshold
        node_proc.append(node)
        again = copies(tmp_path / "again", 1)
        reports = send_and_wait(pacs, cfg, again, 402)
        assert reports[str(pydicom.dcmread(again[0]).SOPInstanceUID)].finding("Tuberculosis").threshold_method == method

        node.stop()  # a new model version starts the site over with the package's threshold
        newer = build_tiny_package(tmp_path / "pkg2", size=64, members=1, reference=reference, version="0.0.2-test")
        cfg.write_text(cfg.read_text().replace(str(package), str(newer)))
        node = NodeProcess(cfg)
        node_proc.append(node)
        fresh = copies(tmp_path / "fresh", 1)
        reports = send_and_wait(pacs, cfg, fresh, 404)
        finding = reports[str(pydicom.dcmread(fresh[0]).SOPInstanceUID)].finding("Tuberculosis")
        assert (finding.threshold, finding.threshold_method) == (0.5, "fixed for tests")
        sites = json.loads(cli(cfg, "sites", "--format", "json").stdout)
        assert sites[0]["images"] == 1 and sites[0]["model"] == "tiny-test 0.0.2-test"
