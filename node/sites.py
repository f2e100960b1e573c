"""Sites step: what site an image came from, and how each site's scores compare with the package's reference.

A site is what ``[sites] key`` makes of an image: its calling AE title (default), Station Name, Institution
Name, or the device (Manufacturer + Manufacturer's Model Name). The worker records every analysed image's
scores under its site (``storage.scores``); :func:`site_reports` turns that history into what ``cxr-node
sites`` and ``status`` show: per site and label the images, score quantiles, share flagged, the threshold in
force, the drift against the package's reference distribution (``ai.drift``) overall and per ISO week.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom

from ai.adapt import Suggestion, suggest
from ai.drift import drift
from ai.findings import Finding
from ai.manifest import ModelManifest, Threshold, effective_thresholds
from storage.queue import AcceptedThreshold, ScoreRecord, SiteScore, Store

log = logging.getLogger(__name__)

UNKNOWN_SITE = "(unknown)"
MAX_SITE_CHARS = 128
#: Score quantiles shown per site and label.
SHOWN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: A week with fewer scores gets no drift statistic of its own (too few to say anything).
MIN_WEEK_SCORES = 20
#: The overall figures (quantiles, share flagged, drift) are those of the last 28 days: the site as it is now.
RECENT_DAYS = 28
#: The weekly figures go back 12 weeks.
HISTORY_WEEKS = 12
#: A suggestion uses the site's most recent scores, at most this many.
SUGGESTION_IMAGES = 1000


def _text(ds: pydicom.Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element: no site from it
        return ""
    return " ".join(str(value or "").split())


def site_of(ds: pydicom.Dataset | None, calling_ae: str, key: str) -> str:
    """The site of an image under ``[sites] key`` ("(unknown)" when the header does not say)."""
    if key == "calling_ae":
        value = calling_ae.strip()
    elif key == "station_name":
        value = _text(ds, "StationName")
    elif key == "institution_name":
        value = _text(ds, "InstitutionName")
    elif key == "device":
        value = " ".join(v for v in (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")) if v)
    else:
        raise ValueError(f"unknown site key {key!r}")
    return value[:MAX_SITE_CHARS] or UNKNOWN_SITE


def score_records(site: str, manifest: ModelManifest, findings: Sequence[Finding]) -> list[ScoreRecord]:
    """The scores of one analysed image to record (a label that did not apply to the patient is not)."""
    return [ScoreRecord(site=site, model_name=manifest.name, model_version=manifest.version, label=f.label,
                        score=float(f.probability), threshold=float(f.threshold),
                        threshold_method=f.threshold_method, positive=bool(f.positive))
            for f in findings if not f.not_applicable]


def site_method(accepted: AcceptedThreshold) -> str:
    """How a site threshold was chosen, as the SR and the site list state it."""
    return (f"site threshold v{accepted.version} for {accepted.site} (accepted by {accepted.accepted_by} "
            f"{accepted.accepted_at:%Y-%m-%d}): {accepted.method}")


def apply_site_thresholds(findings: Sequence[Finding], site: str,
                          accepted: Mapping[tuple[str, str], AcceptedThreshold]) -> list[Finding]:
    """The findings with the site's accepted thresholds in force (a label that does not apply stays negative).

    A site threshold is more specific than a ``[thresholds]`` override of the whole node, so it wins over it.
    """
    out = []
    for f in findings:
        own = accepted.get((site, f.label))
        if own is None:
            out.append(f)
            continue
        positive = (not f.not_applicable) and f.probability >= own.threshold
        out.append(dataclasses.replace(f, threshold=own.threshold, positive=positive,
                                       threshold_method=site_method(own)))
    return out


def site_suggestion(latest: Sequence[SiteScore], manifest: ModelManifest, label: str, prevalence: float | None,
                    level: float) -> Suggestion:
    """The label-free suggestion (``ai.adapt``) from a site's latest scores of ``label``; the package must carry
    the label's reference."""
    return suggest(np.array([s.score for s in latest]), manifest.reference[label], manifest.thresholds[label].value,
                   prevalence, level)


def score_quantiles(values: np.ndarray, points: Sequence[float]) -> dict[str, float]:
    """``{"p05": ..., "p50": ...}``: the scores' quantiles at ``points`` (rounded to 4 places); {} without scores."""
    if values.size == 0:
        return {}
    return {f"p{round(q * 100):02d}": round(float(v), 4)
            for q, v in zip(points, np.quantile(values, points), strict=True)}


def _week(at: dt.datetime) -> str:
    year, week, _ = at.isocalendar()
    return f"{year}-W{week:02d}"


def label_report(history: Sequence[SiteScore], manifest: ModelManifest, label: str, threshold: Threshold,
                 level: float, now: dt.datetime, *, latest: Sequence[SiteScore] = (),
                 min_images: int | None = None, prevalence: float | None = None,
                 weekly: bool = True) -> dict[str, Any]:
    """One site's figures for one label: overall over the last ``RECENT_DAYS``, weekly over ``history`` (unless
    ``weekly`` is False), and the label-free suggestion (``ai.adapt``) from ``latest`` once it holds ``min_images``
    scores (None: no suggestion, adaptation is off)."""
    scores = [s for s in history if s.at >= now - dt.timedelta(days=RECENT_DAYS)]
    values = np.array([s.score for s in scores], dtype=np.float64)
    out: dict[str, Any] = {
        "recent_images": int(values.size),
        "threshold": round(threshold.value, 6),
        "threshold_method": threshold.method,
        "suggested_threshold": None,
        "suggested_method": None,
        "flagged_share": round(float(np.mean([s.positive for s in scores])), 4) if scores else None,
        "quantiles": score_quantiles(values, SHOWN_QUANTILES),
    }
    reference = manifest.reference.get(label)
    if reference is None:
        out["drift"] = None
        out["drift_note"] = "the package carries no reference distribution for this label"
        return out
    out["drift"] = drift(values, reference, level).to_dict() if values.size else None
    if min_images is None:
        out["suggestion_note"] = "site adaptation is off ([sites] adapt)"
    elif len(latest) >= min_images:
        suggestion = site_suggestion(latest, manifest, label, prevalence, level)
        out["suggested_threshold"] = round(suggestion.threshold, 6)
        out["suggested_method"] = suggestion.method
        out["suggestion"] = suggestion.to_dict()
    else:
        out["suggestion_note"] = f"{len(latest)} of the {min_images} images a suggestion needs"
    if not weekly:
        return out
    weeks: dict[str, list[SiteScore]] = {}
    for s in history:
        weeks.setdefault(_week(s.at), []).append(s)
    out["weeks"] = [
        {"week": week, "images": len(items),
         "flagged_share": round(float(np.mean([s.positive for s in items])), 4),
         "drift": (drift(np.array([s.score for s in items]), reference, level).to_dict()
                   if len(items) >= MIN_WEEK_SCORES else None)}
        for week, items in sorted(weeks.items())
    ]
    return out


def site_reports(store: Store, manifest: ModelManifest, thresholds: Mapping[str, Threshold],
                 level: float, now: dt.datetime | None = None, min_images: int | None = None,
                 prevalence: Mapping[str, Mapping[str, float]] | None = None,
                 weekly: bool = True) -> list[dict[str, Any]]:
    """Per site with scores of this package version: its images (all time) and per label :func:`label_report`
    (``min_images`` None: no suggestions; ``prevalence``: per site and label the prevalence an administrator
    stated; ``weekly`` False: the overall figures only)."""
    now = now or store.clock()
    since = now - (dt.timedelta(weeks=HISTORY_WEEKS) if weekly else dt.timedelta(days=RECENT_DAYS))
    stated = prevalence or {}
    accepted = store.site_thresholds(manifest.version, same_scores=manifest.same_score_versions)
    reports = []
    for site, images in store.score_sites(manifest.version).items():
        labels = {}
        for label in manifest.labels:
            suggests = min_images is not None and label in manifest.reference
            latest = store.site_scores(site, manifest.version, label, latest=SUGGESTION_IMAGES) if suggests else []
            own = accepted.get((site, label))
            in_force = thresholds[label] if own is None else Threshold(own.threshold, site_method(own))
            labels[label] = label_report(store.site_scores(site, manifest.version, label, since), manifest, label,
                                         in_force, level, now, latest=latest, min_images=min_images,
                                         prevalence=stated.get(site, {}).get(label), weekly=weekly)
        reports.append({"site": site, "images": images, "model": f"{manifest.name} {manifest.version}",
                        "labels": labels})
    return reports


def drift_alerts(reports: Sequence[Mapping[str, Any]], level: float) -> list[str]:
    """One line per site and label whose overall drift alerts (for the log and ``status``)."""
    lines = []
    for report in reports:
        for label, figures in report["labels"].items():
            d = figures.get("drift")
            if d and d["alert"]:
                lines.append(f"site {report['site']}: {label} scores drift from the package's reference "
                             f"(prevalence-adjusted KS {d['statistic']:.3f} > {max(level, d['critical']):.3f}, "
                             f"best-fitting prevalence {d['prevalence']:.2f}, {d['n']} images)")
    return lines


def current_drift_alerts(store: Store, manifest: ModelManifest, overrides: Mapping[str, float],
                         level: float) -> list[str]:
    """The alert lines of the sites whose last ``RECENT_DAYS`` drift (for ``status`` and the node's hourly check):
    the overall figures only, no suggestion, no weekly figures.

    Raises:
        ValueError: an override for a label the package lacks, or outside [0, 1].
    """
    reports = site_reports(store, manifest, effective_thresholds(manifest, overrides), level, weekly=False)
    return drift_alerts(reports, level)


def format_sites(reports: Sequence[Mapping[str, Any]], level: float) -> str:
    """The text of ``cxr-node sites``."""
    if not reports:
        return "no site has analysed images with this model package yet"
    lines = []
    for report in reports:
        lines.append(f"site {report['site']}: {report['images']} analysed images ({report['model']})")
        for label, f in report["labels"].items():
            q = f["quantiles"]
            spread = (f"scores p05 {q['p05']:.3f} / median {q['p50']:.3f} / p95 {q['p95']:.3f}, "
                      f"{f['flagged_share']:.1%} at or above its threshold" if q else "no scores")
            d = f.get("drift")
            drift_text = (f"drift {d['statistic']:.3f} ({'ALERT' if d['alert'] else 'ok'}; best-fitting prevalence "
                          f"{d['prevalence']:.2f}; {d['n']} images)" if d else f.get("drift_note", "no drift figure"))
            suggestion = ("no suggestion yet" if f["suggested_threshold"] is None else
                          f"suggested {f['suggested_threshold']:.4f} ({f['suggested_method']})")
            lines.append(f"  {label}: last {RECENT_DAYS} days {f['recent_images']} images, {spread}; {drift_text}; "
                         f"threshold {f['threshold']:.4f} ({f['threshold_method']}); {suggestion}")
    alerts = drift_alerts(reports, level)
    if alerts:
        lines.append("ALERTS:")
        lines.extend(f"  {line}" for line in alerts)
    return "\n".join(lines)


def auto_accept(store: Store, manifest: ModelManifest, site: str, min_images: int,
                prevalence: Mapping[str, Mapping[str, float]] | None = None, level: float = 0.1
                ) -> list[AcceptedThreshold]:
    """``[sites] adapt = "auto"``: put the suggestion in force for each label of ``site`` that has none yet for
    this model version, once the site has ``min_images`` scores of it. Each acceptance is logged as an AUDIT line
    (no patient values). Returns what was accepted."""
    accepted = store.site_thresholds(manifest.version, site, manifest.same_score_versions)
    out = []
    for label in manifest.labels:
        reference = manifest.reference.get(label)
        if reference is None or (site, label) in accepted:
            continue
        latest = store.site_scores(site, manifest.version, label, latest=SUGGESTION_IMAGES)
        if len(latest) < min_images:
            continue
        suggestion = site_suggestion(latest, manifest, label, (prevalence or {}).get(site, {}).get(label), level)
        entry = store.accept_site_threshold(site, label, manifest.name, manifest.version, suggestion.threshold,
                                            suggestion.method, "auto")
        log.warning("AUDIT site threshold accepted automatically ([sites] adapt = auto): site %s, %s %.6f "
                    "(v%d for %s %s; package threshold %.6f): %s", site, label, entry.threshold, entry.version,
                    manifest.name, manifest.version, manifest.thresholds[label].value, suggestion.method)
        out.append(entry)
    return out
