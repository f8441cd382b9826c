"""k-th nearest neighbour search (cosine): the engine of the KNN score (scores.KNN).

Float32 products of L2-normalised rows, `chunk_size` query rows at a time, and torch.topk.
`neighbour_cache` lets evaluate score the same arrays for every candidate K with one
product per array instead of one per K (with all the training data, the bank holds 40,600
rows and KNN was most of evaluate's time).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

# Largest similarity block (queries x bank) held at once: 32 Mi float32 = 128 MiB, whatever
# the bank size (a 640k ImageNet bank gets 52-row chunks).
KNN_BLOCK_ELEMENTS = 1 << 25
# Inside neighbour_cache: the similarities kept per query row (at least k; K's candidates
# in params.yaml go up to 100).
KEPT = 128

_cache: list | None = None  # inside neighbour_cache: (bank source, query array, top similarities)


@contextmanager
def neighbour_cache():
    """Inside, `kth_distance` keeps each (bank, query array)'s top max(k, KEPT) similarities and
    answers a later k from them: the same numbers, one product per array. Arrays are taken as
    read-only (one changed in place inside would read stale neighbours); only the thread that
    entered should score inside (evaluate does; serving never enters)."""
    global _cache
    before, _cache = _cache, []
    try:
        yield
    finally:
        _cache = before


def normalised_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=1)  # zero rows stay zero (eps-clamped norm), as in sklearn


@torch.inference_mode()
def _top_similarities(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """The k largest dot products of each query row with the bank rows, largest first."""
    out = torch.empty(len(queries), k, dtype=torch.float32)
    for start in range(0, len(queries), chunk_size):
        out[start:start + chunk_size] = torch.topk(queries[start:start + chunk_size] @ bank.T, k, dim=1).values
    return out


def _cached_top(bank: torch.Tensor, bank_source, queries, k: int, chunk_size: int) -> torch.Tensor:
    for source, array, top in _cache:
        if source is bank_source and array is queries and top.shape[1] >= k:
            return top
    top = _top_similarities(bank, normalised_tensor(queries), min(len(bank), max(k, KEPT)), chunk_size)
    _cache.append((bank_source, queries, top))
    return top


def kth_distance(bank: torch.Tensor, queries, k: int, chunk_size: int | None = None,
                 bank_source=None) -> np.ndarray:
    """`knn_kth_distance` against a bank already normalised (`normalised_tensor`); `bank_source`:
    the array it came from, which names the bank inside `neighbour_cache`."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"KNN: k={k} must be between 1 and the bank size {len(bank)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"KNN: chunk_size must be >= 1, got {chunk_size}")
    chunk = chunk_size or max(1, KNN_BLOCK_ELEMENTS // len(bank))
    if _cache is None or bank_source is None:
        top = _top_similarities(bank, normalised_tensor(queries), k, chunk)
    else:
        top = _cached_top(bank, bank_source, queries, k, chunk)
    return np.clip(1.0 - top[:, k - 1].numpy().astype(np.float64), 0.0, 2.0)


def knn_kth_distance(bank, queries, k: int, chunk_size: int | None = None) -> np.ndarray:
    """Cosine distance (1 - cos) from each query to its k-th nearest neighbour in `bank`, float64.

    The same numbers as `sklearn.neighbors.NearestNeighbors(metric="cosine")` (last
    column of `kneighbors`). Nothing is excluded: a query that is also in the bank finds
    itself at distance 0; a zero row is at distance 1 from everything. Only `chunk_size` x
    len(bank) similarities exist at a time (default: as many query rows as fit
    KNN_BLOCK_ELEMENTS).
    """
    bank, queries = np.asarray(bank), np.asarray(queries)
    for what, a in (("KNN bank", bank), ("KNN queries", queries)):
        if a.ndim != 2:
            raise ValueError(f"{what} must be 2-D (samples x dims), got shape {a.shape}")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"KNN: bank has {bank.shape[1]} dims, queries have {queries.shape[1]}")
    return kth_distance(normalised_tensor(bank), queries, int(k), chunk_size)
