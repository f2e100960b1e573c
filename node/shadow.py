"""Shadow step: a candidate package beside the live one, compared on the same images.

With ``[model] shadow_package`` the worker runs the candidate on every image the live package analyses: its SR
is stored (result kind ``shadow_sr``, never sent) and its scores join the score history under its own version.
:func:`shadow_report` compares the two on the images both scored: first the image's triage flag as each package
would set it (any positive label that is not informational in that package: what the radiologist's worklist
sees), then per label the agreement of the decisions, the decisions that would flip (live positive -> shadow
negative and back), both score distributions, and whether the label sets the triage flag in each package (an
informational label does not: ``ModelManifest.informational``). This is what ``cxr-node shadow`` prints; no
patient values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ai.manifest import ModelManifest
from node.sites import score_quantiles
from storage.queue import Store

SHOWN_QUANTILES = (0.05, 0.5, 0.95)


def shadow_report(store: Store, live: ModelManifest, shadow: ModelManifest) -> dict[str, Any]:
    """Per label both packages carry: images both scored, agreement, flips, score quantiles of each."""
    labels: dict[str, Any] = {}
    for label in live.labels:
        if label not in shadow.labels:
            continue
        pairs = store.paired_scores(live.version, shadow.version, label)
        a = np.array([p[0] for p in pairs], dtype=np.float64)
        b = np.array([p[2] for p in pairs], dtype=np.float64)
        pa = np.array([p[1] for p in pairs], dtype=bool)
        pb = np.array([p[3] for p in pairs], dtype=bool)
        n = len(pairs)
        labels[label] = {
            "images": n,
            "agreement": round(float(np.mean(pa == pb)), 4) if n else None,
            "flips_positive_to_negative": int(np.sum(pa & ~pb)),
            "flips_negative_to_positive": int(np.sum(~pa & pb)),
            "live_positive": int(pa.sum()), "shadow_positive": int(pb.sum()),
            "mean_abs_score_difference": round(float(np.mean(np.abs(a - b))), 4) if n else None,
            "live_scores": score_quantiles(a, SHOWN_QUANTILES), "shadow_scores": score_quantiles(b, SHOWN_QUANTILES),
            "sets_triage_flag": {"live": label not in live.informational, "shadow": label not in shadow.informational},
        }
    return {"live": f"{live.name} {live.version}", "shadow": f"{shadow.name} {shadow.version}",
            "triage_flag": _flags(store, live, shadow), "labels": labels,
            "only_live": [x for x in live.labels if x not in shadow.labels],
            "only_shadow": [x for x in shadow.labels if x not in live.labels]}


def _flags(store: Store, live: ModelManifest, shadow: ModelManifest) -> dict[str, Any]:
    """The image's triage flag as each package sets it, on the images both scored."""
    pairs = store.paired_positives(live.version, shadow.version)
    fa = np.array([bool(a - set(live.informational)) for a, _ in pairs], dtype=bool)
    fb = np.array([bool(b - set(shadow.informational)) for _, b in pairs], dtype=bool)
    return {"images": len(pairs), "agreement": round(float(np.mean(fa == fb)), 4) if pairs else None,
            "flips_positive_to_negative": int(np.sum(fa & ~fb)), "flips_negative_to_positive": int(np.sum(~fa & fb)),
            "live_positive": int(fa.sum()), "shadow_positive": int(fb.sum())}


def format_shadow(report: Mapping[str, Any]) -> str:
    lines = [f"live {report['live']} / shadow {report['shadow']}"]
    flag = report["triage_flag"]
    if flag["images"]:
        lines.append(f"  triage flag: {flag['images']} images, agreement {flag['agreement']:.1%}; would flip "
                     f"{flag['flips_positive_to_negative']} positive -> negative and "
                     f"{flag['flips_negative_to_positive']} negative -> positive; positive live "
                     f"{flag['live_positive']}, shadow {flag['shadow_positive']}")
    for label, f in report["labels"].items():
        role = f["sets_triage_flag"]
        if role["live"] != role["shadow"]:
            lines.append(f"  {label}: sets the triage flag in the {'live' if role['live'] else 'shadow'} package only "
                         f"(informational in the other)")
        if not f["images"]:
            lines.append(f"  {label}: no image scored by both yet")
            continue
        lines.append(f"  {label}: {f['images']} images, agreement {f['agreement']:.1%}; would flip "
                     f"{f['flips_positive_to_negative']} positive -> negative and {f['flips_negative_to_positive']} "
                     f"negative -> positive; positive live {f['live_positive']}, shadow {f['shadow_positive']}; "
                     f"median score live {f['live_scores']['p50']:.3f}, shadow {f['shadow_scores']['p50']:.3f}")
    for key, what in (("only_live", "only the live package has"), ("only_shadow", "only the shadow package has")):
        if report[key]:
            lines.append(f"  labels {what}: {', '.join(report[key])}")
    return "\n".join(lines)
