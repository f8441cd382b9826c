"""The frozen backbone on ONNX Runtime: exported when a bundle is saved, run when it is loaded (ours).

On the serving host's CPU, ONNX Runtime runs the BatchNorm-folded EfficientNet 2-3x faster
than eager torch (README, Serving). The export happens once, at `save`, so the served model
needs onnxruntime only, not the exporter; the bundle keeps the backbone's own weights (or its
package reference) too, so `mofe score` and tests can check the ONNX graph against torch.
A fine-tuned variant's image model (routing between block experts) stays on torch.

Everything here imports onnx / onnxruntime lazily: the ML core does not need them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mofe_ood.backbones import pooled_features
from mofe_ood.params import ParamError

RUNTIMES = ("onnxruntime", "torch")
ONNX_FILE = "backbone.onnx"


class _Pooled(torch.nn.Module):
    """What the score reads from a frozen backbone: images -> pooled features."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.backbone, x).float()


def _need(package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ParamError(f"serve.runtime: onnxruntime needs the {package} package (pip install "
                         f"'mofe-ood[pipeline]'), or set serve.runtime: torch") from None


def export(backbone: torch.nn.Module, image_size: int, out: Path) -> Path:
    """Write `backbone` (as folded for inference) as one ONNX file with a dynamic batch size.

    The graph is checked against torch on a random batch before it is kept: a wrong export
    must fail the registration, not change served scores.
    """
    _need("onnx"), _need("onnxscript")
    model = _Pooled(backbone).eval()
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), input_names=["images"], output_names=["features"],
                                    dynamic_shapes={"x": {0: batch}}, dynamo=True, optimize=True,
                                    verbose=False)
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's debug notes hold source paths: same model, other bytes
        del node.metadata_props[:]
    data = proto.SerializeToString()  # one file: the weights inside, no external data
    session = Session(data, threads=1)
    with torch.no_grad():
        want = model(x)
    got = session(x)
    tolerance = 1e-4 * float(want.abs().max())
    if not torch.allclose(got, want, rtol=1e-4, atol=tolerance):
        raise RuntimeError(f"the ONNX export of the backbone differs from torch by "
                           f"{float((got - want).abs().max()):.3g} (allowed {tolerance:.3g}); "
                           f"set serve.runtime: torch")
    out.write_bytes(data)
    return out


class Session:
    """An ONNX Runtime session on the CPU, called like the torch backbone: N x 3 x S x S -> N x D."""

    def __init__(self, model: bytes | Path, threads: int | None = None):
        ort = _need("onnxruntime")
        options = ort.SessionOptions()
        # One pass at a time runs (the detector's batcher), so it may use every thread torch would.
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # Idle workers sleep instead of spinning: between passes the cores decode, resize and
        # answer the other requests (spinning made 8-client single-image serving slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()  # ORT takes NCHW, not channels_last
        return torch.from_numpy(self.session.run(None, {"images": images})[0])


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
