"""Report step: the Markdown report and its plots from the results of ``training.evaluate``.

``write_report(results, out_dir)`` writes ``results.json`` (strict JSON), ``report.md`` and ``plots/*.png``
(ROC with the ensemble's bootstrap band, precision-recall, calibration, score histograms per cohort and label)
into a report folder (``training.rundir.ReportDir``). It computes no figure: every number comes from
``results``.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from storage.files import write_atomic
from training.jsonio import jsonable
from training.predictions import ENSEMBLE
from training.rundir import ReportDir

log = logging.getLogger(__name__)


def _ci(entry: Mapping[str, Any] | None) -> str:
    """``0.912 [0.881, 0.940]``; a dash where undefined."""
    if not entry or entry.get("value") is None:
        return "–"
    low, high = entry.get("low"), entry.get("high")
    if low is None or high is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def _rate(entry: Mapping[str, Any]) -> str:
    return f"{_ci(entry)} ({entry['k']}/{entry['n']})"


def _model_name(member: str) -> str:
    return f"**{member}**" if member == ENSEMBLE else member


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _each_model(results: Mapping[str, Any], label: str) -> list[tuple[str, str, dict, dict]]:
    """(cohort, member, label entry, model entry) for every evaluated model of ``label``."""
    out = []
    for cohort, c in results["cohorts"].items():
        entry = c["labels"][label]
        for member, m in entry.get("models", {}).items():
            out.append((cohort, member, entry, m))
    return out


def _md_discrimination(results: Mapping[str, Any], label: str) -> list[str]:
    target = results["settings"]["target_sensitivity"]
    header = ["Cohort", "Model", "n (pos)", "AUROC [95% CI]", "AUPRC [95% CI]", "No-skill AUPRC (prevalence)",
              "Bal. acc. @ Youden", f"Bal. acc. @ sens {target:.2f}"]
    rows = []
    for cohort, member, _, m in _each_model(results, label):
        ba = m.get("balanced_accuracy", {})
        prevalence = "–" if m.get("skipped") else f"{m['n_pos'] / m['n']:.3f}"
        rows.append([cohort, _model_name(member), f"{m['n']} ({m['n_pos']})", _ci(m.get("auroc")),
                     _ci(m.get("auprc")), prevalence, _ci(ba.get("youden")), _ci(ba.get("sensitivity"))])
    skipped = [f"- {cohort}: {m['skipped']}" for cohort, member, _, m in _each_model(results, label)
               if member == ENSEMBLE and m.get("skipped")]
    return ["### Discrimination", "", *_table(header, rows), *skipped, *([""] if skipped else [])]


def _md_operating_points(results: Mapping[str, Any], label: str) -> list[str]:
    header = ["Cohort", "Model", "Operating point", "Threshold", "Sensitivity", "Specificity", "PPV", "NPV"]
    rows = []
    for cohort, member, _, m in _each_model(results, label):
        for kind, op in m["operating_points"].items():
            rates = [_rate(op[k]) for k in ("sensitivity", "specificity", "ppv", "npv")]
            rows.append([cohort, _model_name(member), kind, f"{op['threshold']:.4f}", *rates])
    note = ("Thresholds fixed on the OOF ensemble and applied unchanged to every member and cohort; "
            "rates with Wilson 95% CIs (k/n).")
    return ["### Operating points", "", note, "", *_table(header, rows), *_md_fold_thresholds(results, label)]


def _md_fold_thresholds(results: Mapping[str, Any], label: str) -> list[str]:
    lines = []
    for cohort, entry in results["cohorts"].items():
        per_fold = (entry["labels"].get(label) or {}).get("fold_thresholds")
        if not per_fold:
            continue
        shown = ", ".join(f"fold {f} {e['threshold']:.4f}" if "threshold" in e else f"fold {f} –"
                          for f, e in per_fold["folds"].items())
        spread = "–" if per_fold["spread"] is None else f"{per_fold['spread']:.4f}"
        lines += [f"Each fold's own threshold at sensitivity >= {per_fold['target']:.2f} ({cohort}): {shown}; "
                  f"spread {spread}.", ""]
    return lines


def _md_calibration(results: Mapping[str, Any], label: str) -> list[str]:
    rows = []
    for cohort, member, _, m in _each_model(results, label):
        cal = m.get("calibration") or {}
        if "brier" in cal:
            rows.append([cohort, _model_name(member), f"{cal['brier']:.4f}", f"{cal['ece']:.4f}"])
        else:
            rows.append([cohort, _model_name(member), "–", cal.get("skipped", m.get("skipped", "–"))])
    return ["### Calibration", "", *_table(["Cohort", "Model", "Brier", "ECE (10 bins)"], rows)]


def _md_subgroups(results: Mapping[str, Any], label: str) -> list[str]:
    rows = []
    for cohort, c in results["cohorts"].items():
        for attr, groups in c["labels"][label].get("subgroups", {}).items():
            for value, s in groups.items():
                rows.append([cohort, attr, value, f"{s['n']} ({s['n_pos']})", _ci(s.get("auroc")),
                             _ci(s["sensitivity"]), _ci(s["specificity"]), s.get("skipped", "")])
    if not rows:
        return ["### Subgroups", "", "No subgroup attribute (site, sex, age) with two or more values.", ""]
    header = ["Cohort", "Attribute", "Group", "n (pos)", "AUROC [95% CI]", "Sens @ Youden", "Spec @ Youden",
              "Note"]
    return ["### Subgroups (ensemble)", "", *_table(header, rows)]


def _md_audits(audits: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Shortcut audits", ""]
    if not audits:
        return [*lines, "No shortcut audit was run (thumbnail floor, lung blackout).", ""]
    for a in audits:
        lines.append(f"- **{a.get('kind', 'audit')}** ({a.get('cohort', '?')}, {a.get('label', '?')}): "
                     f"{a.get('verdict', '')}{_audit_counts(a)}")
    return [*lines, ""]


def _audit_counts(audit: Mapping[str, Any]) -> str:
    """`` [n=40, 20 pos]``; for the lung blackout also the fill and the images without a lung mask."""
    parts = [f"n={audit['n']}, {audit.get('n_pos', '?')} pos"] if "n" in audit else []
    if audit.get("kind") == "lung_blackout":
        fill = audit.get("fill", 0)
        parts.append("lungs set to " + ("the background grey" if fill == "background" else f"grey {fill}"))
        if audit.get("n_without_mask"):
            parts.append(f"{audit['n_without_mask']} image(s) without a lung mask left out")
    return f" [{'; '.join(parts)}]" if parts else ""


def _md_header(results: Mapping[str, Any]) -> list[str]:
    s = results["settings"]
    cohorts = ", ".join(f"{name} ({c['n_images']} images, {c['n_patients']} patients)"
                        for name, c in results["cohorts"].items())
    rows = [[label, f"{t['youden']['value']:.4f}", f"{t['sensitivity']['value']:.4f}"]
            for label, t in results["thresholds"].items()]
    return [
        "# Evaluation report", "",
        f"Cohorts: {cohorts}.", "",
        f"AUROC, AUPRC and balanced accuracy: 95% CIs from {s['n_boot']} bootstrap resamples of patients, "
        f"stratified by label (seed {s['seed']}). Sensitivity, specificity, PPV, NPV: Wilson 95% CIs. "
        "Operating thresholds were chosen on the OOF ensemble only and are applied unchanged to every "
        "member and every cohort (an image is positive when its score >= the threshold)"
        + (", each placed midway between the score that reaches it and the next lower OOF score."
           if s.get("threshold_at") == "midway" else "."), "",
        "## Operating thresholds", "",
        *_table(["Label", "Youden J", f"Sensitivity >= {s['target_sensitivity']:.2f}"], rows),
    ]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _save_figure(fig: Any, path: Path) -> None:
    """Render ``fig`` as PNG in memory, then write it whole (a full disk leaves no half image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    write_atomic(path, buffer.getvalue())


def _new_axes(title: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    fig = Figure(figsize=(5.2, 4.6))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)  # fixed: no extra layout draw
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_roc(entry: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"ROC: {title}")
    band = entry.get("roc_band")
    if band:
        ax.fill_between(band["fpr"], band["low"], band["high"], color="C0", alpha=0.2,
                        label="ensemble 95% CI")
    for i, (member, m) in enumerate(entry["models"].items()):
        if "curves" not in m:
            continue
        ens = member == ENSEMBLE
        ax.plot(m["curves"]["roc"]["fpr"], m["curves"]["roc"]["tpr"], color="C0" if ens else f"C{i % 9 + 1}",
                lw=2.2 if ens else 0.9, alpha=1 if ens else 0.7, label=f"{member} {m['auroc']['value']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    _save_figure(fig, path)


def _plot_pr(entry: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"Precision-recall: {title}")
    for i, (member, m) in enumerate(entry["models"].items()):
        if "curves" not in m:
            continue
        ens = member == ENSEMBLE
        ax.step(m["curves"]["pr"]["recall"], m["curves"]["pr"]["precision"], where="pre",
                color="C0" if ens else f"C{i % 9 + 1}", lw=2.2 if ens else 0.9,
                label=f"{member} AP {m['auprc']['value']:.3f}")
    prevalence = entry["prevalence"]
    ax.axhline(prevalence, ls="--", color="grey", lw=0.8, label=f"no skill (prevalence) {prevalence:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower left")
    _save_figure(fig, path)


def _plot_calibration(entry: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"Calibration: {title}")
    for i, (member, m) in enumerate(entry["models"].items()):
        rel = (m.get("calibration") or {}).get("reliability")
        if not rel:
            continue
        x = np.array(rel["mean_predicted"], dtype=float)  # None (empty bin) -> NaN: not drawn
        y = np.array(rel["fraction_positive"], dtype=float)
        ens = member == ENSEMBLE
        ax.plot(x[~np.isnan(x)], y[~np.isnan(x)], marker="o", ms=4 if ens else 2, lw=2.2 if ens else 0.8,
                color="C0" if ens else f"C{i % 9 + 1}", label=f"{member} ECE {m['calibration']['ece']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    _save_figure(fig, path)


def _plot_histogram(entry: Mapping[str, Any], thresholds: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"Ensemble scores: {title}")
    hist = entry["models"][ENSEMBLE]["curves"]["histogram"]
    edges = np.asarray(hist["bin_edges"])
    for key, color in (("negative", "C2"), ("positive", "C3")):
        ax.stairs(hist[key], edges, fill=True, alpha=0.45, color=color, label=f"{key} ({sum(hist[key])})")
    for kind, style in (("youden", "-"), ("sensitivity", ":")):
        ax.axvline(thresholds[kind]["value"], color="k", ls=style, lw=1, label=f"{kind} threshold")
    ax.set(xlabel="ensemble score", ylabel="images")
    ax.legend(fontsize=7)
    _save_figure(fig, path)


def write_plots(results: Mapping[str, Any], plot_dir: Path) -> dict[str, dict[str, list[Path]]]:
    """ROC, PR, calibration and histogram PNGs per cohort and label; returns label -> cohort -> paths."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, list[Path]]] = {}
    for label in results["labels"]:
        for cohort, c in results["cohorts"].items():
            entry = c["labels"][label]
            if "skipped" in entry or "curves" not in entry["models"][ENSEMBLE]:
                continue
            title = f"{label}, {cohort}"
            stem = f"{_slug(cohort)}_{_slug(label)}.png"
            paths = [plot_dir / f"{kind}_{stem}" for kind in ("roc", "pr", "calibration", "histogram")]
            _plot_roc(entry, title, paths[0])
            _plot_pr(entry, title, paths[1])
            if "brier" in entry["models"][ENSEMBLE]["calibration"]:
                _plot_calibration(entry, title, paths[2])
            else:
                paths.pop(2)
            _plot_histogram(entry, results["thresholds"][label], title, paths[-1])
            written.setdefault(label, {})[cohort] = paths
    return written


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.md``, ``results.json`` and ``plots/*.png`` into ``out_dir``.

    Args:
        results: The output of :func:`training.evaluate.evaluate_cohorts`.
        out_dir: Destination folder (created).

    Returns:
        The path of ``report.md``.
    """
    out = ReportDir(Path(out_dir))
    out.path.mkdir(parents=True, exist_ok=True)
    results_json = json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n"
    write_atomic(out.results, results_json.encode("utf-8"))
    plots = write_plots(results, out.plots)
    lines = [*_md_header(results), *_md_audits(results.get("audits", []))]
    for label in results["labels"]:
        lines += [f"## {label}", ""]
        lines += _md_discrimination(results, label)
        lines += _md_operating_points(results, label)
        lines += _md_calibration(results, label)
        lines += _md_subgroups(results, label)
        for cohort, paths in plots.get(label, {}).items():
            lines += [f"### Plots: {cohort}", ""]
            lines += [f"![{p.stem}]({out.plots.name}/{p.name})" for p in paths] + [""]
    write_atomic(out.markdown, "\n".join(lines).encode("utf-8"))
    log.info("evaluation report written to %s", out.markdown)
    return out.markdown
