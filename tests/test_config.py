"""Configuration: defaults, partial files, environment overrides, every bad key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_embedded_default_is_valid_and_matches_the_contract() -> None:
    s = load_settings(REPO / "config" / "node.toml", environ={})
    assert s.scp.ae_title == "CXR-AI"
    assert s.scp.port == 11112
    assert s.scp.allowed_callers == ()
    assert s.storage.database_url == ""
    assert s.send.retry_initial_s == 10 and s.send.retry_max_s == 600
    assert [(d.name, d.ae_title, d.host, d.port) for d in s.destinations] == [("pacs", "PACS", "127.0.0.1", 4242)]
    assert s.model.package == ""
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("cxr-node.sqlite")


def test_every_key_of_the_default_file_is_commented() -> None:
    for line in (REPO / "config" / "node.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"key without a comment: {line!r}"


def test_partial_file_takes_defaults_for_the_rest(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "[scp]\nport = 2000\n"), environ={})
    assert s.scp.port == 2000
    assert s.scp.ae_title == "CXR-AI"
    assert s.destinations == ()
    assert s.data_path == tmp_path / "var"  # relative to the file's folder


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "CXR_SCP_PORT": "3000",
        "CXR_SCP_AE_TITLE": "NODE2",
        "CXR_SCP_ALLOWED_CALLERS": '["DX1", "CR2"]',
        "CXR_STORAGE_DATABASE_URL": "postgresql+psycopg2://cxr:secret@db/cxr",
        "CXR_THRESHOLDS_TUBERCULOSIS": "0.4",
        "CXR_DESTINATIONS": '[{"name": "p", "ae_title": "P", "host": "h", "port": 104}]',
    }
    s = load_settings(write(tmp_path, "[scp]\nport = 2000\n[thresholds]\nTuberculosis = 0.3\n"), environ=env)
    assert s.scp.port == 3000 and s.scp.ae_title == "NODE2"
    assert s.scp.allowed_callers == ("DX1", "CR2")
    assert s.thresholds == {"Tuberculosis": 0.4}
    assert s.destinations[0].port == 104
    assert "secret" not in str(s.summary())


def test_every_bad_key_is_named_with_expected_and_found(tmp_path: Path) -> None:
    text = """
[scp]
port = "eleven"
ae_title = "THIS_AE_TITLE_IS_TOO_LONG"
colour = "blue"
[send]
retry_initial_s = 100
retry_max_s = 10
[filter]
no_view_policy = "maybe"
[[destinations]]
name = "pacs"
host = "h"
port = 70000
[thresholds]
Tuberculosis = 1.5
[extra]
"""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    msg = str(info.value)
    for expected in ("scp.port: expected an integer, found 'eleven'", "scp.colour: unknown key",
                     "scp.ae_title", "retry_initial_s <= retry_max_s", "filter.no_view_policy",
                     "destinations[0].ae_title: required", "thresholds.Tuberculosis", "extra: unknown section"):
        assert expected in msg, (expected, msg)


def test_toml_syntax_error_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOML syntax"):
        load_settings(write(tmp_path, "[scp\nport=1"), environ={})


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_sites_and_site_prevalence_are_validated(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[sites]\nkey = "device"\nadapt = "off"\n[site_prevalence]\n"DX 2" = { Tuberculosis = 0.08 }\n')
    settings = load_settings(good, environ={})
    assert settings.sites.key == "device" and settings.sites.adapt == "off"
    assert settings.site_prevalence == {"DX 2": {"Tuberculosis": 0.08}}
    bad = tmp_path / "bad.toml"
    bad.write_text('[sites]\nkey = "ward"\nadapt = "always"\nmin_images = 5\ndrift_alert = 1.5\n'
                   '[site_prevalence]\nDX2 = { Tuberculosis = 1.0 }\nCT = 3\n')
    with pytest.raises(ConfigError) as info:
        load_settings(bad, environ={})
    text = str(info.value)
    for part in ("sites.key: expected one of calling_ae, station_name, institution_name, device, found 'ward'",
                 "sites.adapt: expected one of suggest, auto, off", "sites.min_images: expected >= 20",
                 "sites.drift_alert: expected a number in (0, 1)", "site_prevalence.DX2.Tuberculosis",
                 "site_prevalence.CT: expected a table"):
        assert part in text, text
