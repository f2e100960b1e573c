"""Training log step: each unit's ``log.csv`` (one row per epoch) and ``done.json``, written and read back.

``log.csv`` columns (``LOG_COLUMNS``): epoch, phase, lr, train_loss, val_loss (the held-out fold), auroc, auprc,
sensitivity, specificity, f1 (the held-out fold; macro over labels, threshold 0.5), seconds, inner_loss (the
monitored part of the training folds under ``monitor = "inner"``, else empty). Floats carry 6 significant digits,
NaN is an empty cell. A resumed unit first trims the log to its checkpointed epoch (:func:`trim_log`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from storage.files import write_atomic
from training.data import csv_bytes

LOG_COLUMNS = (
    "epoch",
    "phase",
    "lr",
    "train_loss",
    "val_loss",
    "auroc",
    "auprc",
    "sensitivity",
    "specificity",
    "f1",
    "seconds",
    "inner_loss",
)
_OLD_COLUMNS = LOG_COLUMNS[:-1]  # logs written before inner_loss existed: read as if it were empty


def _format(value: Any) -> str:
    """A log cell: floats with 6 significant digits, NaN as empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def append_log(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch row to the unit's CSV log (header written with the first row)."""
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(LOG_COLUMNS)
        writer.writerow([_format(row.get(column, math.nan)) for column in LOG_COLUMNS])


def trim_log(path: Path, epochs: int) -> None:
    """Keep the log's header and complete rows up to the checkpointed epoch, rewritten whole.

    Rows after the checkpoint come from an interruption between log and checkpoint; a cut last line
    (a crash or a full disk mid-append) is dropped, and a cut header drops the file.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [row for row in csv.reader(line for line in lines if line.endswith("\n")) if row]
    kept: list[list[str]] = []
    width = {tuple(LOG_COLUMNS): 0, tuple(_OLD_COLUMNS): 1}.get(tuple(rows[0])) if rows else None
    if width is not None:  # a log of the old columns gains the empty new one, so that rows can follow
        kept = [list(LOG_COLUMNS)] + [
            r + [""] * width for r in rows[1:]
            if len(r) == len(rows[0]) and r[0].isdigit() and int(r[0]) <= epochs
        ]
    if len(kept) == len(lines) and width == 0:
        return
    if not kept:
        path.unlink()
        return
    write_atomic(path, csv_bytes(kept))


def read_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a unit's ``log.csv``."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_done(path: Path, done: dict[str, Any]) -> None:
    """Write a unit's ``done.json`` (the unit is finished)."""
    write_atomic(path, json.dumps(done, indent=2).encode("utf-8"))
