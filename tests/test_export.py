"""Model package export (training.export.export_package) read back through ai.manifest, as the node does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ai.errors import ModelPackageError
from ai.manifest import MANIFEST_NAME, load_manifest, sha256_file
from ai.preprocess import PreprocessSpec
from tests.model_fixtures import TINY_VERSION, build_tiny_package
from training import export
from training.export import ExportError, MemberInfo, export_package
from training.models import build_model

LABELS = ("Tuberculosis", "Effusion")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tiny_package_round_trips_through_load_manifest(tmp_path: Path) -> None:
    start = time.perf_counter()
    package = build_tiny_package(tmp_path / "pkg", labels=LABELS, members=2, size=64)
    assert time.perf_counter() - start < 5.0, "build_tiny_package must stay fast for other tests"
    manifest = load_manifest(package, verify=True)
    assert manifest.labels == LABELS and manifest.version == TINY_VERSION
    assert manifest.preprocess == PreprocessSpec(size=64)
    assert [(m.architecture, m.fold, m.weights) for m in manifest.members] == [
        ("tiny", 0, "random"),
        ("tiny", 1, "random"),
    ]
    assert {label: (t.value, t.method) for label, t in manifest.thresholds.items()} == {
        label: (0.5, "fixed for tests") for label in LABELS
    }
    for member in manifest.members:
        assert member.sha256 == sha256_file(package / member.file)
    assert sorted(p.name for p in package.iterdir()) == sorted([MANIFEST_NAME, *(m.file for m in manifest.members)])
    parity = manifest.evaluation_summary["onnx_export"]["parity_max_abs_diff"]
    assert set(parity) == {m.file for m in manifest.members} and max(parity.values()) <= 1e-4


def test_member_graph_follows_the_contract(tmp_path: Path) -> None:
    package = build_tiny_package(tmp_path / "pkg", labels=LABELS, members=2, size=64)
    manifest = load_manifest(package)
    graph = onnx.load(str(package / manifest.members[0].file)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == manifest.input_name == "image"
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64], "batch is dynamic, size fixed"
    assert [o.name for o in graph.output] == ["logits", "cam"]
    images = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    outputs = [_session(package / m.file).run(None, {"image": images}) for m in manifest.members]
    for logits, cam in outputs:
        assert logits.shape == (3, 2) and cam.shape[:2] == (3, 2) and cam.shape[2] == cam.shape[3]
        np.testing.assert_allclose(cam.mean((2, 3)), logits, atol=1e-5)
    assert not np.allclose(outputs[0][0], outputs[1][0]), "members use different seeds"


def test_corrupted_or_missing_member_is_detected(tmp_path: Path) -> None:
    package = build_tiny_package(tmp_path / "pkg")
    member = package / load_manifest(package).members[1].file
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match=rf"{member.name}.*sha256 mismatch"):
        load_manifest(package)
    member.unlink()
    with pytest.raises(ModelPackageError, match=rf"{member.name}.*not found"):
        load_manifest(package)


def test_package_of_mixed_architectures_records_weights_and_folds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lite = build_model("efficientnet_lite0", 1, weights="imagenet")
    tiny = build_model("tiny", 1)
    package = export_package(
        [(lite, MemberInfo(fold=0)), (tiny, MemberInfo(file="extra.onnx"))],
        tmp_path / "pkg",
        name="mixed",
        version="1.2.3",
        labels=["Tuberculosis"],
        spec=PreprocessSpec(size=64),
        thresholds={"Tuberculosis": (0.3, "sensitivity 0.90 on OOF")},
        data_summary={"cohorts": ["shenzhen"]},
        evaluation_summary={"auroc": 0.9},
    )
    manifest = load_manifest(package)
    assert [(m.file, m.architecture, m.fold, m.weights) for m in manifest.members] == [
        ("efficientnet_lite0_fold0.onnx", "efficientnet_lite0", 0, "imagenet"),
        ("extra.onnx", "tiny", None, "random"),
    ]
    assert manifest.data_summary == {"cohorts": ["shenzhen"]} and manifest.evaluation_summary["auroc"] == 0.9


def _export(tmp_path: Path, **overrides: object) -> Path:
    args: dict = {
        "members": [(build_model("tiny", 2), MemberInfo())],
        "out_dir": tmp_path / "pkg",
        "name": "t",
        "version": "1",
        "labels": LABELS,
        "spec": PreprocessSpec(size=32),
        "thresholds": {label: (0.5, "fixed") for label in LABELS},
    }
    args.update(overrides)
    members, out_dir = args.pop("members"), args.pop("out_dir")
    return export_package(members, out_dir, **args)  # type: ignore[arg-type]


def test_inconsistent_inputs_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing \['Effusion'\]"):
        _export(tmp_path, thresholds={"Tuberculosis": (0.5, "fixed")})
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        _export(tmp_path, thresholds={label: (1.5, "fixed") for label in LABELS})
    with pytest.raises(ValueError, match="1 outputs for 2 labels"):
        _export(tmp_path, members=[(build_model("tiny", 1), MemberInfo())])
    with pytest.raises(ValueError, match="distinct"):
        _export(tmp_path, members=[(build_model("tiny", 2), MemberInfo())] * 2)
    with pytest.raises(ValueError, match="architecture"):
        _export(tmp_path, members=[(build_model("tiny", 2), MemberInfo(architecture="resnet18"))])
    assert not (tmp_path / "pkg").exists()


def test_existing_package_is_replaced_only_when_asked(tmp_path: Path) -> None:
    first = _export(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        _export(tmp_path)
    _export(tmp_path, version="2", overwrite=True)
    assert load_manifest(first).version == "2"


def test_failed_parity_leaves_no_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> float:
        raise ExportError("differ by 1 (> 0.0001)")

    monkeypatch.setattr(export, "check_parity", fail)
    with pytest.raises(ExportError):
        _export(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_float16_weights_halve_the_member_and_keep_float32_compute(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lite = build_model("efficientnet_lite0", 1, weights="imagenet")
    common = {"labels": ["Tuberculosis"], "spec": PreprocessSpec(size=64)}
    common["thresholds"] = {"Tuberculosis": (0.5, "fixed")}
    fp32 = _export(tmp_path / "a", members=[(lite, MemberInfo(fold=0))], **common)
    fp16 = _export(tmp_path / "b", members=[(lite, MemberInfo(fold=0))], weights_dtype="float16", **common)
    name = "efficientnet_lite0_fold0.onnx"
    assert (fp16 / name).stat().st_size < 0.55 * (fp32 / name).stat().st_size
    graph = onnx.load(str(fp16 / name)).graph
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).numpy()
    want, got = (_session(p / name).run(None, {"image": x}) for p in (fp32, fp16))
    assert all(g.dtype == np.float32 for g in got)
    assert max(float(np.max(np.abs(w - g))) for w, g in zip(want, got, strict=True)) < export.FP16_PARITY_TOLERANCE
    record = load_manifest(fp16).evaluation_summary["onnx_export"]
    assert record["weights_dtype"] == "float16" and record["parity_tolerance"] == export.PARITY_TOLERANCE
    assert max(record["parity_max_abs_diff"].values()) <= export.PARITY_TOLERANCE  # float32 graph vs torch
    assert 0 < max(record["float16_storage_max_abs_diff"].values()) <= export.FP16_PARITY_TOLERANCE
    with pytest.raises(ValueError, match="weights_dtype"):
        _export(tmp_path / "c", weights_dtype="bfloat16")


def test_float16_storage_keeps_the_initializers_it_is_told_to(tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["y"]), helper.make_node("MatMul", ["y", "b"], ["z"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert export.store_weights_float16(path, keep={"b"}) == 1
    stored = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert stored == {"a_fp16": onnx.TensorProto.FLOAT16, "b": onnx.TensorProto.FLOAT}
    x = rng.standard_normal((1, 16)).astype(np.float32)
    (z,) = _session(path).run(None, {"x": x})
    np.testing.assert_allclose(z, x @ a.astype(np.float16).astype(np.float32) @ b, rtol=1e-5, atol=1e-5)


def test_int8_last_stage_stores_the_fine_tuned_layers_as_int8_and_the_rest_as_float16(tmp_path: Path) -> None:
    from onnx import numpy_helper

    from training.models import backbone_stages

    torch.manual_seed(0)
    tiny = build_model("tiny", 2, size=64)
    common = {"labels": ["Tuberculosis", "Effusion"], "spec": PreprocessSpec(size=64),
              "thresholds": {"Tuberculosis": (0.5, "fixed"), "Effusion": (0.5, "fixed")}}
    fp32 = _export(tmp_path / "a", members=[(tiny, MemberInfo(fold=0))], **common)
    int8 = _export(tmp_path / "b", members=[(tiny, MemberInfo(fold=0))], weights_dtype="int8-last-stage", **common)
    name = "tiny_fold0.onnx"
    graph = onnx.load(str(int8 / name)).graph
    inits = {i.name: i for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    int8_nodes = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dequantized]
    # the last stage's convolutions and the head's Gemm, found by their module scope, and nothing else
    last_stage_convs = sum(isinstance(m, torch.nn.Conv2d) for m in dict(tiny.backbone.body.named_modules()).values()
                           if any(p is q for p in m.parameters(recurse=False) for q in backbone_stages(tiny)[-1][1]))
    assert len(int8_nodes) == last_stage_convs + 1 and last_stage_convs >= 1
    assert {n.op_type for n in int8_nodes} == {"Conv", "Gemm"}
    for node in int8_nodes:
        assert inits[f"{node.input[1]}_int8"].data_type == onnx.TensorProto.INT8
        assert inits[f"{node.input[1]}_scale"].data_type == onnx.TensorProto.FLOAT  # the scales stay float32
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)  # the earlier layers
    assert max(int(np.max(np.abs(numpy_helper.to_array(inits[f"{n.input[1]}_int8"])))) for n in int8_nodes) == 127
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).numpy()
    want, got = (_session(p / name).run(None, {"image": x}) for p in (fp32, int8))
    changed = max(float(np.max(np.abs(w - g))) for w, g in zip(want, got, strict=True))
    assert 0 < changed <= export.INT8_PARITY_TOLERANCE
    record = load_manifest(int8).evaluation_summary["onnx_export"]
    assert record["weights_dtype"] == "int8-last-stage"
    assert 0 < record["int8_storage_max_abs_diff"][name] <= record["int8_storage_tolerance"]


def test_int8_storage_per_output_channel_and_a_shared_weight_once(tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    w, v = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="plain"),  # B is [in, out]: per column
         helper.make_node("Gemm", ["y", "v"], ["z"], name="transposed", transB=1),  # B is [out, in]: per row
         helper.make_node("Gemm", ["x", "w"], ["y2"], name="shared")],  # the same weight as "plain"
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert export.store_weights_int8(path, {"plain", "transposed", "shared"}) == ["w_scale", "v_scale"]
    onnx.checker.check_model(str(path))
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    np.testing.assert_allclose(stored["w_scale"], np.abs(w).max(axis=0) / 127, rtol=1e-6)  # one per output column
    np.testing.assert_allclose(stored["v_scale"], np.abs(v).max(axis=1) / 127, rtol=1e-6)  # one per output row
    x = rng.standard_normal((2, 8)).astype(np.float32)
    z, y2 = _session(path).run(None, {"x": x})
    np.testing.assert_allclose(y2, x @ w, atol=0.05)
    np.testing.assert_allclose(z, x @ w @ v.T, atol=0.1)


def test_module_paths_of_exported_nodes() -> None:
    assert export.onnx_module_path("/backbone/blocks/blocks.5/blocks.5.0/conv_pw/Conv") == "backbone.blocks.5.0.conv_pw"
    assert export.onnx_module_path("/backbone/conv_head/Conv") == "backbone.conv_head"
    assert export.onnx_module_path("/head/Gemm") == "head" and export.onnx_module_path("/Einsum") == ""


def test_export_leaves_the_model_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 1, drop_rate=0.5).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    export.export_member(model, tmp_path / "m.onnx", 64)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), before)  # dropout and BatchNorm still in inference behaviour


def test_a_member_must_be_the_graph_that_scored_its_oof_images(tmp_path: Path) -> None:
    """``expected_sha256`` (the graphs that scored the OOF images the thresholds come from): a member whose export
    differs is refused before anything is published, and the map must name every exported member."""
    torch.manual_seed(0)
    members = [(build_model("tiny", 2), MemberInfo(fold=0)), (build_model("tiny", 2), MemberInfo(fold=1))]
    good = _export(tmp_path / "good", members=members)
    digests = {m.file: m.sha256 for m in load_manifest(good).members}
    assert load_manifest(_export(tmp_path / "same", members=members, expected_sha256=digests)).members == \
        load_manifest(good).members
    with pytest.raises(ExportError, match=r"tiny_fold1\.onnx: sha256 .* differs from that of the graph that scored"):
        _export(tmp_path / "other", members=members, expected_sha256={**digests, "tiny_fold1.onnx": "0" * 64})
    with pytest.raises(ValueError, match="every exported member must be the graph that scored"):
        _export(tmp_path / "partial", members=members, expected_sha256={"tiny_fold0.onnx": digests["tiny_fold0.onnx"]})
    assert not (tmp_path / "other" / "pkg").exists() and not (tmp_path / "partial" / "pkg").exists()
