"""KNN k-th neighbour search: our `knn_kth_distance` against scikit-learn, same data, same run.

`python -m mofe_ood.bench knn [--bank 60000] [--queries 10000] [--dim 1280] [--k 10] [--repeats 1]`
Random clustered float32 features (a bank and queries drawn around the same
centres, as ID features cluster by class). Prints both times (wall clock, and
the process CPU time, steadier on a shared machine; best of `--repeats`), the
speed ratio and the largest difference of the k-th cosine distances; exits 1
when that difference exceeds 1e-5.

Both sides are float32 matrix products at heart (scikit-learn's brute-force
cosine search is a float32 BLAS GEMM on float32 input), so the ratio mostly
measures MKL-in-torch + topk against OpenBLAS + argpartition.
"""

import argparse
import time

import numpy as np
import torch

from mofe_ood.neighbours import knn_kth_distance

TOLERANCE = 1e-5


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    """`n` points around randomly chosen `centres`, float32."""
    x = rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    x *= spread
    x += centres[rng.integers(0, len(centres), n)]
    return x


def timed(fn, repeats: int):
    """(result, best wall seconds, CPU seconds of that run) over `repeats` runs of fn()."""
    best = None
    for _ in range(max(1, repeats)):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[1]:
            best = (result, wall, cpu)
    return best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench knn")
    parser.add_argument("--bank", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="time each side this many times, keep the best")
    args = parser.parse_args(argv)

    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    bank = clustered(rng, centres, args.bank, spread=0.7)
    queries = clustered(rng, centres, args.queries, spread=0.7)
    print(f"bank {bank.shape}, queries {queries.shape}, float32, k={args.k}, "
          f"{torch.get_num_threads()} torch threads", flush=True)

    knn_kth_distance(bank[:1000], queries[:100], args.k)  # warm-up (thread pool, allocator)
    print("ours: torch float32 matmul + topk ...", flush=True)
    ours, ours_s, ours_cpu = timed(lambda: knn_kth_distance(bank, queries, args.k), args.repeats)
    print(f"ours: {ours_s:.2f} s (CPU {ours_cpu:.2f} s)", flush=True)

    print("scikit-learn: NearestNeighbors(metric='cosine').kneighbors (brute force, takes a while) ...",
          flush=True)

    def sklearn_kth():
        index = NearestNeighbors(n_neighbors=args.k, metric="cosine").fit(bank)
        return index.kneighbors(queries, return_distance=True)[0][:, -1]

    theirs, sk_s, sk_cpu = timed(sklearn_kth, args.repeats)
    print(f"scikit-learn: {sk_s:.2f} s (CPU {sk_cpu:.2f} s)", flush=True)

    diff = float(np.max(np.abs(ours - theirs)))
    print(f"speed-up: {sk_s / ours_s:.1f}x wall clock (ours {ours_s:.2f} s, scikit-learn {sk_s:.2f} s), "
          f"{sk_cpu / ours_cpu:.1f}x CPU time")
    print(f"max |k-th distance difference|: {diff:.2e} (tolerance {TOLERANCE:.0e})")
    if diff > TOLERANCE:
        print("FAIL: k-th distances differ from scikit-learn")
        return 1
    return 0
