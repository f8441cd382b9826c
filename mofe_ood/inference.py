"""Inference: the one place where images become a class and an OOD decision.

`Detector` bundles everything a trained variant needs at prediction time: the
backbone (a reference to the packaged weights, or the weights themselves), the
variant's head, the score's fit data (the KNN bank = ID train features through
the head), the score's name and hyper-parameters, and the decision threshold
calibrated by `evaluate` (score >= threshold means ID). `mofe score` and the
MLflow model (register.py) both call `Detector.predict`, and the bank and the
score are fitted by evaluate's own code, so all three compute the same numbers.

Images go the way `prepare` + `extract` take in-memory images: decoded to RGB,
downscaled by PIL only when the longer side exceeds `max_side` (prepare.max_side),
then resized and normalised as one tensor batch, so a PNG of a benchmark image
scores as the image did in evaluate. (Image-folder splits, which extract reads
from disk straight at image_size, are resized by PIL instead: close, not equal.)
A bundle (`save`/`load`) is safetensors + JSON, never pickle.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors
from tqdm import tqdm

from mofe_ood.backbones import Preprocess, create_backbone, for_inference, pooled_features
from mofe_ood.extract import preprocess
from mofe_ood.images import MAX_PIXELS, BadImage, as_image, encode_png, list_images  # noqa: F401 (re-exported)

FORMAT = "mofe-ood-detector/1"
FROZEN = "frozen"  # evaluate.FROZEN: the backbone alone, no head


def to_batch(images: list[np.ndarray], prep: Preprocess) -> torch.Tensor:
    """Images of any sizes -> N x 3 x S x S, each same-shaped group resized as one batch."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    if len(groups) == 1:
        return preprocess(np.stack(images), prep)
    out = torch.empty(len(images), 3, prep.image_size, prep.image_size)
    for index in groups.values():
        out[index] = preprocess(np.stack([images[i] for i in index]), prep)
    return out.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- predictions

@dataclass
class Predictions:
    """Per input image; rows whose `errors` entry is set carry no prediction (NaN / -1)."""

    classes: list[str]
    class_index: np.ndarray    # N, int64, -1 when unknown
    probabilities: np.ndarray  # N x C float32 (C = 0 for a variant without a classifier)
    ood_score: np.ndarray      # N float64, higher = more ID
    is_ood: np.ndarray         # N bool
    errors: list[str | None]

    def __len__(self) -> int:
        return len(self.errors)

    def records(self) -> list[dict]:
        out = []
        for i, error in enumerate(self.errors):
            if error is not None:
                out.append({"class": None, "probability": None, "ood_score": None, "is_ood": None,
                            "error": error})
                continue
            c = int(self.class_index[i])
            out.append({"class": self.classes[c] if c >= 0 else None,
                        "probability": float(self.probabilities[i, c]) if c >= 0 else None,
                        "ood_score": float(self.ood_score[i]), "is_ood": bool(self.is_ood[i]),
                        "error": None})
        return out

    def to_frame(self):
        """pandas DataFrame: class, probability, probabilities (list per row), ood_score, is_ood, error."""
        import pandas as pd

        frame = pd.DataFrame(self.records(), columns=["class", "probability", "ood_score", "is_ood", "error"])
        probs = [None if e is not None else [float(v) for v in row]
                 for row, e in zip(self.probabilities, self.errors)]
        frame.insert(2, "probabilities", probs)
        return frame


# ---------------------------------------------------------------- the detector

class Detector:
    """Backbone -> variant head -> OOD score + threshold; `predict` takes images, not features."""

    def __init__(self, *, variant: str, classes: list[str], backbone: torch.nn.Module,
                 backbone_spec: dict, head: torch.nn.Module | None, head_files: dict[str, bytes],
                 bank: dict[str, np.ndarray], score: dict, max_side: int):
        self.variant = variant
        self.classes = list(classes)
        self.backbone_spec = dict(backbone_spec)
        # A fine-tuned variant's image model (finetune.FinetunedMoFE) gives the routed feature itself.
        self.finetuned = backbone_spec["weights"] == "finetuned"
        size = int(backbone_spec["image_size"])
        # The model as built is what a bundle saves (BatchNorm folding renames its tensors).
        self.saved_backbone = backbone
        self.backbone = backbone.eval() if self.finetuned else for_inference(backbone, size)
        self.prep = Preprocess(size, tuple(backbone_spec["mean"]), tuple(backbone_spec["std"]))
        self.head = head.eval() if head is not None else None
        self.head_files = dict(head_files)
        self.bank = dict(bank)
        self.score_spec = {"name": score["name"], "hyper": dict(score.get("hyper") or {}),
                           "threshold": float(score["threshold"]), "tpr": score.get("tpr")}
        self.threshold = self.score_spec["threshold"]
        self.max_side = int(max_side)
        self.scorer = self._fit_score()

    def _fit_score(self):
        from mofe_ood import scores

        head = None
        if self.head is not None:  # as evaluate.variant_outputs hands the head to the scores
            weight, bias = self.head.classifier_weights()
            head = (weight.detach().numpy().astype(np.float64), bias.detach().numpy().astype(np.float64))
        return scores.make_score(self.score_spec["name"], **self.score_spec["hyper"]).fit(
            self.bank["features"], self.bank["labels"], self.bank.get("logits"), head)

    # ---- building

    @classmethod
    def from_pipeline(cls, variant: str, models_dir: str | Path = "models",
                      features_dir: str | Path = "data/features", reports_dir: str | Path = "reports",
                      params: dict | None = None) -> "Detector":
        """The detector of `variant` as the pipeline left it (train + evaluate outputs)."""
        from mofe_ood import evaluate

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
        # The bank and the head exactly as evaluate computes them.
        outputs, _ = evaluate.variant_outputs(variant, bank_dir, models_dir, ["train"])
        train = outputs["train"]
        bank = {"features": np.ascontiguousarray(train.features, np.float32),
                "labels": np.ascontiguousarray(train.labels, np.int64)}
        head, head_files = None, {}
        if variant != FROZEN:
            from mofe_ood.train import load_model

            head, _ = load_model(model_dir)
            head_files = {f.name: f.read_bytes() for f in sorted(model_dir.iterdir())
                          if f.is_file() and f.suffix in (".json", ".safetensors")}
            bank["logits"] = np.ascontiguousarray(train.logits, np.float32)
        backbone, spec = _pipeline_backbone(info, model_dir, params)
        max_side = int((params.get("prepare") or {}).get("max_side") or 128)
        calibration = thresholds[variant]  # {score, hyper, tpr, threshold}
        score = {"name": calibration["score"], "hyper": calibration.get("hyper") or {},
                 "threshold": calibration["threshold"], "tpr": calibration.get("tpr")}
        return cls(variant=variant, classes=info["classes"], backbone=backbone, backbone_spec=spec,
                   head=head, head_files=head_files, bank=bank, score=score, max_side=max_side)

    def save(self, out_dir: str | Path) -> Path:
        """Write the bundle (replacing `out_dir`): detector.json, bank.safetensors, head/, [backbone]."""
        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        spec = dict(self.backbone_spec)
        if spec["weights"] not in ("package", "finetuned"):  # finetuned: its weights are in head/
            spec["weights"] = "backbone.safetensors"
            save_tensors({k: v.detach().contiguous() for k, v in self.saved_backbone.state_dict().items()},
                         out_dir / "backbone.safetensors")
        save_arrays(self.bank, out_dir / "bank.safetensors")
        if self.head_files:
            (out_dir / "head").mkdir()
            for name, data in self.head_files.items():
                (out_dir / "head" / name).write_bytes(data)
        config = {"format": FORMAT, "variant": self.variant, "classes": self.classes, "backbone": spec,
                  "head": "head" if self.head_files else None, "score": self.score_spec,
                  "input": {"max_side": self.max_side, "max_pixels": MAX_PIXELS}}
        (out_dir / "detector.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out_dir

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "Detector":
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
            from mofe_ood.finetune import load_finetuned

            backbone, _ = load_finetuned(bundle_dir / config["head"])
        else:  # the exact tensors that were saved, loaded strictly
            backbone = create_backbone(spec["name"], "random", spec["image_size"], num_classes=0)
            backbone.load_state_dict(load_tensors(bundle_dir / spec["weights"]))
        head, head_files = None, {}
        if config.get("head"):
            from mofe_ood.train import load_model

            head_dir = bundle_dir / config["head"]
            head, _ = load_model(head_dir)
            head_files = {f.name: f.read_bytes() for f in sorted(head_dir.iterdir()) if f.is_file()}
        bank = load_arrays(bundle_dir / "bank.safetensors")
        return cls(variant=config["variant"], classes=config["classes"], backbone=backbone,
                   backbone_spec=spec, head=head, head_files=head_files, bank=bank,
                   score=config["score"], max_side=config["input"]["max_side"])

    # ---- predicting

    @torch.inference_mode()
    def outputs(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed images -> (the feature the score reads, class logits or None)."""
        if self.finetuned:  # as finetune writes features/: NCHW input, the routed feature
            features = self.backbone(x.contiguous())["feature"].float()
        else:
            features = pooled_features(self.backbone, x).float()
        if self.head is None:
            return features.numpy(), None
        result = self.head(features)
        return result["feature"].float().numpy(), result["logits"].float().numpy()

    def predict(self, images, batch_size: int = 64, progress: bool = False) -> Predictions:
        """Images -> Predictions, in input order.

        `images`: a uint8 array (N x H x W gray or N x H x W x 3), or a sequence of file
        paths, encoded image bytes or uint8 arrays. An input that cannot be read gets an
        error message in `Predictions.errors`; the others are still predicted.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be >= 1")
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise ValueError(f"an image array must be uint8 N x H x W [x C], got {images.dtype} "
                                 f"{images.shape}")
            if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
                raise ValueError(f"an image array must be N x H x W x C with C in 1, 3, 4; got {images.shape}")
        n = len(images)
        c = len(self.classes) if self.head is not None else 0
        result = Predictions(self.classes, np.full(n, -1, np.int64), np.full((n, c), np.nan, np.float32),
                             np.full(n, np.nan), np.zeros(n, bool), [None] * n)
        starts = range(0, n, batch_size)
        # progress: a bar on stderr when it is a terminal (tqdm's disable=None)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=None if progress else True,
                          leave=False, dynamic_ncols=True):
            stop = min(start + batch_size, n)
            if isinstance(images, np.ndarray):  # one shape: no per-image decoding
                batch = images[start:stop]
                if batch.ndim == 4:
                    batch = batch[..., 0] if batch.shape[-1] == 1 else batch[..., :3]
                good, x = list(range(start, stop)), preprocess(batch, self.prep)
            else:
                good, decoded = [], []
                for i in range(start, stop):
                    try:
                        decoded.append(as_image(images[i], self.max_side))
                        good.append(i)
                    except BadImage as err:
                        result.errors[i] = str(err)
                if not good:
                    continue
                x = to_batch(decoded, self.prep)
            feature, logits = self.outputs(x)
            result.ood_score[good] = self.scorer.score(feature, logits)
            if logits is not None:
                result.class_index[good] = logits.argmax(1)
                result.probabilities[good] = torch.softmax(torch.from_numpy(logits), 1).numpy()
        ok = np.array([e is None for e in result.errors], bool)
        result.is_ood[ok] = result.ood_score[ok] < self.threshold
        return result


def _pipeline_backbone(info: dict, model_dir: Path, params: dict) -> tuple[torch.nn.Module, dict]:
    """The model that turned images into the variant's input features, and how a bundle refers to it."""
    config_path = model_dir / "config.json"
    tuned = json.loads(config_path.read_text()).get("finetuned") if config_path.is_file() else None
    if tuned:  # finetune.py: backbone + MoFE with block experts, images -> routed feature
        from mofe_ood.finetune import load_finetuned

        model, _ = load_finetuned(model_dir)
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


def images_from_input(model_input: Any) -> Any:
    """What the MLflow model receives -> what `Detector.predict` takes.

    A DataFrame (or dict of columns) with `image` (encoded bytes) and/or `path`
    per row (a row's bytes win over its path), a list/Series of paths or bytes, or
    a uint8 image array.
    """
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        return model_input
    if isinstance(model_input, dict):
        import pandas as pd

        model_input = pd.DataFrame(model_input)
    columns = getattr(model_input, "columns", None)
    if columns is None:
        return list(model_input)
    if "image" not in columns and "path" not in columns:
        raise ValueError(f"expected a column 'image' (encoded image bytes) or 'path', got {list(columns)}")
    images = model_input["image"].tolist() if "image" in columns else [None] * len(model_input)
    paths = model_input["path"].tolist() if "path" in columns else [None] * len(model_input)
    out: list = []
    for image, path in zip(images, paths):
        if isinstance(image, (bytes, bytearray)) and len(image):
            out.append(image)
        else:  # pandas fills a missing cell with None or NaN
            out.append(path if isinstance(path, str) and path else b"")
    return out


def example_images():
    """A two-row model input (gray and RGB 28 x 28 PNGs): the MLflow model's input example."""
    import pandas as pd

    ramp = np.add.outer(np.arange(28), np.arange(28)).astype(np.uint8) * 4
    return pd.DataFrame({"image": [encode_png(ramp), encode_png(np.stack([ramp, ramp.T, 255 - ramp], -1))]})


# ---------------------------------------------------------------- `mofe score`

def load_detector(model: str, features_dir: str | Path = "data/features", reports_dir: str | Path = "reports",
                  params: dict | None = None) -> Detector:
    """A registry URI (models:/NAME@ALIAS, runs:/...), a bundle or MLflow model folder, or models/<variant>."""
    if ":/" in model:
        import tempfile

        import mlflow

        from mofe_ood.register import connect

        connect(must_exist=True)
        with tempfile.TemporaryDirectory(prefix="mofe-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=tmp))
            found = sorted(local.rglob("detector.json"))
            if not found:
                raise FileNotFoundError(f"{model} holds no detector bundle (is it a mofe-ood model?)")
            return Detector.load(found[0].parent)
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (give models/<variant>, a detector "
                                "bundle, or a registry URI such as models:/mofe-ood@champion)")
    if (path / "detector.json").is_file():
        return Detector.load(path)
    if (path / "artifacts" / "detector" / "detector.json").is_file():  # a downloaded MLflow model
        return Detector.load(path / "artifacts" / "detector")
    return Detector.from_pipeline(path.name, path.parent, features_dir, reports_dir, params)


def score_files(detector: Detector, paths: list[Path], emit, batch_size: int = 64,
                progress: bool = True) -> tuple[int, int]:
    """Predict `paths` chunk by chunk, calling `emit(path, record)` in order; -> (scored, failed)."""
    scored = failed = 0
    chunk = batch_size * 16
    with tqdm(total=len(paths), unit="img", desc="mofe score", leave=False, dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            for path, record in zip(part, detector.predict(part, batch_size=batch_size).records()):
                emit(path, record)
                failed += record["error"] is not None
                scored += record["error"] is None
            bar.update(len(part))
    return scored, failed
