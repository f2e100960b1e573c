"""``cxr-node config export``: the effective configuration (node.toml, environment, console changes) as TOML.

The file loads back (``node.config.load_settings``) into the same settings, wherever it is written: paths are made
absolute. A comment after each value the console set says its version, who and when, so the exported file is also
a record of what was changed where.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from node.config import _SECTIONS, Settings

PATH_KEYS = {("storage", "data_dir"), ("filter", "rules_file"), ("model", "package"), ("model", "gate"),
             ("model", "shadow_package"), ("web", "cert_file"), ("web", "key_file")}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string for these characters


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def settings_toml(settings: Settings, sources: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """TOML text of ``settings``; ``sources`` (``LiveSettings.sources``) adds where console values come from."""
    sources = sources or {}

    def note(key: str) -> str:
        s = sources.get(key)
        if not s or s.get("source") != "console":
            return ""
        pending = ", takes effect at the next start" if s.get("pending_restart") else ""
        return f"  # console v{s['version']} by {s['changed_by']} at {s['changed_at']}{pending}"

    lines = [f"# cxr-node effective configuration, exported {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC",
             "# node.toml + environment + changes made in the console; paths are absolute", ""]
    def table(name: str, values: Any) -> None:
        lines.append(f"[{name}]")
        nested = []
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if dataclasses.is_dataclass(value):  # e.g. [scp.tls], written after its parent's keys
                nested.append((f"{name}.{f.name}", value))
                continue
            if (name, f.name) in PATH_KEYS and value and value != "off":
                value = str(settings.resolve(value).resolve())
            lines.append(f"{f.name} = {_value(value)}{note(f'{name}.{f.name}')}")
        lines.append("")
        for sub_name, sub in nested:
            table(sub_name, sub)

    for section in _SECTIONS:
        table(section, getattr(settings, section))
    for d in settings.destinations:
        lines.append("[[destinations]]" + note(f"destinations.{d.name}"))
        lines.extend(f"{f.name} = {_value(getattr(d, f.name))}" for f in dataclasses.fields(d))
        lines.append("")
    if settings.thresholds:
        lines.append("[thresholds]")
        lines.extend(f"{_key(label)} = {_value(v)}{note(f'thresholds.{label}')}"
                     for label, v in settings.thresholds.items())
        lines.append("")
    if settings.site_prevalence:
        lines.append("[site_prevalence]")
        for site, labels in settings.site_prevalence.items():
            inner = ", ".join(f"{_key(label)} = {_value(v)}" for label, v in labels.items())
            lines.append(f"{_key(site)} = {{ {inner} }}")
        lines.append("")
    return "\n".join(lines)
