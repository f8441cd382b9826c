"""The detector bundle: build a Detector from pipeline folders, save it, load it.

A bundle is safetensors + JSON, never pickle: detector.json (format, variant, classes,
backbone reference, score, threshold, input limits), bank.safetensors, head/ (the
variant's head files), and backbone.safetensors unless the backbone is the packaged
one (referred to by name) or fine-tuned (its weights are in head/). It is what the
registry stores and what `mofe score --model` reads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors

from mofe_ood.backbones import create_backbone
from mofe_ood.config import section
from mofe_ood.images import MAX_PIXELS
from mofe_ood.params import ParamError, check_number
from mofe_ood.serving.detector import Detector
from mofe_ood.serving.runtime import ONNX_FILE, RUNTIMES, export
from mofe_ood.variants import FROZEN, load_head, load_image_model, variant_outputs

FORMAT = "mofe-ood-detector/1"


@dataclass(frozen=True)
class Serve:
    """The `serve` section: the registered model's runtime and the input limits it enforces per request (ours)."""

    max_pixels: int
    max_rows: int
    max_row_bytes: int
    max_request_pixels: int
    path_root: str | None
    runtime: str

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ParamError(f"serve.runtime: {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        for name in ("max_pixels", "max_rows", "max_row_bytes", "max_request_pixels"):
            check_number(f"serve.{name}", getattr(self, name), low=1, integer=True)
        if self.path_root is not None and (not isinstance(self.path_root, str) or not self.path_root.startswith("/")):
            raise ParamError(f"serve.path_root: {self.path_root!r} is not an absolute folder path (a folder on "
                             f"the serving host whose files clients may name) or null (no `path` rows)")

    def limits(self) -> dict:
        """The Detector's keyword arguments for these limits."""
        return {"max_pixels": self.max_pixels, "max_rows": self.max_rows, "max_row_bytes": self.max_row_bytes,
                "max_request_pixels": self.max_request_pixels, "path_root": self.path_root}


def serve(params: dict) -> Serve:
    return section(Serve, params.get("serve"), "serve")


def from_pipeline(variant: str, models_dir: str | Path = "models",
                  features_dir: str | Path = "data/features", reports_dir: str | Path = "reports",
                  params: dict | None = None, max_pixels: int | None = None,
                  max_rows: int | None = None) -> Detector:
    """The detector of `variant` as the pipeline left it (train + evaluate outputs).

    Its input limits are params' `serve` section when there is one; `max_pixels` and
    `max_rows`, when given, override those two.
    """
    models_dir, features_dir, reports_dir = Path(models_dir), Path(features_dir), Path(reports_dir)
    params = params or {}
    model_dir = models_dir / variant
    own_features = model_dir / "features"  # a fine-tuned variant has its own features
    bank_dir = own_features if (own_features / "train.npz").is_file() else features_dir
    thresholds_path = reports_dir / "thresholds.json"
    for path in (bank_dir / "info.json", thresholds_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the pipeline (dvc repro) first")
    info = json.loads((bank_dir / "info.json").read_text())
    thresholds = json.loads(thresholds_path.read_text())
    if variant not in thresholds:
        raise ValueError(f"{thresholds_path} has no threshold for variant {variant!r} "
                         f"(evaluated: {', '.join(thresholds) or 'none'})")
    # The bank and the head as evaluate computes them, on one thread: a matmul's float bits change
    # with torch's thread count, and the same inputs must give the same bundle (its content hash
    # is how a re-registration is recognised), whatever the calling process set before.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs, _ = variant_outputs(variant, bank_dir, models_dir, ["train"])
    finally:
        torch.set_num_threads(threads)
    train = outputs["train"]
    bank = {"features": np.ascontiguousarray(train.features, np.float32),
            "labels": np.ascontiguousarray(train.labels, np.int64)}
    head, head_files = None, {}
    if variant != FROZEN:
        head, _ = load_head(model_dir)
        head_files = {f.name: f.read_bytes() for f in sorted(model_dir.iterdir())
                      if f.is_file() and f.suffix in (".json", ".safetensors")}
        bank["logits"] = np.ascontiguousarray(train.logits, np.float32)
    backbone, spec = _pipeline_backbone(info, model_dir, params)
    max_side = int((params.get("prepare") or {}).get("max_side") or 128)
    calibration = thresholds[variant]  # {score, hyper, tpr, threshold}
    score = {"name": calibration["score"], "hyper": calibration.get("hyper") or {},
             "threshold": calibration["threshold"], "tpr": calibration.get("tpr")}
    limits = serve(params).limits() if "serve" in params else {"max_pixels": MAX_PIXELS}
    limits.update({k: v for k, v in (("max_pixels", max_pixels), ("max_rows", max_rows)) if v is not None})
    return Detector(variant=variant, classes=info["classes"], backbone=backbone, backbone_spec=spec,
                    head=head, head_files=head_files, bank=bank, score=score, max_side=max_side, **limits)


def _pipeline_backbone(info: dict, model_dir: Path, params: dict) -> tuple[torch.nn.Module, dict]:
    """The model that turned images into the variant's input features, and how a bundle refers to it."""
    config_path = model_dir / "config.json"
    tuned = json.loads(config_path.read_text()).get("finetuned") if config_path.is_file() else None
    if tuned:  # an image model (variants.save_image_model): backbone + MoFE, images -> routed feature
        model, _ = load_image_model(model_dir)
        return model, {"name": tuned["backbone"], "weights": "finetuned", "source": "finetuned",
                       "image_size": int(tuned["image_size"]), "mean": list(tuned["mean"]),
                       "std": list(tuned["std"]), "feature_dim": int(model.backbone.num_features)}
    name, weights, size = info["backbone"], str(info["weights"]), int(info["image_size"])
    if weights == "random":  # tests only: the same random draw as extract.run makes
        with torch.random.fork_rng():
            torch.manual_seed(int((params.get("base") or {}).get("seed", 0)))
            backbone = create_backbone(name, "random", size, num_classes=0)
    else:
        backbone = create_backbone(name, weights, size, num_classes=0)
    cfg = backbone.pretrained_cfg
    spec = {"name": name, "weights": "package" if weights == "package" else "embedded", "source": weights,
            "image_size": size, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "feature_dim": int(backbone.num_features)}
    return backbone, spec


def save(detector: Detector, out_dir: str | Path, runtime: str = "torch") -> Path:
    """Write the bundle (replacing `out_dir`): detector.json, bank.safetensors, head/, [backbone].

    runtime "onnxruntime" adds backbone.onnx (a frozen backbone only), which `load` then runs.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    spec = dict(detector.backbone_spec)
    spec.pop("onnx", None)  # a loaded bundle's: written again below only for runtime onnxruntime
    if spec["weights"] not in ("package", "finetuned"):  # finetuned: its weights are in head/
        spec["weights"] = "backbone.safetensors"
        save_tensors({k: v.detach().contiguous() for k, v in detector.saved_backbone.state_dict().items()},
                     out_dir / "backbone.safetensors")
    if runtime == "onnxruntime" and not detector.finetuned:
        export(detector.backbone, spec["image_size"], out_dir / ONNX_FILE)
        spec["onnx"] = ONNX_FILE
    save_arrays(detector.bank, out_dir / "bank.safetensors")
    if detector.head_files:
        (out_dir / "head").mkdir()
        for name, data in detector.head_files.items():
            (out_dir / "head" / name).write_bytes(data)
    config = {"format": FORMAT, "variant": detector.variant, "classes": detector.classes, "backbone": spec,
              "head": "head" if detector.head_files else None, "score": detector.score_spec,
              "input": {"max_side": detector.max_side, "max_pixels": detector.max_pixels,
                        "max_rows": detector.max_rows, "max_row_bytes": detector.max_row_bytes,
                        "max_request_pixels": detector.max_request_pixels, "path_root": detector.path_root}}
    (out_dir / "detector.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def load(bundle_dir: str | Path) -> Detector:
    bundle_dir = Path(bundle_dir)
    config_path = bundle_dir / "detector.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a detector bundle (no detector.json)")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format {config.get('format')!r}, this code reads {FORMAT!r}")
    spec = config["backbone"]
    if spec["weights"] == "package":
        backbone = create_backbone(spec["name"], "package", spec["image_size"], num_classes=0)
    elif spec["weights"] == "finetuned":
        backbone, _ = load_image_model(bundle_dir / config["head"])
    else:  # the exact tensors that were saved, loaded strictly
        backbone = create_backbone(spec["name"], "random", spec["image_size"], num_classes=0)
        backbone.load_state_dict(load_tensors(bundle_dir / spec["weights"]))
    head, head_files = None, {}
    if config.get("head"):
        head_dir = bundle_dir / config["head"]
        head, _ = load_head(head_dir)
        head_files = {f.name: f.read_bytes() for f in sorted(head_dir.iterdir()) if f.is_file()}
    bank = load_arrays(bundle_dir / "bank.safetensors")
    limits = config["input"]  # older bundles lack the newer limits: none of those then
    onnx = bundle_dir / spec["onnx"] if spec.get("onnx") else None  # bundles saved for torch have none
    return Detector(variant=config["variant"], classes=config["classes"], backbone=backbone,
                    backbone_spec=spec, head=head, head_files=head_files, bank=bank,
                    score=config["score"], max_side=limits["max_side"],
                    max_pixels=limits.get("max_pixels", MAX_PIXELS), max_rows=limits.get("max_rows"),
                    max_row_bytes=limits.get("max_row_bytes"), max_request_pixels=limits.get("max_request_pixels"),
                    path_root=limits.get("path_root"), onnx=onnx)


def load_detector(model: str, features_dir: str | Path = "data/features", reports_dir: str | Path = "reports",
                  params: dict | None = None) -> Detector:
    """A registry URI (models:/NAME@ALIAS, runs:/...), a bundle or MLflow model folder, or models/<variant>."""
    if ":/" in model:
        import tempfile

        import mlflow

        from mofe_ood.registry.tracking import connect

        connect(must_exist=True)
        with tempfile.TemporaryDirectory(prefix="mofe-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=tmp))
            found = sorted(local.rglob("detector.json"))
            if not found:
                raise FileNotFoundError(f"{model} holds no detector bundle (is it a mofe-ood model?)")
            return load(found[0].parent)
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (give models/<variant>, a detector "
                                "bundle, or a registry URI such as models:/mofe-ood@champion)")
    if (path / "detector.json").is_file():
        return load(path)
    if (path / "artifacts" / "detector" / "detector.json").is_file():  # a downloaded MLflow model
        return load(path / "artifacts" / "detector")
    return from_pipeline(path.name, path.parent, features_dir, reports_dir, params)  # params' serve limits
