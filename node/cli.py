"""Command line: ``cxr-node serve | predict | echo | status | sites | shadow | health | users | audit | config export |
check-config``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ai.errors import ModelPackageError
from node.config import ConfigError, Settings, load_settings
from node.logs import setup_logging
from node.privileges import PrivilegeError

log = logging.getLogger("node")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    scp_changes: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        scp_changes["port"] = args.port
    if getattr(args, "ae_title", None):
        scp_changes["ae_title"] = args.ae_title
    if scp_changes:
        settings = dataclasses.replace(settings, scp=dataclasses.replace(settings.scp, **scp_changes))
    if getattr(args, "data_dir", None):
        storage = dataclasses.replace(settings.storage, data_dir=str(Path(args.data_dir).resolve()))
        settings = dataclasses.replace(settings, storage=storage)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        listen_socket, tls_listen_socket = _drop_privileges(settings, args.role)
    except (PrivilegeError, OSError) as exc:
        print(f"cxr-node serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _metrics_dir(settings)
    from node.app import Node, ScpProcessError  # after _metrics_dir: its modules create the metrics
    from node.tls import TlsFileError

    try:
        Node(settings, role=args.role, listen_socket=listen_socket,
             tls_listen_socket=tls_listen_socket).serve_forever()
    except ScpProcessError as exc:
        log.error("cxr-node stopped: %s", exc)
        return EXIT_FAILED
    except TlsFileError as exc:  # loaded when the configuration was, but not by service.user
        log.error("cxr-node stopped: %s", exc)
        return EXIT_CONFIG
    return EXIT_OK


def _metrics_dir(settings: Settings) -> None:
    """Counters of every node process in ``<data_dir>/metrics`` (``node.metrics``): set before any of them imports
    prometheus_client, emptied so that a restarted node's counters start at zero."""
    import shutil

    folder = settings.data_path / "metrics"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def _store(settings: Settings) -> Any:
    from storage.db import make_engine
    from storage.queue import Store

    settings.data_path.mkdir(parents=True, exist_ok=True)  # a node that never ran: an empty database
    return Store(make_engine(settings.database_url))


def cmd_users(args: argparse.Namespace) -> int:
    from node.audit import AuditTrail
    from node.users import FIRST_ADMIN, FIRST_PASSWORD_FILE, DuplicateUser, UserError, add_user, set_password

    settings = _settings(args)
    store = _store(settings)
    audit = AuditTrail(store, settings.audit.syslog)
    actor = f"command line ({os.environ.get('USER') or os.getuid()})"
    if args.action == "list":
        users = store.users()
        if args.format == "json":
            print(json.dumps([dataclasses.asdict(u) for u in users], indent=2, default=str))
        else:
            for u in users:
                locked = f", locked until {u.locked_until:%Y-%m-%d %H:%M:%S} UTC" if u.locked_until else ""
                print(f"{u.name}\t{u.role}\tcreated {u.created_at:%Y-%m-%d %H:%M:%S} UTC{locked}")
            if not users:
                print("no users (the node creates 'admin' at its first start with the console on)")
        return EXIT_OK
    if not args.name:
        print(f"cxr-node users {args.action}: name the user", file=sys.stderr)
        return EXIT_CONFIG
    if args.action == "unlock":
        if not store.unlock_user(args.name):
            print(f"no user named {args.name!r}", file=sys.stderr)
            return EXIT_FAILED
        print(f"user {args.name} unlocked")
        return EXIT_OK
    if args.action == "remove":
        if not store.remove_user(args.name):
            print(f"no user named {args.name!r}", file=sys.stderr)
            return EXIT_FAILED
        audit.record("user_removed", "success", actor, user=args.name)
        if args.name == FIRST_ADMIN:  # its first password is of no use now
            (settings.data_path / FIRST_PASSWORD_FILE).unlink(missing_ok=True)
        print(f"user {args.name} removed")
        return EXIT_OK
    if not args.password_stdin:
        print(f"cxr-node users {args.action}: give the password on standard input with --password-stdin (never as an "
              "argument: it would show in the process list and the shell history)", file=sys.stderr)
        return EXIT_CONFIG
    password = sys.stdin.readline().rstrip("\r\n")
    try:
        if args.action == "passwd":
            set_password(store, args.name, password)
            print(f"password of {args.name} replaced (and the user unlocked)")
            return EXIT_OK
        add_user(store, args.name, args.role, password, audit, by=actor)
    except (UserError, DuplicateUser) as exc:
        print(f"cxr-node users {args.action}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"user {args.name} ({args.role}) added")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    store = _store(_settings(args))
    events = store.audit_events(limit=args.limit, event=args.event)
    if args.format == "json":
        print(json.dumps([{"id": e.id, "at": e.at.isoformat(), "event": e.event, "outcome": e.outcome,
                           "actor": e.actor, "address": e.address, "detail": e.detail} for e in events], indent=2))
    else:
        for e in reversed(events):
            detail = " ".join(f"{k}={v}" for k, v in e.detail.items())
            print(f"{e.at:%Y-%m-%d %H:%M:%S} {e.event} {e.outcome} {e.actor}"
                  f"{' from ' + e.address if e.address else ''}{' ' + detail if detail else ''}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from node.live import LiveSettings, overlay
    from node.toml_export import settings_toml

    settings = _settings(args)
    store = _store(settings)
    live = LiveSettings(overlay(settings, store.config_overrides(), include_restart=True), store, toml=settings)
    live.refresh()
    text = settings_toml(live.current, live.sources())
    if args.output:  # owner-only: it may hold the database URL's password
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"effective configuration written to {args.output}")
    else:
        print(text, end="")
    return EXIT_OK


def _drop_privileges(settings: Settings, role: str) -> tuple[socket.socket | None, socket.socket | None]:
    """Bind the SCP ports while privileged (roles all/scp), then run as ``service.user``.

    Returns:
        The bound listening sockets the SCP takes over, plain and TLS (``[scp.tls]``); None for each the SCP
        binds itself (or does not open).
    """
    from node.privileges import bind_listening_socket, check_runtime_readable, drop_privileges, warn_if_root

    if not settings.service.user:
        warn_if_root(settings.service.user)
        return None, None
    scp = settings.scp
    sockets: list[socket.socket | None] = [None, None]
    try:
        if role in ("all", "scp") and os.geteuid() == 0:
            if not scp.tls.only:
                sockets[0] = bind_listening_socket(scp.bind_address, scp.port)
            if scp.tls.enabled:
                sockets[1] = bind_listening_socket(scp.bind_address, scp.tls.port)
        drop_privileges(settings.service.user, settings.service.group)
        check_runtime_readable()
    except BaseException:
        for sock in sockets:
            if sock is not None:
                sock.close()
        raise
    return sockets[0], sockets[1]


def cmd_check_config(args: argparse.Namespace) -> int:
    from ai.errors import ModelPackageError
    from ai.manifest import load_manifest
    from node.filter import FilterRules
    from node.packages import gate_package_dir, model_package_dir

    settings = _settings(args)
    problems: list[str] = []
    try:
        FilterRules.for_settings(settings)
    except ValueError as exc:
        problems.append(f"filter.rules_file: {exc}")
    try:
        manifest = load_manifest(model_package_dir(settings))
        for label in settings.thresholds:
            if label not in manifest.labels:
                problems.append(f"thresholds.{label}: expected one of the model's labels "
                                f"{list(manifest.labels)}, found {label!r}")
    except ModelPackageError as exc:
        problems.append(f"model.package: {exc}")
    gate = gate_package_dir(settings)
    try:
        if gate is not None:
            load_manifest(gate)
    except ModelPackageError as exc:
        problems.append(f"model.gate: {exc}")
    if problems:
        print(f"{args.config or 'configuration'} is invalid:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config or 'defaults'}: OK")
    print(json.dumps(settings.summary(), indent=2))
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    from node.send import echo

    settings = _settings(args)
    dest = next((d for d in settings.destinations if d.name == args.name), None)
    if dest is None:
        names = ", ".join(d.name for d in settings.destinations) or "none configured"
        print(f"echo: no destination named {args.name!r} (configured: {names})", file=sys.stderr)
        return EXIT_CONFIG
    ok = echo(dest, dest.our_ae_title(settings.scp.ae_title), timeout_s=settings.send.timeout_s)
    print(f"C-ECHO {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {'success' if ok else 'FAILED'}")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    status = store.status(recent=args.recent)
    status["conflicts"] = store.conflicts(recent=args.recent)
    status["recent_results"] = [report_summary(row) for row in store.recent_reports(recent=args.recent)]
    status["drift_alerts"] = _drift_alerts(settings, store)
    status["settings"] = _setting_sources(settings, store)
    if args.format == "json":
        print(json.dumps(status, indent=2, default=str))
    else:
        print(format_status(status))
    return EXIT_OK


def cmd_sites(args: argparse.Namespace) -> int:
    from ai.manifest import effective_thresholds, load_manifest
    from node.packages import model_package_dir
    from node.sites import format_sites, site_reports

    settings = _settings(args)
    if args.action == "accept" and not args.site:
        print("cxr-node sites accept: name the site (as `cxr-node sites` lists it)", file=sys.stderr)
        return EXIT_CONFIG
    store = _store(settings)
    manifest = load_manifest(model_package_dir(settings), verify=False)
    thresholds = effective_thresholds(manifest, settings.thresholds)
    reports = site_reports(store, manifest, thresholds, settings.sites.drift_alert,
                           min_images=None if settings.sites.adapt == "off" else settings.sites.min_images,
                           prevalence=settings.site_prevalence)
    if args.action == "accept":
        return _accept_site(store, manifest, reports, args.site, args.label)
    print(json.dumps(reports, indent=2) if args.format == "json" else format_sites(reports, settings.sites.drift_alert))
    return EXIT_OK


def _accept_site(store: Any, manifest: Any, reports: list[dict[str, Any]], site: str | None,
                 label: str | None) -> int:
    """``cxr-node sites accept SITE [--label LABEL]``: the site's current suggestions put in force."""
    report = next((r for r in reports if r["site"] == site), None)
    if report is None:
        known = ", ".join(repr(r["site"]) for r in reports) or "none yet"
        print(f"no site {site!r} has analysed images with {manifest.name} {manifest.version} (sites: {known})",
              file=sys.stderr)
        return EXIT_FAILED
    if label is not None and label not in report["labels"]:
        print(f"label {label!r} is not one of the package's {list(report['labels'])}", file=sys.stderr)
        return EXIT_FAILED
    chosen = [label] if label else list(report["labels"])
    missing = [name for name in chosen if report["labels"][name]["suggested_threshold"] is None]
    if missing:
        why = "; ".join(f"{name}: {report['labels'][name].get('suggestion_note', 'no suggestion')}" for name in missing)
        print(f"site {site!r} has no suggestion to accept for {', '.join(missing)} ({why})", file=sys.stderr)
        return EXIT_FAILED
    for name in chosen:
        figures = report["labels"][name]
        accepted = store.accept_site_threshold(site, name, manifest.name, manifest.version,
                                               figures["suggested_threshold"], figures["suggested_method"],
                                               "administrator")
        log.info("site threshold accepted: site %s, %s %.6f (v%d, model %s)", site, name, accepted.threshold,
                 accepted.version, manifest.version)
        print(f"site {site}: {name} threshold {accepted.threshold:.6f} in force (v{accepted.version} for "
              f"{manifest.name} {manifest.version}; was {figures['threshold']:.6f}, {figures['threshold_method']})")
    print("the worker uses it from the next image on; no restart needed")
    return EXIT_OK


def cmd_shadow(args: argparse.Namespace) -> int:
    from ai.manifest import load_manifest
    from node.packages import model_package_dir
    from node.shadow import format_shadow, shadow_report

    settings = _settings(args)
    if not settings.model.shadow_package:
        print("no shadow package: set [model] shadow_package in the configuration", file=sys.stderr)
        return EXIT_CONFIG
    store = _store(settings)
    live = load_manifest(model_package_dir(settings), verify=False)
    shadow = load_manifest(settings.resolve(settings.model.shadow_package), verify=False)
    report = shadow_report(store, live, shadow)
    print(json.dumps(report, indent=2) if args.format == "json" else format_shadow(report))
    return EXIT_OK


def _drift_alerts(settings: Settings, store: Any) -> list[str]:
    """The sites whose scores drift (``cxr-node sites`` has the figures); none when the package is unreadable."""
    from ai.manifest import load_manifest
    from node.packages import model_package_dir
    from node.sites import current_drift_alerts

    try:
        manifest = load_manifest(model_package_dir(settings), verify=False)
        return current_drift_alerts(store, manifest, settings.thresholds, settings.sites.drift_alert)
    except (ModelPackageError, ValueError):
        return []


def cmd_health(args: argparse.Namespace) -> int:
    from node.health import check_node
    from storage.db import make_engine
    from storage.queue import Store

    settings = _settings(args)
    store = Store(make_engine(settings.database_url, create=False)) if args.role != "scp" else None
    try:
        checks = check_node(settings, store, args.role, max_beat_age_s=args.max_beat_age,
                            stall_s=args.stall, timeout_s=args.timeout)
    except Exception as exc:  # the database unreachable or without tables: not healthy, say why
        print(f"unhealthy: {type(exc).__name__} while checking {settings.summary()['database']}", file=sys.stderr)
        return EXIT_FAILED
    healthy = all(c.ok for c in checks)
    if args.format == "json":
        print(json.dumps({"healthy": healthy, "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    return EXIT_OK if healthy else EXIT_FAILED


def report_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What one SR the node wrote says, read back through ``node.report`` (the code that wrote it): per
    finding probability, threshold and decision, or why the image was not analysed. No patient values."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from node.report import read_report

    out = {"job_id": row["job_id"], "at": row["at"]}
    try:
        report = read_report(pydicom.dcmread(row["path"]))
    except (OSError, ValueError, InvalidDicomError) as exc:  # purged by retention, or not one of our SRs
        return {**out, "result": f"SR not readable ({type(exc).__name__})"}
    out["model"] = f"{report.algorithm.name} {report.algorithm.version}"
    if report.not_analysed is not None:
        return {**out, "result": f"not analysed: {report.not_analysed.reason}"}
    out["findings"] = {
        f.label: ({"not_applicable": f.not_applicable} if f.probability is None else
                  {"probability": round(f.probability, 4), "threshold": round(f.threshold, 4), "present": f.positive})
        | ({"informational": True} if f.informational else {})
        for f in report.findings
    }
    flagged = [f.label for f in report.findings if f.flags]
    out["result"] = f"analysed: {'POSITIVE (' + ', '.join(flagged) + ')' if flagged else 'negative'}"
    noted = [f.label for f in report.findings if f.positive and f.informational]
    if noted:
        out["result"] += f"; informational, at or above threshold: {', '.join(noted)}"
    skipped = [f.label for f in report.findings if f.not_applicable]
    if skipped:
        out["result"] += f"; not applicable (patient age): {', '.join(skipped)}"
    return out


def _setting_sources(settings: Settings, store: Any) -> dict[str, dict[str, Any]]:
    """Every setting the console can change: its value in force and where it comes from (``node.live``)."""
    from node.live import LiveSettings

    live = LiveSettings(settings, store)
    live.refresh()
    sources = live.sources()
    started = store.audit_events(limit=1, event="node_started")
    for key, entry in sources.items():  # a restart key changed before the node's last start is in force
        if entry.get("pending_restart") and started and live.changes[key].changed_at < started[0].at:
            entry["pending_restart"] = False
    return sources


def format_status(status: dict[str, Any]) -> str:
    """Human-readable status: queue counts, outbox per destination, recent failures, settings not at their
    default and where they come from."""
    lines = ["jobs:    " + ", ".join(f"{k} {v}" for k, v in sorted(status.get("jobs", {}).items()))]
    for key, s in sorted(status.get("settings", {}).items()):
        if s["source"] == "default":
            continue
        where = (f"console v{s['version']} by {s['changed_by']} at {s['changed_at']}"
                 f"{', takes effect at the next start' if s.get('pending_restart') else ''}"
                 if s["source"] == "console" else s["source"])
        lines.append(f"setting {key} = {json.dumps(s['value'])} ({where})")
    lines.extend(f"ALERT:   {line}" for line in status.get("drift_alerts", []))
    if status.get("waiting_for_disk"):
        lines.append(f"ALERT:   {status['waiting_for_disk']} job(s) wait for disk space to write their results")
    for dest, counts in sorted(status.get("outbox", {}).items()):
        lines.append(f"outbox {dest}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    conflicts = status.get("conflicts") or {}
    if conflicts.get("total"):
        lines.append(f"conflicts: {conflicts['total']} changed re-send(s) of known SOP Instance UIDs kept apart "
                     f"(received {conflicts['received']} times, answered Duplicate SOP Instance):")
        lines.extend(f"  {c['sop_instance_uid']} from {c['calling_ae']} (job {c['job_id']} {c['job_state']}, "
                     f"{c['times']}x, last {c['last_received_at']}): {c['path']}" for c in conflicts.get("recent", []))
    if status.get("recent_results"):
        lines.append("recent results:")
        for r in status["recent_results"]:
            scores = ", ".join(f"{label} {f['probability']:.3f} {'>=' if f['present'] else '<'} {f['threshold']:.3f}"
                               for label, f in r.get("findings", {}).items() if "probability" in f)
            lines.append(f"  job {r['job_id']} {r['at']}: {r['result']}{' (' + scores + ')' if scores else ''}")
    for key in ("job_failures", "send_failures"):
        failures = status.get(key) or []
        if failures:
            lines.append(f"recent {key.replace('_', ' ')}:")
            lines.extend(f"  {json.dumps(f, default=str)}" for f in failures)
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from node.predict import predict_paths

    settings = _settings(args)
    failed = 0
    for row in predict_paths(settings, [Path(p) for p in args.paths], args.model):
        failed += row["status"] == "failed"
        print(json.dumps(row) if args.format == "jsonl" else _predict_line(row), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def _predict_line(row: dict[str, Any]) -> str:
    if row["status"] != "analysed":
        return f"{row['path']}: {row['status']} ({row['reason']})"
    not_applicable = row.get("not_applicable", {})
    informational = row.get("informational", [])
    parts = [f"{label} {p:.3f}{' POSITIVE' if row['positive'][label] else ''}"
             f"{' (informational)' if label in informational else ''}"
             f"{' (not applicable: ' + not_applicable[label] + ')' if label in not_applicable else ''}"
             for label, p in row["scores"].items()]
    flag = "" if not informational else f" -> triage flag {'POSITIVE' if row['triage'] else 'negative'}"
    return f"{row['path']}: " + ", ".join(parts) + flag


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-node", description="Chest X-ray AI triage DICOM node: receive, analyse, return SR + overlay.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=None,
                       help="TOML configuration (default: built-in defaults; see config/node.toml)")
        return p

    p = add("serve", "run the node (SCP, worker and scheduler)")
    p.add_argument("--role", choices=("all", "scp", "worker"), default="all",
                   help="all: everything in one process; scp: receive only; worker: analyse and send")
    p.add_argument("--port", type=int, default=None, help="override scp.port")
    p.add_argument("--ae-title", default=None, help="override scp.ae_title")
    p.add_argument("--data-dir", default=None, help="override storage.data_dir")
    p.set_defaults(func=cmd_serve)
    p = add("predict", "score DICOM, PNG or JPEG files offline with the node's preprocessing and ensemble")
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--model", type=Path, default=None, help="model package folder (default: configured)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.set_defaults(func=cmd_predict)
    p = add("echo", "C-ECHO a configured destination")
    p.add_argument("name", help="the destination's name in the configuration")
    p.set_defaults(func=cmd_echo)
    p = add("status", "queue and outbox counts, recent failures")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--recent", type=int, default=10, help="how many recent failures to list")
    p.set_defaults(func=cmd_status)
    p = add("sites", "per site: analysed images, score distribution and drift against the package's reference, "
                     "threshold in force")
    p.add_argument("action", nargs="?", choices=("list", "accept"), default="list",
                   help="list (default), or accept: put a site's suggested thresholds in force")
    p.add_argument("site", nargs="?", help="with accept: the site (as `cxr-node sites` names it)")
    p.add_argument("--label", default=None, help="with accept: only this label (default: every label)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_sites)
    p = add("shadow", "the shadow package against the live one on the same images: agreement, flips, scores")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_shadow)
    p = add("health", "does the running node work: SCP answers C-ECHO, a worker is alive, the queue moves")
    p.add_argument("--role", choices=("all", "scp", "worker"), default="all", help="the role the node runs")
    p.add_argument("--max-beat-age", type=float, default=30.0, help="seconds a worker heartbeat may be old")
    p.add_argument("--stall", type=float, default=300.0,
                   help="seconds due jobs may wait with none finishing before the queue counts as stuck")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the C-ECHO")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_health)
    p = add("users", "console users: add, passwd (password on standard input), unlock, remove, list")
    p.add_argument("action", choices=("add", "passwd", "unlock", "remove", "list"))
    p.add_argument("name", nargs="?", help="the user's name (every action but list)")
    p.add_argument("--role", choices=("admin", "viewer"), default="viewer",
                   help="admin changes settings and retries work; viewer reads (default viewer)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input (add, passwd)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_users)
    p = add("audit", "the audit trail: associations, sends, configuration changes, logins (latest last)")
    p.add_argument("--limit", type=int, default=100, help="how many of the latest events (default 100)")
    p.add_argument("--event", default=None, help="only this event (association, result_sent, config_change, ...)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_audit)
    p = add("config", "config export: the effective configuration (node.toml + console changes) as TOML")
    p.add_argument("action", choices=("export",))
    p.add_argument("--output", default=None, help="write to this file (default: standard output)")
    p.set_defaults(func=cmd_config)
    p = add("check-config", "validate a configuration file (every bad key is named)")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except ModelPackageError as exc:
        print(f"model package unusable: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
