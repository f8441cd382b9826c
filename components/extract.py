"""Components of stage `extract`: the whole stage in one step, or scaled out (list the shards,
featurise each, merge), as pipeline.py picks by `extract.shards`.
"""

from typing import List

from kfp.dsl import Dataset, Input, Output

from components import component, sections


@component
def extract(base: str, extract: str, prepared: Input[Dataset], features: Output[Dataset]):
    """Features of every prepared split (`extract.shards: 1`: the plain DAG); the pod has
    `extract.gpus` GPUs, and `extract.device` says what runs on them, as under `dvc repro`."""
    from mofe_ood import extract as stage

    params = sections(base=base, extract=extract)
    info = stage.run(params, prepared.path, features.path)
    features.metadata.update(backbone=info["backbone"], feature_dim=info["feature_dim"])


@component
def shard_indices(extract: str) -> List[int]:
    """0 .. extract.shards - 1: the items the pipeline's ParallelFor runs `extract_shard` over."""
    from mofe_ood.extract import shard_count

    return list(range(shard_count(sections(extract=extract))))


@component
def extract_shard(base: str, extract: str, prepared: Input[Dataset], shard: int, features: Output[Dataset]):
    """Features of shard `shard` (a run of whole batches) of every prepared split."""
    from mofe_ood import extract as stage

    params = sections(base=base, extract=extract)
    stage.run_shard(params, prepared.path, features.path, int(shard))


@component
def merge_features(shards: Input[List[Dataset]], features: Output[Dataset]):
    """Concatenate the shards into the data/features layout (what `mofe extract` writes)."""
    from mofe_ood import extract as stage

    info = stage.merge_shards([s.path for s in shards], features.path)
    features.metadata.update(backbone=info["backbone"], feature_dim=info["feature_dim"],
                             counts={name: s["count"] for name, s in info["splits"].items()})
