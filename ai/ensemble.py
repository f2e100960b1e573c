"""Inference step: run the ONNX ensemble of a model package and turn its outputs into findings.

``Ensemble.load`` verifies the package (``ai.manifest.load_manifest``: every member present and
matching its sha256), then creates one onnxruntime session per member, once. Providers: the ones
asked for, else CUDA first when ``onnxruntime.get_available_providers()`` offers it (onnxruntime-gpu
installs the same module), then CPU. ``providers`` reports what the sessions really use (onnxruntime
falls back to CPU when CUDA cannot start).

Aggregation (the manifest's ``mean``): the probability of a label is the mean over members of
``sigmoid(logits)``, over the members that output the label when members carry different labels
(``Member.labels``). Members may take inputs of different sizes (``Member.size``): each runs on the image
preprocessed at its own size, and the caller gives one batch per size (``ModelManifest.input_sizes``;
``ai.analyse.model_input`` makes them). The class activation map of a label is the mean over those members of
their ``cam`` output (logit space; its spatial mean is the member's logit), each resized bilinearly to the
package's grid (``preprocess.size`` squared) as a whole square: the letterboxes of one image at two sizes differ
only by the rounding of the content's edges, at most one grid pixel (``tests/test_preprocess.py``), far finer
than a CAM cell (32 input pixels for an EfficientNet member). ``Finding.heatmap`` maps that onto [0, 1] with the
sigmoid: an absolute scale (0.5 = no evidence either way) that is comparable across images, so a clearly negative
image yields a dark map instead of a min-max stretched one that would invent hot spots.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import onnxruntime as ort

from ai.errors import ModelPackageError
from ai.findings import Finding
from ai.manifest import (  # effective_thresholds and SITE_OVERRIDE live with the manifest, importable from here
    ModelManifest,
    Threshold,
    effective_thresholds,
    load_manifest,
    member_path,
)
from ai.preprocess import Letterbox, PreprocessSpec, preprocess_sizes, to_model_input

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Prediction:
    """Ensemble outputs for a batch.

    Attributes:
        probabilities: [N, L] float32, mean over members of sigmoid(logits).
        cams: [N, L, S, S] float32, mean over members of the CAM (logit space) resized to S x S.
        member_probabilities: [M, N, L] float32, each member's sigmoid(logits), in manifest order (NaN for a
            label the member does not output).
    """

    probabilities: np.ndarray
    cams: np.ndarray
    member_probabilities: np.ndarray


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (no overflow for large |x|)."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64))), dtype=np.float32)


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime offers CUDA, else CPU only."""
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def default_threads() -> int:
    """CPU cores this process may run on (all of them: one inference at a time per worker)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int) -> ort.SessionOptions:
    """One session per member, run one after the other: parallelism inside operators only."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class Ensemble:
    """The loaded model package: its manifest, one onnxruntime session per member, the thresholds."""

    def __init__(
        self,
        manifest: ModelManifest,
        sessions: Sequence[ort.InferenceSession],
        package_dir: Path,
        thresholds: Mapping[str, Threshold],
    ) -> None:
        """Use ``Ensemble.load``; this only assembles already validated parts."""
        self.manifest = manifest
        self.package_dir = package_dir
        self._sessions = tuple(sessions)
        self._thresholds = MappingProxyType(dict(thresholds))
        self.providers: tuple[str, ...] = tuple(self._sessions[0].get_providers())

    @classmethod
    def load(
        cls,
        package_dir: str | Path,
        providers: Sequence[str] = (),
        threshold_overrides: Mapping[str, float] = MappingProxyType({}),
        threads: int | None = None,
    ) -> Ensemble:
        """Verify a model package and create its sessions.

        Args:
            package_dir: the package folder (``manifest.json`` + members).
            providers: onnxruntime providers in order of preference; empty: ``default_providers()``.
            threshold_overrides: per-label thresholds set by the site (they replace the package's).
            threads: intra-op threads per session; None: ``default_threads()``.

        Raises:
            ModelPackageError: invalid manifest, missing or altered member, a member onnxruntime
                cannot load, or a member whose inputs/outputs do not match the manifest.
            ValueError: an unavailable provider or an invalid threshold override.
        """
        package_dir = Path(package_dir)
        manifest = load_manifest(package_dir, verify=True)
        thresholds = effective_thresholds(manifest, threshold_overrides)
        chosen = _check_providers(providers)
        options = session_options(threads or default_threads())
        sessions = [
            _open_session(member_path(package_dir, member), manifest, manifest.member_spec(member), options, chosen)
            for member in manifest.members
        ]
        ensemble = cls(manifest, sessions, package_dir, thresholds)
        log.info(
            "model package %s %s: %d members, labels %s, providers %s, %d threads",
            manifest.name, manifest.version, len(sessions), list(manifest.labels), list(ensemble.providers),
            options.intra_op_num_threads,
        )
        return ensemble

    @property
    def thresholds(self) -> Mapping[str, Threshold]:
        """Effective threshold per label (package value or site override)."""
        return self._thresholds

    def predict(self, batch: np.ndarray | Mapping[int, np.ndarray]) -> Prediction:
        """Run every member on a batch of model inputs and aggregate.

        Args:
            batch: per input size S of the package (``manifest.input_sizes``), float32 [N, channels, S, S] in
                [0, 1] (``ai.preprocess.to_model_input``), the same N images at every size: a mapping {S: batch},
                or one array when the package has one input size.

        Raises:
            ValueError: the batch does not have the package's input shapes.
            ModelPackageError: a member returned outputs of the wrong shape.
        """
        spec = self.manifest.preprocess
        inputs = self._inputs(batch)
        names = [self.manifest.outputs["logits"], self.manifest.outputs["cam"]]
        labels = self.manifest.labels
        n = next(iter(inputs.values())).shape[0]
        probs = np.full((len(self._sessions), n, len(labels)), np.nan, np.float32)
        counts = np.zeros(len(labels), np.int64)
        # members grouped by CAM grid and output labels: each group's sum is resized once
        cam_sums: dict[tuple[tuple[int, ...], tuple[int, ...]], np.ndarray] = {}
        for m, (member, session) in enumerate(zip(self.manifest.members, self._sessions, strict=True)):
            columns = tuple(labels.index(label) for label in member.outputs(labels))
            x = inputs[member.input_size(spec.size)]
            logits, cam = session.run(names, {self.manifest.input_name: x})
            self._check_outputs(member.file, logits, cam, n, len(columns))
            probs[m][:, columns] = sigmoid(logits)
            counts[list(columns)] += 1
            key = (tuple(cam.shape[2:]), columns)
            cam_sums[key] = cam_sums[key] + cam if key in cam_sums else cam.astype(np.float64)
        cams = np.zeros((n, len(labels), spec.size, spec.size), np.float64)
        for (_, columns), total_cam in cam_sums.items():
            cams[:, list(columns)] += _resize_maps(total_cam, spec.size)
        cams /= counts.reshape(1, -1, 1, 1)
        total = np.where(np.isnan(probs), 0.0, probs).sum(axis=0, dtype=np.float64)
        mean = (total / counts.reshape(1, -1)).astype(np.float32)
        return Prediction(probabilities=mean, cams=cams.astype(np.float32), member_probabilities=probs)

    def inputs(self, image: np.ndarray) -> tuple[dict[int, np.ndarray], Letterbox]:
        """The one preprocessing of a decoded image for this package: {size: float32 (channels, size, size)} for each
        of its members' input sizes (the field detected once), with the letterbox of the heat maps' grid
        (``preprocess.size``).

        Raises:
            UnsupportedImage: the image cannot be preprocessed.
        """
        manifest = self.manifest
        grays = preprocess_sizes(image, manifest.preprocess, manifest.input_sizes)
        inputs = {size: to_model_input(gray, manifest.spec_at(size)) for size, (gray, _) in grays.items()}
        return inputs, grays[manifest.preprocess.size][1]

    def _inputs(self, batch: np.ndarray | Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """{input size: float32 contiguous batch} for every input size of the package, checked."""
        sizes = self.manifest.input_sizes
        if not isinstance(batch, Mapping):
            if len(sizes) > 1:
                raise ValueError(f"the members of {self.manifest.name} {self.manifest.version} take inputs of "
                                 f"sizes {list(sizes)}: give one batch per size, {{size: batch}}")
            batch = {sizes[0]: batch}
        if set(batch) != set(sizes):
            raise ValueError(f"expected one batch per input size {list(sizes)}, got sizes {sorted(batch)}")
        channels = self.manifest.preprocess.channels
        out = {}
        for size in sizes:
            x = np.ascontiguousarray(batch[size], dtype=np.float32)
            if x.ndim != 4 or x.shape[1:] != (channels, size, size) or x.shape[0] < 1:
                raise ValueError(f"batch must have shape [N, {channels}, {size}, {size}], got {list(x.shape)}")
            out[size] = x
        if len({x.shape[0] for x in out.values()}) > 1:
            found = {size: x.shape[0] for size, x in out.items()}
            raise ValueError(f"the batches of every input size must hold the same images, got counts {found}")
        return out

    def findings(self, image_chw: np.ndarray | Mapping[int, np.ndarray]) -> list[Finding]:
        """One ``Finding`` per label (manifest order) for one preprocessed image [channels, S, S], or one per input
        size of the package ({S: image})."""
        batch = ({size: _one_image(image) for size, image in image_chw.items()} if isinstance(image_chw, Mapping)
                 else _one_image(image_chw))
        prediction = self.predict(batch)
        out = []
        for index, label in enumerate(self.manifest.labels):
            probability = float(prediction.probabilities[0, index])
            threshold = self._thresholds[label]
            out.append(
                Finding(
                    label=label,
                    probability=probability,
                    threshold=threshold.value,
                    positive=probability >= threshold.value,
                    threshold_method=threshold.method,
                    heatmap=sigmoid(prediction.cams[0, index]),
                    informational=label in self.manifest.informational,
                )
            )
        return out

    def _check_outputs(self, file: str, logits: np.ndarray, cam: np.ndarray, n: int, labels: int) -> None:
        if logits.shape != (n, labels) or cam.ndim != 4 or cam.shape[:2] != (n, labels):
            raise ModelPackageError(
                f"{self.package_dir / file}: expected logits [{n}, {labels}] and cam [{n}, {labels}, h, w], "
                f"got {list(logits.shape)} and {list(cam.shape)}"
            )


def _one_image(image_chw: np.ndarray) -> np.ndarray:
    """One preprocessed image [channels, S, S] as a batch of one."""
    image = np.asarray(image_chw)
    if image.ndim != 3:
        raise ValueError(f"image must have shape [channels, size, size], got {list(image.shape)}")
    return image[np.newaxis]


def _resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """[N, L, h, w] -> [N, L, size, size], bilinear (pixel centres aligned)."""
    n, labels, h, w = maps.shape
    if (h, w) == (size, size):
        return maps
    flat = np.ascontiguousarray(maps.reshape(n * labels, h, w).transpose(1, 2, 0), dtype=np.float32)
    out = np.empty((n * labels, size, size), np.float64)
    for start in range(0, n * labels, 512):  # cv2 takes at most 512 channels at a time
        chunk = np.ascontiguousarray(flat[:, :, start : start + 512])
        resized = cv2.resize(chunk, (size, size), interpolation=cv2.INTER_LINEAR)
        out[start : start + chunk.shape[2]] = resized.reshape(size, size, -1).transpose(2, 0, 1)
    return out.reshape(n, labels, size, size)


def _check_providers(providers: Sequence[str]) -> list[str]:
    """The providers to ask for, checked against what onnxruntime offers here."""
    if not providers:
        return default_providers()
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"onnxruntime providers {missing} are not available here; available: {available}")
    return list(providers)


def _open_session(
    path: Path, manifest: ModelManifest, spec: PreprocessSpec, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """One member's session, checked against the manifest's input (at the member's ``spec``) and outputs.

    Raises:
        ModelPackageError: onnxruntime cannot load the file, or its input/outputs do not match.
    """
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
        raise ModelPackageError(f"{path}: onnxruntime cannot load this member: {exc}") from exc
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    shape = inputs.get(manifest.input_name)
    if shape is None or len(shape) != 4:
        raise ModelPackageError(
            f"{path}: expected input {manifest.input_name!r} [N, {spec.channels}, {spec.size}, {spec.size}], "
            f"found inputs {inputs}"
        )
    expected = (spec.channels, spec.size, spec.size)
    if any(isinstance(got, int) and got != want for got, want in zip(shape[1:], expected, strict=True)):
        raise ModelPackageError(
            f"{path}: input {manifest.input_name!r} has shape {shape}, "
            f"expected [N, {spec.channels}, {spec.size}, {spec.size}] (manifest preprocess and member size)"
        )
    wanted = set(manifest.outputs.values())
    if not wanted <= outputs:
        raise ModelPackageError(f"{path}: expected outputs {sorted(wanted)}, found {sorted(outputs)}")
    return session
