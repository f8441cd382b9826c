"""`bench gpu` on the CPU: the no-GPU exit, and the timed steps the GPU runs, on a tiny random DINOv2."""

import math
from pathlib import Path

import pytest
import torch

from mofe_ood.bench import gpu
from mofe_ood.params import load

TINY = dict(depth=2, embed_dim=32, num_heads=2)
PARAMS = load(Path(__file__).resolve().parents[1] / "params.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert gpu.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no GPU visible") and out.count("\n") == 1
    assert "small, base at 224 px" in out


@pytest.mark.parametrize("phase", ["base", "experts", "router"])
def test_a_finetune_phase_trains_on_the_cpu(phase):
    torch.manual_seed(0)
    model, p, tp = gpu.build("small", 28, "cpu", PARAMS, **TINY)
    assert len(model.mofe.experts) == tp.mofe.num_experts and not p.max_steps_per_epoch
    trained = {"base": model.backbone.blocks[0], "experts": model.mofe.experts[0], "router": model.mofe.router}[phase]
    before = [q.detach().clone() for q in trained.parameters()]
    r = gpu.time_finetune(model, p, tp, phase, batch_size=2, steps=2, warmup=1, device="cpu")
    assert r["images_per_s"] > 0 and math.isfinite(r["loss"]) and r["peak_gib"] is None
    # the optimizer stepped
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters(), strict=True))


def test_extract_times_the_backbone_on_the_cpu():
    r = gpu.time_extract("small", 28, batch_size=2, steps=2, warmup=1)
    assert r["images_per_s"] > 0 and r["peak_gib"] is None


def test_the_table_is_aligned_markdown():
    rows = [("small", "finetune base", 64, 1234.56, 3.2), ("base", "extract", "2 x 64", 7.0, None)]
    lines = gpu.table(rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # aligned
    assert lines[0].startswith("| model | phase ") and lines[1].startswith("|-------|") and lines[1].endswith("--:|")
    assert lines[2].endswith("|   1234.6 |     3.20 |") and lines[3].endswith("|      7.0 |        - |")


@pytest.mark.slow  # two spawned processes: ~20 s on 2 CPUs
def test_ddp_times_the_base_phase_in_two_cpu_processes():
    cfg = dict(name="small", image_size=28, params=PARAMS, backbone_kwargs=TINY, batch_size=2, steps=2, warmup=1)
    r = gpu.time_ddp(2, cfg, timeout_s=120)
    assert r is not None and r["images_per_s"] > 0 and math.isfinite(r["loss"])
