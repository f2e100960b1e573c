"""Live configuration: node.toml's settings with the changes made in the console, read from the database.

node.toml (and the environment) is the starting point; the console and its API (``node.web``) record each change as
a row of ``config_changes`` (who, when, old -> new; ``storage.console``). :class:`LiveSettings` gives every part of
the node the effective settings and notices a change by its id (one cheap query), so changes reach every process
that shares the database: the SCP processes (checked as each association opens), the worker (before each job) and the
sender (before each round).

What changes without a restart (:data:`LIVE_KEYS`) and what needs one (:data:`RESTART_KEYS`) is stated here once; the
API refuses other keys. A change that needs a restart is stored and shown as pending until the node restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from node.config import (
    ENV_PREFIX,
    Destination,
    ScpSettings,
    SendSettings,
    Settings,
    _coerce,
    _destinations,
    _validate,
)
from storage.records import ConfigChangeRecord

log = logging.getLogger(__name__)

REMOVED = {"removed": True}  # the value of ``destinations.<name>`` that removes a destination node.toml names

# Keys the console may change, and whether the change takes effect at once (else at the next start).
LIVE_KEYS = frozenset({"scp.allowed_callers", "scp.require_called_ae", "scp.max_associations",
                       "send.retry_initial_s", "send.retry_max_s", "send.alert_after", "send.timeout_s"})
# Not here: scp.port, bind_address and processes (the sockets are bound, as root if need be, before the database is
# opened as the service user) and everything else: node.toml only.
RESTART_KEYS = frozenset({"scp.ae_title", "scp.max_pdu", "scp.network_timeout_s", "scp.artim_timeout_s",
                          "scp.max_associations_per_address"})
DESTINATION_KEYS = tuple(f.name for f in dataclasses.fields(Destination))
TLS_PATH_KEYS = ("ca_file", "cert_file", "key_file")


class ChangeError(ValueError):
    """A console change that cannot be made: ``problems`` name each key with what was expected and found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def overlay(base: Settings, changes: Mapping[str, ConfigChangeRecord], include_restart: bool = False) -> Settings:
    """``base`` with the console's changes applied (those of :data:`RESTART_KEYS` only with ``include_restart``:
    a running node keeps the values it started with)."""
    scp: dict[str, Any] = {}
    send: dict[str, Any] = {}
    destinations = {d.name: d for d in base.destinations}
    thresholds = dict(base.thresholds)
    for key, change in sorted(changes.items(), key=lambda kv: kv[1].id):
        value = change.new_value
        section, _, name = key.partition(".")
        if value is None and section in ("scp", "send"):
            continue  # back to node.toml's value
        if section == "scp" and (key in LIVE_KEYS or (include_restart and key in RESTART_KEYS)):
            scp[name] = tuple(value) if isinstance(value, list) else value
        elif section == "send" and key in LIVE_KEYS:
            send[name] = value
        elif section == "destinations":
            if value is None:  # back to node.toml's
                original = next((d for d in base.destinations if d.name == name), None)
                destinations.pop(name, None)
                if original is not None:
                    destinations[name] = original
            elif value == REMOVED:
                destinations.pop(name, None)
            elif isinstance(value, dict):
                destinations[name] = Destination(**{k: value[k] for k in DESTINATION_KEYS if k in value})
        elif section == "thresholds":
            if value is None:
                thresholds.pop(name, None)
                if name in base.thresholds:
                    thresholds[name] = base.thresholds[name]
            else:
                thresholds[name] = float(value)  # type: ignore[arg-type]
    return dataclasses.replace(base, scp=dataclasses.replace(base.scp, **scp),
                               send=dataclasses.replace(base.send, **send),
                               destinations=tuple(destinations.values()), thresholds=thresholds)


def check_scp_change(base: Settings, body: Mapping[str, Any], toml: Settings | None = None) -> dict[str, Any]:
    """Validate a change of receiving keys (``PATCH /api/v1/scp``); returns the coerced values (None: back to
    node.toml's value, taken from ``toml``).

    Raises:
        ChangeError: an unknown key, a key that cannot be changed here, or a bad value.
    """
    return _check_section(base, "scp", ScpSettings(), body, toml)


def check_send_change(base: Settings, body: Mapping[str, Any], toml: Settings | None = None) -> dict[str, Any]:
    """Validate a change of the sending keys (retry delays, alert, timeout); None: back to node.toml's value."""
    return _check_section(base, "send", SendSettings(), body, toml)


def _check_section(base: Settings, section: str, default: Any, body: Mapping[str, Any],
                   base_settings: Settings | None = None) -> dict[str, Any]:
    problems: list[str] = []
    values: dict[str, Any] = {}
    changeable = sorted(k.partition(".")[2] for k in LIVE_KEYS | RESTART_KEYS if k.startswith(section + "."))
    if not body:
        problems.append(f"{section}: expected an object with one or more of {', '.join(changeable)}, found nothing")
    back: list[str] = []  # null: back to node.toml's value
    for key, value in body.items():
        if key not in changeable:
            problems.append(f"{section}.{key}: cannot be changed here (expected one of {', '.join(changeable)}; "
                            "other keys are set in node.toml)")
            continue
        if value is None:
            back.append(key)
            continue
        coerced = _coerce(f"{section}.{key}", value, getattr(default, key), problems)
        if coerced is not None:
            values[key] = coerced
    if not problems:
        current = getattr(base, section)
        started = getattr(base_settings or base, section)
        restored = {key: getattr(started, key) for key in back}
        candidate = dataclasses.replace(base, **{section: dataclasses.replace(current, **values, **restored)})
        _validate(candidate, problems)
    if problems:
        raise ChangeError(problems)
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, **dict.fromkeys(back)}


def check_destination(base: Settings, body: Mapping[str, Any], name: str | None = None) -> Destination:
    """Validate one destination (``POST``/``PUT /api/v1/destinations``) as node.toml's ``[[destinations]]`` are, and
    against the others in force; relative certificate paths are taken from the configuration file's folder.

    Raises:
        ChangeError: a missing or unknown key, a bad value, an unreadable certificate or a name used twice.
    """
    if not isinstance(body, Mapping):
        raise ChangeError([f"destination: expected a JSON object, found {body!r}"])
    problems: list[str] = []
    item = dict(body)
    if name is not None and item.setdefault("name", name) != name:
        problems.append(f"destination.name: the URL names {name!r}, the body {item['name']!r} (rename by adding "
                        "a new one and removing this one)")
    for key in ("name", "host"):
        if isinstance(item.get(key), str) and not item[key].strip():
            problems.append(f"destination.{key}: expected a non-empty string, found {item[key]!r}")
    for key in TLS_PATH_KEYS:
        if isinstance(item.get(key), str) and item[key]:
            item[key] = str(base.resolve(item[key]))
    parsed = _destinations([item], problems)
    if problems or not parsed:
        raise ChangeError([p.replace("destinations[0]", "destination") for p in problems])
    dest = parsed[0]
    others = tuple(d for d in base.destinations if d.name != dest.name)
    _validate(dataclasses.replace(base, destinations=(*others, dest)), problems)
    if problems:
        raise ChangeError(problems)
    return dest


def _with_restart_keys(current: Settings, started: Settings) -> Settings:
    """``current`` with the values of :data:`RESTART_KEYS` the node started with (in force until a restart)."""
    scp = {key.partition(".")[2]: getattr(started.scp, key.partition(".")[2]) for key in RESTART_KEYS
           if key.startswith("scp.")}
    return dataclasses.replace(current, scp=dataclasses.replace(current.scp, **scp))


def base_source(base: Settings, key: str, environ: Mapping[str, str] | None = None) -> str:
    """Where node.toml's side of a key comes from: ``environment``, ``node.toml`` or ``default``."""
    environ = os.environ if environ is None else environ
    section, _, name = key.partition(".")
    if section == "destinations":
        return "environment" if f"{ENV_PREFIX}DESTINATIONS" in environ else "node.toml"
    if f"{ENV_PREFIX}{section}_{name}".upper() in {k.upper() for k in environ}:
        return "environment"
    if section == "thresholds":
        return "node.toml" if name in base.thresholds else "model package"
    default = {"scp": ScpSettings(), "send": SendSettings()}.get(section)
    if default is not None and getattr(getattr(base, section), name) == getattr(default, name):
        return "default"
    return "node.toml"


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class LiveSettings:
    """The effective settings of a running node, refreshed when the console changes one.

    Args:
        base: the settings the node started with: node.toml's with the console's changes of that moment, those of
            :data:`RESTART_KEYS` included.
        store: the store holding ``config_changes`` (any object with ``config_version`` and
            ``config_overrides``).
        toml: node.toml's settings (with the environment and command-line flags) without any console change: what
            a change back to node.toml (null) restores, and the "source" of values the console never set; default
            ``base``.
    """

    def __init__(self, base: Settings, store: Any, toml: Settings | None = None) -> None:
        self.base = base
        self.toml = toml if toml is not None else base
        self.store = store
        self._lock = threading.Lock()
        self._version = 0
        self._changes: dict[str, ConfigChangeRecord] = {}
        self._current = base
        self._listeners: list[Any] = []

    @property
    def current(self) -> Settings:
        """The effective settings as of the last :meth:`refresh`."""
        return self._current

    @property
    def changes(self) -> dict[str, ConfigChangeRecord]:
        return dict(self._changes)

    def on_change(self, listener: Any) -> None:
        """Call ``listener(settings)`` after each refresh that found a change (e.g. the SCP's caller list)."""
        self._listeners.append(listener)

    def refresh(self) -> Settings:
        """Read the latest change id; when it moved, recompute the effective settings. A database that cannot be
        read leaves the settings as they were (logged): receiving and sending go on."""
        try:
            version = self.store.config_version()
            if version == self._version:
                return self._current
            changes = self.store.config_overrides()
        except Exception as exc:
            log.warning("configuration changes not read (the settings in force stay): %s", exc)
            return self._current
        with self._lock:
            if version > self._version:  # never back to an older state read by a slower thread
                self._changes = changes
                self._current = _with_restart_keys(overlay(self.toml, changes), self.base)
                self._version = version
                for listener in self._listeners:
                    listener(self._current)
        return self._current

    def pending_restart(self) -> dict[str, Any]:
        """Changed keys that take effect at the next start: key -> the value then in force."""
        started = self.base
        out: dict[str, Any] = {}
        for key, change in self._changes.items():
            if key in RESTART_KEYS and change.new_value is not None:
                section, _, name = key.partition(".")
                if _listed(getattr(getattr(started, section), name)) != change.new_value:
                    out[key] = change.new_value
        return out

    def sources(self) -> dict[str, dict[str, Any]]:
        """Every key the console can change, plus each destination and threshold override: its value in force and
        where it comes from (``default``, ``node.toml``, ``environment``, ``console``; a console value with its
        version, who and when)."""
        current = self._current
        out: dict[str, dict[str, Any]] = {}
        keys = sorted(LIVE_KEYS | RESTART_KEYS) + [f"destinations.{d.name}" for d in current.destinations] + [
            f"thresholds.{label}" for label in current.thresholds]
        for key in self._changes:  # removed destinations and cleared thresholds too
            if key not in keys and key.partition(".")[0] in ("destinations", "thresholds"):
                keys.append(key)
        for key in keys:
            section, _, name = key.partition(".")
            if section in ("scp", "send"):
                value = _listed(getattr(getattr(current, section), name))
            elif section == "destinations":
                dest = next((d for d in current.destinations if d.name == name), None)
                value = dataclasses.asdict(dest) if dest is not None else None
            else:
                value = current.thresholds.get(name)
            change = self._changes.get(key)
            entry: dict[str, Any] = {"value": value, "restart": key in RESTART_KEYS}
            if change is not None and change.new_value is not None:
                entry.update(source="console", version=change.id, changed_by=change.changed_by,
                             changed_at=change.changed_at.isoformat())
                if key in RESTART_KEYS:
                    entry["value"] = change.new_value
                    entry["pending_restart"] = key in self.pending_restart()
            else:
                entry["source"] = base_source(self.toml, key)
            out[key] = entry
        return out
