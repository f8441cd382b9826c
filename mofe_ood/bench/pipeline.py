"""Wall time of the whole pipeline: `dvc repro -f` against `python pipeline.py run`, alternating.

`python -m mofe_ood.bench pipeline [--repeats 3] [--runner subprocess|docker] [--set S.K=V ...]`
from the project root (make run's environment; a docker runner needs make image, make
services and DOCKER_HOST). Both sides run the same params, one after the other, `repeats`
times in alternation, because these machines' speed drifts with neighbouring jobs: the
figure to read is the ratio of each pair and its spread, not one pair. Prints each run's
seconds and the ratio KFP / DVC (mean, min, max). `dvc repro -f` rewrites data/, models/,
reports/ and registers in ./mlflow.db as `make run` does.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="params for both sides (dvc: `dvc repro` runs on params.yaml, so use "
                             "this only with a runner whose params you also set in params.yaml)")
    args = parser.parse_args(argv)
    if not Path("dvc.yaml").is_file():
        sys.exit("run it from the project root (where dvc.yaml is)")
    sets = [x for s in args.set for x in ("--set", s)]
    dvc, kfp = [], []
    with tempfile.TemporaryDirectory(prefix="bench-kfp-") as root:
        for i in range(args.repeats):
            dvc.append(timed([sys.executable, "-m", "dvc", "repro", "-f"]))
            kfp.append(timed([sys.executable, "pipeline.py", "run", "--runner", args.runner,
                              "--root", f"{root}/{i}", *sets]))
            print(f"pair {i + 1}: dvc repro -f {dvc[-1]:.0f} s, pipeline.py run ({args.runner}) "
                  f"{kfp[-1]:.0f} s, ratio {kfp[-1] / dvc[-1]:.2f}", flush=True)
    ratios = [k / d for k, d in zip(kfp, dvc)]
    print(f"dvc repro -f: mean {statistics.mean(dvc):.0f} s; pipeline.py run ({args.runner}): mean "
          f"{statistics.mean(kfp):.0f} s; ratio mean {statistics.mean(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} pairs)")
    return 0
