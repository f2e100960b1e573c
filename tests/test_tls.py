"""DICOM TLS (node/tls.py): the ``[scp.tls]`` and destination TLS keys of the configuration, and the TLS contexts.

The certificates are made here with openssl, EC P-256 (milliseconds): a CA, a server certificate (for
127.0.0.1) and a client certificate it signed, and a client certificate of another CA (a stranger).
Tests that need openssl or a dcmtk built with TLS skip, naming what is missing.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from node.config import ConfigError, Destination, ScpTlsSettings, load_settings
from node.tls import client_context
from tests.conftest import REPO

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    """The test's certificates and keys (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    stranger_cert: Path  # a client certificate of other_ca
    stranger_key: Path


def _openssl(*args: str | Path) -> None:
    out = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", *EC_KEY, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], *extensions: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    ext = [arg for e in ("basicConstraints=CA:FALSE", *extensions) for arg in ("-addext", e)]
    _openssl("req", "-x509", *EC_KEY, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-CA", ca[0], "-CAkey", ca[1], *ext)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (Debian package openssl): the TLS tests make their certificates with it")
    folder = tmp_path_factory.mktemp("pki")
    ca, other = _ca(folder, "ca"), _ca(folder, "other-ca")
    server = _leaf(folder, "server", ca, "subjectAltName=IP:127.0.0.1")
    client = _leaf(folder, "client", ca)
    stranger = _leaf(folder, "stranger", other)
    return Pki(ca[0], *server, *client, other[0], *stranger)

# --- configuration -------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text, encoding="utf-8")
    return p


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ=environ or {})
    return exc.value.problems


def test_tls_keys_take_paths_relative_to_the_file_and_the_summary_names_the_port(tmp_path: Path, pki: Pki) -> None:
    for f in (pki.server_cert, pki.server_key, pki.ca):
        shutil.copy(f, tmp_path / f.name)
    text = f"""
[scp.tls]
enabled = true
port = 2763
cert_file = "{pki.server_cert.name}"
key_file = "{pki.server_key.name}"
ca_file = "{pki.ca.name}"
require_client_cert = true
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 2762
tls = true
ca_file = "{pki.ca.name}"
"""
    s = load_settings(write(tmp_path, text), environ={})
    assert s.scp.tls.cert_file == str(tmp_path / pki.server_cert.name)
    assert s.destinations[0].ca_file == str(tmp_path / pki.ca.name) and s.destinations[0].tls
    summary = s.summary()
    assert summary["scp"]["tls"] == {"port": 2763, "only": False, "client_certificates": "required",
                                     "cert_file": str(tmp_path / pki.server_cert.name)}
    assert summary["destinations"] == ["pacs=PACS@10.0.0.5:2762 (TLS)"]
    assert "PRIVATE KEY" not in str(summary)
    assert load_settings(None, environ={}).summary()["scp"]["tls"] == "off"


def test_environment_sets_the_nested_tls_keys(tmp_path: Path, pki: Pki) -> None:
    env = {"CXR_SCP_TLS_ENABLED": "true", "CXR_SCP_TLS_PORT": "0", "CXR_SCP_TLS_ONLY": "true",
           "CXR_SCP_TLS_CERT_FILE": str(pki.server_cert), "CXR_SCP_TLS_KEY_FILE": str(pki.server_key)}
    s = load_settings(write(tmp_path, "[scp]\nport = 2000\n"), environ=env)
    assert (s.scp.port, s.scp.tls.enabled, s.scp.tls.port, s.scp.tls.only) == (2000, True, 0, True)
    assert s.scp.tls.key_file == str(pki.server_key)


def test_missing_tls_files_are_named_with_their_key_and_path(tmp_path: Path) -> None:
    text = """
[scp.tls]
enabled = true
cert_file = "certs/node.pem"
key_file = "certs/node.key"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "h"
port = 104
tls = true
ca_file = "/nowhere/ca.pem"
"""
    found = problems(write(tmp_path, text))
    assert f"scp.tls.cert_file: expected a PEM file, found no file at {tmp_path / 'certs' / 'node.pem'}" in found
    assert "destinations.pacs.ca_file: expected a PEM file, found no file at /nowhere/ca.pem" in found


def test_every_bad_tls_key_is_named_with_expected_and_found(tmp_path: Path) -> None:
    text = """
[scp]
port = 2762
[scp.tls]
enabled = "yes"
port = "2762"
require_client_cert = 1
colour = "blue"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "h"
port = 104
tls = "yes"
[[destinations]]
name = "ris"
ae_title = "RIS"
host = "h"
port = 104
ca_file = "ca.pem"
"""
    found = problems(write(tmp_path, text))
    for expected in ("scp.tls.enabled: expected true or false, found 'yes'",
                     "scp.tls.port: expected an integer, found '2762'",
                     "scp.tls.require_client_cert: expected true or false, found 1",
                     "destinations[0].tls: expected true or false, found 'yes'",
                     "destinations.ris.tls: expected true with ca_file, cert_file, key_file or check_hostname "
                     "(results would go unencrypted), found false"):
        assert expected in found, found
    assert any(p.startswith("scp.tls.colour: unknown key (expected one of ca_file, cert_file, enabled") for p in found)
    assert problems(write(tmp_path, "[scp]\ntls = 5\n")) == ["[scp.tls]: expected a table, found 5"]


def test_tls_combinations_that_cannot_work_are_refused(tmp_path: Path, pki: Pki) -> None:
    files = f'cert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n'
    found = problems(write(tmp_path, f"[scp]\nport = 2762\n[scp.tls]\nenabled = true\nport = 2762\n{files}"
                                     "require_client_cert = true\n"))
    assert found == ["scp.tls.port: expected another port than scp.port (the plain listener), found 2762 for both",
                     "scp.tls.ca_file: required with require_client_cert = true (the CA that client certificates "
                     "must chain to), found nothing"]
    assert problems(write(tmp_path, "[scp.tls]\nonly = true\n")) == [
        "scp.tls.only: expected enabled = true with it (TLS only needs the TLS listener), found enabled = false"]
    swapped = f'cert_file = "{pki.server_key}"\nkey_file = "{pki.server_cert}"\n'
    (bad,) = problems(write(tmp_path, f"[scp.tls]\nenabled = true\n{swapped}"))
    assert bad.startswith("scp.tls.cert_file/key_file: expected a PEM certificate and its matching private key"), bad
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", pki.server_key, "-out", encrypted, "-aes256", "-passout", "pass:secret")
    (bad,) = problems(write(tmp_path, f'[scp.tls]\nenabled = true\ncert_file = "{pki.server_cert}"\n'
                                      f'key_file = "{encrypted}"\n'))
    assert bad.startswith("scp.tls.key_file: expected an unencrypted private key, found an encrypted one"), bad
    (bad,) = problems(write(tmp_path, '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n'
                                      "tls = true\n"))
    assert bad == ("destinations.pacs.ca_file: required with tls = true (the CA that the destination's certificate "
                   "must chain to), found nothing")


def test_embedded_default_holds_every_tls_key_switched_off() -> None:
    """config/node.toml shows every key (test_config checks that each has its comment)."""
    raw = tomllib.loads((REPO / "config" / "node.toml").read_text())
    assert set(raw["scp"]["tls"]) == {f.name for f in fields(ScpTlsSettings)}
    assert {f.name for f in fields(Destination)} <= set(raw["destinations"][0])
    s = load_settings(REPO / "config" / "node.toml", environ={})
    assert s.scp.tls == ScpTlsSettings() and not s.destinations[0].tls


# --- the contexts ----------------------------------------------------------------------------------


def test_client_context_is_tls_1_2_or_later_and_verifies_against_the_ca_only(pki: Pki) -> None:
    context = client_context(str(pki.ca))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname
    assert context.options & ssl.OP_NO_COMPRESSION
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ca"),),)]
