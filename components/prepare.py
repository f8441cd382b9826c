"""Component `prepare`: the ID splits and OOD sets (mofe_ood.prepare.run)."""

from kfp.dsl import Dataset, Output

from components import component, sections


@component
def prepare(base: str, prepare: str, evaluate__extra_ood: str, prepared: Output[Dataset]):
    """Build the benchmark into `prepared` (of `evaluate`, only `extra_ood` is read). Where
    `prepare.fashion_mnist_dir` is null, the pod's $FASHION_MNIST_DIR says where the raw data is."""
    from mofe_ood import prepare as stage

    params = sections(base=base, prepare=prepare, evaluate__extra_ood=evaluate__extra_ood)
    manifest = stage.run(params, prepared.path)
    prepared.metadata["counts"] = {name: s["count"] for name, s in manifest["splits"].items()}
