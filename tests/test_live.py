"""Live configuration (node/live.py) on a real SQLite store: the console's changes over node.toml, what takes effect
when, where each value comes from, validation, and ``config export`` loading back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from node.config import Destination, load_settings
from node.live import REMOVED, ChangeError, LiveSettings, check_destination, check_scp_change, overlay
from node.toml_export import settings_toml
from storage.db import make_engine
from storage.queue import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"))


def base(tmp_path: Path) -> object:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[scp]\nport = 11999\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                   'port = 4242\n[thresholds]\nTuberculosis = 0.3\n')
    return load_settings(cfg, environ={})


def test_changes_apply_in_order_and_restart_keys_wait_for_a_start(tmp_path: Path, store: Store) -> None:
    settings = base(tmp_path)
    live = LiveSettings(settings, store)  # type: ignore[arg-type]
    seen: list[tuple[str, ...]] = []
    live.on_change(lambda s: seen.append(s.scp.allowed_callers))
    assert live.refresh().scp.allowed_callers == ()
    store.record_config_change("scp.allowed_callers", [], ["CT01"], "ada")
    store.record_config_change("scp.allowed_callers", ["CT01"], ["CT01", "DX2"], "bob")
    store.record_config_change("scp.max_pdu", 131072, 65536, "ada")
    store.record_config_change("thresholds.Tuberculosis", 0.3, 0.42, "ada")
    store.record_config_change("destinations.archive", None,
                               dataclasses.asdict(Destination("archive", "ARCH", "10.0.0.5", 104)), "ada")
    store.record_config_change("destinations.pacs", {}, REMOVED, "ada")
    current = live.refresh()
    assert current.scp.allowed_callers == ("CT01", "DX2") and seen == [("CT01", "DX2")]
    assert current.scp.max_pdu == 131072  # needs a restart
    assert live.pending_restart() == {"scp.max_pdu": 65536}
    assert overlay(settings, store.config_overrides(), include_restart=True).scp.max_pdu == 65536  # type: ignore
    assert current.thresholds["Tuberculosis"] == 0.42
    assert [d.name for d in current.destinations] == ["archive"]
    sources = live.sources()
    callers = sources["scp.allowed_callers"]
    assert callers["source"] == "console" and callers["changed_by"] == "bob"
    assert sources["scp.max_pdu"] == {**sources["scp.max_pdu"], "source": "console", "value": 65536,
                                      "pending_restart": True}
    assert sources["scp.artim_timeout_s"]["source"] == "default"
    assert sources["destinations.pacs"]["value"] is None and sources["destinations.pacs"]["source"] == "console"
    # null: back to node.toml's value
    store.record_config_change("thresholds.Tuberculosis", 0.42, None, "ada")
    store.record_config_change("destinations.pacs", REMOVED, None, "ada")
    current = live.refresh()
    assert current.thresholds["Tuberculosis"] == 0.3
    assert sorted(d.name for d in current.destinations) == ["archive", "pacs"]
    assert live.sources()["thresholds.Tuberculosis"]["source"] == "node.toml"
    # a live key back to node.toml's value, on a node that started with the console's value
    started = overlay(settings, store.config_overrides(), include_restart=True)  # type: ignore[arg-type]
    restarted = LiveSettings(started, store, toml=settings)  # type: ignore[arg-type]
    assert restarted.refresh().scp.allowed_callers == ("CT01", "DX2") and restarted.refresh().scp.max_pdu == 65536
    store.record_config_change("scp.allowed_callers", ["CT01", "DX2"], None, "ada")
    assert restarted.refresh().scp.allowed_callers == ()
    assert restarted.sources()["scp.allowed_callers"]["source"] == "default"


def test_a_database_that_cannot_be_read_keeps_the_settings_in_force(tmp_path: Path, store: Store) -> None:
    live = LiveSettings(base(tmp_path), store)  # type: ignore[arg-type]
    store.record_config_change("scp.allowed_callers", [], ["CT01"], "ada")
    assert live.refresh().scp.allowed_callers == ("CT01",)
    (tmp_path / "db.sqlite").write_bytes(b"not a database" * 100)
    store.engine.dispose()
    assert live.refresh().scp.allowed_callers == ("CT01",)


def test_changes_are_validated_like_node_toml(tmp_path: Path) -> None:
    settings = base(tmp_path)
    assert check_scp_change(settings, {"allowed_callers": ["CT01"]}) == {"allowed_callers": ["CT01"]}  # type: ignore
    with pytest.raises(ChangeError) as exc:
        check_scp_change(settings, {"allowed_callers": "CT01", "port": 70000, "data_dir": "/x"})  # type: ignore
    problems = " | ".join(exc.value.problems)
    assert "scp.allowed_callers: expected a list of strings" in problems and "data_dir: cannot be changed" in problems
    with pytest.raises(ChangeError, match=r"scp\.allowed_callers: expected AE titles"):
        check_scp_change(settings, {"allowed_callers": ["A" * 17]})  # type: ignore[arg-type]
    dest = check_destination(settings, {"name": "b", "ae_title": "B", "host": "h", "port": 104})  # type: ignore
    assert dest == Destination("b", "B", "h", 104)
    with pytest.raises(ChangeError) as exc:
        check_destination(settings, {"name": "b", "ae_title": "B", "host": "", "port": "104", "x": 1})  # type: ignore
    problems = " | ".join(exc.value.problems)
    assert "destination.host" in problems and "destination.port: expected an integer" in problems
    assert "destination.x: unknown key" in problems
    with pytest.raises(ChangeError, match=r"the URL names 'c'"):
        check_destination(settings, {"name": "b", "ae_title": "B", "host": "h", "port": 104}, "c")  # type: ignore


def test_config_export_loads_back_to_the_same_settings(tmp_path: Path, store: Store) -> None:
    settings = load_settings(REPO / "config" / "node.toml", environ={})
    store.record_config_change("scp.allowed_callers", [], ["CT01"], "ada")
    live = LiveSettings(settings, store)
    live.refresh()
    out = tmp_path / "elsewhere" / "exported.toml"
    out.parent.mkdir()
    out.write_text(settings_toml(live.current, live.sources()))
    loaded = load_settings(out, environ={})
    assert "# console v1 by ada" in out.read_text()
    assert loaded.data_path.resolve() == live.current.data_path.resolve()
    same = dataclasses.replace(loaded, base_dir=".", storage=live.current.storage)
    assert same == dataclasses.replace(live.current, base_dir=".")
