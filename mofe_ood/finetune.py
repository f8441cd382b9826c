"""End-to-end fine-tuning (a ViT + MoFE with block experts, on images): the `finetune` section.

The train stage runs it when `finetune.enabled` (train.py); the code is the
training library's (training/finetuning.py: the loop, phases and outputs;
training/heads.py: `FinetunedMoFE`, `load_finetuned`). `run` fine-tunes alone,
writing `<models_dir>/<finetune.variant>/` and nothing else.
"""

from __future__ import annotations

from pathlib import Path

from mofe_ood.training import finetuning
from mofe_ood.training.settings import FinetuneConfig, finetune_config

__all__ = ["config", "run"]


def config(params: dict) -> FinetuneConfig:
    """The `finetune` section, checked."""
    return finetune_config(params)


def run(params: dict, prepared_dir: str | Path = "data/prepared", models_dir: str | Path = "models") -> dict:
    """Fine-tune; writes `<models_dir>/<finetune.variant>/` (replacing only that folder)."""
    return finetuning.run(params, prepared_dir, models_dir)
