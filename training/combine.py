"""Combine step (``cxr-train combine``): one package's members for some labels added, byte for byte, to another's;
and (``cxr-train reissue``) a package under a new version with the project's current age ranges.

A package's labels may come from different runs, each with its own members and threshold (``cxr-train export
--base-package`` adds a run's). When a label's members already exist as a validated package, rebuilding them from
their run is neither needed nor always possible (a run trained on other hardware does not retrain bit for bit), and
a package that claims to carry them unchanged must carry the very files. Here the base package's members stay as
they are and, after them, the other package's members of ``labels`` are copied with their sha256, input sizes,
thresholds, reference distributions, age ranges and informational flags. A copied member must output only those
labels (a member cannot be cut without rewriting its graph); the two packages must preprocess alike but for the
input size (each member keeps its own). A copied file whose name the base uses already is stored under the other
package's name as a prefix (the bytes, and so the sha256, unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ai.manifest import Member, ModelManifest, load_manifest, member_path
from training.export import INPUT_NAME, OUTPUT_NAMES, check_same_preprocessing, default_version, export_package
from training.labels import label_ages


def combine_packages(base_dir: str | Path, other_dir: str | Path, labels: Sequence[str], out: str | Path,
                     version: str = "", overwrite: bool = False, name: str = "") -> Path:
    """Write the base package plus ``other_dir``'s members, thresholds and references of ``labels`` as a package,
    named ``name`` (default: the two packages' names joined by ``+``).

    Raises:
        ValueError: a label the other package lacks or the base carries already, a member of the other package that
            outputs one of ``labels`` beside a label not asked for, or preprocessing that differs beyond the size.
        ModelPackageError: either package fails its manifest or checksum check.
    """
    base_dir, other_dir = Path(base_dir), Path(other_dir)
    base, other = load_manifest(base_dir, verify=True), load_manifest(other_dir, verify=True)
    labels = tuple(dict.fromkeys(labels))
    missing = [label for label in labels if label not in other.labels]
    shared = [label for label in labels if label in base.labels]
    if not labels or missing or shared:
        raise ValueError(f"--labels {list(labels)}: name labels of {other.name} {other.version} "
                         f"({list(other.labels)}) that {base.name} {base.version} does not carry "
                         f"({list(base.labels)}); missing there {missing}, carried already {shared}")
    check_same_preprocessing(base.preprocess, base_dir, other.preprocess, other_dir)
    taken = _members_of(other, labels, other_dir)
    size = base.preprocess.size
    copied = [(member_path(base_dir, m), _entry(m, base, size)) for m in base.members]
    used = {m.file for m in base.members}
    copied += [(member_path(other_dir, m), replace(_entry(m, other, size), file=_free_name(m.file, other.name, used)))
               for m in taken]
    name = name or f"{base.name}+{other.name}"
    summary: dict[str, Any] = {
        "base_package": _record(base, base.labels),
        "added_package": _record(other, labels),
    }
    return export_package(
        [], out, name=name, version=version or default_version(name),
        labels=base.labels + labels, spec=base.preprocess,
        thresholds={**base.thresholds, **{label: other.thresholds[label] for label in labels}},
        data_summary={base.name: base.data_summary, other.name: other.data_summary}, evaluation_summary=summary,
        reference={**base.reference, **{k: v for k, v in other.reference.items() if k in labels}},
        ages={**base.ages, **{k: v for k, v in other.ages.items() if k in labels}}, copied=copied,
        informational=(*base.informational, *(label for label in other.informational if label in labels)),
        overwrite=overwrite,
    )


def reissue_package(package_dir: str | Path, out: str | Path, version: str, overwrite: bool = False) -> Path:
    """The package again under ``version`` with the project's current age ranges (``training.labels.LABEL_AGES``,
    for the labels it carries; a label the table has no range for gets none), everything else as it was: members
    byte for byte, thresholds, references, the informational labels, the data summary; the evaluation summary
    appends to ``reissues`` what this reissue came from and which labels' ranges it changed.

    An age range is a statement about whom a label may be reported for, not about the members: changing it needs no
    training, only a new version, so that every SR says which rule it was made under.

    Raises:
        ValueError: no version, the package's own version, or nothing that would change.
        ModelPackageError: the package fails its manifest or checksum check.
    """
    package_dir = Path(package_dir)
    manifest = load_manifest(package_dir, verify=True)
    ages = label_ages(manifest.labels)
    if (manifest.input_name, manifest.outputs) != (INPUT_NAME, dict(zip(OUTPUT_NAMES, OUTPUT_NAMES, strict=True))):
        raise ValueError(f"{package_dir}: its members' input and output names ({manifest.input_name}, "
                         f"{manifest.outputs}) are not the ones this export writes; it cannot be reissued")
    if not version or version == manifest.version:
        raise ValueError(f"a reissue needs a version of its own, not {version!r} "
                         f"({manifest.name} is {manifest.version})")
    if ages == manifest.ages:
        raise ValueError(f"{manifest.name} {manifest.version} carries the current age ranges already: "
                         "nothing to reissue")
    size = manifest.preprocess.size
    changed = sorted(label for label in {*ages, *manifest.ages} if ages.get(label) != manifest.ages.get(label))
    reissues = [*manifest.evaluation_summary.get("reissues", []), {"from_version": manifest.version,
                                                                   "ages_changed": changed}]
    return export_package(
        [], out, name=manifest.name, version=version, labels=manifest.labels, spec=manifest.preprocess,
        thresholds=dict(manifest.thresholds), data_summary=manifest.data_summary,
        evaluation_summary={**manifest.evaluation_summary, "reissues": reissues},
        reference=dict(manifest.reference), ages=ages,
        copied=[(member_path(package_dir, m), _entry(m, manifest, size)) for m in manifest.members],
        informational=manifest.informational, overwrite=overwrite,
    )


def _members_of(package: ModelManifest, labels: tuple[str, ...], where: Path) -> list[Member]:
    """The package's members that output ``labels``; each must output nothing else.

    Raises:
        ValueError: a member that outputs a label asked for and one not asked for.
    """
    taken = []
    for member in package.members:
        outputs = member.outputs(package.labels)
        if not set(outputs) & set(labels):
            continue
        extra = [label for label in outputs if label not in labels]
        if extra:
            raise ValueError(f"{where / member.file} outputs {list(outputs)}: it carries {extra} too, which "
                             f"--labels does not name; a member is copied whole or not at all")
        taken.append(member)
    return taken


def _entry(member: Member, package: ModelManifest, size: int) -> Member:
    """A member's manifest entry in the combined package (grid ``size``): its labels and its input size explicit
    (the size left out when it is the combined package's)."""
    own = member.input_size(package.preprocess.size)
    return replace(member, labels=member.outputs(package.labels), size=None if own == size else own)


def _free_name(file: str, prefix: str, used: set[str]) -> str:
    """``file``, or ``<prefix>_<file>`` when the base package has a member file of that name already."""
    name = file if file not in used else f"{prefix}_{file}"
    if name in used:
        raise ValueError(f"member file {file} of the added package clashes with the base's {sorted(used)}")
    used.add(name)
    return name


def _record(package: ModelManifest, labels: Sequence[str]) -> dict[str, Any]:
    """What the combined package's evaluation summary says of one source package."""
    return {"name": package.name, "version": package.version, "labels": list(labels),
            "evaluation_summary": package.evaluation_summary}
