"""Shadow mode: a candidate package beside the live one (its results stored, never sent, compared), and sites or
destinations in a validation period (results kept, not delivered). The PACS is a real dcmtk storescp."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from node.config import Destination, ModelSettings, SendSettings, Settings, SiteSettings, StorageSettings
from storage.db import make_engine
from storage.queue import Store
from tests.test_send import received, storescp
from tests.test_worker import chest, enqueue

pytestmark = pytest.mark.integration


def receive(settings: Settings, store: Store, station: str, count: int) -> list[str]:
    uids = []
    for _ in range(count):
        ds = chest()
        ds.StationName = station
        enqueue(store, settings.data_path, ds)
        uids.append(ds.SOPInstanceUID)
    return uids


def test_the_shadow_package_is_stored_never_sent_and_compared(tmp_path: Path, port: int) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from ai.ensemble import Ensemble
    from node.report import read_report
    from node.send import Outbox
    from node.worker import Worker
    from tests.model_fixtures import build_tiny_package
    from tests.test_cli import cli

    live = build_tiny_package(tmp_path / "live", size=64, members=1, seed=0, threshold=0.5)
    candidate = build_tiny_package(tmp_path / "cand", size=64, members=1, seed=7, threshold=0.5,
                                   version="0.0.1-candidate")
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", port),
                                      Destination("trial", "TRIAL", "127.0.0.1", port, shadow=True)),
                        model=ModelSettings(package=str(live), shadow_package=str(candidate)),
                        sites=SiteSettings(key="station_name", shadow=("ROOM V",)))
    settings.data_path.mkdir(parents=True)
    store = Store(make_engine(settings.database_url))
    worker = Worker(store, Ensemble.load(live, threads=1), settings, owner="test:1:1",
                    shadow=Ensemble.load(candidate, threads=1))
    delivered = receive(settings, store, "ROOM A", 12)
    kept = receive(settings, store, "ROOM V", 3)  # a site in its validation period
    while worker.run_once():
        pass
    results = list((settings.data_path / "results").rglob("*.dcm"))
    reports = [read_report(ds) for ds in map(pydicom.dcmread, results) if ds.Modality == "SR"]
    shadow_srs = [r for r in reports if r.algorithm.version == "0.0.1-candidate"]
    assert len(shadow_srs) == 15  # one per analysed image, stored beside the live results
    with storescp(tmp_path, port) as out:
        Outbox(store, settings.destinations, SendSettings(timeout_s=5), "CXR-AI").run_due(store.clock())
    arrived = received(out)
    versions = {read_report(ds).algorithm.version for ds in arrived.values() if ds.Modality == "SR"}
    assert versions == {"0.0.0-test"}  # the PACS never sees the shadow package's results
    sources = {read_report(ds).source_sop_instance_uids[0] for ds in arrived.values() if ds.Modality == "SR"}
    assert sources == set(delivered) and not sources & set(kept)  # the validation site's results stay home
    assert len(arrived) == 2 * len(delivered)  # SR + overlay per image, once: the shadow destination gets none
    assert set(store.status()["outbox"]) == {"pacs"}

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "var"\n[model]\npackage = "{live}"\nshadow_package = "{candidate}"\n')
    report = json.loads(cli("shadow", "--format", "json", "--config", str(config)).stdout)
    tb = report["labels"]["Tuberculosis"]
    pairs = store.paired_scores("0.0.0-test", "0.0.1-candidate", "Tuberculosis")
    assert tb["images"] == len(pairs) == 15
    assert tb["flips_positive_to_negative"] == sum(a and not b for _, a, _, b in pairs)
    assert tb["flips_negative_to_positive"] == sum(b and not a for _, a, _, b in pairs)
    assert tb["agreement"] == pytest.approx(sum(a == b for _, a, _, b in pairs) / 15, abs=1e-4)
    flag = report["triage_flag"]  # one label that sets the flag: the image's flag is its decision
    assert (flag["images"], flag["flips_positive_to_negative"], flag["flips_negative_to_positive"]) == (
        15, tb["flips_positive_to_negative"], tb["flips_negative_to_positive"])
    text = cli("shadow", "--config", str(config)).stdout
    assert "live tiny-test 0.0.0-test / shadow tiny-test 0.0.1-candidate" in text and "15 images" in text
    no_shadow = tmp_path / "plain.toml"
    no_shadow.write_text(f'[storage]\ndata_dir = "var"\n[model]\npackage = "{live}"\n')
    assert cli("shadow", "--config", str(no_shadow)).returncode == 2


def test_the_comparison_says_where_a_label_stops_or_starts_setting_the_flag(tmp_path: Path) -> None:
    """Trialling a package that makes a label informational (or the reverse): the report says so per label."""
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from ai.manifest import load_manifest
    from node.shadow import format_shadow, shadow_report
    from tests.model_fixtures import build_tiny_package

    labels = ("Tuberculosis", "Effusion")
    live = load_manifest(build_tiny_package(tmp_path / "live", labels=labels, members=1))
    candidate = load_manifest(build_tiny_package(tmp_path / "candidate", labels=labels, members=1,
                                                 version="0.0.1-candidate", informational=("Effusion",)))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"))
    report = shadow_report(store, live, candidate)
    assert report["labels"]["Effusion"]["sets_triage_flag"] == {"live": True, "shadow": False}
    assert report["labels"]["Tuberculosis"]["sets_triage_flag"] == {"live": True, "shadow": True}
    text = format_shadow(report)
    assert "Effusion: sets the triage flag in the live package only (informational in the other)" in text
    assert "Tuberculosis: sets the triage flag" not in text


def test_the_comparison_counts_the_images_whose_triage_flag_would_change(tmp_path: Path) -> None:
    """Every label's decisions agree, yet the candidate makes Effusion informational: the flag of every image whose
    only positive finding is Effusion goes from positive to negative, and the report says so for the images."""
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from ai.ensemble import Ensemble
    from ai.manifest import load_manifest
    from node.shadow import format_shadow, shadow_report
    from node.worker import Worker
    from tests.model_fixtures import build_tiny_package

    def package(folder: str, version: str, informational: tuple[str, ...]) -> Path:
        path = build_tiny_package(tmp_path / folder, labels=("Tuberculosis", "Effusion"), members=1,
                                  version=version, informational=informational)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["thresholds"]["Tuberculosis"]["value"] = 1.0  # never positive
        manifest["thresholds"]["Effusion"]["value"] = 0.0  # always positive
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    live, candidate = package("live", "1.0", ()), package("candidate", "2.0", ("Effusion",))
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        model=ModelSettings(package=str(live), shadow_package=str(candidate)))
    settings.data_path.mkdir(parents=True)
    store = Store(make_engine(settings.database_url))
    worker = Worker(store, Ensemble.load(live, threads=1), settings, owner="test:1:1",
                    shadow=Ensemble.load(candidate, threads=1))
    receive(settings, store, "ROOM A", 4)
    while worker.run_once():
        pass
    report = shadow_report(store, load_manifest(live), load_manifest(candidate))
    assert [report["labels"][label]["agreement"] for label in ("Tuberculosis", "Effusion")] == [1.0, 1.0]
    assert report["triage_flag"] == {"images": 4, "agreement": 0.0, "flips_positive_to_negative": 4,
                                     "flips_negative_to_positive": 0, "live_positive": 4, "shadow_positive": 0}
    assert "triage flag: 4 images, agreement 0.0%; would flip 4 positive -> negative" in format_shadow(report)
    swapped = shadow_report(store, load_manifest(candidate), load_manifest(live))  # the other way round
    assert swapped["triage_flag"]["flips_negative_to_positive"] == 4
