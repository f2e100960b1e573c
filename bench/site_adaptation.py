"""Label-free site thresholds on simulated sites: the evaluation fixed in docs/sites/README.md.

Simulated sites are drawn with replacement from a labelled cohort at a prevalence and size; on each draw the
package threshold (fixed), the suggestion of ``ai.adapt`` with the true prevalence stated, the suggestion with
the prevalence estimated from the scores, and an oracle (labels: sensitivity 0.90 on the draw) are compared by
their sensitivity and specificity on the drawn images. The labels are read only to count; the suggestions see
the scores alone.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/site_adaptation.py --package ai/models/default \\
        --site-scores runs/site-montgomery/scores_montgomery.csv \\
        --control runs/tb-320-strong-aug/predictions_oof.csv --out bench/results/site_adaptation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ai.adapt import suggest
from ai.manifest import ScoreReference, load_manifest
from training import metrics
from training.predictions import ENSEMBLE, read_predictions
from training.thresholds import reference_distribution

PREVALENCES = (0.10, 0.25, 0.42)
SIZES = (100, 200, 500)
Z = 1.959964


def wilson_half_width(k: int, n: int) -> float:
    """Half the width of the 95 % Wilson interval of k successes in n (``training.metrics.wilson_ci``)."""
    low, high = metrics.wilson_ci(k, n, z=Z)
    return (high - low) / 2


def rates(scores: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float, int, int]:
    """Sensitivity, specificity, true positives, positives at threshold ``t``."""
    tp = int(np.sum(scores[y] >= t))
    return tp / y.sum(), float(np.mean(scores[~y] < t)), tp, int(y.sum())


def simulate(scores: np.ndarray, y: np.ndarray, reference: ScoreReference, threshold: float, reps: int,
             seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    out = []
    for prevalence in PREVALENCES:
        for n in SIZES:
            k = round(prevalence * n)
            rows: dict[str, list[tuple[float, float]]] = {"fixed": [], "stated": [], "estimated": [], "oracle": []}
            worse = {"stated": 0, "estimated": 0}
            thresholds: dict[str, list[float]] = {"stated": [], "estimated": [], "prevalence_estimated": []}
            for _ in range(reps):
                pick = np.concatenate([rng.choice(pos, k), rng.choice(neg, n - k)])
                s, yy = scores[pick], y[pick]
                fixed = rates(s, yy, threshold)
                stated = suggest(s, reference, threshold, prevalence=prevalence)
                guessed = suggest(s, reference, threshold)
                candidates = {"fixed": threshold, "stated": stated.threshold, "estimated": guessed.threshold,
                              "oracle": metrics.threshold_for_sensitivity(yy, s, 0.90)}
                for name, t in candidates.items():
                    sens, spec, _, _ = rates(s, yy, t)
                    rows[name].append((sens, spec))
                margin = wilson_half_width(fixed[2], fixed[3])
                for name in worse:
                    worse[name] += rows[name][-1][0] < fixed[0] - margin
                thresholds["stated"].append(stated.threshold)
                thresholds["estimated"].append(guessed.threshold)
                thresholds["prevalence_estimated"].append(guessed.prevalence)
            entry: dict[str, Any] = {"prevalence": prevalence, "n": n, "positives": k, "reps": reps}
            for name, values in rows.items():
                arr = np.array(values)
                spread = [[round(float(v), 4) for v in np.quantile(arr[:, i], (0.05, 0.95))] for i in (0, 1)]
                entry[name] = {"sensitivity_mean": round(float(arr[:, 0].mean()), 4),
                               "specificity_mean": round(float(arr[:, 1].mean()), 4),
                               "sensitivity_p05_p95": spread[0], "specificity_p05_p95": spread[1],
                               "goal_met_share": round(float(np.mean((arr[:, 0] >= 0.90) & (arr[:, 1] >= 0.70))), 4)}
            fixed_arr = np.array(rows["fixed"])
            for name in ("stated", "estimated"):
                arr = np.array(rows[name])
                entry[name]["median_abs_change"] = {
                    "sensitivity": round(float(np.median(np.abs(arr[:, 0] - fixed_arr[:, 0]))), 4),
                    "specificity": round(float(np.median(np.abs(arr[:, 1] - fixed_arr[:, 1]))), 4)}
                entry[name]["worse_than_fixed_beyond_ci_share"] = round(worse[name] / reps, 4)
                entry[name]["threshold_median"] = round(float(np.median(thresholds[name])), 4)
            entry["estimated"]["prevalence_median"] = round(float(np.median(thresholds["prevalence_estimated"])), 4)
            out.append(entry)
    return out


def verdict(control: list[dict[str, Any]], site: list[dict[str, Any]]) -> dict[str, Any]:
    """The criteria of docs/sites/README.md, each true or false, with the settings that fail."""
    control_fail = [(e["prevalence"], e["n"]) for e in control
                    if max(e["stated"]["median_abs_change"].values()) > 0.03]
    mean_fail = [(e["prevalence"], e["n"]) for e in site
                 if e["stated"]["sensitivity_mean"] < e["fixed"]["sensitivity_mean"]]
    worse_fail = [(e["prevalence"], e["n"]) for e in site if e["stated"]["worse_than_fixed_beyond_ci_share"] > 0.05]
    return {"control_changes_nearly_nothing": not control_fail, "control_failing_settings": control_fail,
            "site_sensitivity_not_lower_on_average": not mean_fail, "site_mean_failing_settings": mean_fail,
            "site_rarely_worse_beyond_ci": not worse_fail, "site_worse_failing_settings": worse_fail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--site-scores", type=Path, required=True, help="the package's scores of a labelled cohort")
    parser.add_argument("--control", type=Path, required=True, help="OOF predictions of the package's run")
    parser.add_argument("--label", default="Tuberculosis")
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest = load_manifest(args.package, verify=False)
    threshold = manifest.thresholds[args.label].value
    control_table = read_predictions(args.control)
    reference = manifest.reference.get(args.label) or reference_distribution(control_table, args.label)
    results: dict[str, Any] = {"package": f"{manifest.name} {manifest.version}", "label": args.label,
                               "package_threshold": threshold,
                               "reference": {"source": reference.source, "cohort": reference.cohort,
                                             "n": reference.n, "prevalence": reference.prevalence},
                               "settings": {"prevalences": PREVALENCES, "sizes": SIZES, "reps": args.reps, "seed": 0}}
    for name, path in (("control", args.control), ("site", args.site_scores)):
        table = read_predictions(path)
        y_all = table.labels[args.label]
        known = ~np.isnan(y_all)
        results[name] = {"cohort": path.name, "images": int(known.sum()), "positives": int(np.nansum(y_all)),
                         "settings": simulate(table.scores[args.label][ENSEMBLE][known], y_all[known] == 1,
                                              reference, threshold, args.reps, seed=0)}
    results["verdict"] = verdict(results["control"]["settings"], results["site"]["settings"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["verdict"], indent=2))
    for name in ("control", "site"):
        print(f"{name} ({results[name]['cohort']}): prevalence n | sensitivity / specificity: fixed, stated, "
              "estimated, oracle")
        for e in results[name]["settings"]:
            cells = ", ".join(f"{e[k]['sensitivity_mean']:.3f}/{e[k]['specificity_mean']:.3f}"
                              for k in ("fixed", "stated", "estimated", "oracle"))
            print(f"  {e['prevalence']:.2f} {e['n']:4d} | {cells}")


if __name__ == "__main__":
    main()
