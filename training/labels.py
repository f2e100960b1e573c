"""Label vocabulary step: the canonical label names every cohort, model and package agrees on.

Cohort manifests name their label columns freely (``label_tb``, ``label_Pleural Thickening``); this
module maps every spelling onto one canonical name so that cohorts align, the prediction CSVs
(``label_<Label>``, ``score_<Label>__<member>``) line up, and the model package's manifest carries
the same names the node reports.

The vocabulary is Tuberculosis, pediatric pneumonia, the 14 NIH ChestX-ray14 findings in their canonical
spelling (``Pleural_Thickening`` with an underscore, as in the NIH ``Data_Entry_2017.csv``) and NIH's
``No Finding``.

``Pediatric_Pneumonia`` (the Guangzhou set's ``label_pneumonia``, children aged 1-5) and NIH's ``Pneumonia``
(adults, mined from report text) are two labels, never one: their prevalences differ (74 % vs 4 %), so do the
population, the definition (a clinical diagnosis, bacterial or viral, against a text-mined finding) and the
images (224 px JPEG squashed to square against 1024 px PNG). Pooled, "pneumonia" would be learnt as "a
child's 224 px image" and a pooled AUROC would reward it. A cohort maps its column onto one of them
(``label_columns`` in the run configuration); the bare alias ``pneumonia`` stays NIH's finding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ai.manifest import MAX_AGE_YEARS, AgeRange

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
"""The 14 findings of NIH ChestX-ray14, spelled as in its ``Data_Entry_2017.csv``."""

NO_FINDING = "No Finding"
PEDIATRIC_PNEUMONIA = "Pediatric_Pneumonia"
CANONICAL_LABELS: tuple[str, ...] = ("Tuberculosis", PEDIATRIC_PNEUMONIA, *NIH_FINDINGS, NO_FINDING)
"""Every label a cohort, a model or a package may name, in a fixed order."""

LABEL_AGES: dict[str, AgeRange] = {
    PEDIATRIC_PNEUMONIA: AgeRange(1.0, 6.0, "children aged 1-5 (Guangzhou pediatric set, Kermany et al. 2018)"),
    "Tuberculosis": AgeRange(15.0, float(MAX_AGE_YEARS),
                             "patients of most ages, few of them children (Shenzhen: 30 of 662 under 18); "
                             "WHO recommends computer-aided TB detection from age 15", unknown_age="applies"),
}
"""Labels limited to an age range: a package carrying one says so (manifest ``ages``), and the node reports it only
for patients inside the range (``ai.applicability``). Pediatric pneumonia, learnt from children aged 1-5 only, needs
a known age inside it. Tuberculosis, learnt from patients of most ages but shown to work at no other hospital's
children (docs/model/age-rule.md), applies from 15 years, WHO's age for computer-aided TB detection, and to a
patient of unknown age."""


def label_ages(labels: Sequence[str]) -> dict[str, AgeRange]:
    """The ``labels`` the table limits to an age range, with that range, in ``labels``' order (manifest ``ages``)."""
    return {label: LABEL_AGES[label] for label in labels if label in LABEL_AGES}

LABEL_PREFIX = "label_"
"""Prefix of a label column in cohort manifests and prediction CSVs (``label_Tuberculosis``)."""

# Extra spellings (already normalised by _normalise) -> canonical name.
_ALIASES: dict[str, str] = {
    "tb": "Tuberculosis",
    "paediatric_pneumonia": PEDIATRIC_PNEUMONIA,
    "pneumonia_pediatric": PEDIATRIC_PNEUMONIA,
    "ptb": "Tuberculosis",
    "pulmonary_tuberculosis": "Tuberculosis",
    "pleural_effusion": "Effusion",
    "pleuralthickening": "Pleural_Thickening",
    "nofinding": NO_FINDING,
    "no_findings": NO_FINDING,
    "cardiac_enlargement": "Cardiomegaly",
    "enlarged_heart": "Cardiomegaly",
    "pulmonary_edema": "Edema",
    "pulmonary_fibrosis": "Fibrosis",
}


class LabelError(ValueError):
    """A label name is not in the canonical vocabulary, or a label list is invalid."""


def _normalise(name: str) -> str:
    """Lower case, ``label_`` prefix removed, runs of spaces/hyphens/dots/underscores -> ``_``."""
    text = name.strip()
    if text.lower().startswith(LABEL_PREFIX):
        text = text[len(LABEL_PREFIX) :]
    return re.sub(r"[\s\-._]+", "_", text.lower()).strip("_")


_LOOKUP: dict[str, str] = {_normalise(label): label for label in CANONICAL_LABELS} | _ALIASES


def canonical_label(name: str) -> str:
    """The canonical name for a label spelling.

    Accepts the canonical name itself, any case, spaces or hyphens for underscores, an optional
    ``label_`` prefix (a manifest column name) and the aliases above (``tb`` -> ``Tuberculosis``).

    Args:
        name: a label name or a label column name.

    Returns:
        The canonical label, e.g. ``Tuberculosis``.

    Raises:
        LabelError: the name matches no canonical label; the message lists the vocabulary.
    """
    found = _LOOKUP.get(_normalise(name))
    if found is None:
        raise LabelError(
            f"label {name!r} is not in the canonical vocabulary; expected one of "
            f"{', '.join(CANONICAL_LABELS)} (or an alias such as 'tb')"
        )
    return found


def canonical_labels(names: Iterable[str]) -> tuple[str, ...]:
    """Canonical names for a list of labels, in the given order, rejecting duplicates and emptiness.

    Args:
        names: label spellings (e.g. from a configuration file).

    Returns:
        The canonical names in the same order.

    Raises:
        LabelError: an unknown name, two spellings of the same label, or an empty list.
    """
    result: list[str] = []
    for name in names:
        label = canonical_label(name)
        if label in result:
            raise LabelError(f"label {name!r} names {label!r} a second time")
        result.append(label)
    if not result:
        raise LabelError("at least one label is required, found none")
    return tuple(result)


def label_column(label: str) -> str:
    """The column name of a label in prediction CSVs: ``label_<Label>``."""
    return f"{LABEL_PREFIX}{canonical_label(label)}"


def score_column(label: str, member: str) -> str:
    """The column name of one member's score in prediction CSVs: ``score_<Label>__<member>``."""
    return f"score_{canonical_label(label)}__{member}"


def label_columns(columns: Iterable[str]) -> dict[str, str]:
    """Map the ``label_*`` columns of a manifest header to canonical labels.

    Args:
        columns: the CSV header.

    Returns:
        ``{canonical label: column name}`` in header order.

    Raises:
        LabelError: a ``label_*`` column names no canonical label, or two columns name the same one.
    """
    found: dict[str, str] = {}
    for column in columns:
        if not column.lower().startswith(LABEL_PREFIX):
            continue
        label = canonical_label(column)
        if label in found:
            raise LabelError(f"columns {found[label]!r} and {column!r} both name label {label!r}")
        found[label] = column
    return found
