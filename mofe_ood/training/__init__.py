"""The training library: what the `train` stage (and fine-tuning within it) is built from.

- `settings`: the `train` and `finetune` sections as frozen config objects;
- `phases`: MoFE's training phases (trainable parameters, losses);
- `loop`: the one step loop (schedule, lr, optimizer groups, checkpoints and
  resume, history) with hooks for autocast and data parallelism;
- `head_training`: heads on cached features; `finetuning`: ViT + block experts on images;
- `distributed`: data-parallel processes that give the results of one process;
- `data`, `history`: cached features in, history.csv out.
What each variant is and how a trained model is built, saved and loaded is mofe_ood/variants.py,
which evaluate and serving read too. Nothing here imports a stage module except the readers of
the stages' outputs (see `data`).
"""
