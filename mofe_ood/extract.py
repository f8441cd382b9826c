"""Stage `extract`: frozen-backbone features for every prepared split.

Output (the interface users feed to their own tools, format of mofe_ood.splits):
`data/features/<split>.npz` with `features` (N x D float32) and `labels` (N int64,
-1 for OOD), for the splits `train`, `val`, `test` and one per OOD set, plus
`info.json` (backbone, image size, feature dim, class names, split kinds and groups).
With `extract.top_blocks` = N > 0 each npz also holds `trunk` (float16): the activations
entering the backbone's last N blocks (EfficientNet-Lite0 at 128 px, N = 1: blocks[5]'s
output, 192 x 4 x 4), from the same pass; the block-expert variants of `train` read them.

Runtime (`extract.runtime`, ours): on the CPU the pass runs on ONNX Runtime, the same checked
export a served bundle runs (mofe_ood/onnx_runtime.py), about 2x eager torch's speed; exported
once per stage run and checked against torch first (features and trunk within 1e-4 of their
largest value). On CUDA, or with `extract.runtime: torch`, torch runs it.

Scale-out (the Kubeflow pipeline): `run_shard` featurises one contiguous run of
whole batches of every split, `merge_shards` concatenates them into the same
layout: every image is computed in the same batch as by `run`, so the merged
arrays equal `run`'s (tests/test_pipeline.py).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from mofe_ood import atomic, onnx_runtime
from mofe_ood.backbones import (DEVICES, Preprocess, check, check_top_blocks, create_backbone,
                                features_and_trunk_of, for_inference, preprocess_config, torch_device)
from mofe_ood.config import base, section
from mofe_ood.params import ParamError, check_choice, check_number
from mofe_ood.splits import DataError, Images, load_features, load_split, load_trunk


RUNTIMES = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class Extract:
    """The `extract` section (params.yaml documents every key)."""

    backbone: str
    weights: str
    image_size: int
    batch_size: int
    num_threads: int | None
    shards: int
    device: str
    gpus: int
    top_blocks: int  # also cache the activations entering the backbone's last N blocks/stages (0: none)
    runtime: str  # auto | onnxruntime | torch: what runs the backbone's pass

    def __post_init__(self):
        if not isinstance(self.weights, str):
            raise ParamError(f"extract.weights: {self.weights!r} is not 'package', 'hub', 'random' or a file path")
        check(self.backbone, self.weights, self.image_size)
        check_number("extract.batch_size", self.batch_size, low=1, integer=True)
        check_number("extract.num_threads", self.num_threads, low=1, integer=True, allow_none=True)
        check_number("extract.shards", self.shards, low=1, integer=True)
        # A choice here; whether CUDA is there, when the stage runs (validate may run elsewhere).
        check_choice("extract.device", self.device, DEVICES)
        check_number("extract.gpus", self.gpus, low=0, integer=True)  # the pod's; the device is extract.device
        check_number("extract.top_blocks", self.top_blocks, low=0, integer=True)  # the upper bound: backbones
        check_choice("extract.runtime", self.runtime, RUNTIMES)


def config(params: Mapping) -> Extract:
    """The `extract` section, every value checked (mofe validate calls this too)."""
    return section(Extract, params.get("extract"), "extract")


def backbone(cfg: Extract) -> tuple[torch.nn.Module, Preprocess]:
    """The backbone, ready for inference on `extract.device`, and what its input must look like."""
    device = torch_device("extract.device", cfg.device)
    if device.type == "cuda":
        # Float32 convolutions, not TF32 (cuDNN's default): GPU features then equal the CPU's up
        # to rounding, as `mofe score` (on the CPU) must reproduce evaluate's numbers.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = create_backbone(cfg.backbone, cfg.weights, cfg.image_size, num_classes=0)
    return for_inference(model.to(device), cfg.image_size), preprocess_config(model, cfg.image_size)


def runtime_of(cfg: Extract, device: torch.device) -> str:
    """`extract.runtime` resolved: auto is onnxruntime on the CPU where its packages are installed, else torch."""
    if cfg.runtime == "torch" or (cfg.runtime == "auto" and (device.type != "cpu" or not onnx_runtime.available())):
        return "torch"
    if device.type != "cpu":
        raise ParamError(f"extract.runtime: onnxruntime runs on the CPU, but extract.device {cfg.device!r} "
                         f"gives {device.type}; set extract.device: cpu, or extract.runtime: auto or torch")
    for package in onnx_runtime.PACKAGES:
        onnx_runtime.need(package, "extract.runtime")
    return "onnxruntime"


def forward(cfg: Extract, model: torch.nn.Module, image_size: int):
    """The pass `features_and_trunk_of` runs: None (torch's own) or the ONNX Runtime session's.

    The session has `extract.num_threads` (else torch's count) threads, fixed: the same
    arrays run to run (and the same for any count: tests/test_extract_onnx.py).
    """
    if runtime_of(cfg, next(model.parameters()).device) == "torch":
        return None
    graph = onnx_runtime.export(model, image_size, cfg.top_blocks, param="extract.runtime")
    session = onnx_runtime.Session(graph, threads=cfg.num_threads, param="extract.runtime")

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = session.outputs(x)
        return outputs[0], (outputs[1] if cfg.top_blocks else None)

    return run


@contextmanager
def torch_threads_beside(run_pass):
    """With ONNX Runtime's pass (`forward` not None), torch keeps one thread while inside: it only
    preprocesses then, and its idle OpenMP workers would spin-wait beside ONNX Runtime's pass
    (158 vs 122 images/s on 2 busy cores). Torch's count comes back on leaving."""
    before = torch.get_num_threads()
    if run_pass is not None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def featurise(cfg: Extract, model: torch.nn.Module, prep: Preprocess, run_pass, images: Images,
              rows: range | None = None, desc: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """`features_and_trunk_of` the `rows` of `images` with `run_pass` (`forward`'s), as the stage runs it."""
    with torch_threads_beside(run_pass):
        return features_and_trunk_of(model, images, prep, cfg.batch_size, desc=desc, rows=rows,
                                     top_blocks=cfg.top_blocks, forward=run_pass, channels_last=run_pass is None)


def load_model(params: Mapping) -> tuple[torch.nn.Module, Preprocess]:
    """`backbone` of the params' extract section (the benchmarks' entry)."""
    return backbone(config(params))


def configure_threads(params: Mapping) -> None:
    threads = config(params).num_threads
    if threads:
        torch.set_num_threads(threads)


def run(params: dict, prepared_dir: str | Path = "data/prepared",
        out_dir: str | Path = "data/features") -> dict:
    """Featurise every split of the manifest; `out_dir` is replaced in one move at the end."""
    return _extract(params, prepared_dir, out_dir, shard=None)


def shard_count(params: Mapping) -> int:
    """`extract.shards`: how many workers featurise the splits side by side (Kubeflow)."""
    return config(params).shards


def shard_rows(count: int, index: int, shards: int, batch_size: int = 1) -> range:
    """The rows of shard `index`: batches [index*B/shards, (index+1)*B/shards) of the B batches.

    Whole batches, not rows [index*count/shards, ...): a backbone's output for an image can
    differ in the last bits with the batch around it (oneDNN picks other kernels for a
    batch of 1), so shards batch exactly like `run` does to give the same arrays.
    """
    batches = -(-count // batch_size)
    start, stop = (min(i * batches // shards * batch_size, count) for i in (index, index + 1))
    return range(start, stop)


def run_shard(params: dict, prepared_dir: str | Path, out_dir: str | Path, index: int) -> dict:
    """Shard `index` of `extract.shards`: the same layout as `run`, for `shard_rows` of every split.

    Its info.json adds `shard` (index, shards, rows per split); `merge_shards` joins the shards
    back into exactly what `run` writes.
    """
    shards = shard_count(params)
    check_number("extract shard index", index, low=0, high=shards - 1, integer=True)
    return _extract(params, prepared_dir, out_dir, shard=(index, shards))


def _extract(params: dict, prepared_dir: str | Path, out_dir: str | Path,
             shard: tuple[int, int] | None) -> dict:
    cfg = config(params)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(base(params).seed)
    model, prep = backbone(cfg)
    if cfg.top_blocks:
        check_top_blocks(model, cfg.top_blocks)
    run_pass = forward(cfg, model, prep.image_size)
    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())

    with atomic.replacing(out_dir) as tmp:
        rows_of, trunk_shape = {}, None
        for name in manifest["splits"]:
            images = load_split(prepared_dir, name)
            rows = shard_rows(len(images), *shard, cfg.batch_size) if shard else range(len(images))
            feats, trunk = featurise(cfg, model, prep, run_pass, images, rows, desc=name)
            arrays = {"features": feats, "labels": images.labels[rows.start:rows.stop].astype(np.int64)}
            if trunk is not None:
                arrays["trunk"] = trunk
                trunk_shape = list(trunk.shape[1:]) if len(trunk) else trunk_shape
            np.savez(tmp / f"{name}.npz", **arrays)
            rows_of[name] = [rows.start, rows.stop]
        info = {
            "backbone": cfg.backbone, "weights": cfg.weights, "image_size": prep.image_size,
            "feature_dim": int(model.num_features), "classes": manifest["classes"],
            "splits": {name: {"kind": s["kind"], "group": s["group"], "count": s["count"]}
                       for name, s in manifest["splits"].items()},
        }
        if cfg.top_blocks:
            info["trunk"] = {"top_blocks": cfg.top_blocks, "shape": trunk_shape, "dtype": "float16"}
        if shard:
            info["shard"] = {"index": shard[0], "shards": shard[1], "rows": rows_of}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def merge_shards(shard_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Concatenate the folders written by `run_shard` (in any order) into `run`'s layout in `out_dir`."""
    shards = sorted(((Path(d), json.loads((Path(d) / "info.json").read_text())) for d in shard_dirs),
                    key=lambda item: item[1].get("shard", {}).get("index", -1))
    found = [(info.get("shard") or {}).get("index") for _, info in shards]
    of = sorted({(info.get("shard") or {}).get("shards") for _, info in shards}, key=str)
    if not shards:
        raise DataError("no shard folders to merge")
    if found != list(range(len(shards))) or of != [len(shards)]:
        raise DataError(f"expected all shards 0..{len(shards) - 1} of one extraction, each once; "
                        f"got shards {found} of {of}")
    merged = {k: v for k, v in shards[0][1].items() if k != "shard"}
    for d, info in shards[1:]:
        if {k: v for k, v in info.items() if k != "shard"} != merged:
            raise DataError(f"{d}: a shard of another extraction (backbone, classes or splits differ)")

    with atomic.replacing(out_dir) as tmp:
        for name, split in merged["splits"].items():
            rows = [info["shard"]["rows"][name] for _, info in shards]
            ends = [0] + [stop for _, stop in rows]
            if [start for start, _ in rows] != ends[:-1] or ends[-1] != split["count"]:
                raise DataError(f"split {name!r}: shard rows {rows} do not tile 0..{split['count']}")
            parts = [load_features(d, name) for d, _ in shards]
            arrays = {"features": np.concatenate([f for f, _ in parts]),
                      "labels": np.concatenate([labels for _, labels in parts])}
            if merged.get("trunk"):
                # A shard with no rows of this split stores its trunk as shape (0,): it has no
                # activations to take the shape from, so only the non-empty parts are joined.
                trunks = [load_trunk(d, name) for (d, _), (start, stop) in zip(shards, rows, strict=True)
                          if stop > start]
                arrays["trunk"] = np.concatenate(trunks) if trunks else load_trunk(shards[0][0], name)
            np.savez(tmp / f"{name}.npz", **arrays)
        (tmp / "info.json").write_text(json.dumps(merged, indent=2) + "\n")
    return merged
