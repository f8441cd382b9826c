"""Stage `train`: heads on the cached frozen features, one folder per variant.

Variants (`train.variants`, training/heads.py): `linear`, `mlp`, `mofe` and
`mofe_dynmix` (MoFE + Dynamic-β Mixup: the method); with `finetune.enabled`
also the fine-tuned MoFE on images (training/finetuning.py), as
`finetune.variant`, after the heads. The training itself is the library's
(mofe_ood/training/); this module reads params and folders and writes outputs.

Output per variant, `<models_dir>/<variant>/`:
- `model.safetensors`: the weights (no pickle anywhere, checkpoints included);
- `config.json`: architecture (enough for `heads.load_model`), class names, class
  groups, the params used, the final ID validation accuracy;
- `history.csv`: one row per epoch (DVC plot data): epoch, phase, loss, lr,
  ID val accuracy, the mixup alpha of every class in use.
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

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mofe_ood.atomic import replacing
from mofe_ood.backbones import is_vit
from mofe_ood.config import as_dict, base
from mofe_ood.params import ParamError
from mofe_ood.training import distributed, finetuning
from mofe_ood.training.data import load_data
from mofe_ood.training.head_training import train_variant
from mofe_ood.training.heads import save_weights, trained_variants, write_config
from mofe_ood.training.history import history_markdown, write_history
from mofe_ood.training.settings import TrainConfig, finetune_config, train_config

__all__ = ["config", "run", "history_markdown"]
log = logging.getLogger(__name__)


def config(params: dict) -> TrainConfig:
    """The `train` section, checked (before any data is read or any training)."""
    return train_config(params)


def _check(params: dict) -> tuple[TrainConfig, bool]:
    cfg = config(params)
    trained_variants(params)  # a bad finetune section fails here, before any training
    finetune = finetune_config(params).enabled
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
    features_dir, models_dir = Path(features_dir), Path(models_dir)
    info = json.loads((features_dir / "info.json").read_text())
    if any(v.startswith("mofe") for v in cfg.variants):
        cfg.mofe.check_data(len(info["classes"]))
    processes = distributed.processes(cfg.gpus, cfg.processes)
    if processes > 1 and not distributed.under_torchrun():
        _launch(processes, params, features_dir, models_dir, prepared_dir)
        return json.loads((models_dir / "metrics.json").read_text())
    world = distributed.init()
    if world.distributed:
        log.info("train: rank %d of %d on %s", world.rank, world.size, world.device)
    data = load_data(features_dir)
    summary = {}
    with replacing(models_dir, enabled=world.main) as tmp:
        with torch.random.fork_rng(devices=[]):
            threads = torch.get_num_threads()
            try:
                if cfg.num_threads:
                    torch.set_num_threads(cfg.num_threads)
                for variant in cfg.variants:
                    ckpt_dir = Path(cfg.checkpoint_dir) / variant if cfg.checkpoint_dir else None
                    start = time.perf_counter()
                    model, arch, history = train_variant(variant, cfg, data, seed, ckpt_dir, world)
                    if world.main:
                        _write_variant(tmp / variant, variant, model, arch, history, cfg, seed, data, info)
                    summary[variant] = {"val_accuracy": history[-1]["val_accuracy"], "epochs": len(history)}
                    log.info("train %s: %.1f s", variant, time.perf_counter() - start)
            finally:
                torch.set_num_threads(threads)
        if world.main and finetune:
            summary.update(finetuning.run(params, prepared_dir, tmp))
        if world.main:
            (tmp / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if world.main and cfg.checkpoint_dir:  # finished: the checkpoints have served
        for variant in cfg.variants:
            shutil.rmtree(Path(cfg.checkpoint_dir) / variant, ignore_errors=True)
    world.barrier()  # the other ranks leave once rank 0 has written
    distributed.shutdown(world)
    return summary


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
