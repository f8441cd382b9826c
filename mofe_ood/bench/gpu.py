"""GPU speed: fine-tuning and extraction images/s and peak memory of DINOv2 backbones, and DDP scaling.

`python -m mofe_ood.bench gpu [--models small,base] [--batch-size 64] [--steps 20] [--warmup 5]
 [--image-size 224] [--params params.yaml]`
Random weights (pretrained=False: no download). Fine-tuning runs training/finetuning.py's own model
(FinetunedMoFE, block experts), param groups, loss, mixup and bf16 autocast for each of its
three phases (base, experts, router) on one fixed batch already on the GPU: no data loading
(`bench extract` times that). Extraction is extract.load_model's model (fp32, TF32 off) under
inference_mode. DDP: the base phase in one process per GPU (NCCL), gradients summed as
the training loop's data parallelism does (`World.sum_grads`); the batch is per GPU.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import numpy as np
import torch

from mofe_ood import params as params_mod
from mofe_ood.backbones import create_backbone, pooled_features
from mofe_ood.mixup import make_mixup
from mofe_ood.training import distributed, finetuning
from mofe_ood.training.loop import Step
from mofe_ood.training.settings import finetune_config, train_config

MODELS = {k: f"vit_{k}_patch14_dinov2" for k in ("small", "base", "large", "giant")}
NUM_CLASSES = 7  # the default benchmark's
DDP_TIMEOUT_S = 600  # a hung NCCL rank must not hold the machine forever


def build(name: str, image_size: int, device, params: dict, **backbone_kwargs):
    """Fine-tuning's model (random weights, class groups c % E): -> (FinetunedMoFE, finetune cfg, train cfg)."""
    p, tp = finetune_config(params), train_config(params)
    backbone = create_backbone(MODELS.get(name, name), "random", image_size, num_classes=0,
                               drop_path_rate=p.drop_path, **backbone_kwargs).to(device)
    groups = np.arange(NUM_CLASSES) % tp.mofe.num_experts
    return finetuning.build(backbone, groups, NUM_CLASSES, tp).to(device), p, tp


def as_finetune_runs() -> None:
    """The CUDA settings finetuning.run makes: the bench times the stage as it runs."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _timed(fn, steps: int, warmup: int, device, world: distributed.World | None = None):
    """-> (seconds of `steps` calls of `fn` after `warmup` untimed ones, its last result, peak GiB or None)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    if cuda:  # queued warm-up kernels must not land in the timed window
        torch.cuda.synchronize(device)
    if world is not None:
        world.barrier()
    out, start = None, time.perf_counter()
    for _ in range(steps):
        out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None


def time_finetune(model, p, tp, phase: str, batch_size: int, steps: int, warmup: int, device,
                  world: distributed.World | None = None, seed: int = 0) -> dict:
    """Training steps of `phase` as finetuning.run takes them, on one random batch. -> images_per_s (all
    ranks; experts: in-group images, each paired with an out-of-group one), loss (the last), peak_gib."""
    step = Step(phase, 1, 0 if phase == "experts" else None)
    optimizer = torch.optim.AdamW(finetuning.param_groups(model, step, p), lr=p.lr, betas=(0.9, 0.99))
    for g in optimizer.param_groups:  # peak lr, the layer-wise decay as the loop applies it
        g["lr"] = p.lr * g.get("lr_scale", 1.0)
    trainable = [q for q in model.parameters() if q.requires_grad]
    mixup = make_mixup(p.mixup, NUM_CLASSES, np.ones(NUM_CLASSES, np.int64), p.label_smoothing, tp.mixup_alpha,
                       tp.dynmix)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *model.backbone.patch_embed.img_size, generator=gen).to(device)
    groups = model.mofe.groups
    # phase 2 sees its expert's classes, paired 1:1 with other classes' images (loop.batches)
    pick = np.flatnonzero(groups == 0) if phase == "experts" else np.arange(NUM_CLASSES)
    y = torch.from_numpy(pick[np.arange(batch_size) % len(pick)]).to(device)
    x_other = torch.randn_like(x) if phase == "experts" and (groups != 0).any() else None

    def one_step() -> torch.Tensor:
        with finetuning.autocast(torch.device(device), p):
            loss = finetuning.loss(model, step, x, y, x_other, mixup, gen, p, tp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world is not None:
            world.sum_grads(trainable)
        optimizer.step()
        return loss.detach()

    seconds, loss, peak = _timed(one_step, steps, warmup, device, world)
    ranks = world.size if world is not None else 1
    return {"images_per_s": ranks * batch_size * steps / seconds, "loss": float(loss), "peak_gib": peak}


def time_extract(name: str, image_size: int, batch_size: int, steps: int, warmup: int) -> dict:
    """Backbone forward as `extract` runs it (its load_model: device auto, fp32, TF32 off)."""
    from mofe_ood.extract import Extract, backbone

    model, _ = backbone(Extract(backbone=MODELS.get(name, name), weights="random", image_size=image_size,
                                batch_size=batch_size, num_threads=None, shards=1, device="auto", gpus=0,
                                top_blocks=0, runtime="torch"))
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, image_size, image_size).to(device)
    seconds, _, peak = _timed(torch.inference_mode()(lambda: pooled_features(model, x)), steps, warmup, device)
    return {"images_per_s": batch_size * steps / seconds, "peak_gib": peak}


def _ddp_worker(rank: int, size: int, port: int, cfg: dict, queue) -> None:
    # distributed.init reads torchrun's variables: set them as torchrun would
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    world = distributed.init()
    if world.device.type == "cuda":
        as_finetune_runs()
    try:
        model, p, tp = build(cfg["name"], cfg["image_size"], world.device, cfg["params"], **cfg["backbone_kwargs"])
        result = time_finetune(model, p, tp, "base", cfg["batch_size"], cfg["steps"], cfg["warmup"], world.device,
                               world=world)
        if world.main:
            queue.put(result)
    finally:
        distributed.shutdown(world)


def time_ddp(size: int, cfg: dict, timeout_s: float = DDP_TIMEOUT_S) -> dict | None:
    """The base phase in `size` processes (NCCL on GPUs, gloo on a CPU); None if it ran out of time."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_ddp_worker, args=(size, port, cfg, queue), nprocs=size, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            return None
    return queue.get()


def table(rows: list[tuple]) -> str:
    """(model, phase, batch, images/s, peak GiB or None) rows as an aligned Markdown table."""
    cells = [("model", "phase", "batch", "images/s", "peak GiB")] + [
        (m, ph, str(b), f"{ips:.1f}", "-" if gib is None else f"{gib:.2f}") for m, ph, b, ips, gib in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(5)]
    def line(r):
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |"

    lines = [line(r) for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ("-" if i < 2 else ":") for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench gpu")
    parser.add_argument("--models", default="small,base", help=f"comma list of {', '.join(MODELS)} or timm names")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--params", default="params.yaml", help="its finetune and train sections")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not torch.cuda.is_available():
        print(f"no GPU visible (torch.cuda.is_available() is False): nothing measured; on a GPU this times "
              f"fine-tuning (block experts, bf16) and extraction of {', '.join(models)} at {args.image_size} px, "
              f"batch {args.batch_size}: images/s and peak GiB, and DDP scaling over all GPUs")
        return 0
    params = params_mod.load(args.params)
    gpus, bs = torch.cuda.device_count(), args.batch_size
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.image_size} px, "
          f"{args.steps} timed steps after {args.warmup} warm-up, random weights", flush=True)
    as_finetune_runs()
    rows, single = [], None
    for name in models:
        model, p, tp = build(name, args.image_size, "cuda", params)
        for phase in ("base", "experts", "router"):
            r = time_finetune(model, p, tp, phase, bs, args.steps, args.warmup, "cuda")
            single = r if phase == "base" else single
            rows.append((name, f"finetune {phase}", bs, r["images_per_s"], r["peak_gib"]))
            print(f"  {name} finetune {phase}: {r['images_per_s']:.1f} images/s, loss {r['loss']:.3f}", flush=True)
        del model
        torch.cuda.empty_cache()  # each measurement's peak is its own
        r = time_extract(name, args.image_size, bs, args.steps, args.warmup)
        rows.append((name, "extract", bs, r["images_per_s"], r["peak_gib"]))
        torch.cuda.empty_cache()
        if gpus > 1:
            cfg = dict(name=name, image_size=args.image_size, params=params, backbone_kwargs={}, batch_size=bs,
                       steps=args.steps, warmup=args.warmup)
            try:
                r = time_ddp(gpus, cfg)
            except Exception as err:  # keep the rows measured so far
                r = None
                print(f"  {name} DDP x{gpus} failed: {type(err).__name__}: {err}", flush=True)
            if r is not None:
                rows.append((name, f"finetune base DDP x{gpus}", f"{gpus} x {bs}", r["images_per_s"], r["peak_gib"]))
                print(f"  {name} DDP x{gpus}: {r['images_per_s'] / single['images_per_s']:.2f} x one GPU "
                      f"(ideal {gpus})", flush=True)
    if gpus == 1:
        print("DDP: skipped, it needs >= 2 GPUs (1 visible)")
    print(table(rows))
    print("experts: each step also runs as many out-of-group images through the frozen trunk; "
          "DDP images/s: all GPUs together")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
