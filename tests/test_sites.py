"""Per-site score history and drift: what a site is, the prevalence-adjusted drift statistic, the worker
recording every analysed image's scores, and `cxr-node sites` / `status` showing them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from ai.adapt import aligned_threshold, suggest
from ai.drift import drift, ks_critical, reference_cdf
from ai.manifest import QUANTILE_POINTS, ScoreReference
from node.sites import UNKNOWN_SITE, site_of

LEVELS = np.linspace(0.0, 1.0, QUANTILE_POINTS)


def beta_reference(n: int = 662, prevalence: float = 0.5) -> ScoreReference:
    """A reference like a trained model's: positives' scores Beta(5, 2), negatives' Beta(2, 5)."""
    rng = np.random.default_rng(0)
    pos, neg = rng.beta(5, 2, 200_000), rng.beta(2, 5, 200_000)
    mixed = np.concatenate([pos[: int(prevalence * 200_000)], neg[: int((1 - prevalence) * 200_000)]])

    def q(values: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in np.quantile(values, LEVELS))

    return ScoreReference("OOF ensemble", "test", n, prevalence, q(mixed), q(pos), q(neg))


def site_sample(n: int, prevalence: float, seed: int, shift: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.binomial(n, prevalence)
    return np.clip(np.concatenate([rng.beta(5, 2, k), rng.beta(2, 5, n - k)]) * shift, 0.0, 1.0)


def test_reference_cdf_inverts_the_quantiles_and_survives_ties() -> None:
    ref = beta_reference()
    np.testing.assert_allclose(reference_cdf(ref.quantiles, np.asarray(ref.quantiles)[1:-1]), LEVELS[1:-1],
                               atol=1e-9)
    tied = (0.0,) * 50 + tuple(np.linspace(0.0, 1.0, 51))
    values = reference_cdf(tied, np.array([0.0, 0.5, 1.0]))
    assert values[0] == pytest.approx(0.5) and values[-1] == 1.0 and np.all(np.diff(values) >= 0)


@pytest.mark.parametrize("prevalence", [0.1, 0.25, 0.42])
def test_a_change_of_prevalence_alone_is_not_drift(prevalence: float) -> None:
    ref = beta_reference()
    result = drift(site_sample(400, prevalence, seed=int(prevalence * 100)), ref, level=0.1)
    assert result.prevalence == pytest.approx(prevalence, abs=0.07)
    assert result.statistic < result.critical and not result.alert
    assert result.unadjusted > result.statistic  # the plain comparison would have called it a shift


def test_scores_that_moved_are_drift_and_alert() -> None:
    ref = beta_reference()
    result = drift(site_sample(400, 0.3, seed=1, shift=0.6), ref, level=0.1)  # every score pulled down
    assert result.alert and result.statistic > max(0.1, result.critical)
    few = drift(site_sample(10, 0.3, seed=2, shift=0.6), ref, level=0.1)
    assert few.critical == pytest.approx(ks_critical(10, 662)) and few.critical > 0.5  # ten images say little


def test_drift_refuses_what_is_not_a_set_of_probabilities() -> None:
    with pytest.raises(ValueError, match="non-empty set of probabilities"):
        drift(np.array([]), beta_reference(), 0.1)
    with pytest.raises(ValueError, match="non-empty set of probabilities"):
        drift(np.array([0.5, 1.5]), beta_reference(), 0.1)


def header(**values: str) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_what_a_site_is() -> None:
    ds = header(StationName="DX ROOM 2", InstitutionName="St  Elsewhere", Manufacturer="Acme",
                ManufacturerModelName="Rad 5")
    assert site_of(ds, "DX2", "calling_ae") == "DX2"
    assert site_of(ds, "DX2", "station_name") == "DX ROOM 2"
    assert site_of(ds, "DX2", "institution_name") == "St Elsewhere"
    assert site_of(ds, "DX2", "device") == "Acme Rad 5"
    assert site_of(header(), "", "calling_ae") == site_of(header(), "DX2", "device") == UNKNOWN_SITE
    with pytest.raises(ValueError, match="unknown site key"):
        site_of(ds, "DX2", "ward")


def test_the_worker_records_each_sites_scores_and_the_commands_show_their_drift(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from ai.ensemble import Ensemble
    from node.config import Destination, Settings, SiteSettings, StorageSettings
    from node.worker import Worker
    from storage.db import make_engine
    from storage.queue import Store
    from tests.model_fixtures import build_tiny_package
    from tests.test_cli import cli
    from tests.test_worker import chest, enqueue

    # an untrained network scores every image about alike: far from a trained model's reference
    package = build_tiny_package(tmp_path / "pkg", size=64, members=1, reference={"Tuberculosis": beta_reference()})
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),),
                        sites=SiteSettings(key="station_name"))
    settings.data_path.mkdir(parents=True)
    store = Store(make_engine(settings.database_url))
    worker = Worker(store, Ensemble.load(package, threads=1), settings, owner="test:1:1")
    for i in range(30):
        ds = chest()
        ds.StationName = "ROOM A" if i < 24 else "ROOM B"
        enqueue(store, settings.data_path, ds)
    while worker.run_once():
        pass
    assert store.score_sites("0.0.0-test") == {"ROOM A": 24, "ROOM B": 6}

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "var"\n[model]\npackage = "{package}"\n'
                      '[sites]\nkey = "station_name"\nmin_images = 20\n'
                      '[site_prevalence]\n"ROOM A" = { Tuberculosis = 0.2 }\n')
    out = cli("sites", "--format", "json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    reports = {r["site"]: r for r in json.loads(out.stdout)}
    assert set(reports) == {"ROOM A", "ROOM B"} and reports["ROOM A"]["images"] == 24
    tb = reports["ROOM A"]["labels"]["Tuberculosis"]
    assert (tb["threshold"], tb["threshold_method"]) == (0.5, "fixed for tests")
    assert tb["suggestion"]["prevalence"] == 0.2 and tb["suggestion"]["prevalence_source"] == "stated"
    assert tb["suggested_method"].startswith("prediction alignment") and 0 <= tb["suggested_threshold"] <= 1
    room_b = reports["ROOM B"]["labels"]["Tuberculosis"]
    assert room_b["suggested_threshold"] is None
    assert room_b["suggestion_note"] == "6 of the 20 images a suggestion needs"
    assert tb["drift"]["n"] == 24 and tb["drift"]["alert"] is True  # scores bunched where the reference is thin
    assert tb["weeks"][0]["images"] == 24 and tb["weeks"][0]["drift"]["n"] == 24
    assert reports["ROOM B"]["labels"]["Tuberculosis"]["weeks"][0]["drift"] is None  # 6 images: too few for a week
    text = cli("sites", "--config", str(config)).stdout
    assert "site ROOM A: 24 analysed images (tiny-test 0.0.0-test)" in text and "ALERT" in text
    status = cli("status", "--config", str(config)).stdout
    assert "ALERT:   site ROOM A: Tuberculosis scores drift from the package's reference" in status
    sr_files = list((settings.data_path / "results").rglob("*.dcm"))
    assert sr_files and all("ROOM" not in str(p) for p in sr_files)  # nothing of the site leaks into paths
    assert pydicom.dcmread(sr_files[0]).SOPClassUID  # results were written as usual


def labelled_site(n: int, prevalence: float, seed: int, move: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A site's scores with their labels; ``move`` < 1 is an acquisition change: every score raised to a power,
    sick and healthy alike (monotone)."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    scores = np.where(y, rng.beta(5, 2, n), rng.beta(2, 5, n))
    return scores ** (1.0 / move), y


def rates(scores: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    return float(np.mean(scores[y] >= t)), float(np.mean(scores[~y] < t))


def test_alignment_leaves_an_unmoved_site_alone_and_undoes_an_acquisition_change() -> None:
    ref = beta_reference()
    t = 0.45  # the package threshold, chosen on the reference
    reference_rates = (1 - reference_cdf(ref.quantiles_positive, np.array([t]))[0],
                       reference_cdf(ref.quantiles_negative, np.array([t]))[0])
    same, y = labelled_site(3000, 0.15, seed=3)
    assert aligned_threshold(same, ref, t, 0.15) == pytest.approx(t, abs=0.03)
    moved, y = labelled_site(3000, 0.15, seed=4, move=0.5)  # scores squared: the sick score lower
    fixed = rates(moved, y, t)
    adapted_t = aligned_threshold(moved, ref, t, 0.15)
    adapted = rates(moved, y, adapted_t)
    assert fixed[0] < reference_rates[0] - 0.15  # the fixed threshold misses many more sick patients
    assert adapted[0] == pytest.approx(reference_rates[0], abs=0.04)  # alignment restores both rates
    assert adapted[1] == pytest.approx(reference_rates[1], abs=0.04)
    stated = suggest(moved, ref, t, prevalence=0.15)
    assert stated.threshold == pytest.approx(adapted_t) and stated.prevalence_source == "stated"
    assert "prevalence 0.15 (stated)" in stated.method and stated.images == 3000
    guessed = suggest(same, ref, t)  # unmoved: the estimated prevalence is right and the threshold stays
    assert guessed.prevalence_source == "estimated" and guessed.prevalence == pytest.approx(0.15, abs=0.05)
    assert guessed.threshold == pytest.approx(t, abs=0.05)
    with pytest.raises(ValueError, match="prevalence in"):
        aligned_threshold(same, ref, t, 1.5)


def test_an_accepted_site_threshold_is_in_the_next_sr_survives_a_restart_and_resets_with_a_new_model(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package
    from tests.test_cli import cli

    reference = {"Tuberculosis": beta_reference()}
    package = build_tiny_package(tmp_path / "pkg", size=64, members=1, reference=reference)
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "var"\n[model]\npackage = "{package}"\n'
                      '[sites]\nkey = "station_name"\nmin_images = 20\n')
    run_worker(tmp_path, package, {"ROOM A": 24, "ROOM B": 3})
    refused = cli("sites", "accept", "ROOM B", "--config", str(config))
    assert refused.returncode == 1 and "no suggestion to accept for Tuberculosis (Tuberculosis: 3 of the 20" in (
        refused.stderr)
    assert cli("sites", "accept", "ROOM C", "--config", str(config)).returncode == 1
    assert cli("sites", "accept", "--config", str(config)).returncode == 2
    suggested = json.loads(cli("sites", "--format", "json", "--config", str(config)).stdout)[0]
    value = suggested["labels"]["Tuberculosis"]["suggested_threshold"]
    accepted = cli("sites", "accept", "ROOM A", "--label", "Tuberculosis", "--config", str(config))
    assert accepted.returncode == 0, accepted.stderr
    assert f"site ROOM A: Tuberculosis threshold {value:.6f} in force (v1 for tiny-test 0.0.0-test" in accepted.stdout

    # the next images, by a worker started afresh (a restart): ROOM A's SR states its own threshold
    reports = run_worker(tmp_path, package, {"ROOM A": 1, "ROOM B": 1})
    room_a, room_b = reports["ROOM A"][-1].finding("Tuberculosis"), reports["ROOM B"][-1].finding("Tuberculosis")
    assert room_a.threshold == pytest.approx(value, abs=1e-6)
    assert room_a.threshold_method.startswith("site threshold v1 for ROOM A (accepted by administrator")
    assert "prediction alignment" in room_a.threshold_method
    assert room_a.positive == (room_a.probability >= value)
    assert (room_b.threshold, room_b.threshold_method) == (0.5, "fixed for tests")
    listed = json.loads(cli("sites", "--format", "json", "--config", str(config)).stdout)
    in_force = {r["site"]: r["labels"]["Tuberculosis"]["threshold_method"] for r in listed}
    assert in_force["ROOM A"].startswith("site threshold v1") and in_force["ROOM B"] == "fixed for tests"

    # the same members reissued with other age ranges score alike: the site keeps its threshold
    from training.combine import reissue_package

    reissued = reissue_package(package, tmp_path / "pkg-reissued", version="0.0.0-test.1")
    reports = run_worker(tmp_path, reissued, {"ROOM A": 1})
    room_a = reports["ROOM A"][-1].finding("Tuberculosis")
    assert room_a.threshold == pytest.approx(value, abs=1e-6) and room_a.threshold_method.startswith(
        "site threshold v1 for ROOM A")
    config_reissued = tmp_path / "node-reissued.toml"
    config_reissued.write_text(config.read_text().replace(str(package), str(reissued)))
    listed = json.loads(cli("sites", "--format", "json", "--config", str(config_reissued)).stdout)
    assert [(r["site"], r["labels"]["Tuberculosis"]["threshold_method"].split(" (")[0]) for r in listed] == [
        ("ROOM A", "site threshold v1 for ROOM A")]  # the reissue's own score history: the one image above

    # a new model version starts the site over with the package's thresholds
    newer = build_tiny_package(tmp_path / "pkg2", size=64, members=1, reference=reference, version="0.0.1-test")
    reports = run_worker(tmp_path, newer, {"ROOM A": 1})
    assert reports["ROOM A"][-1].finding("Tuberculosis").threshold_method == "fixed for tests"


def test_site_thresholds_of_a_version_that_scores_alike_fill_in_below_the_versions_own(tmp_path: Path) -> None:
    from storage.db import make_engine
    from storage.queue import Store

    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"))
    store.accept_site_threshold("A", "Tuberculosis", "pkg", "1.0", 0.3, "m", "admin")
    store.accept_site_threshold("A", "Pediatric_Pneumonia", "pkg", "1.0", 0.6, "m", "admin")
    store.accept_site_threshold("A", "Pediatric_Pneumonia", "pkg", "1.1", 0.7, "m", "admin")
    store.accept_site_threshold("B", "Tuberculosis", "pkg", "0.9", 0.2, "m", "admin")  # not named: never used

    def in_force(version: str, *same: str) -> dict[tuple[str, str], tuple[str, float]]:
        return {k: (v.model_version, v.threshold) for k, v in store.site_thresholds(version, same_scores=same).items()}

    assert in_force("1.1") == {("A", "Pediatric_Pneumonia"): ("1.1", 0.7)}
    assert in_force("1.1", "1.0") == {("A", "Tuberculosis"): ("1.0", 0.3), ("A", "Pediatric_Pneumonia"): ("1.1", 0.7)}
    assert in_force("1.2", "1.1", "1.0") == in_force("1.1", "1.0")  # the latest earlier version that has one
    assert set(store.site_thresholds("1.2", "A", ("1.1", "1.0"))) == {("A", "Tuberculosis"),
                                                                     ("A", "Pediatric_Pneumonia")}


def run_worker(tmp_path: Path, package: Path, images: dict[str, int]) -> dict[str, list]:  # type: ignore[type-arg]
    """Receive ``images`` per station into the node's folder and run a fresh worker until the queue is empty;
    the SRs of this run per station, read back."""
    from ai.ensemble import Ensemble
    from node.config import Destination, Settings, SiteSettings, StorageSettings
    from node.report import read_report
    from node.worker import Worker
    from storage.db import make_engine
    from storage.queue import Store
    from tests.test_worker import chest, enqueue

    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),),
                        sites=SiteSettings(key="station_name", min_images=20))
    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(make_engine(settings.database_url))
    worker = Worker(store, Ensemble.load(package, threads=1), settings, owner="test:1:1")
    sources: dict[str, str] = {}
    for station, count in images.items():
        for _ in range(count):
            ds = chest()
            ds.StationName = station
            sources[ds.SOPInstanceUID] = station
            enqueue(store, settings.data_path, ds)
    while worker.run_once():
        pass
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for path in (settings.data_path / "results").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.Modality == "SR":
            report = read_report(ds)
            station = sources.get(report.source_sop_instance_uids[0])
            if station is not None:
                out.setdefault(station, []).append(report)
    return out


def test_adapt_auto_puts_the_suggestion_in_force_once_with_an_audit_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    import logging

    from ai.ensemble import Ensemble
    from node.config import Destination, Settings, SiteSettings, StorageSettings
    from node.worker import Worker
    from storage.db import make_engine
    from storage.queue import Store
    from tests.model_fixtures import build_tiny_package
    from tests.test_worker import chest, enqueue

    package = build_tiny_package(tmp_path / "pkg", size=64, members=1, reference={"Tuberculosis": beta_reference()})
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),),
                        sites=SiteSettings(key="calling_ae", min_images=20, adapt="auto"),
                        site_prevalence={"DX2": {"Tuberculosis": 0.3}})
    settings.data_path.mkdir(parents=True)
    store = Store(make_engine(settings.database_url))
    worker = Worker(store, Ensemble.load(package, threads=1), settings, owner="test:1:1")
    caplog.set_level(logging.WARNING, logger="node.sites")
    for _ in range(25):
        ds = chest()
        enqueue(store, settings.data_path, ds, "DX2")
    while worker.run_once():
        pass
    accepted = store.site_thresholds("0.0.0-test")
    assert list(accepted) == [("DX2", "Tuberculosis")]  # once, at the 20th image; not again after
    entry = accepted[("DX2", "Tuberculosis")]
    assert entry.version == 1 and entry.accepted_by == "auto" and "prevalence 0.3 (stated)" in entry.method
    audits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AUDIT")]
    assert len(audits) == 1 and "site DX2, Tuberculosis" in audits[0]
    history = store.site_scores("DX2", "0.0.0-test", "Tuberculosis")
    assert [h.threshold_method.startswith("site threshold v1") for h in history] == [False] * 20 + [True] * 5


def test_the_running_node_logs_when_a_site_starts_and_stops_drifting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import itertools
    import logging

    from node.config import Settings, StorageSettings
    from node.scheduler import NodeScheduler
    from storage.db import make_engine
    from storage.queue import ReceivedInstance, ScoreRecord, Store
    from tests.test_manifest import make_package

    manifest = make_package(tmp_path / "pkg")  # carries a reference for Nodule: Beta-like spread on [0, 1]
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"))
    scheduler = NodeScheduler(store, settings, None, manifest)
    assert scheduler.scheduler.get_job("drift") is not None
    caplog.set_level(logging.INFO, logger="node.scheduler")

    received = itertools.count(1)

    def analysed(values: list[float]) -> None:
        for value in values:
            meta = ReceivedInstance(f"1.2.3.{next(received)}", "1.2", "1.2.1", "1.2.840.10008.5.1.4.1.1.1", "DX2",
                                    tmp_path / "x.dcm", 1)
            job = store.record_instance(meta, True, "test")
            store.complete_job(job, [], [], [ScoreRecord("DX2", manifest.name, manifest.version, "Nodule", value,
                                                         0.3, "x", value >= 0.3)])

    analysed([0.02] * 60)  # every score bunched near 0: far from the reference at any prevalence
    assert scheduler.check_drift() and "ALERT: site DX2: Nodule scores drift" in caplog.text
    caplog.clear()
    assert scheduler.check_drift() and "ALERT" not in caplog.text  # said once, not every hour
    analysed([i / 2000 for i in range(1000)])  # then scores spread as the reference's negatives are
    assert scheduler.check_drift() == []
    assert "drift alert over: site DX2: Nodule scores are back near the package's reference" in caplog.text
