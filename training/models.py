"""Model step: `CxrNet`, a registered backbone with a GAP + linear head and exact CAM; its weights and stages.

`build_model` makes a `CxrNet` from a registered name (`training.architectures`, whose names stay importable
from here), random-initialised or from local weights (never downloaded). A `CxrNet` takes float images in
[0, 1] and normalises them itself, so the exported ONNX graph carries its normalisation (docs/contracts.md).

The head is global average pooling -> dropout -> linear. Because the head is linear after a mean,
the class activation map (the head applied at every position of the last feature map, plus the bias)
has a spatial mean equal to the logits: CAM needs no hooks (DESIGN.md, "Known traps").

``head = "cbam"`` is the seed study's NIH head instead (`CbamHead`): CBAM channel and spatial attention on the
feature map, global average pooling, dense 128 and 64 (ReLU, dropout), linear. Its map is the same dense stack
applied at every attended position: it shows where, but its spatial mean is not the logit (the stack is not
linear).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.architectures import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_PACKAGES,
    ArchSpec,
    ConvNeXtFeatureMap,
    FeatureMap,
    MobileNetV3FeatureMap,
    TinyNet,
    TorchvisionShuffleNetFeatureMap,
    VitFeatureMap,
    WeightsError,
    lite_checkpoint_path,
    lite_imagenet_state_dict,
    map_state_dict_in_order,
    register,
)

__all__ = [
    "ARCHITECTURES",
    "HEADS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_PACKAGES",
    "ArchSpec",
    "CbamHead",
    "ConvNeXtFeatureMap",
    "CxrNet",
    "FeatureMap",
    "MobileNetV3FeatureMap",
    "TinyNet",
    "TorchvisionShuffleNetFeatureMap",
    "VitFeatureMap",
    "WeightsError",
    "backbone_stages",
    "build_model",
    "freeze_backbone",
    "keep_labels",
    "lite_checkpoint_path",
    "lite_imagenet_state_dict",
    "load_state_into",
    "load_weights",
    "map_state_dict_in_order",
    "read_state_dict",
    "register",
    "unfreeze_last_stages",
]

log = logging.getLogger(__name__)


HEADS = ("linear", "cbam")
"""Heads a ``CxrNet`` can have (run configuration ``head``)."""


class CbamHead(nn.Module):
    """The seed's NIH head: CBAM (Woo et al. 2018) -> GAP -> dense 128 -> dense 64 -> linear.

    Channel attention: a shared 1x1-conv MLP (reduction 16) on the average- and max-pooled map, summed, sigmoid.
    Spatial attention: a 7x7 convolution over the channel mean and max, sigmoid. Both multiply the map.
    """

    def __init__(self, channels: int, num_labels: int, drop_rate: float, reduction: int = 16,
                 hidden: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        squeezed = max(channels // reduction, 1)
        self.channel = nn.Sequential(nn.Conv2d(channels, squeezed, 1), nn.ReLU(), nn.Conv2d(squeezed, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.dense = nn.Sequential(
            nn.Linear(channels, hidden[0]), nn.ReLU(), nn.Dropout(drop_rate),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Dropout(drop_rate),
        )
        self.out = nn.Linear(hidden[1], num_labels)

    @property
    def out_features(self) -> int:
        return self.out.out_features

    def attend(self, fmap: torch.Tensor) -> torch.Tensor:
        """The feature map [N, C, h, w] weighted by channel, then spatial attention."""
        avg = torch.mean(fmap, dim=(2, 3), keepdim=True)
        peak = torch.amax(fmap, dim=(2, 3), keepdim=True)
        fmap = fmap * torch.sigmoid(self.channel(avg) + self.channel(peak))
        pooled = torch.cat([fmap.mean(1, keepdim=True), fmap.amax(1, keepdim=True)], dim=1)
        return fmap * torch.sigmoid(self.spatial(pooled))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Logits [N, L] of a feature map [N, C, h, w]."""
        return self.out(self.dense(self.attend(fmap).mean((2, 3))))

    def cam(self, fmap: torch.Tensor) -> torch.Tensor:
        """[N, L, h, w]: the dense stack and output layer at every attended position."""
        positions = self.attend(fmap).permute(0, 2, 3, 1)
        return self.out(self.dense(positions)).permute(0, 3, 1, 2)


class CxrNet(nn.Module):
    """Backbone feature map -> global average pool -> dropout -> linear, normalisation inside.

    Args:
        arch: the registered architecture.
        backbone: its `FeatureMap`.
        num_labels: outputs of the head (one logit per label).
        drop_rate: dropout before the head (active in training mode only); in the dense layers of a CBAM head.
        head: "linear" (GAP -> dropout -> linear, exact CAM) or "cbam" (`CbamHead`).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, arch: ArchSpec, backbone: FeatureMap, num_labels: int, drop_rate: float = 0.0,
                 head: str = "linear") -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
        self.arch = arch.name
        self.weights = "random"
        self.head_kind = head
        self.register_buffer("mean", torch.tensor(arch.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(arch.std).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        if head == "cbam":
            self.dropout = nn.Dropout(0.0)
            self.head: nn.Module = CbamHead(backbone.num_features, num_labels, drop_rate)
        else:
            self.dropout = nn.Dropout(drop_rate)
            self.head = nn.Linear(backbone.num_features, num_labels)

    @property
    def num_labels(self) -> int:
        head = self.head
        return head.out_features if isinstance(head, nn.Linear | CbamHead) else 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map [N, C, h, w] of images `x` [N, 3, S, S] in [0, 1]."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, L] of images `x` [N, 3, S, S] in [0, 1]."""
        if isinstance(self.head, CbamHead):
            return self.head(self.features(x))
        return self.head(self.dropout(self.features(x).mean((2, 3))))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N, L] and CAM [N, L, h, w]: the head at every position (linear head: cam.mean((2, 3)) ==
        logits)."""
        fmap = self.features(x)
        if isinstance(self.head, CbamHead):
            return self.head(fmap), self.head.cam(fmap)
        logits = self.head(self.dropout(fmap.mean((2, 3))))
        assert isinstance(self.head, nn.Linear)
        cam = torch.einsum("nchw,lc->nlhw", fmap, self.head.weight) + self.head.bias.view(1, -1, 1, 1)
        return logits, cam


def keep_labels(model: CxrNet, indices: Sequence[int]) -> CxrNet:
    """``model`` with only the outputs ``indices`` (in that order), its head's output layer sliced in place: the
    kept labels' logits and maps are exactly the full model's (a package may leave a label out)."""
    head = model.head
    layer = head.out if isinstance(head, CbamHead) else head
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"no output layer to slice in {type(head).__name__}")
    if not indices or len(set(indices)) != len(indices) or not all(0 <= i < layer.out_features for i in indices):
        raise ValueError(f"indices must be distinct outputs in 0..{layer.out_features - 1}, got {list(indices)}")
    kept = nn.Linear(layer.in_features, len(indices))
    with torch.no_grad():
        kept.weight.copy_(layer.weight[list(indices)])
        kept.bias.copy_(layer.bias[list(indices)])
    if isinstance(head, CbamHead):
        head.out = kept
    else:
        model.head = kept
    return model


def build_model(
    name: str,
    num_labels: int,
    weights: str | Path | None = None,
    *,
    size: int | None = None,
    drop_rate: float = 0.0,
    head: str = "linear",
    **kwargs: Any,
) -> CxrNet:
    """Build a registered architecture as a `CxrNet`.

    Args:
        name: a key of `ARCHITECTURES`.
        num_labels: number of labels (head outputs).
        weights: None (random initialisation), "imagenet" (only where the architecture ships offline
            ImageNet weights: efficientnet_lite0/1/2), or a local weights file (see `load_weights`).
        size: the input size the model will run at; ViT builds its position grid for it.
        drop_rate: dropout before the head (in a CBAM head's dense layers).
        head: "linear" or "cbam" (`HEADS`).
        **kwargs: passed to the network constructor (e.g. timm's `drop_path_rate`).

    Raises:
        KeyError: unknown architecture (the message lists the registered ones).
        WeightsError: weights unavailable or not fitting.
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    if size is not None and size % arch.size_multiple:
        raise ValueError(f"{name} needs a size that is a multiple of {arch.size_multiple}, got {size}")
    model = CxrNet(arch, arch.make(size=size, **kwargs), num_labels, drop_rate, head)
    if weights is None:
        return model
    if str(weights) == "imagenet":
        if arch.imagenet is None:
            with_weights = sorted(n for n, a in ARCHITECTURES.items() if a.imagenet is not None)
            raise WeightsError(f"no offline imagenet weights for {name}; available for {with_weights}")
        load_state_into(model, arch.imagenet(), source=f"imagenet ({LITE_PACKAGES.get(name, name)})")
        model.weights = "imagenet"
    else:
        load_weights(model, weights)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors`, or `.pth`/`.pt`/`.bin` (a state dict or a checkpoint).

    A checkpoint's weights are taken from its 'state_dict', 'model' or 'model_state_dict' entry;
    'module.' (DataParallel) and '_orig_mod.' (torch.compile) prefixes are stripped.

    Raises:
        WeightsError: missing or unreadable file, or no tensors found.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) else {}
    if not tensors:
        raise WeightsError(f"no tensors found in {path} (expected a state dict or a checkpoint with one)")
    return {_strip_prefixes(k): v for k, v in tensors.items()}


def _strip_prefixes(key: str) -> str:
    """Drop leading 'module.' / '_orig_mod.' wrappers from a parameter name."""
    while True:
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def load_weights(model: CxrNet, path: str | Path) -> None:
    """Load a local weights file into `model` (backbone strictly; head if it fits).

    The file may hold a `CxrNet` state dict (keys 'backbone.body.*', 'head.*') or the original network's
    (timm/torchvision names, e.g. an ImageNet checkpoint). The original classifier is dropped and the
    head is re-initialised unless the file has a `CxrNet` head of the same shape.

    Raises:
        WeightsError: the file cannot be read, or the backbone keys or shapes do not match.
    """
    load_state_into(model, read_state_dict(path), source=str(path))
    model.weights = str(path)


def load_state_into(model: CxrNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` (a `CxrNet` or an original-network state dict) into `model`; see `load_weights`.

    Raises:
        WeightsError: missing, unexpected or mis-shaped backbone keys (named, with `source`).
    """
    arch = ARCHITECTURES[model.arch]
    state = dict(state)
    head: dict[str, torch.Tensor] = {}
    if any(k.startswith("backbone.body.") for k in state):
        head = {k.removeprefix("head."): state.pop(k) for k in list(state) if k.startswith("head.")}
        state = {k.removeprefix("backbone.body."): v for k, v in state.items()}
    else:
        dropped = [k for k in state if k == arch.classifier or k.startswith(arch.classifier + ".")]
        for key in dropped:
            del state[key]
        if dropped:
            log.info("%s: dropped the original classifier (%s) from %s", model.arch, ", ".join(dropped), source)
    body = model.backbone.body
    _resample_pos_embed(body, state)
    _load_strict(body, state, source)
    own = model.head.state_dict()
    if head and head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
        model.head.load_state_dict(head)
        log.info("%s: loaded backbone and head from %s", model.arch, source)
    else:
        log.info(
            "%s: loaded backbone from %s; head (%d labels) newly initialised",
            model.arch,
            source,
            model.num_labels,
        )


def _resample_pos_embed(body: Any, state: dict[str, torch.Tensor]) -> None:
    """ViT: interpolate a checkpoint's position embedding onto this model's grid (in place)."""
    target = getattr(body, "pos_embed", None)
    if target is None or "pos_embed" not in state or state["pos_embed"].shape == target.shape:
        return
    from timm.layers import resample_abs_pos_embed

    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=list(body.patch_embed.grid_size),
        num_prefix_tokens=body.num_prefix_tokens,
    )


def _load_strict(body: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """`load_state_dict` that names every missing, unexpected or mis-shaped key in its error.

    Only BatchNorm's `num_batches_tracked` counters may be missing (older checkpoints lack them).
    """
    own = body.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"weights in {source} do not fit the backbone: {len(missing)} missing {missing[:8]}, "
            f"{len(unexpected)} unexpected {unexpected[:8]}, {len(shapes)} shape mismatches {shapes[:4]}"
        )
    body.load_state_dict(state, strict=False)


def backbone_stages(model: CxrNet) -> list[tuple[str, list[nn.Parameter]]]:
    """The backbone's parameters by stage, input to output, as (module name, parameters).

    Stages end at the network's feature-pyramid modules (timm `feature_info`: one per stride for
    CNNs, one per block for ViT); parameters after the last of them (EfficientNet's conv_head,
    ConvNeXt's head norm, ViT's final norm, ...) belong to the last stage.
    """
    body = model.backbone.body
    ends = _stage_modules(body)
    names = [n for n, _ in body.named_modules()]
    order = {n: i for i, n in enumerate(names)}
    last_desc = [max(order[n] for n in names if n == e or n.startswith(e + ".")) for e in ends]
    stages: list[tuple[str, list[nn.Parameter]]] = [(e, []) for e in ends]
    for pname, param in body.named_parameters():
        owner = order[pname.rpartition(".")[0]]
        index = next((i for i, end in enumerate(last_desc) if owner <= end), len(ends) - 1)
        stages[index][1].append(param)
    return stages


def _stage_modules(body: nn.Module) -> list[str]:
    """Names of the modules that end each stage (timm `feature_info`, else known torchvision/tiny names)."""
    if isinstance(body, TinyNet):
        return ["stem", "stage1", "stage2"]
    info = getattr(body, "feature_info", None)
    if info:
        return [d["module"] for d in info]
    if all(hasattr(body, n) for n in ("conv1", "stage2", "stage3", "stage4")):
        return ["conv1", "stage2", "stage3", "stage4"]
    raise ValueError(f"no stage layout known for {type(body).__name__}")


def freeze_backbone(model: CxrNet) -> None:
    """Stop gradients to every backbone parameter; the head stays trainable."""
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    for param in model.head.parameters():
        param.requires_grad_(True)


def unfreeze_last_stages(model: CxrNet, n: int) -> list[nn.Parameter]:
    """Let gradients reach the last `n` backbone stages (after `freeze_backbone`); returns their parameters,
    input to output. Stages as :func:`backbone_stages` cuts them (EfficientNet-Lite0: ``n = 2`` is stride 16
    and 32, ``blocks.3``-``blocks.6`` and ``conv_head``)."""
    stages = backbone_stages(model)
    if not 1 <= n <= len(stages):
        raise ValueError(f"cannot unfreeze {n} stages: the backbone has {len(stages)}")
    params = [p for _, stage in stages[-n:] for p in stage]
    for param in params:
        param.requires_grad_(True)
    return params

