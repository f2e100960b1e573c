"""Test helpers that build small model packages (untrained tiny networks) with `export_package`.

Other modules' tests use `build_tiny_package` to get a real package (ONNX members + manifest) in well
under a second per member, without any training or data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ai.manifest import AgeRange, ScoreReference
from ai.preprocess import PreprocessSpec
from training.export import MemberInfo, export_package
from training.models import build_model

TINY_VERSION = "0.0.0-test"


def build_tiny_package(
    out_dir: str | Path,
    labels: Sequence[str] = ("Tuberculosis",),
    members: int = 2,
    size: int = 64,
    seed: int = 0,
    threshold: float = 0.5,
    ages: Mapping[str, AgeRange] | None = None,
    reference: Mapping[str, ScoreReference] | None = None,
    version: str = TINY_VERSION,
    informational: Sequence[str] = (),
    member_sizes: Sequence[int] | None = None,
) -> Path:
    """Export `members` untrained tiny networks (seeds `seed`, `seed + 1`, ...) as a model package.

    Args:
        out_dir: the package folder (absent or empty).
        labels: label names; every label gets `threshold` ("fixed for tests").
        members: number of ensemble members (folds 0, 1, ...).
        size: input size (`PreprocessSpec.size`).
        seed: torch seed of the first member.
        threshold: the operating threshold of every label.
        reference: per label, the reference score distribution the manifest carries.
        version: the package version.
        ages: labels limited to an age range (manifest ``ages``).
        informational: labels that do not set the triage flag (manifest ``informational``).
        member_sizes: each member's input size (``Member.size``, left out where it is `size`); None: all `size`.

    Returns:
        The package folder.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = []
        sizes = list(member_sizes) if member_sizes is not None else [size] * members
        if len(sizes) != members:
            raise ValueError(f"member_sizes has {len(sizes)} entries for {members} members")
        for fold, own in enumerate(sizes):
            torch.manual_seed(seed + fold)
            info = MemberInfo(fold=fold, size=own if own != size else None)
            models.append((build_model("tiny", len(labels), size=own), info))
        return export_package(
            models,
            out_dir,
            name="tiny-test",
            version=version,
            labels=tuple(labels),
            spec=PreprocessSpec(size=size),
            thresholds={label: (threshold, "fixed for tests") for label in labels},
            data_summary={"note": "untrained tiny test network"},
            evaluation_summary={},
            ages=ages,
            reference=reference,
            informational=informational,
        )
    finally:
        torch.set_num_threads(threads)
