"""Failed work through the console's API (the real application on a real SQLite store, over Starlette's test
client): jobs and sends retried and discarded, what cannot be retried answered 404/409, each action audited; the
send settings changed through the API reach the outbox's next round."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from node.audit import AuditTrail
from node.config import SendSettings, Settings, StorageSettings
from node.live import LiveSettings
from node.send import Outbox
from node.users import add_user
from node.web.api import build_app
from node.web.console import Console
from storage.db import make_engine
from storage.queue import ReceivedInstance, ResultRecord, Store

ADMIN = ("ada", "correct horse battery")
VIEWER = ("vic", "viewer password 1")


@pytest.fixture
def console(tmp_path: Path) -> Console:
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")))
    settings.data_path.mkdir(parents=True)
    store = Store(make_engine(settings.database_url), max_attempts=1)
    audit = AuditTrail(store)
    add_user(store, ADMIN[0], "admin", ADMIN[1])
    add_user(store, VIEWER[0], "viewer", VIEWER[1])
    live = LiveSettings(settings, store)
    live.refresh()
    return Console(live, store, audit)


def failed_job(store: Store, tmp_path: Path, n: int) -> int:
    """A job failed for good (a permanent error), with one result whose send to PACS failed and one rejected."""
    meta = ReceivedInstance(f"1.2.3.{n}", "1.2.3.100", "1.2.3.200", "1.2.840.10008.5.1.4.1.1.1", "CT01",
                            tmp_path / f"{n}.dcm", 10)
    store.record_instance(meta, True, "frontal chest")
    job = store.lease_job("test", 60)
    assert job is not None
    store.fail_job(job.job_id, "UnsupportedImage: colour", retryable=False,
                   results=[ResultRecord("failure_sr", f"1.2.3.{n}.1", tmp_path / "sr.dcm")], destinations=["PACS"])
    return job.job_id


def test_failed_jobs_and_sends_are_retried_and_discarded_by_an_admin(console: Console, tmp_path: Path) -> None:
    store = console.store
    first, second = failed_job(store, tmp_path, 1), failed_job(store, tmp_path, 2)
    api = TestClient(build_app(console))
    failures = api.get("/api/v1/failures", auth=VIEWER).json()
    assert sorted(j["id"] for j in failures["jobs"]) == [first, second]
    assert failures["jobs"][0]["calling_ae"] == "CT01" and "colour" in failures["jobs"][0]["error"]
    assert api.post(f"/api/v1/jobs/{first}/retry", auth=VIEWER).status_code == 403
    r = api.post(f"/api/v1/jobs/{first}/retry", auth=ADMIN)
    assert r.status_code == 200 and r.json()["sop_instance_uid"] == "1.2.3.1"
    assert api.post(f"/api/v1/jobs/{first}/retry", auth=ADMIN).status_code == 409  # queued now, not failed
    assert api.post("/api/v1/jobs/999/retry", auth=ADMIN).status_code == 404
    assert store.lease_job("again", 60).job_id == first  # type: ignore[union-attr]
    r = api.post(f"/api/v1/jobs/{second}/discard", auth=ADMIN)
    assert r.status_code == 200
    assert store.status()["jobs"]["skipped"] == 1
    assert [j["id"] for j in api.get("/api/v1/failures", auth=VIEWER).json()["jobs"]] == []

    # the failure SRs' sends: one fails (retrying), then is discarded; the other is rejected, then retried
    due = store.due_outbox(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1), limit=10, claim_s=60, owner="t")
    store.mark_send_failed(due[0].id, "association to PACS failed", dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    store.mark_rejected(due[1].id, "called AE title not recognised")
    sends = {s["id"]: s for s in api.get("/api/v1/failures", auth=VIEWER).json()["sends"]}
    assert {s["state"] for s in sends.values()} == {"failed", "rejected"}
    assert api.post(f"/api/v1/sends/{due[1].id}/discard", auth=ADMIN).status_code == 409  # rejected already
    assert api.post(f"/api/v1/sends/{due[0].id}/discard", auth=ADMIN).status_code == 200
    assert api.post(f"/api/v1/sends/{due[1].id}/retry", auth=ADMIN).status_code == 200
    now_due = store.due_outbox(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1), limit=10, claim_s=60, owner="u")
    assert [e.id for e in now_due] == [due[1].id]
    sends = {s["id"]: s for s in api.get("/api/v1/failures", auth=VIEWER).json()["sends"]}
    assert sends[due[0].id]["state"] == "rejected" and sends[due[0].id]["error"].startswith("discarded by ada")
    actions = [(e.event, e.actor) for e in store.audit_events(event=None) if e.event.startswith("work_")]
    assert actions.count(("work_retried", "ada")) == 2 and actions.count(("work_discarded", "ada")) == 2


def test_send_settings_changed_in_the_api_reach_the_outbox(console: Console) -> None:
    api = TestClient(build_app(console))
    outbox = Outbox(console.store, [], SendSettings(), "CXR-AI", live=console.live)
    assert outbox.retry_delay(1) == SendSettings().retry_initial_s
    r = api.patch("/api/v1/send", json={"retry_initial_s": 3, "retry_max_s": 30}, auth=ADMIN)
    assert r.status_code == 200 and r.json()["changed"]["retry_initial_s"]["in_force"] == "now"
    bad = api.patch("/api/v1/send", json={"retry_initial_s": 60, "retry_max_s": 30}, auth=ADMIN)
    assert bad.status_code == 422 and "retry_initial_s <= retry_max_s" in bad.json()["detail"]
    outbox.run_due()  # nothing due: the round reads the settings in force
    assert outbox.retry_delay(1) == 3.0 and outbox.retry_delay(10) == 30.0
    sources = api.get("/api/v1/send", auth=VIEWER).json()
    assert sources["retry_initial_s"]["source"] == "console" and sources["timeout_s"]["source"] == "default"


def test_changes_from_another_site_and_cookies_without_the_header_are_refused(console: Console) -> None:
    api = TestClient(build_app(console))
    dest = {"name": "evil", "ae_title": "EVIL", "host": "10.6.6.6", "port": 104}
    # a form another site's page posts with the Basic credentials the browser remembers
    for headers in ({"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}):
        r = api.post("/api/v1/destinations", json=dest, auth=ADMIN, headers=headers)
        assert r.status_code == 403 and "another site" in r.json()["detail"], r.text
    assert api.get("/api/v1/destinations", auth=ADMIN, headers={"origin": "http://evil.example"}).status_code == 200
    # the page's own session: a change needs X-CXR-Console as well
    assert api.post("/api/v1/session", json={"name": ADMIN[0], "password": ADMIN[1]}).status_code == 200
    r = api.post("/api/v1/destinations", json=dest)
    assert r.status_code == 403 and "X-CXR-Console" in r.json()["detail"].replace("x-cxr-console", "X-CXR-Console")
    own = {"x-cxr-console": "1", "origin": "http://testserver", "sec-fetch-site": "same-origin"}
    assert api.post("/api/v1/destinations", json=dest, headers=own).status_code == 201
    assert [d.name for d in console.live.current.destinations] == ["evil"]


def test_a_removed_or_demoted_user_loses_the_session_at_once(console: Console) -> None:
    api = TestClient(build_app(console))
    assert api.post("/api/v1/session", json={"name": ADMIN[0], "password": ADMIN[1]}).status_code == 200
    assert api.get("/api/v1/me").json() == {"name": ADMIN[0], "role": "admin"}
    console.store.remove_user(ADMIN[0])
    add_user(console.store, ADMIN[0], "viewer", ADMIN[1])
    assert api.get("/api/v1/me").json()["role"] == "viewer"  # demoted: the session's role follows
    assert api.patch("/api/v1/scp", json={"max_associations": 4}, headers={"x-cxr-console": "1"}).status_code == 403
    console.store.remove_user(ADMIN[0])
    assert api.get("/api/v1/me").status_code == 401


def test_the_lockout_is_not_extended_by_attempts_while_locked_and_unknown_names_lock_alike(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.users

    api = TestClient(build_app(console))
    answers = [api.get("/api/v1/me", auth=(VIEWER[0], f"wrong {i}")) for i in range(5)]
    assert [a.status_code for a in answers] == [401] * 5  # the failure that sets the lock was heard: 401 ...
    assert "locked for" in answers[-1].text and "locked" not in answers[-2].text  # ... saying the lock began
    locked = console.store.user_hash(VIEWER[0])[0].locked_until  # type: ignore[index]
    assert locked is not None
    for _ in range(3):  # refused unheard, the right password too, and the lock stays where it was
        assert api.get("/api/v1/me", auth=VIEWER).status_code == 429
    assert console.store.user_hash(VIEWER[0])[0].locked_until == locked  # type: ignore[index]
    unknown = [api.get("/api/v1/me", auth=("nobody-here", f"guess {i}")).status_code for i in range(6)]
    assert unknown == [401] * 5 + [429]  # as a known name: answers do not tell which names exist
    # once the lock has run out, the right password works and the count starts afresh
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=node.users.LOCK_S + 1)
    monkeypatch.setattr(console.store, "clock", lambda: later)
    assert api.get("/api/v1/me", auth=VIEWER).status_code == 200
    assert console.store.user_hash(VIEWER[0])[0].failed_logins == 0  # type: ignore[index]
    events = [e for e in console.store.audit_events(event="login") if e.outcome == "failure"]
    assert len(events) == 5 + 3 + 6 and {e.actor for e in events} == {VIEWER[0], "nobody-here"}


def test_put_keeps_what_it_leaves_out_and_null_goes_back_to_node_toml(console: Console) -> None:
    api = TestClient(build_app(console))
    dest = {"name": "b", "ae_title": "B", "host": "h", "port": 104, "calling_ae": "OURS", "shadow": True}
    assert api.post("/api/v1/destinations", json=dest, auth=ADMIN).status_code == 201
    r = api.put("/api/v1/destinations/b", json={"port": 105}, auth=ADMIN)
    changed = r.json()
    assert r.status_code == 200 and (changed["port"], changed["calling_ae"], changed["shadow"]) == (105, "OURS", True)
    assert api.patch("/api/v1/scp", json={"allowed_callers": ["CT01"]}, auth=ADMIN).status_code == 200
    assert console.live.current.scp.allowed_callers == ("CT01",)
    r = api.patch("/api/v1/scp", json={"allowed_callers": None}, auth=ADMIN)
    assert r.status_code == 200 and r.json()["changed"]["allowed_callers"]["value"] == []
    assert console.live.current.scp.allowed_callers == ()
    assert api.get("/api/v1/scp", auth=VIEWER).json()["allowed_callers"]["source"] == "default"
    for bad in ({"timeout_s": 0}, {"alert_after": -1}):
        assert api.patch("/api/v1/send", json=bad, auth=ADMIN).status_code == 422
    r = api.patch("/api/v1/send", content=b'{"retry_initial_s": NaN}', auth=ADMIN,
                  headers={"content-type": "application/json"})
    assert r.status_code == 422 and "finite" in r.json()["detail"]
