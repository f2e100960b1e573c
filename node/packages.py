"""Which model package and input-gate package the node runs, checked or loaded from the settings.

The one place that resolves ``[model] package`` and ``[model] gate`` (empty: the bundled packages in
``ai/models``). Loading imports the model runtime (onnxruntime) only when called, so the SCP-only role and
the commands that only read settings never import it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ai.manifest import GATE_OFF, ModelManifest, bundled_gate_dir, bundled_package_dir, load_manifest
from node.config import Settings

if TYPE_CHECKING:
    from ai.ensemble import Ensemble
    from ai.gate import InputGate

log = logging.getLogger(__name__)


def model_package_dir(settings: Settings) -> Path:
    """The configured model package folder (the bundled default when ``model.package`` is empty)."""
    return settings.resolve(settings.model.package) if settings.model.package else bundled_package_dir()


def load_ensemble(settings: Settings) -> Ensemble:
    """Load the configured model package."""
    from ai.ensemble import Ensemble

    return Ensemble.load(model_package_dir(settings), providers=settings.model.providers,
                         threshold_overrides=settings.thresholds)


def load_shadow(settings: Settings) -> Ensemble | None:
    """The shadow package (``[model] shadow_package``), or None. Its own thresholds only: the node's ``[thresholds]``
    overrides are for the live package."""
    if not settings.model.shadow_package:
        return None
    from ai.ensemble import Ensemble

    return Ensemble.load(settings.resolve(settings.model.shadow_package), providers=settings.model.providers)


def gate_package_dir(settings: Settings) -> Path | None:
    """The configured input-gate package folder (the bundled one when ``model.gate`` is empty), None when "off"."""
    if settings.model.gate == GATE_OFF:
        return None
    return settings.resolve(settings.model.gate) if settings.model.gate else bundled_gate_dir()


def load_gate(settings: Settings) -> InputGate | None:
    """Load the configured input gate (None when ``model.gate = "off"``: every image is scored, logged once)."""
    package = gate_package_dir(settings)
    if package is None:
        log.warning("model.gate = \"off\": every image that passes the tag filter is scored, whatever its pixels")
        return None
    from ai.gate import InputGate

    return InputGate.load(package)


def check_model_package(settings: Settings) -> ModelManifest:
    """Check the configured package without loading it: manifest, each member's sha256, threshold overrides.

    Raises:
        ModelPackageError: naming the file that is missing, altered or invalid.
        ValueError: a threshold override for a label the package lacks, or outside [0, 1].
    """
    from ai.manifest import effective_thresholds

    manifest = load_manifest(model_package_dir(settings), verify=True)
    effective_thresholds(manifest, settings.thresholds)
    gate = gate_package_dir(settings)
    if gate is not None:
        load_manifest(gate, verify=True)
    if settings.model.shadow_package:
        load_manifest(settings.resolve(settings.model.shadow_package), verify=True)
    return manifest
