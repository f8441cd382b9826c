"""The served bundle's backbone on ONNX Runtime: exported when a bundle is saved, run when it is loaded (ours).

On the serving host's CPU, ONNX Runtime runs the BatchNorm-folded EfficientNet 2-3x faster
than eager torch (README, Serving). The export happens once, at `save`, so the served model
needs onnxruntime only, not the exporter; the bundle keeps the backbone's own weights (or its
package reference) too, so `mofe score` and tests can check the ONNX graph against torch.
A fine-tuned variant's image model (routing between block experts) stays on torch.
The export, its check against torch and the session are mofe_ood.onnx_runtime's (extract runs them too).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mofe_ood import onnx_runtime
from mofe_ood.onnx_runtime import Session

__all__ = ["ONNX_FILE", "RUNTIMES", "Session", "export", "leave_cores_to"]

RUNTIMES = ("onnxruntime", "torch")
ONNX_FILE = "backbone.onnx"


def export(backbone: torch.nn.Module, image_size: int, out: Path) -> Path:
    """Write `backbone`'s pooled-features graph to `out` (checked against torch: a wrong export fails the
    registration)."""
    out.write_bytes(onnx_runtime.export(backbone, image_size, param="serve.runtime"))
    return out


def leave_cores_to(session: Session | None) -> int:
    """With a session, torch keeps one thread: it only resizes, runs the head and the score then.

    Call it once the detector is loaded, in a process that serves or scores (it is global);
    -> torch's thread count before, to restore.
    torch's idle OpenMP workers spin-wait on the cores; beside ONNX Runtime's pass that made a
    batch of 8 1.5x slower on 2 cores, and single-image requests 2x (README, Serving).
    """
    before = torch.get_num_threads()
    if session is not None:
        torch.set_num_threads(1)
    return before
