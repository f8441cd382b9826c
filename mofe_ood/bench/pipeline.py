"""Wall time of the whole pipeline, two sides alternating: `dvc repro -f` here against
`python pipeline.py run`, or against `dvc repro -f` in another checkout (`--against DIR`).

`python -m mofe_ood.bench pipeline [--repeats 3] [--runner subprocess|docker] [--set S.K=V ...]`
`python -m mofe_ood.bench pipeline --against ../other-worktree [--repeats 3]`
from the project root (make run's environment; a docker runner needs make image, make
services and DOCKER_HOST). The sides run one after the other, `repeats` times in
alternation, because these machines' speed drifts with neighbouring jobs: the figure to
read is the ratio of each pair and its spread, not one pair. Prints each run's seconds and
the ratio other / here (mean, min, max). `--against` compares two commits or two params
files (a time budget: "the new default at most 3x the old one"); each side runs its own
checkout's code and params.yaml. `dvc repro -f` rewrites data/, models/, reports/ and
registers in that checkout's mlflow.db as `make run` does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    # The checkout's own package first: worktrees sharing one environment (its editable install
    # points at one of them) would otherwise all run that one's code.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(cwd or ".").resolve()),
                                                                     os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
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
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="another checkout of the project: time `dvc repro -f` there instead of pipeline.py")
    args = parser.parse_args(argv)
    for root in (Path("."), args.against):
        if root is not None and not (root / "dvc.yaml").is_file():
            sys.exit(f"{root.resolve()} is not a project root (no dvc.yaml there)")
    sets = [x for s in args.set for x in ("--set", s)]
    dvc_repro = [sys.executable, "-m", "dvc", "repro", "-f"]
    here, other = [], []
    other_name = f"dvc repro -f in {args.against}" if args.against else f"pipeline.py run ({args.runner})"
    with tempfile.TemporaryDirectory(prefix="bench-kfp-") as root:
        for i in range(args.repeats):
            here.append(timed(dvc_repro))
            if args.against:
                other.append(timed(dvc_repro, cwd=args.against))
            else:
                other.append(timed([sys.executable, "pipeline.py", "run", "--runner", args.runner,
                                    "--root", f"{root}/{i}", *sets]))
            print(f"pair {i + 1}: dvc repro -f {here[-1]:.0f} s, {other_name} {other[-1]:.0f} s, "
                  f"ratio {other[-1] / here[-1]:.2f}", flush=True)
    ratios = [o / h for o, h in zip(other, here)]
    print(f"dvc repro -f: mean {statistics.mean(here):.0f} s; {other_name}: mean "
          f"{statistics.mean(other):.0f} s; ratio mean {statistics.mean(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} pairs)")
    return 0
