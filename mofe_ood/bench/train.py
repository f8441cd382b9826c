"""Train-stage speed: seconds per epoch of every variant, and the whole stage's time.

`python -m mofe_ood.bench train [--features data/features] [--params params.yaml]
 [--epochs N] [--threads T] [--set train.KEY=VALUE ...]`
Trains each variant of `train.variants` exactly as the stage does (no files
written) on the cached features, or, when those are absent, on synthetic
features of the default benchmark's size (7 classes, 7000 x 1280 train,
1400 val). `--epochs N` caps every phase at N epochs for a quick estimate.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mofe_ood import params as params_mod
from mofe_ood.cli import parse_set
from mofe_ood.config import base
from mofe_ood.training.data import Data, load_data
from mofe_ood.training.head_training import train_variant
from mofe_ood.training.settings import train_config
from mofe_ood.variants import VARIANTS


def synthetic_data(classes: int = 7, dim: int = 1280, train_per_class: int = 1000, val_per_class: int = 200,
                   seed: int = 0) -> Data:
    """Class Gaussian clusters of non-negative features (as EfficientNet's) at the benchmark's size."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 0.4, size=(classes, dim))

    def draw(n):
        labels = np.repeat(np.arange(classes), n)
        x = np.clip(centres[labels] + rng.normal(scale=0.5, size=(len(labels), dim)), 0, 6)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels)

    return Data(*draw(train_per_class), *draw(val_per_class), [f"class{i}" for i in range(classes)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench train")
    parser.add_argument("--features", default="data/features")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="cap every phase at this many epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: train.num_threads)")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    params = params_mod.merged(params_mod.load(args.params), parse_set(args.set))
    if args.epochs:
        params = params_mod.merged(params, {"train": {k: args.epochs for k in
                                                      ("epochs", "expert_epochs", "router_epochs")}})
    cfg, seed = train_config(params), base(params).seed
    if (Path(args.features) / "train.npz").is_file():
        data, source = load_data(args.features), args.features
    else:
        data, source = synthetic_data(), "SYNTHETIC features (no train.npz in " + args.features + ")"
    if any(VARIANTS[v].routed for v in cfg.variants):
        cfg.mofe.check_data(data.num_classes)
    threads = args.threads or cfg.num_threads
    if threads:
        torch.set_num_threads(threads)
    print(f"features: {source}: {len(data.x_train)} train x {data.x_train.shape[1]}, "
          f"{len(data.x_val)} val, {data.num_classes} classes; {torch.get_num_threads()} torch threads")
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # pay torch's one-time optimizer import here
    total = 0.0
    for variant in cfg.variants:
        start = time.perf_counter()
        _, _, history = train_variant(variant, cfg, data, seed)
        seconds = time.perf_counter() - start
        total += seconds
        phases = {}
        for row in history:
            phases[row["phase"]] = phases.get(row["phase"], 0) + 1
        print(f"{variant:12s} {seconds:7.1f} s  {len(history):3d} epochs  {seconds / len(history):6.2f} s/epoch  "
              f"val acc {history[-1]['val_accuracy']:.4f}  ({', '.join(f'{k} x{v}' for k, v in phases.items())})")
    print(f"train stage (all variants): {total:.1f} s")
    return 0
