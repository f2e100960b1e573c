"""Export step: `CxrNet` members -> ONNX graphs (checked for parity with torch) -> a model package.

The member graph follows docs/contracts.md: input `image` float32 [N, 3, S, S] in [0, 1] (normalisation
inside the graph, dynamic batch), outputs `logits` [N, L] and `cam` [N, L, h, w]. The TorchScript
exporter is used (`dynamo=False`): the dynamo exporter fails on timm's ConvNeXt (DESIGN.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ai.manifest import (
    MAX_TEXT,
    AgeRange,
    Member,
    ModelManifest,
    ScoreReference,
    Threshold,
    dicom_text_problem,
    load_manifest,
    sha256_file,
    write_manifest,
)
from ai.preprocess import PreprocessSpec
from training.models import CxrNet, backbone_stages

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "cam")
PARITY_TOLERANCE = 1e-4
INT8_LAST_STAGE = "int8-last-stage"
WEIGHTS_DTYPES = ("float32", "float16", INT8_LAST_STAGE)
#: The largest change int8 storage of the last stage and head may make (as :func:`output_difference` measures it):
#: 0.06-0.12 measured on tb-320-strong-aug's Lite0 members and 0.06-0.17 on its Lite1 members (real images), whose
#: probabilities move by up to 0.056 on their OOF images (bench/README.md, int8_members.py); a bound well above
#: those, to refuse a broken storage.
INT8_PARITY_TOLERANCE = 0.25
# fp16-stored weights: torch (fp32 weights) vs onnxruntime (weights rounded to fp16, computed in fp32).
# Measured on the bundled EfficientNet-Lite0 members at 256 px (docs/model/README.md); a bound, not a target.
FP16_PARITY_TOLERANCE = 5e-2
FP16_MIN_ELEMENTS = 256  # smaller initializers (normalisation constants, tiny biases) stay float32


class ExportError(RuntimeError):
    """An export that failed or whose ONNX graph does not reproduce the torch model."""


class _WithCam(nn.Module):
    """Adapter whose `forward` is the member's `forward_with_cam` (what the graph computes)."""

    def __init__(self, model: CxrNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_cam(image)


def export_member(model: CxrNet, path: str | Path, size: int, opset: int = 17, weights_dtype: str = "float32") -> Path:
    """Write `model` as one ONNX member graph at input size `size` and check it with `onnx.checker`.

    The model is exported in eval mode (dropout off, BatchNorm running statistics) and left in
    eval mode. The batch dimension is dynamic; the image size is fixed at `size`. With
    `weights_dtype="float16"` the weights are stored as float16 and cast to float32 inside the graph
    (:func:`store_weights_float16`): half the disk, the same float32 compute.

    Returns:
        The path written.

    Raises:
        ExportError: the exporter or the ONNX checker failed (names the architecture and file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is our choice
            torch.onnx.export(
                _WithCam(model).eval(),  # export restores the wrapper's mode afterwards: keep it eval
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        if weights_dtype == "float16":
            store_weights_float16(path)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # the exporter raises many types; report which member failed
        raise ExportError(f"ONNX export of {model.arch} to {path} failed: {exc}") from exc
    return path


def write_member(
    model: CxrNet, path: str | Path, size: int, parity_inputs: torch.Tensor | np.ndarray, *, opset: int = 17,
    weights_dtype: str = "float32", parity_tolerance: float = PARITY_TOLERANCE,
) -> tuple[float, float | None]:
    """One member graph as a package stores it, in two checked steps.

    1. The float32 graph must reproduce torch on `parity_inputs` within `parity_tolerance` (the export is right).
    2. Then the weights are stored as `weights_dtype`: a separate, measured change (:func:`float16_storage`,
       :func:`int8_storage`; float32 stores as exported).

    Returns:
        (the float32 graph's parity difference, the storage's difference or None for float32).

    Raises:
        ExportError: the export failed, or a difference above its tolerance.
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    path = export_member(model, path, size, opset)
    parity = check_parity(model, path, parity_inputs, parity_tolerance)
    if weights_dtype == "float16":
        return parity, float16_storage(path, parity_inputs, FP16_PARITY_TOLERANCE)
    if weights_dtype == INT8_LAST_STAGE:
        return parity, int8_storage(path, parity_inputs, INT8_PARITY_TOLERANCE, last_stage_nodes(model, path))
    return parity, None


def store_weights_float16(path: str | Path, min_elements: int = FP16_MIN_ELEMENTS,
                          keep: Collection[str] = ()) -> int:
    """Rewrite an ONNX graph in place so that its large float32 weights are stored as float16.

    Each float32 initializer with at least `min_elements` values (and not named in `keep`) becomes a float16
    initializer
    `<name>_fp16` plus a `Cast` to float32 named as the original at the head of the graph, so every
    consumer still sees float32 (onnxruntime folds the casts when the session loads; compute stays
    float32). The only change to the results is the rounding of those weights to float16.

    Returns:
        The number of initializers converted.
    """
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    casts, converted = [], 0
    for init in graph.initializer:
        if (init.data_type != TensorProto.FLOAT or int(np.prod(init.dims, dtype=np.int64)) < min_elements
                or init.name in keep):
            continue
        values = numpy_helper.to_array(init)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast", to=TensorProto.FLOAT))
        converted += 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(proto, str(path))
    return converted


def check_parity(
    model: CxrNet,
    onnx_path: str | Path,
    inputs: torch.Tensor | np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Largest difference between torch and onnxruntime (CPU), as :func:`output_difference` measures it.

    Args:
        model: the torch member (evaluated in eval mode).
        onnx_path: its exported graph.
        inputs: float images [N, 3, S, S] in [0, 1].
        tolerance: the largest difference accepted.

    Raises:
        ExportError: a difference above `tolerance`, or output shapes that differ.
    """
    x = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    model.eval()
    with torch.no_grad():
        expected = [t.numpy() for t in model.forward_with_cam(x)]
    session = ort.InferenceSession(str(onnx_path), _session_options(), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    diff = output_difference(expected, got, str(onnx_path))
    if not diff <= tolerance:
        raise ExportError(f"{onnx_path}: torch vs onnxruntime differ by {diff:.3g} (> {tolerance:g})")
    return diff


def last_stage_nodes(model: CxrNet, onnx_path: str | Path) -> list[str]:
    """The Conv and Gemm nodes of `onnx_path` (`model` exported) that belong to the last backbone stage or the head:
    the layers fine-tuning trains with ``unfreeze = "last_stage"`` (with ``"last_two_stages"`` the stage before stays
    float16), found by the module scope in each node's name."""
    _, params = backbone_stages(model)[-1]
    ids = {id(p) for p in params}
    body = model.backbone.body
    last = {name.rpartition(".")[0] for name, p in body.named_parameters() if id(p) in ids}
    nodes = []
    for node in onnx.load(str(onnx_path)).graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        path = onnx_module_path(node.name)
        for prefix in ("backbone.body.", "backbone."):
            path = path.removeprefix(prefix)
        if path == "head" or path.startswith("head.") or any(path == m or path.startswith(m + ".") for m in last):
            nodes.append(node.name)
    return nodes


def onnx_module_path(node_name: str) -> str:
    """The torch module path of an exported node: ``/backbone/blocks/blocks.5/blocks.5.0/conv_pw/Conv`` ->
    ``backbone.blocks.5.0.conv_pw`` (the exporter names each scope after its module, a container's child as
    ``<container>.<index>``)."""
    out, previous = [], ""
    for part in (p for p in node_name.split("/")[:-1] if p):
        out.append(part[len(previous) + 1:] if previous and part.startswith(previous + ".") else part)
        previous = part
    return ".".join(out)


def store_weights_int8(path: str | Path, nodes: Collection[str]) -> list[str]:
    """Rewrite an ONNX graph in place so that the weights of the Conv/Gemm `nodes` are stored as int8, per output
    channel (symmetric, scale = max |w| / 127), each behind a DequantizeLinear that gives the float32 weight back
    under its old name: compute stays float32. Returns the names of the (float32) scales."""
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    dequantize, scales = [], []
    for node in graph.node:
        if node.name not in nodes or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        if f"{name}_scale" in scales:  # a weight two selected nodes share: stored once
            continue
        weight = numpy_helper.to_array(inits[name]).astype(np.float32)
        transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        axis = 0 if node.op_type == "Conv" or transposed else 1
        scale = np.max(np.abs(weight), axis=tuple(i for i in range(weight.ndim) if i != axis)) / 127.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        values = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
        inits[name].CopyFrom(numpy_helper.from_array(values, f"{name}_int8"))
        graph.initializer.extend([numpy_helper.from_array(scale, f"{name}_scale"),
                                  numpy_helper.from_array(np.zeros_like(scale, np.int8), f"{name}_zero")])
        dequantize.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                           [name], name=f"{name}_dequantize", axis=axis))
        scales.append(f"{name}_scale")
    nodes_now = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantize + nodes_now)
    onnx.save(proto, str(path))
    return scales


def int8_storage(onnx_path: str | Path, inputs: torch.Tensor | np.ndarray, tolerance: float,
                 nodes: Collection[str]) -> float:
    """Store a checked float32 graph's weights of `nodes` as int8 (:func:`store_weights_int8`) and the rest as
    float16 (:func:`store_weights_float16`), and measure what that changes, as :func:`float16_storage` does.

    Raises:
        ExportError: a difference above `tolerance`, or no node to store as int8.
    """
    if not nodes:
        raise ExportError(f"{onnx_path}: no Conv or Gemm node of the last stage or the head found for int8 storage")
    weights = {n.input[1] for n in onnx.load(str(onnx_path)).graph.node if n.name in nodes and len(n.input) > 1}

    def store() -> None:
        scales = store_weights_int8(onnx_path, nodes)
        if len(scales) != len(weights):
            raise ExportError(f"{onnx_path}: {len(weights)} weights of the last stage and the head, but "
                              f"{len(scales)} could be stored as int8 (a weight that is no plain float32 initializer)")
        store_weights_float16(onnx_path, keep=scales)

    return _measured_storage(onnx_path, inputs, tolerance, "int8", store)


def float16_storage(onnx_path: str | Path, inputs: torch.Tensor | np.ndarray, tolerance: float) -> float:
    """Store a checked float32 graph's weights as float16 and measure what the rounding changes.

    Returns:
        The largest absolute difference of `logits` and `cam` between the float32 and the float16-stored
        graph on `inputs`.

    Raises:
        ExportError: a difference above `tolerance`.
    """
    return _measured_storage(onnx_path, inputs, tolerance, "float16", lambda: store_weights_float16(onnx_path))


def _measured_storage(onnx_path: str | Path, inputs: torch.Tensor | np.ndarray, tolerance: float, kind: str,
                      store: Callable[[], object]) -> float:
    """Run `store` (a rewrite of the graph's weight storage), check the graph, and return how far its outputs on
    `inputs` moved (:func:`output_difference`); ExportError above `tolerance`."""
    x = np.asarray(inputs, dtype=np.float32)
    before = _onnx_outputs(onnx_path, x)
    store()
    onnx.checker.check_model(str(onnx_path))
    diff = output_difference(before, _onnx_outputs(onnx_path, x), str(onnx_path))
    if not diff <= tolerance:
        raise ExportError(f"{onnx_path}: {kind}-stored weights change the outputs by {diff:.3g} (> {tolerance:g})")
    return diff


def output_difference(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], where: str) -> float:
    """Difference of two (logits, cam) pairs: absolute on the logits, relative to max(1, max |cam|) on the cam.

    The class activation map holds values up to ~20 on real chest X-rays (its spatial mean is the logit), so
    its differences are judged at its own scale; the logits, which decide the probability, in absolute terms.

    Raises:
        ExportError: output shapes that differ.
    """
    diff = 0.0
    for name, want, have in zip(OUTPUT_NAMES, expected, got, strict=True):
        if want.shape != have.shape:
            raise ExportError(f"{where}: output {name} has shape {have.shape}, expected {want.shape}")
        scale = 1.0 if name == "logits" else max(1.0, float(np.max(np.abs(want))))
        diff = max(diff, float(np.max(np.abs(want - have))) / scale)
    return diff


def _onnx_outputs(onnx_path: str | Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), _session_options(), providers=["CPUExecutionProvider"])
    return list(session.run(list(OUTPUT_NAMES), {INPUT_NAME: x}))


def _session_options() -> ort.SessionOptions:
    """Quiet, deterministic CPU session options for checks."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


@dataclass(frozen=True)
class MemberInfo:
    """What the manifest says about one member besides its file and checksum.

    Attributes:
        fold: the cross-validation fold the member was trained without; None: trained on all data.
        weights: where its initial weights came from; None: the model's own record (`CxrNet.weights`).
        file: the `.onnx` file name in the package; None: `<architecture>_fold<k>.onnx` (or `_all`).
        architecture: the registry name; None: the model's own (`CxrNet.arch`), which it must equal.
        labels: the package labels of the model's outputs, in order; None: all of the package's, in its order.
        size: the side of the model's input when it is not the package's (``spec.size`` of :func:`export_package`).
    """

    fold: int | None = None
    weights: str | None = None
    file: str | None = None
    architecture: str | None = None
    labels: tuple[str, ...] | None = None
    size: int | None = None

    def resolve(self, model: CxrNet) -> Member:
        """The manifest entry for `model` (sha256 still empty), every None filled in from `model`.

        Raises:
            ValueError: `architecture` differs from the model's.
        """
        if self.architecture not in (None, model.arch):
            raise ValueError(f"MemberInfo.architecture {self.architecture!r} != the model's {model.arch!r}")
        suffix = "all" if self.fold is None else f"fold{self.fold}"
        return Member(
            file=self.file or f"{model.arch}_{suffix}.onnx",
            sha256="",
            architecture=model.arch,
            fold=self.fold,
            weights=self.weights or model.weights,
            labels=self.labels,
            size=self.size,
        )


def export_package(
    members: Sequence[tuple[CxrNet, MemberInfo]],
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    labels: Sequence[str],
    spec: PreprocessSpec,
    thresholds: Mapping[str, tuple[float, str] | Threshold],
    data_summary: Mapping[str, Any] | None = None,
    evaluation_summary: Mapping[str, Any] | None = None,
    parity_inputs: torch.Tensor | np.ndarray | Mapping[int, torch.Tensor | np.ndarray] | None = None,
    opset: int = 17,
    overwrite: bool = False,
    weights_dtype: str = "float32",
    parity_tolerance: float | None = None,
    reference: Mapping[str, ScoreReference] | None = None,
    ages: Mapping[str, AgeRange] | None = None,
    copied: Sequence[tuple[Path, Member]] = (),
    informational: Sequence[str] = (),
    expected_sha256: Mapping[str, str] | None = None,
) -> Path:
    """Write a model package: one checked ONNX graph per member + `manifest.json` (docs/contracts.md).

    Each member is exported at `spec.size` (or its own `MemberInfo.size`), checked against torch on `parity_inputs`
    (default: two seeded random images) and checksummed. The package is assembled in a hidden sibling folder,
    read back with `ai.manifest.load_manifest` (checksums verified), then renamed into place, so a
    half-written package is never found at `out_dir`. The parity results are recorded in the
    evaluation summary under "onnx_export".

    Args:
        members: (model, info) per member, in ensemble order.
        out_dir: the package folder; it must be absent or empty unless `overwrite`.
        name: package name.
        version: package version string.
        labels: label names, in the order of the models' outputs.
        spec: the preprocessing the members were trained with (its `size` is the export size).
        thresholds: per label, (value, method) or a `Threshold`.
        data_summary: training data summary (JSON values).
        evaluation_summary: evaluation summary (JSON values).
        parity_inputs: float images [N, 3, S, S] in [0, 1] for the parity check; with members of several
            input sizes, {S: images} (a size missing there is checked on random images).
        opset: ONNX opset.
        overwrite: replace an existing package at `out_dir`.
        weights_dtype: "float32", or "float16" to store the weights at half the size (compute stays
            float32; see :func:`store_weights_float16`), or "int8-last-stage": the last backbone stage's and the
            head's weights int8 per output channel, the rest float16 (:func:`int8_storage`; float32 compute).
        parity_tolerance: the largest torch-vs-onnxruntime difference of the float32 graph accepted; None:
            `PARITY_TOLERANCE` (1e-4). With float16 storage, the rounding's own effect is measured after that
            check against `FP16_PARITY_TOLERANCE` and recorded separately in the manifest.
        reference: per label, the score distribution the package was validated on (manifest ``reference``).
        ages: the labels limited to an age range, with that range (manifest ``ages``).
        copied: members taken over unchanged from another package: (its ONNX file, its manifest entry with
            ``labels`` set), listed before `members`; each file is copied byte for byte and must match its sha256.
        informational: labels reported with their decision that do not set the triage flag (manifest
            ``informational``); at least one label must remain that does.
        expected_sha256: per exported member file (all of them, or None), the sha256 its stored graph must have
            (the graph that scored the OOF images the thresholds were chosen on, :mod:`training.stored_scores`);
            checked before publishing.

    Returns:
        `out_dir`.

    Raises:
        ValueError: inconsistent labels, thresholds or members (named in the message).
        FileExistsError: `out_dir` holds files and `overwrite` is False.
        ExportError: an export or parity check failed, or a member's sha256 differs from `expected_sha256`'s.
    """
    labels = tuple(labels)
    for key, value in (("name", name), ("version", version)):
        problem = dicom_text_problem(value)
        if problem:
            raise ValueError(f"package {key} {value!r}: expected {problem}")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    if parity_tolerance is None:
        parity_tolerance = PARITY_TOLERANCE
    informational = tuple(dict.fromkeys(informational))
    if not set(informational) <= set(labels) or set(informational) == set(labels):
        raise ValueError(f"informational labels {list(informational)} must be labels of the package {list(labels)} "
                         f"and leave at least one to set the triage flag")
    expected_sha256 = dict(expected_sha256 or {})
    resolved = _resolve_members(members, labels, spec, [entry for _, entry in copied])
    exported = {entry.file for _, entry in resolved}
    if expected_sha256 and set(expected_sha256) != exported:
        raise ValueError(f"expected_sha256 names {sorted(expected_sha256)}, but the exported members are "
                         f"{sorted(exported)}: every exported member must be the graph that scored")
    threshold_map = _thresholds(thresholds, labels)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace the package")
    parity_at = _parity_inputs(parity_inputs, spec.size)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        entries, parity, storage = [], {}, {}
        staging.mkdir(parents=True)
        for source, entry in copied:
            target = staging / entry.file
            shutil.copyfile(source, target)
            if sha256_file(target) != entry.sha256:
                raise ExportError(f"{source}: sha256 differs from its manifest entry {entry.sha256}")
            entries.append(entry)
        for model, entry in resolved:
            path = staging / entry.file
            size = entry.input_size(spec.size)
            parity[entry.file], stored = write_member(model, path, size, parity_at(size), opset=opset,
                                                      weights_dtype=weights_dtype, parity_tolerance=parity_tolerance)
            if stored is not None:
                storage[entry.file] = stored
            sha256 = sha256_file(path)
            if entry.file in expected_sha256 and expected_sha256[entry.file] != sha256:
                raise ExportError(f"{entry.file}: sha256 {sha256} differs from that of the graph that scored "
                                  f"its OOF images ({expected_sha256[entry.file]}): the export is not reproducible")
            entries.append(replace(entry, sha256=sha256))
            log.info("exported %s (%s), parity %.2g", entry.file, entry.architecture, parity[entry.file])
        export_record: dict[str, Any] = {
            "opset": opset,
            "torch": torch.__version__,
            "weights_dtype": weights_dtype,
            "parity_tolerance": parity_tolerance,
            "parity_max_abs_diff": parity,
        }
        if storage:
            kind = "float16" if weights_dtype == "float16" else "int8"
            export_record[f"{kind}_storage_tolerance"] = (FP16_PARITY_TOLERANCE if kind == "float16"
                                                          else INT8_PARITY_TOLERANCE)
            export_record[f"{kind}_storage_max_abs_diff"] = storage
        manifest = ModelManifest(
            name=name,
            version=version,
            labels=labels,
            preprocess=spec,
            members=tuple(entries),
            thresholds=threshold_map,
            data_summary=dict(data_summary or {}),
            evaluation_summary={**dict(evaluation_summary or {}), **({"onnx_export": export_record} if resolved
                                                                      else {})},
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            reference=dict(reference or {}),
            ages=dict(ages or {}),
            informational=tuple(label for label in labels if label in informational),
        )
        write_manifest(staging, manifest)
        load_manifest(staging, verify=True)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def default_version(name: str) -> str:
    """``<name>-<YYYYMMDD>`` (UTC), or the date alone where that is longer than a DICOM LO value takes."""
    today = datetime.now(UTC).strftime("%Y%m%d")
    return f"{name}-{today}" if len(name) + 1 + len(today) <= MAX_TEXT else today


def check_same_preprocessing(spec: PreprocessSpec, spec_source: object, other: PreprocessSpec,
                             other_source: object) -> None:
    """Members of one package share ``spec``'s preprocessing; only their input size may differ.

    Raises:
        ValueError: ``other`` differs in more than the size, naming both sources and both preprocessings.
    """
    if replace(other, size=spec.size) != spec:
        raise ValueError(f"{other_source} preprocesses differently from {spec_source} ({other} vs {spec}): the "
                         f"members of one package share one preprocessing, only their input size may differ")


def _parity_inputs(
    given: torch.Tensor | np.ndarray | Mapping[int, torch.Tensor | np.ndarray] | None, package_size: int
) -> Callable[[int], torch.Tensor | np.ndarray]:
    """The parity images of each input size: those given (one array: the package's size), else two seeded random
    images.

    Raises:
        ValueError: one array whose side is not the package's.
    """
    if given is not None and not isinstance(given, Mapping):
        if tuple(given.shape[-2:]) != (package_size, package_size):
            raise ValueError(f"parity_inputs of shape {list(given.shape)}: expected [N, 3, {package_size}, "
                             f"{package_size}], or {{size: images}} for members of several sizes")
        given = {package_size: given}
    known = dict(given or {})

    def at(size: int) -> torch.Tensor | np.ndarray:
        if size in known:
            return known[size]
        return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    return at


def _resolve_members(
    members: Sequence[tuple[CxrNet, MemberInfo]], labels: tuple[str, ...], spec: PreprocessSpec,
    copied: Sequence[Member] = (),
) -> list[tuple[CxrNet, Member]]:
    """Each member's manifest entry (sha256 still empty); checks the members (and the `copied` entries of
    members taken over from another package) against the labels and the spec.

    Raises:
        ValueError: no members, duplicate labels or files, a label count or channel count mismatch.
    """
    if not members and not copied:
        raise ValueError("export_package needs at least one member")
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and unique, got {list(labels)}")
    if spec.channels != 3:
        raise ValueError(f"members take 3-channel images; PreprocessSpec.channels is {spec.channels}")
    resolved = [(model, info.resolve(model)) for model, info in members]
    for model, entry in resolved:
        outputs = entry.outputs(labels)
        if model.num_labels != len(outputs):
            raise ValueError(f"member {entry.file} has {model.num_labels} outputs for {len(outputs)} labels")
        foreign = sorted(set(outputs) - set(labels))
        if foreign or len(set(outputs)) != len(outputs):
            raise ValueError(f"member {entry.file}: labels {list(outputs)} must be distinct labels of {list(labels)}")
    for entry in copied:
        foreign = sorted(set(entry.outputs(labels)) - set(labels))
        if entry.labels is None or foreign:
            raise ValueError(f"copied member {entry.file}: labels {entry.labels} must name labels of {list(labels)}")
    entries = [entry for _, entry in resolved] + list(copied)
    if not any(entry.input_size(spec.size) == spec.size for entry in entries):
        sizes = sorted({entry.input_size(spec.size) for entry in entries})
        raise ValueError(f"no member takes the package's input size {spec.size} (members: {sizes}); it is the "
                         f"grid of the heat maps")
    orphans = [label for label in labels if not any(label in entry.outputs(labels) for entry in entries)]
    if orphans:
        raise ValueError(f"no member outputs {orphans}")
    files = [entry.file for entry in entries]
    if len(set(files)) != len(files):
        raise ValueError(f"member files must be distinct, got {files}")
    return resolved


def _thresholds(
    thresholds: Mapping[str, tuple[float, str] | Threshold], labels: tuple[str, ...]
) -> dict[str, Threshold]:
    """One `Threshold` per label, in label order.

    Raises:
        ValueError: missing or extra labels, or a value outside [0, 1].
    """
    if set(thresholds) != set(labels):
        missing, extra = sorted(set(labels) - set(thresholds)), sorted(set(thresholds) - set(labels))
        raise ValueError(f"thresholds need one entry per label: missing {missing}, extra {extra}")
    out = {}
    for label in labels:
        item = thresholds[label]
        threshold = item if isinstance(item, Threshold) else Threshold(float(item[0]), str(item[1]))
        if not 0.0 <= threshold.value <= 1.0:
            raise ValueError(f"threshold for {label} must be in [0, 1], got {threshold.value}")
        out[label] = threshold
    return out


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished package into place, replacing what was at `out_dir`."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
