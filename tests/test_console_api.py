"""The console's REST API against a running node (``cxr-node serve``), as an administrator and a script use it:
HTTP Basic, roles, problem+json errors, destinations with a C-ECHO to a real dcmtk storescp, receiving changes that
dcmtk's echoscu feels at once, thresholds that the next SR read back from Orthanc carries, the audit trail,
persistence across a restart, ``cxr-node config export``, ``/metrics`` checked by ``promtool`` and ``/healthz``."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from node.report import read_report
from tests.conftest import REPO, free_port, require_tool
from tests.peers import dcmsend, orthanc, wait_for
from tests.test_e2e import NodeProcess, model_package, node_config, node_proc, scp_port  # noqa: F401 - fixtures
from tests.test_send import storescp
from tests.test_sites_node import copies
from tests.test_tls import pki  # noqa: F401 - the fixture: a CA and certificates made with openssl

ADMIN = ("ada", "correct horse battery")
VIEWER = ("vic", "viewer password 1")
WEB_ON = {"CXR_WEB_ENABLED": "true"}


def cli(cfg: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "ERROR", *args, "--config", str(cfg)],
                          input=stdin, capture_output=True, text=True, check=False, cwd=REPO)


def console_config(tmp: Path, pacs_port: int, package: Path, storage: str = "") -> tuple[Path, int]:
    """A node.toml with the console on a port of its own (``storage``: lines that replace ``data_dir``), and the
    users ADMIN and VIEWER."""
    cfg = node_config(tmp, pacs_port, package, gate="off")
    web_port = free_port()
    text = cfg.read_text() + f"\n[web]\nport = {web_port}\n"
    cfg.write_text(text.replace('data_dir = "var"', storage) if storage else text)
    for (name, password), role in ((ADMIN, "admin"), (VIEWER, "viewer")):
        out = cli(cfg, "users", "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
        assert out.returncode == 0, out.stderr
    return cfg, web_port


def start_node(tmp: Path, pacs: Any, package: Path, procs: list[NodeProcess]) -> tuple[Path, int, NodeProcess]:
    """A running node with its console (``console_config``), Orthanc as its PACS; (node.toml, console port, node)."""
    cfg, web = console_config(tmp, pacs.dicom_port, package)
    node = NodeProcess(cfg, env=WEB_ON)
    procs.append(node)
    wait_for(lambda: healthy(web), timeout=60, what="the console")
    return cfg, web, node


def client(port: int, who: tuple[str, str] | None = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=who, timeout=60)


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    except httpx.HTTPError:  # not listening yet
        return False


def echoscu(port: int, calling: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("echoscu"), "-aet", calling, "-aec", "CXR-AI", "127.0.0.1", str(port)],
                          capture_output=True, text=True, check=False, timeout=60)


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["title"]
    return dict(body)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Any]:
    with orthanc(tmp_path / "pacs") as p:
        yield p


def test_api_roles_destinations_echo_receiving_audit_and_restart(
    tmp_path: Path, pacs: Any, model_package: Path, node_proc: list[NodeProcess]  # noqa: F811
) -> None:
    cfg, web, node = start_node(tmp_path, pacs, model_package, node_proc)
    port = scp_port(cfg)

    # authentication and roles
    problem(client(web, None).get("/api/v1/destinations"), 401)
    assert client(web, None).get("/api/v1/destinations").headers["www-authenticate"].startswith("Basic")
    problem(client(web, (ADMIN[0], "wrong password")).get("/api/v1/destinations"), 401)
    viewer, admin = client(web, VIEWER), client(web, ADMIN)
    assert [d["name"] for d in viewer.get("/api/v1/destinations").json()] == ["pacs"]
    echo_port = free_port()
    dest = {"name": "ARCHIVE", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": echo_port}
    problem(viewer.post("/api/v1/destinations", json=dest), 403)

    # destinations: add, duplicate, bad input, echo against a real storescp, then with it stopped
    r = admin.post("/api/v1/destinations", json=dest)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/api/v1/destinations/ARCHIVE"
    problem(admin.post("/api/v1/destinations", json=dest), 409)
    bad = problem(admin.post("/api/v1/destinations", json={**dest, "name": "X", "port": 70000, "colour": 1}), 422)
    assert any("port" in e for e in bad["errors"]) and any("colour" in e for e in bad["errors"])
    problem(admin.post("/api/v1/destinations", content=b"{not json", headers={"content-type": "application/json"}),
            400)
    with storescp(tmp_path, echo_port, aet="ARCHIVE"):
        r = viewer.post("/api/v1/destinations/ARCHIVE/echo")
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
    r = viewer.post("/api/v1/destinations/ARCHIVE/echo")
    assert r.status_code == 502 and r.json()["ok"] is False
    assert "failed" in r.json()["detail"] and "ARCHIVE" in r.json()["detail"]
    problem(viewer.post("/api/v1/destinations/NOPE/echo"), 404)

    # receiving: an allowed-callers change refuses the next association of a caller no longer listed
    assert echoscu(port, "OTHER").returncode == 0
    r = admin.patch("/api/v1/scp", json={"allowed_callers": ["ECHOSCU", "MODALITY"]})
    assert r.status_code == 200, r.text
    assert r.json()["changed"]["allowed_callers"]["in_force"] == "now"
    refused = echoscu(port, "OTHER")
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert echoscu(port, "MODALITY").returncode == 0
    problem(admin.patch("/api/v1/scp", json={"allowed_callers": "MODALITY"}), 422)
    problem(admin.patch("/api/v1/scp", json={"data_dir": "/tmp"}), 422)
    problem(viewer.patch("/api/v1/scp", json={"allowed_callers": []}), 403)
    r = admin.patch("/api/v1/scp", json={"max_pdu": 65536})
    assert r.json()["changed"]["max_pdu"]["in_force"] == "at the next start"
    scp = viewer.get("/api/v1/scp").json()
    assert scp["allowed_callers"]["source"] == "console" and scp["allowed_callers"]["changed_by"] == ADMIN[0]
    assert scp["max_pdu"]["pending_restart"] is True and "port" not in scp  # node.toml only: bound before the database
    problem(admin.patch("/api/v1/scp", json={"port": 11113}), 422)
    assert scp["require_called_ae"]["source"] == "default"

    # the audit trail: the change (who, old -> new), the refused association (calling AE, address, reason), logins
    events = viewer.get("/api/v1/audit", params={"limit": 500}).json()
    change = next(e for e in events if e["event"] == "config_change" and e["detail"]["key"] == "scp.allowed_callers")
    assert change["actor"] == ADMIN[0] and change["detail"]["old"] == "[]"
    assert change["detail"]["new"] == '["ECHOSCU", "MODALITY"]'
    refusal = next(e for e in events if e["event"] == "association" and e["outcome"] == "failure")
    assert refusal["actor"] == "OTHER" and refusal["address"] == "127.0.0.1"
    assert "allowed_callers" in refusal["detail"]["reason"]
    assert any(e["event"] == "login" and e["outcome"] == "failure" and e["actor"] == ADMIN[0] for e in events)
    text = cli(cfg, "audit", "--limit", "500")
    assert text.returncode == 0 and "config_change success ada" in text.stdout
    status = cli(cfg, "status")
    assert status.returncode == 0, status.stderr
    assert 'setting scp.allowed_callers = ["ECHOSCU", "MODALITY"] (console v' in status.stdout
    assert "setting scp.max_pdu = 65536 (console v" in status.stdout
    assert "takes effect at the next start" in status.stdout
    assert "setting destinations.pacs = " in status.stdout and "(node.toml)" in status.stdout
    assert "setting scp.require_called_ae" not in status.stdout  # at its default

    # persisted across a restart; the pending change is in force after it
    node.stop()
    node = NodeProcess(cfg, env=WEB_ON)
    node_proc.append(node)
    wait_for(lambda: healthy(web), timeout=60, what="the console")
    assert echoscu(port, "OTHER").returncode != 0
    assert [d["name"] for d in viewer.get("/api/v1/destinations").json()] == ["pacs", "ARCHIVE"]
    scp = viewer.get("/api/v1/scp").json()
    assert scp["max_pdu"]["value"] == 65536 and scp["max_pdu"]["pending_restart"] is False
    assert "next start" not in cli(cfg, "status").stdout  # the restart put it in force

    # remove a destination node.toml names; config export writes what is in force, and it loads back
    assert admin.delete("/api/v1/destinations/pacs").status_code == 200
    assert [d["name"] for d in viewer.get("/api/v1/destinations").json()] == ["ARCHIVE"]
    out = cli(cfg, "config", "export", "--output", str(tmp_path / "exported.toml"))
    assert out.returncode == 0, out.stderr
    from node.config import load_settings

    exported = load_settings(tmp_path / "exported.toml", environ={})
    assert exported.scp.allowed_callers == ("ECHOSCU", "MODALITY") and exported.scp.max_pdu == 65536
    assert [d.name for d in exported.destinations] == ["ARCHIVE"]
    assert "# console v" in (tmp_path / "exported.toml").read_text()

    # repeated failed logins lock the name
    codes = [client(web, (VIEWER[0], f"wrong {i}")).get("/api/v1/me").status_code for i in range(6)]
    assert codes[:4] == [401] * 4 and codes[-1] == 429
    problem(client(web, VIEWER).get("/api/v1/me"), 429)  # locked: even the right password waits


def test_threshold_change_reaches_the_next_sr_metrics_and_health(
    tmp_path: Path, pacs: Any, model_package: Path, node_proc: list[NodeProcess]  # noqa: F811
) -> None:
    cfg, web, _ = start_node(tmp_path, pacs, model_package, node_proc)
    admin = client(web, ADMIN)
    before = admin.get("/api/v1/thresholds").json()["thresholds"][0]
    assert (before["label"], before["in_force"], before["source"]) == ("Tuberculosis", 0.0, "node.toml")
    assert before["sets_triage_flag"] is True
    r = admin.put("/api/v1/thresholds", json={"Tuberculosis": 0.999})
    assert r.status_code == 200, r.text
    after = r.json()["thresholds"][0]
    assert after["in_force"] == 0.999 and after["source"] == "console" and after["override"]["changed_by"] == "ada"
    problem(admin.put("/api/v1/thresholds", json={"Tuberculosis": 1.5}), 422)
    problem(admin.put("/api/v1/thresholds", json={"Nodule": 0.5}), 422)

    files = copies(tmp_path / "images", 2)
    assert dcmsend(files, scp_port(cfg)).returncode == 0
    wait_for(lambda: len(pacs.instances()) >= 4, timeout=240, what="2 SRs and 2 overlays at the PACS")
    reports = [read_report(pydicom.dcmread(__import__("io").BytesIO(pacs.file(i["ID"]))))
               for i in pacs.instances() if pacs.tags(i["ID"])["Modality"] == "SR"]
    assert len(reports) == 2
    for report in reports:
        finding = report.findings[0]
        assert finding.threshold == pytest.approx(0.999) and "console override" in finding.threshold_method
    results = admin.get("/api/v1/results").json()
    assert len(results) == 2 and all(s["state"] == "sent" for r in results for s in r["sent"])
    assert {r["sop_instance_uid"] for r in results} == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    sites = admin.get("/api/v1/sites").json()  # the per-site score history the drift view shows
    assert [(s["site"], s["images"]) for s in sites] == [("MODALITY", 2)]

    # /metrics: valid for promtool, and the counters moved with what dcmsend sent
    text = httpx.get(f"http://127.0.0.1:{web}/metrics", timeout=30).text
    promtool = shutil.which("promtool")
    if promtool:
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    assert 'cxr_images_received_total{calling_ae="MODALITY",status="analyse"} 2.0' in text
    assert 'cxr_send_attempts_total{destination="pacs",outcome="sent"} 4.0' in text
    assert "cxr_inference_seconds_count 2.0" in text and 'cxr_jobs{state="done"} 2.0' in text
    assert 'cxr_model_info{name="' in text and "cxr_disk_free_bytes" in text
    health = httpx.get(f"http://127.0.0.1:{web}/healthz", timeout=30).json()
    assert health["status"] == "pass" and [c["name"] for c in health["checks"]] == [
        "database", "disk", "model", "scp", "scheduler"]
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it): format not checked")


def test_healthz_turns_503_on_a_read_only_database_and_a_full_disk(
    tmp_path: Path, pacs: Any, model_package: Path, node_proc: list[NodeProcess]  # noqa: F811
) -> None:
    if os.geteuid() != 0:
        pytest.skip("an immutable database file and a small file system for the data need root (CI runs as root)")
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(data)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    database = tmp_path / "db" / "cxr-node.sqlite"
    database.parent.mkdir()
    try:
        cfg, web = console_config(tmp_path, pacs.dicom_port, model_package,
                                  storage=f'data_dir = "{data}"\nmin_free_mb = 16')
        cfg.write_text(cfg.read_text().replace('database_url = ""', f'database_url = "sqlite:///{database}"'))
        node = NodeProcess(cfg, env=WEB_ON)
        node_proc.append(node)

        def health() -> httpx.Response:
            return httpx.get(f"http://127.0.0.1:{web}/healthz", timeout=30)

        wait_for(lambda: healthy(web), timeout=60, what="healthy")
        assert {c["name"] for c in health().json()["checks"]} == {"database", "disk", "model", "scp", "scheduler"}
        # the database file read-only (root ignores file modes: the immutable attribute)
        files = [str(database)]
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            r = wait_for(lambda: (h := health()).status_code == 503 and h, timeout=10, what="503 (answers are cached "
                         "for 2 s)")
            assert r.json()["failed"] == ["database"], r.text
            assert "not writable" in r.json()["checks"][0]["detail"]
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
        wait_for(lambda: healthy(web), timeout=30, what="healthy again")
        # the disk below storage.min_free_mb
        filler = data / "filler"
        with filler.open("wb") as fh:
            fh.write(b"\0" * (40 * 2**20))
        r = wait_for(lambda: (h := health()).status_code == 503 and h, timeout=10, what="503 for the disk")
        assert r.json()["failed"] == ["disk"], r.text
        assert "expected at least 16 MB" in str(r.json()["checks"])
        filler.unlink()
        wait_for(lambda: healthy(web), timeout=30, what="healthy again")
    finally:
        for p in node_proc:
            p.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_https_console_metrics_login_and_the_audit_trail_to_syslog(
    tmp_path: Path, pacs: Any, model_package: Path, node_proc: list[NodeProcess], pki: Any  # noqa: F811
) -> None:
    """``[web] cert_file``/``key_file``: the console answers over HTTPS only (a certificate the test's CA signed);
    ``metrics_auth = "on"``: /metrics needs a login; ``[audit] syslog``: RFC 5424 datagrams reach a UDP listener."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as siem:
        siem.bind(("127.0.0.1", 0))
        siem.settimeout(30)
        cfg, web = console_config(tmp_path, pacs.dicom_port, model_package)
        cfg.write_text(cfg.read_text().replace(f"[web]\nport = {web}\n", f'[web]\nport = {web}\n'
                       f'cert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\nmetrics_auth = "on"\n'
                       f'[audit]\nsyslog = "udp://127.0.0.1:{siem.getsockname()[1]}"\n'))
        node = NodeProcess(cfg, env=WEB_ON)
        node_proc.append(node)
        url = f"https://127.0.0.1:{web}"
        wait_for(lambda: _https_up(url, pki.ca), timeout=60, what="the HTTPS console")
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer
            httpx.get(f"http://127.0.0.1:{web}/healthz", timeout=10).raise_for_status()
        with httpx.Client(base_url=url, verify=str(pki.ca), timeout=30) as https:
            problem(https.get("/metrics"), 401)
            assert "cxr_jobs" in https.get("/metrics", auth=VIEWER).text
            login = https.post("/api/v1/session", json={"name": ADMIN[0], "password": ADMIN[1]})
            assert login.status_code == 200 and "secure" in login.headers["set-cookie"].lower()
        assert echoscu(scp_port(cfg), "SYSLOGTEST").returncode == 0
        messages = []
        while not any(b"SYSLOGTEST" in m for m in messages):
            messages.append(siem.recv(65536))
    message = next(m for m in messages if b"SYSLOGTEST" in m).decode()
    # <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG, facility authpriv (10), severity informational (6)
    assert re.match(r"^<86>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \S+ cxr-node \d+ association \[cxr@32473 ", message)
    assert 'outcome="success"' in message and 'actor="SYSLOGTEST"' in message and 'called="CXR-AI"' in message


def _https_up(url: str, ca: Path) -> bool:
    try:
        return httpx.get(f"{url}/healthz", verify=str(ca), timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def test_users_command_and_the_first_admin(tmp_path: Path) -> None:
    """``cxr-node users``: the password only from standard input, short ones and duplicates refused, list without
    hashes; the first admin's password file, readable by the owner only, goes when that user is removed."""
    from node.config import load_settings
    from node.users import FIRST_PASSWORD_FILE, check_login, first_admin
    from storage.db import make_engine
    from storage.queue import Store

    cfg = tmp_path / "node.toml"
    cfg.write_text('[storage]\ndata_dir = "var"\n')
    settings = load_settings(cfg, environ={})
    settings.data_path.mkdir()
    store = Store(make_engine(settings.database_url))
    (settings.data_path / FIRST_PASSWORD_FILE).write_text("left by someone\n")  # readable by all: replaced
    (settings.data_path / FIRST_PASSWORD_FILE).chmod(0o644)
    path = first_admin(store, settings.data_path)
    assert path == settings.data_path / FIRST_PASSWORD_FILE and oct(path.stat().st_mode & 0o777) == "0o600"
    assert check_login(store, "admin", path.read_text().strip()).user is not None
    assert first_admin(store, settings.data_path) is None  # users exist: nothing made
    assert cli(cfg, "users", "add", "bob", "--role", "viewer").returncode == 2  # no --password-stdin
    assert "at least 10" in cli(cfg, "users", "add", "bob", "--password-stdin", stdin="short\n").stderr
    assert cli(cfg, "users", "add", "bob", "--password-stdin", stdin="long enough pw\n").returncode == 0
    assert "exists already" in cli(cfg, "users", "add", "bob", "--password-stdin", stdin="long enough pw\n").stderr
    listed = cli(cfg, "users", "list", "--format", "json")
    assert [(u["name"], u["role"]) for u in json.loads(listed.stdout)] == [("admin", "admin"), ("bob", "viewer")]
    assert "argon2" not in listed.stdout
    assert cli(cfg, "users", "remove", "admin").returncode == 0 and not path.exists()
    assert cli(cfg, "users", "remove", "admin").returncode == 1
    events = [(e.event, e.detail.get("user")) for e in store.audit_events()]
    assert ("user_removed", "admin") in events and ("user_added", "bob") in events
