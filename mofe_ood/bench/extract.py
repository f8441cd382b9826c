"""Feature-extraction throughput (images/s) and peak memory at the params' image size.

`python -m mofe_ood.bench extract [--images N] [--params params.yaml] [--set K=V ...]`
Times the real extract path (preprocess + backbone, batched, inference_mode,
channels_last) on Fashion-MNIST-sized gray images after one warm-up batch.
"""

import argparse
import resource
import time

import numpy as np
import torch

from mofe_ood import params as params_mod
from mofe_ood.cli import parse_set
from mofe_ood.backbones import features_of
from mofe_ood.extract import configure_threads, load_model
from mofe_ood.splits import Images


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench extract")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    params = params_mod.merged(params_mod.load(args.params), parse_set(args.set))
    configure_threads(params)
    model, prep = load_model(params)
    batch = params["extract"]["batch_size"]
    rng = np.random.default_rng(0)
    images = Images(np.zeros(args.images, np.int64),
                    images=rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8))
    features_of(model, images, prep, batch, rows=range(batch))  # warm-up
    start = time.perf_counter()
    features_of(model, images, prep, batch)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"backbone {params['extract']['backbone']} ({params['extract']['weights']}), "
          f"{prep.image_size} px, batch {batch}, {torch.get_num_threads()} threads")
    print(f"extract: {args.images} images in {seconds:.1f} s = {args.images / seconds:.1f} images/s")
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")
    return 0
