"""Feature-extraction throughput (images/s) and peak memory of both runtimes, at the params' image size.

`python -m mofe_ood.bench extract [--images N] [--rounds R] [--params params.yaml] [--set K=V ...]`
Times the real extract pass (preprocess + backbone, batched, the trunk too when
extract.top_blocks > 0) on Fashion-MNIST-sized gray images, on torch and on ONNX Runtime
(extract.runtime), in this process on the same images: each after one warm-up batch, the
two alternating R times (on a shared machine, load moves both alike). Prints each one's
images/s (median and best of the rounds), the ratio of the medians, the ONNX export's
time, the largest feature difference, and each one's peak memory: the largest resident set
during its timed passes (Linux: the peak is reset before each; elsewhere the process's max RSS).
"""

import argparse
import dataclasses
import functools
import resource
from pathlib import Path
import statistics
import time

import numpy as np
import torch

from mofe_ood import extract
from mofe_ood import params as params_mod
from mofe_ood.cli import parse_set
from mofe_ood.splits import Images

RUNTIMES = ("torch", "onnxruntime")


def peak_mib(reset: bool = False) -> float:
    """The peak resident set since the last reset, MiB (`reset`: start a new peak)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench extract")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    params = params_mod.merged(params_mod.load(args.params), parse_set(args.set))
    cfg = extract.config(params)
    extract.configure_threads(params)
    model, prep = extract.backbone(cfg)
    rng = np.random.default_rng(0)
    images = Images(np.zeros(args.images, np.int64),
                    images=rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8))
    passes, seconds, features, peaks = {}, {r: [] for r in RUNTIMES}, {}, {r: 0.0 for r in RUNTIMES}
    for runtime in RUNTIMES:
        start, _ = time.perf_counter(), peak_mib(reset=True)
        forward = extract.forward(dataclasses.replace(cfg, runtime=runtime), model, prep.image_size)
        if forward is None and runtime != "torch":
            raise SystemExit("extract.runtime: onnxruntime resolved to torch here (a CUDA device?)")
        passes[runtime] = functools.partial(extract.featurise, cfg, model, prep, forward, images)
        passes[runtime](range(min(cfg.batch_size, args.images)))  # warm-up
        if runtime != "torch":
            print(f"{runtime}: export, check and session {time.perf_counter() - start:.1f} s, "
                  f"peak memory {peak_mib():.0f} MiB")
    for _ in range(args.rounds):
        for runtime in RUNTIMES:
            start, _ = time.perf_counter(), peak_mib(reset=True)
            features[runtime] = passes[runtime]()[0]
            seconds[runtime].append(time.perf_counter() - start)
            peaks[runtime] = max(peaks[runtime], peak_mib())
    print(f"backbone {cfg.backbone} ({cfg.weights}), {prep.image_size} px, batch {cfg.batch_size}, "
          f"top_blocks {cfg.top_blocks}, {torch.get_num_threads()} threads, {args.images} images x {args.rounds}")
    rates = {}
    for runtime in RUNTIMES:
        rates[runtime] = args.images / statistics.median(seconds[runtime])
        print(f"extract on {runtime}: {rates[runtime]:.1f} images/s (median; best "
              f"{args.images / min(seconds[runtime]):.1f}), peak memory {peaks[runtime]:.0f} MiB")
    want, got = features["torch"], features["onnxruntime"]
    print(f"onnxruntime / torch: {rates['onnxruntime'] / rates['torch']:.2f}x; features differ by "
          f"{float(np.abs(got - want).max() / np.abs(want).max()):.2g} of their largest value")
    return 0
