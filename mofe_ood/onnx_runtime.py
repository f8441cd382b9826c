"""The frozen backbone on ONNX Runtime's CPU provider: one export, checked against torch, one session (ours).

On the CPU, ONNX Runtime runs the BatchNorm-folded EfficientNet about 2x faster than eager
torch (README: Extraction, Serving). Two users, one graph builder:
- the extract stage on the CPU (`extract.runtime`): images -> pooled features, and the
  trunk's activations when `extract.top_blocks` > 0, from one pass;
- a served bundle (`serve.runtime`, serving/runtime.py): images -> pooled features.
Each export is checked against torch on a random batch before it is used: a wrong export
must fail the stage or the registration, not change features or served scores.

Everything here imports onnx / onnxscript / onnxruntime lazily: the ML core does not need them.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from mofe_ood.backbones import forward_of
from mofe_ood.params import ParamError

PACKAGES = ("onnx", "onnxscript", "onnxruntime")
RTOL = 1e-4  # an output's largest difference to torch, relative to its largest value


class Graph(torch.nn.Module):
    """images -> pooled features [, the activations entering the top `top_blocks` blocks]: what is exported."""

    def __init__(self, backbone: torch.nn.Module, top_blocks: int = 0):
        super().__init__()
        self.backbone = backbone
        self.top_blocks = top_blocks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, trunk = forward_of(self.backbone, self.top_blocks)(x)
        return (features.float(),) if trunk is None else (features.float(), trunk.float())


def available() -> bool:
    """Whether the exporter and the runtime are installed (`extract.runtime: auto` asks)."""
    return all(importlib.util.find_spec(p) is not None for p in PACKAGES)


def need(package: str, param: str):
    """`package`, or a ParamError saying how to install it or to set `param` to torch."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ParamError(f"{param}: onnxruntime needs the {package} package (pip install "
                         f"'mofe-ood[pipeline]'), or set {param}: torch") from None


def export(backbone: torch.nn.Module, image_size: int, top_blocks: int = 0, param: str = "serve.runtime") -> bytes:
    """`backbone` (as folded for inference) as one ONNX model with a dynamic batch size, checked against torch.

    Outputs "features" (N x D), and "trunk" when `top_blocks` > 0. `param` names the setting
    that chose onnxruntime, for the error messages.
    """
    for package in PACKAGES[:2]:
        need(package, param)
    model = Graph(backbone, top_blocks).eval()
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(next(backbone.parameters()).device)
    names = ["features", "trunk"] if top_blocks else ["features"]
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, (x,), input_names=["images"], output_names=names,
                                        dynamic_shapes={"x": {0: batch}}, dynamo=True, optimize=True,
                                        verbose=False)
    except Exception as err:  # an architecture the exporter cannot take: say what to set instead
        raise RuntimeError(f"the ONNX export of the backbone failed ({type(err).__name__}: {err}); "
                           f"set {param}: torch") from err
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's debug notes hold source paths: same model, other bytes
        del node.metadata_props[:]
    data = proto.SerializeToString()  # one file: the weights inside, no external data
    with torch.no_grad():
        wants = model(x)
    gots = Session(data, threads=1, param=param).outputs(x)
    for name, want, got in zip(names, wants, gots, strict=True):
        want = want.cpu()
        tolerance = RTOL * float(want.abs().max())
        if got.shape != want.shape or not torch.allclose(got, want, rtol=RTOL, atol=tolerance):
            difference = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
            raise RuntimeError(f"the ONNX export of the backbone's {name} differs from torch by "
                               f"{difference:.3g} (allowed {tolerance:.3g}); set {param}: torch")
    return data


class Session:
    """An ONNX Runtime session on the CPU, called like the torch backbone: N x 3 x S x S -> N x D.

    `threads`: ONNX Runtime's intra-op threads (None: torch's count), fixed, so a pass gives the
    same bytes every time. Idle workers sleep instead of spinning: between passes the cores
    decode, resize and answer other requests (spinning made 8-client single-image serving
    slower), or preprocess the next batch (extraction: 150 vs 100 images/s on 2 busy cores).
    """

    def __init__(self, model: bytes | Path, threads: int | None = None, param: str = "serve.runtime"):
        ort = need("onnxruntime", param)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every output of the graph, in its order (features, then the trunk if it has one)."""
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()  # ORT takes NCHW, not channels_last
        return tuple(torch.from_numpy(out) for out in self.session.run(None, {"images": images}))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]
