"""Configuration step: read the node's TOML file, apply environment overrides, validate every key.

Order of precedence: built-in defaults < TOML file < environment variables (``CXR_<SECTION>_<KEY>``,
e.g. ``CXR_SCP_PORT=11113``, ``CXR_SCP_TLS_ENABLED=true`` for ``[scp.tls] enabled``; destinations as JSON in
``CXR_DESTINATIONS``) < command-line flags.
Validation collects *all* problems and names each key with what was expected and what was found.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from ai.errors import ConfigError
from node.tls import TLS_PORT, TlsFileError, client_context, server_context

ENV_PREFIX = "CXR_"
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash/control


@dataclass(frozen=True)
class ScpTlsSettings:
    """``[scp.tls]``: a DICOM TLS listener beside (or instead of) the plain one (see node/tls.py)."""

    enabled: bool = False  # listen with TLS on ``port`` as well
    port: int = TLS_PORT  # the TLS port (2762, IANA dicom-tls); 0 = any free port
    only: bool = False  # TLS only: the plain ``scp.port`` is not opened
    cert_file: str = ""  # our certificate (PEM; intermediates after it); required when enabled
    key_file: str = ""  # its unencrypted private key (PEM); required when enabled
    ca_file: str = ""  # CA certificates that client certificates must chain to; empty: none requested
    require_client_cert: bool = False  # refuse clients without a certificate that ca_file trusts


@dataclass(frozen=True)
class ScpSettings:
    """The C-STORE/C-ECHO service class provider (what modalities send to)."""

    ae_title: str = "CXR-AI"  # called AE title we answer to
    port: int = 11112
    bind_address: str = "0.0.0.0"
    allowed_callers: tuple[str, ...] = ()  # calling AE titles accepted; empty = any
    require_called_ae: bool = True  # refuse associations addressed to another AE title
    max_associations: int = 16  # concurrent associations per SCP process (pynetdicom's default, 10, refuses more)
    processes: int = 1  # SCP processes accepting on one listening socket: > 1 uses more cores
    max_pdu: int = 131072  # receive PDU size; larger PDUs halve pynetdicom's CPU per GB (MAX_PDU_RANGE)
    network_timeout_s: float = 60.0  # idle limit of an association; also the time one PDU may take to arrive
    artim_timeout_s: float = 10.0  # PS3.8 ARTIM: accept -> whole A-ASSOCIATE-RQ, and abort -> peer's close
    max_associations_per_address: int = 8  # concurrent connections per peer IP address (per SCP process)
    tls: ScpTlsSettings = field(default_factory=ScpTlsSettings)


@dataclass(frozen=True)
class StorageSettings:
    """Where received files, produced results and the database live."""

    data_dir: str = "var"  # received files, results, the SQLite database
    database_url: str = ""  # empty: SQLite in data_dir; or a SQLAlchemy URL (PostgreSQL)
    retention_days: int = 30  # received instances older than this are purged; 0 = keep forever
    min_free_mb: int = 200  # refuse new instances (Out of Resources) below this free space; results that
    # waited for a full disk are written once this much is free again


@dataclass(frozen=True)
class FilterSettings:
    """Which received instances are analysed (frontal human chest radiographs)."""

    modalities: tuple[str, ...] = ("CR", "DX", "DR", "RG")
    no_view_policy: str = "analyse"  # images with no view information: "analyse" or "skip"
    rules_file: str = ""  # empty: the bundled node/filter_rules.toml


@dataclass(frozen=True)
class WorkerSettings:
    """The analysis worker that leases jobs from the shared queue."""

    lease_s: float = 120.0  # a job whose lease was not renewed for this long returns to the queue
    poll_s: float = 0.2  # idle poll interval
    max_attempts: int = 5  # retryable failures before a job is failed for good
    retry_initial_s: float = 10.0  # first delay of a retryable failure; doubles per attempt
    retry_max_s: float = 600.0  # cap of the delay
    job_timeout_s: float = 120.0  # the worker process is killed when one job runs longer (a stall)
    max_memory_mb: int = 3072  # the worker process is killed when its resident memory passes this (690 MB
    # peak with tb-default-1.2.0 on a 3000 x 3000 16-bit image, 922 MB with chest-default-1.6.0's members,
    # about 16 bytes a pixel more beyond)


@dataclass(frozen=True)
class SendSettings:
    """Sending results to destinations (the outbox)."""

    retry_initial_s: float = 10.0  # first retry delay for a failed send; doubles per attempt
    retry_max_s: float = 600.0  # cap of the delay
    alert_after: int = 5  # log an alert after this many consecutive failures to a destination
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Destination:
    """One DICOM destination that receives every result (SR and SC)."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae: str = ""  # our AE title towards this destination; empty: scp.ae_title
    shadow: bool = False  # a validation period: results for it are stored, never sent
    tls: bool = False  # DICOM TLS towards it (node/tls.py)
    ca_file: str = ""  # with tls: CA certificates its certificate must chain to (required)
    cert_file: str = ""  # with tls: our client certificate (PEM); empty: none presented
    key_file: str = ""  # with tls: its unencrypted private key (PEM)
    check_hostname: bool = False  # with tls: its certificate must also name ``host``

    def our_ae_title(self, node_ae_title: str) -> str:
        """The calling AE title we use towards this destination: its own ``calling_ae``, else the node's."""
        return self.calling_ae or node_ae_title


@dataclass(frozen=True)
class ModelSettings:
    """The model package the worker runs."""

    package: str = ""  # empty: the bundled default model package
    providers: tuple[str, ...] = ()  # empty: CUDA when present, else CPU
    heatmap: bool = True  # produce the Secondary Capture overlay
    gate: str = ""  # the input gate package (ai/gate.py); empty: the bundled one; "off": every image is scored
    shadow_package: str = ""  # a candidate package run beside the live one: results stored, never sent


SITE_KEYS = ("calling_ae", "station_name", "institution_name", "device")
SITE_ADAPT = ("suggest", "auto", "off")


@dataclass(frozen=True)
class SiteSettings:
    """What a site is (the per-site score history, drift and site thresholds: node/sites.py)."""

    key: str = "calling_ae"  # calling_ae, station_name, institution_name or device (manufacturer + model)
    min_images: int = 200  # analysed images of a site before a label-free threshold is suggested
    adapt: str = "suggest"  # suggest (an administrator accepts), auto (applied, audited) or off
    drift_alert: float = 0.1  # prevalence-adjusted KS distance above which a site's scores alert
    shadow: tuple[str, ...] = ()  # sites in a validation period: their results are stored, never sent


@dataclass(frozen=True)
class ServiceSettings:
    """The process: who the node runs as once its port is bound (see node/privileges.py)."""

    user: str = ""  # started as root: switch to this user after binding the SCP port; empty: stay as started
    group: str = ""  # with user: this group instead of the user's primary group


@dataclass(frozen=True)
class WebSettings:
    """The console: the page, the REST API under /api/v1, /healthz and /metrics (node/web)."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"  # the console is for this machine unless an administrator opens it
    port: int = 8080
    cert_file: str = ""  # with key_file: HTTPS (PEM); empty: plain HTTP (keep bind_address on loopback then)
    key_file: str = ""
    metrics_auth: str = "auto"  # /metrics needs a login: "auto" (only when not bound to loopback), "on", "off"


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail (node/audit.py): always in the database; optionally to syslog as well."""

    syslog: str = ""  # udp://host:514 or tcp://host:601 (RFC 5424); empty: the database only


@dataclass(frozen=True)
class Settings:
    """The whole node configuration."""

    scp: ScpSettings = field(default_factory=ScpSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    send: SendSettings = field(default_factory=SendSettings)
    destinations: tuple[Destination, ...] = ()
    model: ModelSettings = field(default_factory=ModelSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    sites: SiteSettings = field(default_factory=SiteSettings)
    web: WebSettings = field(default_factory=WebSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # per-label overrides
    site_prevalence: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # site -> label -> stated
    base_dir: str = "."  # relative paths are resolved against this (the config file's folder)

    def resolve(self, path: str) -> Path:
        """Resolve a configured path against the configuration file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def data_path(self) -> Path:
        return self.resolve(self.storage.data_dir)

    @property
    def database_url(self) -> str:
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{(self.data_path / 'cxr-node.sqlite').resolve()}"

    def _tls_summary(self) -> dict[str, Any] | str:
        """``[scp.tls]`` for the start-up log: its port and client certificate policy (file names, no contents)."""
        tls = self.scp.tls
        if not tls.enabled:
            return "off"
        clients = ("required" if tls.require_client_cert else "verified if presented") if tls.ca_file else "not asked"
        return {"port": tls.port, "only": tls.only, "client_certificates": clients, "cert_file": tls.cert_file}

    def summary(self) -> dict[str, Any]:
        """The effective configuration for the start-up log, without secrets (passwords in URLs)."""
        url = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", self.database_url)
        return {
            "scp": {"ae_title": self.scp.ae_title, "port": self.scp.port,
                    "allowed_callers": list(self.scp.allowed_callers),
                    "max_associations": self.scp.max_associations, "processes": self.scp.processes,
                    "max_associations_per_address": self.scp.max_associations_per_address,
                    "max_pdu": self.scp.max_pdu, "artim_timeout_s": self.scp.artim_timeout_s,
                    "tls": self._tls_summary()},
            "database": url,
            "data_dir": str(self.data_path),
            "destinations": [f"{d.name}={d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}"
                             f"{' (shadow)' if d.shadow else ''}" for d in self.destinations],
            "model": self.model.package or "(bundled)",
            "gate": self.model.gate or "(bundled)",
            "shadow_package": self.model.shadow_package or "(none)",
            "thresholds": dict(self.thresholds),
            "no_view_policy": self.filter.no_view_policy,
            "service_user": self.service.user or "(as started)",
            "sites": {"key": self.sites.key, "adapt": self.sites.adapt},
            "web": (f"{'https' if self.web.cert_file else 'http'}://{self.web.bind_address}:{self.web.port}"
                    if self.web.enabled else "(off)"),
            "audit_syslog": self.audit.syslog or "(database only)",
        }


_SECTIONS: dict[str, type] = {
    "scp": ScpSettings,
    "storage": StorageSettings,
    "filter": FilterSettings,
    "worker": WorkerSettings,
    "send": SendSettings,
    "model": ModelSettings,
    "service": ServiceSettings,
    "sites": SiteSettings,
    "web": WebSettings,
    "audit": AuditSettings,
}


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        t, "a list of strings"
    )


def _coerce(key: str, value: Any, default: Any, problems: list[str]) -> Any:
    """Check one value against the type of its default; append a problem and return None if wrong."""
    t = type(default)
    ok: bool
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t is str:
        ok = isinstance(value, str)
    elif t is tuple:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - every field has one of the types above
        ok = True
    if not ok:
        problems.append(f"{key}: expected {_type_name(t)}, found {value!r}")
        return None
    return value


def _section(name: str, raw: Any, problems: list[str], cls: type | None = None) -> Any:
    """One table of the file (``cls``: its settings class; None: the section ``name``'s)."""
    cls = cls or _SECTIONS[name]
    default = cls()
    if raw is None:
        return default
    if not isinstance(raw, dict):
        problems.append(f"[{name}]: expected a table, found {raw!r}")
        return default
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            problems.append(f"{name}.{key}: unknown key (expected one of {', '.join(sorted(known))})")
            continue
        if is_dataclass(getattr(default, key)):  # a table in the table, such as [scp.tls]
            values[key] = _section(f"{name}.{key}", value, problems, type(getattr(default, key)))
            continue
        v = _coerce(f"{name}.{key}", value, getattr(default, key), problems)
        if v is not None:
            values[key] = v
    return replace(default, **values)


def _destinations(raw: Any, problems: list[str]) -> tuple[Destination, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"destinations: expected an array of tables [[destinations]], found {raw!r}")
        return ()
    out: list[Destination] = []
    required = {"name": "", "ae_title": "", "host": "", "port": 0}
    optional = {f.name: f.default for f in fields(Destination) if f.name not in required}
    for i, item in enumerate(raw):
        where = f"destinations[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a table, found {item!r}")
            continue
        before = len(problems)
        for key in item:
            if key not in (*required, *optional):
                problems.append(f"{where}.{key}: unknown key (expected {', '.join((*required, *optional))})")
        for key, default in required.items():
            if key not in item:
                problems.append(f"{where}.{key}: required, found nothing")
            else:
                _coerce(f"{where}.{key}", item[key], default, problems)
        for key, default in optional.items():
            if key in item:
                _coerce(f"{where}.{key}", item[key], default, problems)
        if len(problems) == before:
            out.append(Destination(**{**optional, **item}))
    return tuple(out)


def _thresholds(raw: Any, problems: list[str]) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"[thresholds]: expected a table of label = number, found {raw!r}")
        return {}
    out: dict[str, float] = {}
    for label, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            problems.append(f"thresholds.{label}: expected a probability between 0 and 1, found {value!r}")
        else:
            out[label] = float(value)
    return out


def _site_prevalence(raw: Any, problems: list[str]) -> dict[str, dict[str, float]]:
    """``[site_prevalence]``: per site a table of label = the prevalence an administrator states for it."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"[site_prevalence]: expected a table of site = {{ Label = prevalence }}, found {raw!r}")
        return {}
    out: dict[str, dict[str, float]] = {}
    for site, labels in raw.items():
        if not isinstance(labels, dict):
            problems.append(f"site_prevalence.{site}: expected a table of label = prevalence, found {labels!r}")
            continue
        for label, value in labels.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
                problems.append(f"site_prevalence.{site}.{label}: expected a prevalence between 0 and 1 "
                                f"(exclusive), found {value!r}")
            else:
                out.setdefault(str(site), {})[str(label)] = float(value)
    return out


MAX_PDU_RANGE = (4096, 4 * 1024 * 1024)  # scp.max_pdu: dcmtk's minimum; each association may hold one such buffer


def _validate_scp_transport(scp: ScpSettings, problems: list[str]) -> None:
    """Range checks of the keys that bound what a peer can make the SCP allocate or hold."""
    low, high = MAX_PDU_RANGE
    if not low <= scp.max_pdu <= high:
        problems.append(f"scp.max_pdu: expected {low}-{high} bytes (0, unlimited, is not allowed), "
                        f"found {scp.max_pdu}")
    if not 1.0 <= scp.network_timeout_s <= 3600.0:
        problems.append(f"scp.network_timeout_s: expected 1-3600 seconds, found {scp.network_timeout_s}")
    if not 0.1 <= scp.artim_timeout_s <= 300.0:
        problems.append(f"scp.artim_timeout_s: expected 0.1-300 seconds, found {scp.artim_timeout_s}")
    if scp.max_associations_per_address < 1:  # above max_associations it has no effect
        problems.append(f"scp.max_associations_per_address: expected >= 1, found {scp.max_associations_per_address}")


def _validate_tls(s: Settings, problems: list[str]) -> None:
    """``[scp.tls]`` and the TLS keys of every destination: ports, and each file loaded as the node loads it."""
    tls = s.scp.tls
    if tls.enabled:
        if not 0 <= tls.port <= 65535:
            problems.append(f"scp.tls.port: expected 0-65535, found {tls.port}")
        elif tls.port and not tls.only and tls.port == s.scp.port:
            problems.append(f"scp.tls.port: expected another port than scp.port (the plain listener), found "
                            f"{tls.port} for both")
        try:
            server_context(tls.cert_file, tls.key_file, tls.ca_file, tls.require_client_cert)
        except TlsFileError as exc:
            problems.append(str(exc))
    elif tls.only:
        problems.append("scp.tls.only: expected enabled = true with it (TLS only needs the TLS listener), "
                        "found enabled = false")
    for d in s.destinations:
        where = f"destinations.{d.name}"
        if d.tls:
            try:
                client_context(d.ca_file, d.cert_file, d.key_file, d.check_hostname, where=where)
            except TlsFileError as exc:
                problems.append(str(exc))
        elif d.ca_file or d.cert_file or d.key_file or d.check_hostname:
            problems.append(f"{where}.tls: expected true with ca_file, cert_file, key_file or check_hostname "
                            "(results would go unencrypted), found false")


def _tls_files_resolved(s: Settings) -> Settings:
    """The settings with every TLS file as an absolute path, resolved against the configuration file's folder
    (destinations are sent to without the settings at hand)."""

    def path(p: str) -> str:
        return str(s.resolve(p).absolute()) if p else ""

    tls = s.scp.tls
    scp = replace(s.scp, tls=replace(tls, cert_file=path(tls.cert_file), key_file=path(tls.key_file),
                                     ca_file=path(tls.ca_file)))
    destinations = tuple(replace(d, ca_file=path(d.ca_file), cert_file=path(d.cert_file), key_file=path(d.key_file))
                         for d in s.destinations)
    return replace(s, scp=scp, destinations=destinations)


def _validate_worker(w: WorkerSettings, problems: list[str]) -> None:
    """Range checks of the worker's keys (its supervisor kills and restarts it on these limits)."""
    if w.lease_s < 1.0:
        problems.append(f"worker.lease_s: expected >= 1 second, found {w.lease_s}")
    if not 0.01 <= w.poll_s <= 60.0:
        problems.append(f"worker.poll_s: expected 0.01-60 seconds, found {w.poll_s}")
    if w.max_attempts < 1:
        problems.append(f"worker.max_attempts: expected >= 1, found {w.max_attempts}")
    if w.retry_initial_s <= 0 or w.retry_max_s < w.retry_initial_s:
        problems.append("worker.retry_initial_s/retry_max_s: expected 0 < retry_initial_s <= retry_max_s, "
                        f"found {w.retry_initial_s} and {w.retry_max_s}")
    if not 1.0 <= w.job_timeout_s <= 86400.0:
        problems.append(f"worker.job_timeout_s: expected 1-86400 seconds, found {w.job_timeout_s}")
    if w.max_memory_mb < 256:
        problems.append(f"worker.max_memory_mb: expected >= 256 (the model runtime alone needs about 200), "
                        f"found {w.max_memory_mb}")


def _validate_web(s: Settings, problems: list[str]) -> None:
    web = s.web
    if not 0 <= web.port <= 65535:
        problems.append(f"web.port: expected 0-65535, found {web.port}")
    if web.metrics_auth not in ("auto", "on", "off"):
        problems.append(f"web.metrics_auth: expected 'auto', 'on' or 'off', found {web.metrics_auth!r}")
    if bool(web.cert_file) != bool(web.key_file):
        problems.append("web.cert_file/key_file: expected both (HTTPS) or neither, found only "
                        f"{'cert_file' if web.cert_file else 'key_file'}")
    for key in ("cert_file", "key_file"):
        path = getattr(web, key)
        if web.enabled and path and not s.resolve(path).is_file():
            problems.append(f"web.{key}: expected a PEM file, found nothing at {s.resolve(path)}")
    if s.audit.syslog and not re.match(r"^(udp|tcp)://[^:/]+(:\d+)?$", s.audit.syslog):
        problems.append(f"audit.syslog: expected udp://host:port or tcp://host:port, found {s.audit.syslog!r}")


def _validate(s: Settings, problems: list[str]) -> None:
    """Cross-field and range checks."""
    if not AE_TITLE_RE.match(s.scp.ae_title) or not s.scp.ae_title.strip():
        problems.append(f"scp.ae_title: expected 1-16 printable characters, no backslash, found {s.scp.ae_title!r}")
    for ae in s.scp.allowed_callers:
        if not AE_TITLE_RE.match(ae):
            problems.append(f"scp.allowed_callers: expected AE titles of 1-16 characters, found {ae!r}")
    if not 0 <= s.scp.port <= 65535:
        problems.append(f"scp.port: expected 0-65535, found {s.scp.port}")
    if s.scp.max_associations < 1:
        problems.append(f"scp.max_associations: expected >= 1, found {s.scp.max_associations}")
    if s.scp.processes < 1:
        problems.append(f"scp.processes: expected >= 1, found {s.scp.processes}")
    _validate_scp_transport(s.scp, problems)
    _validate_tls(s, problems)
    _validate_worker(s.worker, problems)
    if s.filter.no_view_policy not in ("analyse", "skip"):
        problems.append(f"filter.no_view_policy: expected 'analyse' or 'skip', found {s.filter.no_view_policy!r}")
    if not all(math.isfinite(v) for v in (s.send.retry_initial_s, s.send.retry_max_s, s.send.timeout_s)):
        problems.append("send.retry_initial_s/retry_max_s/timeout_s: expected finite numbers, found "
                        f"{s.send.retry_initial_s}, {s.send.retry_max_s} and {s.send.timeout_s}")
    if not 1.0 <= s.send.timeout_s <= 3600.0:
        problems.append(f"send.timeout_s: expected 1-3600 seconds, found {s.send.timeout_s}")
    if s.send.alert_after < 0:
        problems.append(f"send.alert_after: expected >= 0 (0: no alert), found {s.send.alert_after}")
    if s.send.retry_initial_s <= 0 or s.send.retry_max_s < s.send.retry_initial_s:
        problems.append(
            "send.retry_initial_s/retry_max_s: expected 0 < retry_initial_s <= retry_max_s, "
            f"found {s.send.retry_initial_s} and {s.send.retry_max_s}"
        )
    if s.sites.key not in SITE_KEYS:
        problems.append(f"sites.key: expected one of {', '.join(SITE_KEYS)}, found {s.sites.key!r}")
    if s.sites.adapt not in SITE_ADAPT:
        problems.append(f"sites.adapt: expected one of {', '.join(SITE_ADAPT)}, found {s.sites.adapt!r}")
    if s.sites.min_images < 20:
        problems.append(f"sites.min_images: expected >= 20, found {s.sites.min_images}")
    if not 0.0 < s.sites.drift_alert < 1.0:
        problems.append(f"sites.drift_alert: expected a number in (0, 1), found {s.sites.drift_alert}")
    _validate_web(s, problems)
    if s.storage.retention_days < 0:
        problems.append(f"storage.retention_days: expected >= 0, found {s.storage.retention_days}")
    names = [d.name for d in s.destinations]
    for d in s.destinations:
        if names.count(d.name) > 1:
            problems.append(f"destinations: name {d.name!r} is used more than once")
        if not AE_TITLE_RE.match(d.ae_title):
            problems.append(f"destinations.{d.name}.ae_title: expected 1-16 characters, found {d.ae_title!r}")
        if not 1 <= d.port <= 65535:
            problems.append(f"destinations.{d.name}.port: expected 1-65535, found {d.port}")


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    """Apply ``CXR_<SECTION>_<KEY>`` variables onto the raw TOML mapping (values parsed as TOML)."""
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        if rest == "destinations":
            try:
                raw["destinations"] = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"{var}: expected a JSON array of destinations, found {text!r} ({exc.msg})")
            continue
        section, _, key = rest.partition("_")
        if section == "thresholds" and key:
            target = raw.setdefault("thresholds", {})
            label = next((k for k in target if k.lower() == key), key)
            target[label] = _parse_env_value(text)
        elif section in _SECTIONS and key:
            table = raw.setdefault(section, {})
            sub, _, leaf = key.partition("_")  # CXR_SCP_TLS_ENABLED: key enabled of the table [scp.tls]
            if leaf and is_dataclass(getattr(_SECTIONS[section](), sub, None)) and isinstance(table, dict):
                table, key = table.setdefault(sub, {}), leaf
            if isinstance(table, dict):
                table[key] = _parse_env_value(text)


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as CXR_SCP_AE_TITLE=NODE1


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, override and validate the configuration.

    Args:
        path: the TOML file; None for the built-in defaults.
        environ: the environment to read ``CXR_*`` overrides from (default: ``os.environ``).

    Raises:
        ConfigError: naming every invalid key, or the TOML syntax error.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "configuration"
    base_dir = "."
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError([f"file not found: {p}"], source) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"TOML syntax: {exc}"], source) from exc
        base_dir = str(p.resolve().parent)
    problems: list[str] = []
    _env_overrides(raw, environ, problems)
    for key in raw:
        if key not in (*_SECTIONS, "destinations", "thresholds", "site_prevalence"):
            problems.append(f"{key}: unknown section (expected scp, storage, filter, worker, send, "
                            "destinations, model, service, sites, web, audit, site_prevalence, thresholds)")
    sections = {name: _section(name, raw.get(name), problems) for name in _SECTIONS}
    settings = Settings(
        destinations=_destinations(raw.get("destinations"), problems),
        thresholds=_thresholds(raw.get("thresholds"), problems),
        site_prevalence=_site_prevalence(raw.get("site_prevalence"), problems),
        base_dir=base_dir,
        **sections,
    )
    settings = _tls_files_resolved(settings)
    _validate(settings, problems)
    if problems:
        raise ConfigError(problems, source)
    return settings
