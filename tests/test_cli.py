"""The `cxr-node` command line as an administrator uses it: check-config, predict, echo, status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from tests.conftest import REPO, free_port, require_tool
from tests.peers import DCMTK_ENV


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "ERROR", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("m") / "pkg", size=64)


def config(tmp_path: Path, package: Path, extra: str = "") -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[storage]\ndata_dir = "var"\n[model]\npackage = "{package}"\n{extra}')
    return cfg


def test_check_config_accepts_a_good_file_and_names_bad_keys(tmp_path: Path, package: Path) -> None:
    good = cli("check-config", "--config", str(config(tmp_path, package)))
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
    bad = cli("check-config", "--config",
              str(config(tmp_path, package, '[scp]\nport = "x"\n[thresholds]\nPneumothorax = 0.3\n')))
    assert bad.returncode == 2
    assert "scp.port: expected an integer, found 'x'" in bad.stderr


def test_check_config_names_a_threshold_for_a_label_the_model_lacks(tmp_path: Path, package: Path) -> None:
    out = cli("check-config", "--config", str(config(tmp_path, package, "[thresholds]\nPneumothorax = 0.3\n")))
    assert out.returncode == 2
    assert "thresholds.Pneumothorax" in out.stderr and "Tuberculosis" in out.stderr


def test_serve_refuses_a_bad_config(tmp_path: Path, package: Path) -> None:
    out = cli("serve", "--config", str(config(tmp_path, package, "[scp]\nmax_associations = 0\n")))
    assert out.returncode == 2 and "scp.max_associations" in out.stderr


def test_predict_jsonl_on_png_noise_dicom_lateral_and_garbage(tmp_path: Path, package: Path) -> None:
    from pydicom.data import get_testdata_file

    from ai.pixels import dicom_to_float

    rg1 = get_testdata_file("RG1_UNCR.dcm")
    if rg1 is None:
        pytest.skip("pydicom-data is not installed (test extra)")
    png = tmp_path / "chest.png"  # a real chest radiograph as PNG: no tags, scored
    cv2.imwrite(str(png), np.rint(dicom_to_float(pydicom.dcmread(rg1)) * 255).astype(np.uint8))
    noise = tmp_path / "noise.png"  # not a radiograph: the input gate refuses it
    cv2.imwrite(str(noise), (np.random.default_rng(0).random((300, 250)) * 255).astype(np.uint8))
    lateral = tmp_path / "lateral.dcm"
    ds = pydicom.dcmread(rg1)
    ds.ViewPosition = "LL"
    ds.save_as(lateral)
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(rg1)
    ds.PixelData = ds.PixelData[:1000]  # truncated pixel data: cannot be decoded
    ds.save_as(broken)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"nonsense" * 10)
    out = cli("predict", "--format", "jsonl", "--config", str(config(tmp_path, package)),
              str(png), str(noise), rg1, str(lateral), str(broken), str(garbage))
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    statuses = [r["status"] for r in rows]
    assert statuses == ["analysed", "not analysed", "analysed", "skipped", "failed", "skipped"], rows
    for r in (rows[0], rows[2]):
        assert set(r["scores"]) == {"Tuberculosis"} and 0.0 <= r["scores"]["Tuberculosis"] <= 1.0
        assert r["positive"]["Tuberculosis"] == (r["scores"]["Tuberculosis"] >= r["thresholds"]["Tuberculosis"])
    assert rows[1]["reason"].startswith("image is not a frontal chest radiograph (p = ") and rows[1]["scores"] == {}
    assert "lateral" in rows[3]["reason"]
    assert "UnsupportedImage" in rows[4]["reason"]
    assert "modality" in rows[5]["reason"]  # not an image we analyse, said why
    assert out.returncode == 1  # one input failed


def test_echo_a_configured_destination(tmp_path: Path, package: Path) -> None:
    storescp = require_tool("storescp")
    port = free_port()
    dest = f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n'
    cfg = config(tmp_path, package, dest)
    assert cli("echo", "pacs", "--config", str(cfg)).returncode == 1  # nothing listens yet
    proc = subprocess.Popen([storescp, "-aet", "PACS", str(port)], env=DCMTK_ENV, cwd=tmp_path)
    try:
        time.sleep(0.5)
        out = cli("echo", "pacs", "--config", str(cfg))
        assert out.returncode == 0 and "success" in out.stdout
        assert cli("echo", "nope", "--config", str(cfg)).returncode == 2
    finally:
        proc.terminate()
        proc.wait()


def test_status_on_a_fresh_node(tmp_path: Path, package: Path) -> None:
    out = cli("status", "--format", "json", "--config", str(config(tmp_path, package)))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert not any(status["jobs"].values())
    text = cli("status", "--config", str(config(tmp_path, package)))
    assert text.stdout.startswith("jobs:")


def test_status_text_alerts_when_results_wait_for_disk_space() -> None:
    from node.cli import format_status

    calm = format_status({"jobs": {"done": 3}, "outbox": {}, "waiting_for_disk": 0})
    assert "ALERT" not in calm
    full = format_status({"jobs": {"queued": 2, "done": 3}, "outbox": {}, "waiting_for_disk": 2})
    assert "ALERT:   2 job(s) wait for disk space to write their results" in full.splitlines()


def test_status_text_lists_changed_resends_kept_apart() -> None:
    from node.cli import format_status

    conflict = {"sop_instance_uid": "1.2.3.4", "calling_ae": "MOD1", "job_id": 7, "job_state": "done", "times": 2,
                "last_received_at": "2026-01-01T00:00:00+00:00", "path": "/var/conflicts/1.2.3/1.2.3.4.ab.dcm"}
    text = format_status({"jobs": {"done": 1}, "outbox": {}, "conflicts": {"total": 1, "received": 2,
                                                                           "recent": [conflict]}})
    assert "conflicts: 1 changed re-send(s) of known SOP Instance UIDs kept apart (received 2 times" in text
    assert "1.2.3.4 from MOD1 (job 7 done, 2x, last 2026-01-01T00:00:00+00:00)" in text
    assert "conflicts" not in format_status({"jobs": {}, "outbox": {}, "conflicts": {"total": 0}})
