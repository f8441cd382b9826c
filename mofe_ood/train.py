"""Stage `train`: heads on the cached frozen features, one folder per variant.

Variants (`train.variants`, mofe_ood/variants.py): on the pooled frozen features
`linear`, `mlp`, `mofe` and `mofe_dynmix` (MLP experts, ours); on the cached trunk
activations (extract.top_blocks) `top` (the backbone's top fine-tuned, no experts),
`mofe_block` and `mofe_block_dynmix` (the paper's MoFE: copies of the top as
experts, + Dynamic-β Mixup: the method; in phases, both start phase 2 from `top`,
trained once per seed, as the paper's experts start from its fine-tuned baseline;
`top` is trained even when not listed); with `finetune.enabled`
also the fine-tuned MoFE on images (training/finetuning.py), as
`finetune.variant`, after the heads. The training itself is the library's
(mofe_ood/training/); this module reads params and folders and writes outputs.

Output per variant, `<models_dir>/<variant>/`:
- `model.safetensors`: the weights (no pickle anywhere, checkpoints included);
- `config.json`: architecture (enough for `variants.load_head`), class names, class
  groups, the params used, the final ID validation accuracy;
- `history.csv`: one row per epoch (DVC plot data): epoch, phase, loss, lr,
  ID val accuracy, the mixup alpha of every class in use.
and for each of `train.seeds` (other seeds than base.seed, ours: mean ± sd in
results.md) the same under `<models_dir>/<variant>/seeds/<seed>/`;
plus `<models_dir>/metrics.json` (per variant: final val accuracy, epochs; no timings: DVC
tracks the folder, and its hash must be the same on every machine. Timings go to the log).

Deterministic: every epoch draws its shuffle, mixup and dropout from generators
seeded by (base.seed, phase, epoch), so a run resumed from a checkpoint
(`train.checkpoint_dir`, written after every epoch) continues exactly as an
uninterrupted one.

Data-parallel (training/distributed.py): with `train.gpus` > 1 on a machine with
CUDA, or `train.processes` > 1 (on a CPU-only machine: gloo processes), `run`
relaunches this module under torchrun (`python -m mofe_ood.train PARAMS_JSON
FEATURES MODELS PREPARED LOG_LEVEL`), one process per GPU; the weights equal one
process's up to float rounding. Rank 0 writes the outputs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mofe_ood.atomic import replacing
from mofe_ood.backbones import is_vit, preprocess_config
from mofe_ood.config import as_dict, base
from mofe_ood.params import ParamError
from mofe_ood.training import distributed, finetuning
from mofe_ood.splits import load_features, load_trunk
from mofe_ood.training.data import load_data, load_trunk_data
from mofe_ood.training.head_training import TOP, train_sharing_phase_one
from mofe_ood.training.history import history_markdown, write_history
from mofe_ood.training.settings import TrainConfig, finetune_config, train_config
from mofe_ood.variants import (TRUNK_VARIANTS, VARIANTS, FinetunedMoFE, frozen_backbone, save_image_model,
                               save_weights, trained_variants, write_config)

__all__ = ["config", "run", "history_markdown"]
log = logging.getLogger(__name__)


def config(params: dict) -> TrainConfig:
    """The `train` section, checked (before any data is read or any training)."""
    return train_config(params)


def _check(params: dict) -> tuple[TrainConfig, bool]:
    cfg = config(params)
    finetune = finetune_config(params).enabled  # a bad finetune section fails here, before any training
    trained_variants(params)  # as does a finetune.variant named like a head variant
    if finetune and not is_vit(str(params["extract"]["backbone"])):
        raise ParamError(f"finetune.enabled: fine-tuning with block experts needs a DINOv2 "
                         f"extract.backbone, not {params['extract']['backbone']!r}")
    return cfg, finetune


def run(params: dict, features_dir: str | Path = "data/features", models_dir: str | Path = "models",
        prepared_dir: str | Path = "data/prepared") -> dict:
    """Train every variant of `train.variants` (and the fine-tuned one); `models_dir` is replaced in one
    move at the end. More than one process: relaunch under torchrun and return rank 0's summary."""
    cfg, finetune = _check(params)
    seed = base(params).seed
    if seed in cfg.seeds:
        raise ParamError(f"train.seeds: {cfg.seeds!r} repeats base.seed {seed} (list only the other seeds)")
    features_dir, models_dir = Path(features_dir), Path(models_dir)
    info = json.loads((features_dir / "info.json").read_text())
    if any(VARIANTS[v].routed for v in cfg.variants):
        cfg.mofe.check_data(len(info["classes"]))
    processes = distributed.processes(cfg.gpus, cfg.processes)
    if processes > 1 and not distributed.under_torchrun():
        _launch(processes, params, features_dir, models_dir, prepared_dir)
        return json.loads((models_dir / "metrics.json").read_text())
    world = distributed.init()
    if world.distributed:
        log.info("train: rank %d of %d on %s", world.rank, world.size, world.device)
    data = load_data(features_dir)
    trunk, backbone, backbone_spec = None, None, None
    if any(VARIANTS[v].trunk for v in cfg.variants):
        trunk, backbone, backbone_spec = _trunk_inputs(features_dir, info, params)
    summary = {}
    with replacing(models_dir, enabled=world.main) as tmp:
        with torch.random.fork_rng(devices=[]):
            threads = torch.get_num_threads()
            try:
                if cfg.num_threads:
                    torch.set_num_threads(cfg.num_threads)
                phase_one = {}  # seed -> `top`, phase 1 of the routed trunk variants: trained once
                for variant in cfg.variants:
                    # base.seed's model is the variant's; each of train.seeds adds one under seeds/<seed>/
                    for run_seed in (seed, *cfg.seeds):
                        where = _where(variant, run_seed, seed)
                        ckpt_dir = functools.partial(_checkpoint_dir, cfg.checkpoint_dir, run_seed, seed)
                        start = time.perf_counter()
                        model, arch, history = train_sharing_phase_one(
                            variant, cfg, data, run_seed, ckpt_dir, phase_one, world=world, trunk=trunk,
                            backbone=backbone, backbone_spec=backbone_spec)
                        if world.main and VARIANTS[variant].trunk:
                            _write_trunk_variant(tmp / where, variant, model, backbone, history, cfg, run_seed,
                                                 features_dir, info)
                        elif world.main:
                            _write_variant(tmp / where, variant, model, arch, history, cfg, run_seed, data, info)
                        if run_seed == seed:
                            summary[variant] = {"val_accuracy": history[-1]["val_accuracy"], "epochs": len(history)}
                        log.info("train %s (seed %d): %.1f s", variant, run_seed, time.perf_counter() - start)
            finally:
                torch.set_num_threads(threads)
        if world.main and finetune:
            summary.update(finetuning.run(params, prepared_dir, tmp))
        if world.main:
            (tmp / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if world.main and cfg.checkpoint_dir:  # finished: the checkpoints have served
        for variant in {*cfg.variants, TOP}:  # (seeds/ of train.seeds lie inside each variant's folder)
            shutil.rmtree(Path(cfg.checkpoint_dir) / variant, ignore_errors=True)
    world.barrier()  # the other ranks leave once rank 0 has written
    distributed.shutdown(world)
    return summary


def _where(variant: str, run_seed: int, seed: int) -> str:
    """A variant's folder under models/ (and checkpoint_dir/): base.seed's, or seeds/<seed>/ in it."""
    return variant if run_seed == seed else f"{variant}/seeds/{run_seed}"


def _checkpoint_dir(root: str | None, run_seed: int, seed: int, variant: str) -> Path | None:
    return Path(root) / _where(variant, run_seed, seed) if root else None


def _write_variant(out: Path, variant: str, model, arch: dict, history: list[dict], cfg: TrainConfig,
                   seed: int, data, info: dict) -> None:
    out.mkdir(parents=True)
    save_weights(out / "model.safetensors", model)
    write_config(out, {"variant": variant, "architecture": arch, "classes": data.classes,
                       "groups": arch.get("groups"),
                       "features": {k: info.get(k) for k in ("backbone", "weights", "image_size", "feature_dim")},
                       "params": {"seed": seed, "train": as_dict(cfg)},
                       "val_accuracy": history[-1]["val_accuracy"] if history else None})
    write_history(out / "history.csv", history)


def _trunk_inputs(features_dir: Path, info: dict, params: dict):
    """What the trunk variants train on: the cached trunk, the frozen backbone their experts copy."""
    top = info.get("trunk")
    if not top:
        raise ParamError(f"train.variants: {', '.join(TRUNK_VARIANTS)} read the trunk activations, but "
                         f"{features_dir} has none: set extract.top_blocks >= 1 and run extract again")
    backbone = frozen_backbone(info["backbone"], str(info["weights"]), int(info["image_size"]), base(params).seed)
    spec = {"backbone": info["backbone"], "image_size": int(info["image_size"]), "top_blocks": int(top["top_blocks"])}
    return load_trunk_data(features_dir, load_data(features_dir)), backbone.eval(), spec


@torch.inference_mode()
def _write_trunk_variant(out: Path, variant: str, model, backbone, history: list[dict], cfg: TrainConfig,
                         seed: int, features_dir: Path, info: dict) -> None:
    """A trunk variant as an image model (variants.save_image_model): the frozen backbone's trunk + the
    trained MoFE, and its routed features of every split, computed from the cached trunk."""
    def split_features():
        for split in info["splits"]:
            x, labels = load_trunk(features_dir, split), load_features(features_dir, split)[1]
            feats = [model(torch.from_numpy(x[i:i + 1024].astype(np.float32)))["feature"].numpy()
                     for i in range(0, len(x), 1024)]
            yield split, np.concatenate(feats) if feats else np.zeros((0, model.dim), np.float32), labels

    out.mkdir(parents=True)
    prep = preprocess_config(backbone, int(info["image_size"]))
    save_image_model(out, variant, FinetunedMoFE(backbone, model.eval()), split_features(), info["splits"],
                     list(info["classes"]),
                     {"backbone": info["backbone"], "weights": info["weights"], "image_size": info["image_size"],
                      "mean": prep.mean, "std": prep.std, "backbone_kwargs": {}},
                     {"seed": seed, "train": as_dict(cfg), "top_blocks": info["trunk"]["top_blocks"]}, history)
    write_history(out / "history.csv", history)


def _launch(processes: int, params: dict, features_dir: Path, models_dir: Path, prepared_dir) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.json"
        params_file.write_text(json.dumps(params))
        args = [params_file, features_dir, models_dir, prepared_dir, logging.getLogger().getEffectiveLevel()]
        distributed.launch(processes, "mofe_ood.train", [str(a) for a in args])


def worker(argv: list[str]) -> None:
    """One data-parallel process: PARAMS_JSON FEATURES_DIR MODELS_DIR PREPARED_DIR LOG_LEVEL (rank 0 logs)."""
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=int(argv[4]) if rank0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    run(json.loads(Path(argv[0]).read_text()), argv[1], argv[2], argv[3])


if __name__ == "__main__":
    worker(sys.argv[1:])
