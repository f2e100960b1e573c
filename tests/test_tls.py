"""DICOM TLS (node/tls.py): the node's TLS listener against dcmtk's echoscu and storescu, its sender against
dcmtk's storescp, and the ``[scp.tls]`` and destination TLS keys of the configuration.

The certificates are made here with openssl, EC P-256 (milliseconds): a CA, a server certificate (for
127.0.0.1) and a client certificate it signed, and a client certificate of another CA (a stranger).
Tests that need openssl or a dcmtk built with TLS skip, naming what is missing.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.audit import AuditTrail
from node.config import (
    ConfigError,
    Destination,
    ScpSettings,
    ScpTlsSettings,
    SendSettings,
    Settings,
    StorageSettings,
    load_settings,
)
from node.filter import FilterRules
from node.health import check_scp
from node.intake import Intake
from node.receive import make_ae, start_scp
from node.scp_server import NoDelayAssociationServer
from node.send import Outbox, Verdict, echo, send_files
from node.tls import client_context
from storage.db import Instance, make_engine
from storage.queue import Store
from tests.conftest import REPO, free_port, require_tool
from tests.peers import DCMTK_ENV, wait_for
from tests.test_scp_processes import CR_IMAGE_STORAGE, STORED, write_cr
from tests.test_send import T0, make_file, make_outbox_store, received, storescp

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


# --- the listener --------------------------------------------------------------------------------


def dcmtk_tls(name: str) -> str:
    """A dcmtk program built with TLS (OpenSSL), or skip the test saying which is missing."""
    path = require_tool(name)
    usage = subprocess.run([path, "--help"], capture_output=True, text=True, check=False).stdout
    if "+tls" not in usage:
        pytest.skip(f"{name} is built without TLS support (dcmtk needs OpenSSL for +tls)")
    return path


def trusted(pki: Pki) -> list[str]:
    """dcmtk's options for a client with a certificate of the node's CA, verifying the node's certificate."""
    return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]


def echoscu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk_tls("echoscu"), "-aet", "MODALITY", "-aec", "CXR-AI", "-to", "10", *options, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)


def storescu(port: int, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk_tls("storescu"), "-aet", "MODALITY", "-aec", "CXR-AI", "-to", "10", *options, "127.0.0.1",
           str(port), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)


@pytest.fixture(autouse=True)
def _restore_pynetdicom_config() -> Iterator[None]:
    """make_ae switches chunked receive on process-wide; leave pynetdicom as we found it."""
    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET)
    yield
    _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET = saved


@dataclass
class Scp:
    """The node's SCP listening plain and with TLS, on free ports, with its SQLite store."""

    settings: Settings
    engine: Engine
    plain: NoDelayAssociationServer
    tls: NoDelayAssociationServer

    @property
    def port(self) -> int:
        return int(self.plain.server_address[1])

    @property
    def tls_port(self) -> int:
        return int(self.tls.server_address[1])

    def stored(self) -> dict[str, Path]:
        """Every stored instance: its SOPInstanceUID and file."""
        with Session(self.engine) as s:
            return {uid: Path(path) for uid, path in s.execute(select(Instance.sop_instance_uid, Instance.path))}


@pytest.fixture
def start_tls_scp(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Scp]]:
    """Start the SCP with ``[scp.tls] enabled`` (its keys: the fixture's, overridden by the arguments)."""
    started: list[Scp] = []

    def start(**tls_keys: Any) -> Scp:
        tls = ScpTlsSettings(enabled=True, port=0, cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                             ca_file=str(pki.ca))
        scp = ScpSettings(port=0, bind_address="127.0.0.1", artim_timeout_s=2.0, tls=replace(tls, **tls_keys))
        settings = Settings(scp=scp, storage=StorageSettings(data_dir=str(tmp_path / "data"), min_free_mb=0))
        engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}")
        intake = Intake(settings.data_path, Store(engine), settings, FilterRules.load(None))
        ae = make_ae(settings)
        audit = AuditTrail(Store(engine))
        node = Scp(settings, engine, start_scp(settings, intake, ae, audit=audit),
                   start_scp(settings, intake, ae, audit=audit, tls=True))
        started.append(node)
        return node

    yield start
    for node in started:
        node.plain.shutdown()
        node.tls.shutdown()
        node.engine.dispose()


@pytest.mark.integration
def test_tls_listener_answers_echo_and_stores_what_storescu_sends(
    start_tls_scp: Callable[..., Scp], pki: Pki, tmp_path: Path
) -> None:
    node = start_tls_scp()
    echoed = echoscu(node.tls_port, *trusted(pki))
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr
    path, sop_uid = write_cr(tmp_path, 1, generate_uid())
    sent = storescu(node.tls_port, path, *trusted(pki))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    stored = node.stored()
    assert list(stored) == [sop_uid] and stored[sop_uid].is_file()


@pytest.mark.integration
def test_required_client_certificate_refuses_strangers_and_anonymous_clients_beside_the_plain_port(
    start_tls_scp: Callable[..., Scp], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_tls_scp(require_client_cert=True)
    caplog.set_level(logging.WARNING, logger="node.transport")
    stranger = echoscu(node.tls_port, "+tls", str(pki.stranger_key), str(pki.stranger_cert), "+cf", str(pki.ca))
    assert stranger.returncode != 0, "a client certificate of another CA was accepted"
    anonymous = echoscu(node.tls_port, "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode != 0, "a client without a certificate was accepted"
    plain_to_tls = echoscu(node.tls_port)
    assert plain_to_tls.returncode != 0, "a plain DICOM client was accepted on the TLS port"
    failures = re.findall(r"TLS handshake with 127\.0\.0\.1 failed: (.*): connection closed", caplog.text)
    assert len(failures) == 3, caplog.text
    assert "certificate verify failed" in failures[0] and "certificate" in failures[1], failures
    assert echoscu(node.port).returncode == 0, "the plain port stopped answering"
    assert echoscu(node.tls_port, *trusted(pki)).returncode == 0, "a trusted client was refused"
    wait_for(lambda: node.tls.peer_slots.held("127.0.0.1") == 0, 10, what="every connection's slot released")
    events = Store(node.engine).audit_events(event="association")  # the audit trail has each refusal
    refused = [e for e in events if e.outcome == "failure"]
    assert len(refused) == 3 and all(e.detail["reason"].startswith("TLS handshake failed") for e in refused)
    assert {e.address for e in refused} == {"127.0.0.1"}
    assert [e.actor for e in events if e.outcome == "success"] == ["MODALITY", "MODALITY"]  # echoscu -aet


@pytest.mark.integration
def test_a_silent_client_does_not_hold_up_the_others_and_is_closed_at_the_artim_timeout(
    start_tls_scp: Callable[..., Scp], pki: Pki
) -> None:
    """The handshake runs in the connection's own thread, within scp.artim_timeout_s (2 s here) of the accept."""
    node = start_tls_scp()
    with socket.create_connection(("127.0.0.1", node.tls_port)) as silent:
        silent.settimeout(10)
        answered = echoscu(node.tls_port, *trusted(pki))
        assert answered.returncode == 0, answered.stdout + answered.stderr
        assert silent.recv(1) == b"", "the silent connection was not closed"
    wait_for(lambda: node.tls.peer_slots.held("127.0.0.1") == 0, 10, what="the silent connection's slot released")


@pytest.mark.integration
def test_health_checks_a_tls_only_listener_over_tls(start_tls_scp: Callable[..., Scp], pki: Pki) -> None:
    node = start_tls_scp(require_client_cert=True)
    tls_only = replace(node.settings.scp, tls=replace(node.settings.scp.tls, port=node.tls_port, only=True))
    check = check_scp(replace(node.settings, scp=tls_only), timeout_s=5)
    assert check.ok and "(TLS)" in check.detail, check.detail


# --- scp.processes > 1 ---------------------------------------------------------------------------


@pytest.mark.integration
def test_every_scp_process_accepts_on_the_tls_port(tmp_path: Path, pki: Pki) -> None:
    """``cxr-node serve --role scp`` with two processes: two TLS associations held at once go one to each."""
    tls_port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[scp]\nport = {free_port()}\nbind_address = "127.0.0.1"\nprocesses = 2\n'
                      f'[scp.tls]\nenabled = true\nport = {tls_port}\ncert_file = "{pki.server_cert}"\n'
                      f'key_file = "{pki.server_key}"\nca_file = "{pki.ca}"\nrequire_client_cert = true\n'
                      f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_mb = 1\n')
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config), "--role", "scp"],
                                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    try:
        listening = re.compile(rf"2 SCP processes listening on port \d+ and TLS port {tls_port}: pids ([\d, ]+)")
        found = wait_for(lambda: listening.search(log_path.read_text()) or proc.poll() is not None, 60,
                         what="two SCP processes listening")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        pids = {int(p) for p in found.group(1).split(",")}
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CR_IMAGE_STORAGE)
        tls = client_context(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        held, sent = [], []
        for k in range(2):
            assoc = ae.associate("127.0.0.1", tls_port, ae_title="CXR-AI", tls_args=(tls, "127.0.0.1"))
            assert assoc.is_established, log_path.read_text()[-3000:]
            held.append(assoc)
            path, uid = write_cr(tmp_path, k, generate_uid())
            assert assoc.send_c_store(path).Status == 0x0000
            sent.append(uid)
        by_uid = {uid: int(pid) for pid, uid in STORED.findall(log_path.read_text())}
        for assoc in held:
            assoc.release()
        assert {by_uid[uid] for uid in sent} == pids, by_uid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# --- destinations --------------------------------------------------------------------------------


def tls_pacs(port: int, pki: Pki, **keys: Any) -> Destination:
    """A ``tls = true`` destination: the PACS on this machine, its certificate checked against the test CA."""
    dest = Destination("pacs", "PACS", "127.0.0.1", port, tls=True, ca_file=str(pki.ca),
                       cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    return replace(dest, **keys)


def tls_storescp(pki: Pki) -> list[str]:
    """storescp's options: TLS with the server certificate, client certificates required (dcmtk's default)."""
    dcmtk_tls("storescp")
    return ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca)]


@pytest.mark.integration
def test_tls_destination_receives_results_and_answers_echo(tmp_path: Path, port: int, pki: Pki) -> None:
    paths = [make_file(tmp_path, n) for n in range(2)]
    with storescp(tmp_path, port, *tls_storescp(pki)) as out:
        assert echo(tls_pacs(port, pki), "CXR-AI", timeout_s=5)
        outcomes = send_files(tls_pacs(port, pki, check_hostname=True), paths, "CXR-AI", timeout_s=5)
    assert [o.verdict for o in outcomes] == [Verdict.SENT] * 2, [o.error for o in outcomes]
    assert set(received(out)) == {o.sop_instance_uid for o in outcomes}


@pytest.mark.integration
def test_untrusted_or_misnamed_destination_certificate_is_a_retryable_failure_that_says_so(
    tmp_path: Path, port: int, pki: Pki
) -> None:
    path = make_file(tmp_path, 1)
    with storescp(tmp_path, port, *tls_storescp(pki)) as out:
        (untrusted,) = send_files(tls_pacs(port, pki, ca_file=str(pki.other_ca)), [path], "CXR-AI", timeout_s=5)
        (misnamed,) = send_files(tls_pacs(port, pki, host="localhost", check_hostname=True), [path], "CXR-AI",
                                 timeout_s=5)
        (ours_refused,) = send_files(tls_pacs(port, pki, cert_file=str(pki.stranger_cert),
                                              key_file=str(pki.stranger_key)), [path], "CXR-AI", timeout_s=5)
    assert received(out) == {}
    assert untrusted.verdict is Verdict.RETRYABLE and not untrusted.associated
    assert untrusted.error.startswith(f"TLS handshake with pacs (PACS@127.0.0.1:{port}) failed: certificate verify "
                                      "failed"), untrusted.error
    assert str(pki.other_ca) in untrusted.error
    assert misnamed.verdict is Verdict.RETRYABLE and "Hostname mismatch" in misnamed.error, misnamed.error
    assert "names localhost" in misnamed.error, misnamed.error
    assert ours_refused.verdict is Verdict.RETRYABLE and "TLS handshake with pacs" in ours_refused.error, \
        ours_refused.error


@pytest.mark.integration
def test_outbox_keeps_results_that_failed_the_handshake_and_delivers_them_once_trusted(
    tmp_path: Path, port: int, pki: Pki
) -> None:
    store = make_outbox_store(tmp_path, [make_file(tmp_path, 1)], ["pacs"])
    settings = SendSettings(retry_initial_s=10, retry_max_s=15, timeout_s=5)
    with storescp(tmp_path, port, *tls_storescp(pki)) as out:
        wrong_ca = Outbox(store, [tls_pacs(port, pki, ca_file=str(pki.other_ca))], settings, "CXR-AI")
        assert wrong_ca.run_due(T0) == 1
        (entry,) = store.due_outbox(T0 + dt.timedelta(seconds=10))
        assert entry.state == "failed" and "certificate verify failed" in (entry.last_error or "")
        fixed = Outbox(store, [tls_pacs(port, pki)], settings, "CXR-AI")
        assert fixed.run_due(T0 + dt.timedelta(seconds=10)) == 1
    assert len(received(out)) == 1
    assert store.status()["outbox"]["pacs"]["sent"] == 1
