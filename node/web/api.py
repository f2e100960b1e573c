"""The console's HTTP application: the REST API under ``/api/v1``, ``/healthz``, ``/metrics`` and the page.

Authentication: HTTP Basic on every API request, or the session cookie the page's login sets
(``POST /api/v1/session``; HttpOnly, SameSite=Strict, 8 hours). A request that changes something with the cookie
must also carry the header ``X-CXR-Console: 1`` (a page of another site cannot send it without a CORS preflight,
which this application never answers): the cookie alone cannot be used across sites. Roles: ``viewer`` reads,
``admin`` also changes (else 403). No credentials: 401 (with a Basic challenge unless the page asked). Repeated
failed logins lock the name (``node.users``): 429 with ``Retry-After``.

Errors are RFC 9457 problem details (``application/problem+json``: type, title, status, detail, and ``errors``
naming each bad key). Changes of settings are versioned in the database and audited (``Console.change``); the
response says whether the change is in force now or at the next start.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ai.errors import RetryableError
from node.live import (
    LIVE_KEYS,
    REMOVED,
    RESTART_KEYS,
    ChangeError,
    check_destination,
    check_scp_change,
    check_send_change,
)
from node.metrics import NodeCollector, registry
from node.users import LOCK_S, check_login
from node.web.console import Console
from node.web.page import PAGE
from storage.records import UserRecord

SESSION_COOKIE = "cxr_session"
SESSION_S = 8 * 3600.0
CSRF_HEADER = "x-cxr-console"
PROBLEM = "application/problem+json"
HEALTH_CACHE_S = 2.0


class Problem(Exception):  # noqa: N818 - an answer, not a fault
    """An RFC 9457 problem: raised by a handler, answered as ``application/problem+json``."""

    def __init__(self, status: int, title: str, detail: str = "", errors: list[str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.errors, self.headers = status, title, detail, errors, headers


def problem_response(status: int, title: str, detail: str = "", errors: list[str] | None = None,
                     headers: dict[str, str] | None = None, instance: str = "") -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who makes a request, and how (``cookie``: the page's session)."""

    name: str
    role: str
    via: str


class Sessions:
    """The page's login sessions (in memory: a restarted node asks the page to log in again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[Principal, float]] = {}

    def create(self, user: UserRecord) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._sessions = {t: v for t, v in self._sessions.items() if v[1] > now}
            self._sessions[token] = (Principal(user.name, user.role, "cookie"), now + SESSION_S)
        return token

    def get(self, token: str) -> Principal | None:
        with self._lock:
            found = self._sessions.get(token)
        return found[0] if found and found[1] > time.monotonic() else None

    def end(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def build_app(console: Console) -> FastAPI:
    """The console's application for one node."""
    app = FastAPI(title="cxr-node console", version="1", docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/v1/openapi.json")
    sessions = Sessions()
    metrics_registry = registry([NodeCollector(lambda: console.store.status(recent=0),
                                               console.live.base.data_path, console.model)])

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, exc.errors, exc.headers, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, str(exc.detail) if exc.detail else "error", "",
                                headers=dict(exc.headers or {}), instance=request.url.path)

    @app.exception_handler(RetryableError)
    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(503, "database unavailable", str(exc).splitlines()[0][:300],
                                headers={"Retry-After": "5"}, instance=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return problem_response(422, "invalid request", "the request body or parameters are not as expected",
                                errors, instance=request.url.path)

    def client(request: Request) -> str:
        return request.client.host if request.client else ""

    def cross_site(request: Request) -> None:
        """Refuse a change a page of another site makes the browser send (a form posted with credentials the
        browser remembers): browsers say where a request comes from (``Sec-Fetch-Site``, ``Origin``); scripts and
        command-line clients send neither."""
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if (site is not None and site not in ("same-origin", "none")) or (origin is not None and origin != own):
            raise Problem(403, "forbidden", f"a change from another site ({origin or site}) is refused")

    def authenticate(request: Request) -> Principal:
        if request.method not in ("GET", "HEAD"):
            cross_site(request)
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            found = sessions.get(token)
            if found is not None:
                if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
                    raise Problem(403, "forbidden", f"a change with the session cookie needs the header "
                                  f"{CSRF_HEADER}: 1")
                current = console.store.user_hash(found.name)  # removed or demoted since the login: not any more
                if current is None:
                    sessions.end(token)
                    raise Problem(401, "authentication required", "the user no longer exists")
                return Principal(found.name, current[0].role, "cookie")
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        challenge = {} if request.headers.get(CSRF_HEADER) else {"WWW-Authenticate": 'Basic realm="cxr-node"'}
        if scheme.lower() != "basic" or not encoded:
            raise Problem(401, "authentication required", "log in, or send HTTP Basic credentials",
                          headers=challenge)
        try:
            name, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise Problem(401, "authentication required", "malformed Basic credentials", headers=challenge) from exc
        if not sep:
            raise Problem(401, "authentication required", "malformed Basic credentials", headers=challenge)
        result = check_login(console.store, name, password, console.audit, client(request), audit_success=False)
        if result.locked:
            raise Problem(429, "too many failed logins", result.reason, headers={"Retry-After": f"{LOCK_S:.0f}"})
        if result.user is None:
            raise Problem(401, "authentication required", result.reason, headers=challenge)
        return Principal(result.user.name, result.user.role, "basic")

    def admin(who: Principal = Depends(authenticate)) -> Principal:  # noqa: B008 - FastAPI's dependency idiom
        if who.role != "admin":
            raise Problem(403, "forbidden", f"user {who.name!r} has the role {who.role!r}; changes need 'admin'")
        return who

    async def body_object(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise Problem(400, "bad request", f"expected a JSON object: {exc}") from exc
        if not isinstance(body, dict):
            raise Problem(400, "bad request", f"expected a JSON object, found {type(body).__name__}")
        return body

    viewer_dep = Depends(authenticate)
    admin_dep = Depends(admin)

    # -- no authentication -------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": "default-src 'self'; script-src 'self' "
                                           "'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
                                           "X-Frame-Options": "DENY", "Cache-Control": "no-store"})

    health_cache: list[Any] = [0.0, None]  # (monotonic time, checks): /healthz needs no login, so a flood of it
    # must not become a flood of database writes

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        if time.monotonic() - health_cache[0] > HEALTH_CACHE_S or health_cache[1] is None:
            health_cache[:] = [time.monotonic(), console.health()]
        checks = health_cache[1]
        failed = [c.name for c in checks if not c.ok]
        body = {"status": "fail" if failed else "pass", "failed": failed,
                "checks": [dataclasses.asdict(c) for c in checks]}
        return JSONResponse(body, status_code=503 if failed else 200)

    def metrics_need_login() -> bool:
        web = console.live.base.web
        return web.metrics_auth == "on" or (web.metrics_auth == "auto" and not _loopback(web.bind_address))

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if metrics_need_login():
            authenticate(request)
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/api/v1/session")
    async def login(request: Request) -> JSONResponse:
        body = await body_object(request)
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str):
            raise Problem(400, "bad request", "expected {\"name\": ..., \"password\": ...}")
        cross_site(request)
        result = await run_in_threadpool(check_login, console.store, name, password, console.audit, client(request))
        if result.locked:
            raise Problem(429, "too many failed logins", result.reason, headers={"Retry-After": f"{LOCK_S:.0f}"})
        if result.user is None:
            raise Problem(401, "login failed", result.reason)
        token = sessions.create(result.user)
        response = JSONResponse({"name": result.user.name, "role": result.user.role})
        response.set_cookie(SESSION_COOKIE, token, max_age=int(SESSION_S), httponly=True, samesite="strict",
                            secure=bool(console.live.base.web.cert_file), path="/")
        return response

    @app.delete("/api/v1/session")
    def logout(request: Request) -> JSONResponse:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            sessions.end(token)
        response = JSONResponse({"ok": True})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- reading -----------------------------------------------------------------------------------------------

    @app.get("/api/v1/me")
    def me(who: Principal = viewer_dep) -> dict[str, Any]:
        return {"name": who.name, "role": who.role}

    @app.get("/api/v1/overview")
    def overview(who: Principal = viewer_dep) -> dict[str, Any]:
        return console.overview()

    @app.get("/api/v1/config")
    def config(who: Principal = viewer_dep) -> dict[str, Any]:
        console.live.refresh()
        return {"settings": console.live.sources(), "pending_restart": console.live.pending_restart()}

    def scp_view() -> dict[str, Any]:
        console.live.refresh()
        sources = console.live.sources()
        return {key.partition(".")[2]: sources[key] for key in sorted(LIVE_KEYS | RESTART_KEYS)
                if key.startswith("scp.")}

    @app.get("/api/v1/scp")
    def get_scp(who: Principal = viewer_dep) -> dict[str, Any]:
        return scp_view()

    def apply_section(section: str, changes: dict[str, Any], who: Principal, request: Request) -> dict[str, Any]:
        current = getattr(console.live.current, section)
        applied: dict[str, Any] = {}
        for key, value in changes.items():
            old = getattr(current, key)
            old = list(old) if isinstance(old, tuple) else old
            pending = console.live.changes.get(f"{section}.{key}")
            if pending is not None and pending.new_value is not None:
                old = pending.new_value
            version = console.change(f"{section}.{key}", old, value, who.name, client(request))
            if value is None:  # back to node.toml's
                value = getattr(getattr(console.live.toml, section), key)
                value = list(value) if isinstance(value, tuple) else value
            applied[key] = {"value": value, "version": version,
                            "in_force": "at the next start" if f"{section}.{key}" in RESTART_KEYS else "now"}
        return applied

    def checked(check: Callable[..., Any], title: str, *args: Any) -> Any:
        """``check(current settings, *args)``, its ``ChangeError`` answered 422 naming each bad key."""
        try:
            return check(console.live.current, *args)
        except ChangeError as exc:
            raise Problem(422, title, str(exc), exc.problems) from exc

    @app.patch("/api/v1/scp")
    async def patch_scp(request: Request, who: Principal = admin_dep) -> dict[str, Any]:
        body = await body_object(request)

        def work() -> dict[str, Any]:
            changes = checked(check_scp_change, "invalid receiving settings", body, console.live.toml)
            return {"changed": apply_section("scp", changes, who, request), "scp": scp_view()}
        return await run_in_threadpool(work)

    @app.get("/api/v1/send")
    def get_send(who: Principal = viewer_dep) -> dict[str, Any]:
        console.live.refresh()
        return {k.partition(".")[2]: v for k, v in console.live.sources().items() if k.startswith("send.")}

    @app.patch("/api/v1/send")
    async def patch_send(request: Request, who: Principal = admin_dep) -> dict[str, Any]:
        body = await body_object(request)

        def work() -> dict[str, Any]:
            changes = checked(check_send_change, "invalid sending settings", body, console.live.toml)
            return {"changed": apply_section("send", changes, who, request)}
        return await run_in_threadpool(work)

    # -- destinations ------------------------------------------------------------------------------------------

    def destinations_view() -> list[dict[str, Any]]:
        live = console.live.refresh()
        sources = console.live.sources()
        states = console.store.destination_states()
        out = []
        for d in live.destinations:
            entry = sources.get(f"destinations.{d.name}", {})
            out.append({**dataclasses.asdict(d), "source": entry.get("source", "node.toml"),
                        "version": entry.get("version"), "changed_by": entry.get("changed_by"),
                        "changed_at": entry.get("changed_at"),
                        **states.get(d.name, {"up": None, "waiting": 0, "last_sent": None, "last_failure": None})})
        return out

    def find_destination(name: str) -> Any:
        dest = next((d for d in console.live.refresh().destinations if d.name == name), None)
        if dest is None:
            names = ", ".join(d.name for d in console.live.current.destinations) or "none"
            raise Problem(404, "no such destination", f"no destination named {name!r} (configured: {names})")
        return dest

    @app.get("/api/v1/destinations")
    def list_destinations(who: Principal = viewer_dep) -> list[dict[str, Any]]:
        return destinations_view()

    @app.get("/api/v1/destinations/{name}")
    def get_destination(name: str, who: Principal = viewer_dep) -> dict[str, Any]:
        find_destination(name)
        return next(d for d in destinations_view() if d["name"] == name)

    @app.post("/api/v1/destinations", status_code=201)
    async def add_destination(request: Request, who: Principal = admin_dep) -> JSONResponse:
        body = await body_object(request)

        def work() -> JSONResponse:
            name = body.get("name")
            if isinstance(name, str) and any(d.name == name for d in console.live.refresh().destinations):
                raise Problem(409, "destination exists", f"a destination named {name!r} exists; change it with "
                              f"PUT /api/v1/destinations/{name}")
            dest = checked(check_destination, "invalid destination", body)
            version = console.change(f"destinations.{dest.name}", None, dataclasses.asdict(dest), who.name,
                                     client(request))
            return JSONResponse({**dataclasses.asdict(dest), "version": version, "in_force": "now"},
                                status_code=201, headers={"Location": f"/api/v1/destinations/{dest.name}"})
        return await run_in_threadpool(work)

    @app.put("/api/v1/destinations/{name}")
    async def put_destination(name: str, request: Request, who: Principal = admin_dep) -> dict[str, Any]:
        """Change a destination: keys the body leaves out keep their values (a port change keeps its TLS keys)."""
        body = await body_object(request)

        def work() -> dict[str, Any]:
            old = find_destination(name)
            dest = checked(check_destination, "invalid destination", {**dataclasses.asdict(old), **body}, name)
            version = console.change(f"destinations.{name}", dataclasses.asdict(old), dataclasses.asdict(dest),
                                     who.name, client(request))
            return {**dataclasses.asdict(dest), "version": version, "in_force": "now"}
        return await run_in_threadpool(work)

    @app.delete("/api/v1/destinations/{name}")
    def delete_destination(name: str, request: Request, who: Principal = admin_dep) -> dict[str, Any]:
        old = find_destination(name)
        in_toml = any(d.name == name for d in console.live.base.destinations)
        version = console.change(f"destinations.{name}", dataclasses.asdict(old), REMOVED if in_toml else None,
                                 who.name, client(request))
        return {"removed": name, "version": version, "in_force": "now",
                "note": "results waiting for it stay in the outbox (Failed work) until it is added again or they "
                        "are discarded"}

    @app.post("/api/v1/destinations/{name}/echo")
    def echo_destination(name: str, request: Request, who: Principal = viewer_dep) -> JSONResponse:
        from node.send import echo_result

        dest = find_destination(name)
        settings = console.live.current
        started = time.perf_counter()
        ok, detail = echo_result(dest, dest.our_ae_title(settings.scp.ae_title), timeout_s=settings.send.timeout_s)
        body = {"ok": ok, "destination": name, "detail": detail,
                "ms": round(1000 * (time.perf_counter() - started))}
        return JSONResponse(body, status_code=200 if ok else 502)

    # -- thresholds --------------------------------------------------------------------------------------------

    def thresholds_view() -> dict[str, Any]:
        live = console.live.refresh()
        manifest = console.manifest
        changes = console.live.changes
        labels = list(manifest.labels) if manifest is not None else sorted(live.thresholds)
        history = console.store.config_history("thresholds.", limit=200)
        out = []
        for label in labels:
            package = manifest.thresholds[label] if manifest is not None else None
            change = changes.get(f"thresholds.{label}")
            console_value = change.new_value if change is not None else None
            toml_value = console.live.base.thresholds.get(label)
            in_force = live.thresholds.get(label, package.value if package is not None else None)
            source = "console" if console_value is not None else "node.toml" if toml_value is not None else "package"
            out.append({
                "label": label,
                "sets_triage_flag": manifest is None or label not in manifest.informational,
                "package": {"value": package.value, "method": package.method} if package is not None else None,
                "node_toml": toml_value,
                "override": None if console_value is None else {
                    "value": console_value, "version": change.id, "changed_by": change.changed_by,  # type: ignore
                    "changed_at": change.changed_at.isoformat()},  # type: ignore[union-attr]
                "in_force": in_force, "source": source,
                "history": [{"version": h.id, "old": h.old_value, "new": h.new_value, "changed_by": h.changed_by,
                             "changed_at": h.changed_at.isoformat()} for h in history
                            if h.key == f"thresholds.{label}"],
            })
        return {"model": {"name": manifest.name, "version": manifest.version} if manifest else None,
                "thresholds": out, "note": "a site's accepted threshold (cxr-node sites) wins over these for its "
                                           "images"}

    @app.get("/api/v1/thresholds")
    def get_thresholds(who: Principal = viewer_dep) -> dict[str, Any]:
        return thresholds_view()

    @app.put("/api/v1/thresholds")
    async def put_thresholds(request: Request, who: Principal = admin_dep) -> dict[str, Any]:
        body = await body_object(request)
        return await run_in_threadpool(set_thresholds, body, who, request)

    def set_thresholds(body: dict[str, Any], who: Principal, request: Request) -> dict[str, Any]:
        manifest = console.manifest
        problems = []
        if not body:
            problems.append("thresholds: expected {\"Label\": value between 0 and 1, or null to remove the override}")
        for label, value in body.items():
            if manifest is not None and label not in manifest.labels:
                problems.append(f"thresholds.{label}: unknown label (expected one of {', '.join(manifest.labels)})")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                        or not 0.0 <= float(value) <= 1.0):
                problems.append(f"thresholds.{label}: expected a probability between 0 and 1 or null, found {value!r}")
        if problems:
            raise Problem(422, "invalid thresholds", "; ".join(problems), problems)
        live = console.live.current
        for label, value in body.items():
            old = live.thresholds.get(label, manifest.thresholds[label].value if manifest is not None else None)
            console.change(f"thresholds.{label}", old, None if value is None else float(value), who.name,
                           client(request))
        return thresholds_view()

    # -- work, results, audit, sites ---------------------------------------------------------------------------

    @app.get("/api/v1/failures")
    def failures(limit: int = 100, who: Principal = viewer_dep) -> dict[str, Any]:
        return console.store.failed_work(limit=max(1, min(limit, 1000)))

    def work_action(what: str, item_id: int, action: str, who: Principal, request: Request) -> dict[str, Any]:
        store = console.store
        done: Any
        if what == "jobs":
            done = store.retry_job(item_id) if action == "retry" else store.discard_job(item_id, who.name)
        else:
            done = store.retry_send(item_id) if action == "retry" else store.discard_send(item_id, who.name)
        if done is None:
            state = "failed" if action == "discard" or what == "jobs" else "failed or rejected"
            raise Problem(409 if _exists(what, item_id) else 404, f"cannot {action}",
                          f"no {state} {what[:-1]} with id {item_id}"
                          + (" that no sender is sending right now" if what == "sends" else ""))
        detail = {"job": item_id, "sop_instance_uid": done} if what == "jobs" else {
            "outbox_id": item_id, "destination": done[0], "sop_instance_uid": done[1]}
        console.audit.record("work_retried" if action == "retry" else "work_discarded", "success", who.name,
                             client(request), **detail)
        if action == "retry" and what == "sends" and console.kick_send is not None:
            console.kick_send()
        return {"ok": True, "action": action, **detail}

    def _exists(what: str, item_id: int) -> bool:
        return console.store.item_exists(what, item_id)

    for what in ("jobs", "sends"):
        for action in ("retry", "discard"):
            def handler(item_id: int, request: Request, who: Principal = admin_dep, what: str = what,
                        action: str = action) -> dict[str, Any]:
                return work_action(what, item_id, action, who, request)
            app.add_api_route(f"/api/v1/{what}/{{item_id}}/{action}", handler, methods=["POST"],
                              name=f"{action}_{what}")

    @app.get("/api/v1/results")
    def results(limit: int = 20, who: Principal = viewer_dep) -> list[dict[str, Any]]:
        from node.cli import report_summary

        rows = console.store.recent_results(limit=max(1, min(limit, 200)))
        return [{**{k: v for k, v in r.items() if k != "path"}, **report_summary(r)} for r in rows]

    @app.get("/api/v1/audit")
    def audit(limit: int = 100, before: int | None = None, event: str | None = None,
              who: Principal = viewer_dep) -> list[dict[str, Any]]:
        return [_audit_row(e) for e in console.store.audit_events(max(1, min(limit, 1000)), before, event)]

    @app.get("/api/v1/sites")
    def sites(who: Principal = viewer_dep) -> list[dict[str, Any]]:
        return console.site_reports()

    return app


def _audit_row(e: Any) -> dict[str, Any]:
    return {"id": e.id, "at": e.at.isoformat(), "event": e.event, "outcome": e.outcome, "actor": e.actor,
            "address": e.address, "detail": e.detail}

