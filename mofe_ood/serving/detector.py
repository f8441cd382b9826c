"""The Detector: images in, a class and an OOD decision out. It only predicts.

It holds what a trained variant needs at prediction time: the backbone (BatchNorm
folded, channels-last), the variant's head, the score fitted on its bank (the ID
train features through the head), and the threshold `evaluate` calibrated (score >=
threshold means ID). `mofe score`, the served MLflow model and the tests call
`predict`; the bank and the score come from evaluate's own code, so all compute
the same numbers. Building one from pipeline folders and saving / loading it is
serving/bundle.py's job.

Images go the way `prepare` + `extract` take in-memory images (images.py): decoded to
RGB, downscaled by PIL only when the longer side exceeds `max_side`, then resized and
normalised as one tensor batch, so a PNG of a benchmark image scores as it did in
evaluate. (Image-folder splits, which extract reads from disk straight at image_size,
are resized by PIL instead: close, not equal.)

Concurrent callers (the MLflow server runs each request in a thread) share one
forward pass at a time: whoever holds the model scores every batch queued meanwhile
as one (ours), so 8 clients sending one image each cost one forward of 8, not 8
forwards fighting over the cores.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mofe_ood.backbones import Preprocess, for_inference, pooled_features, preprocess
from mofe_ood.images import MAX_PIXELS, BadImage, as_image, escaped

log = logging.getLogger(__name__)


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

        records = self.records()
        probs = [None if e is not None else row.tolist() for row, e in zip(self.probabilities, self.errors)]
        columns = {name: [r[name] for r in records] for name in ("class", "probability")}
        columns["probabilities"] = probs
        columns.update({name: [r[name] for r in records] for name in ("ood_score", "is_ood", "error")})
        # object columns: a missing value is null in JSON, not NaN, and pandas infers no
        # (Arrow string) dtype, which cost more than the rest of a single-image answer
        return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})


class _Batcher:
    """One forward pass at a time; each pass takes the batches queued while the last one ran.

    A pass takes queued batches in arrival order up to `max_rows` rows (at least one batch),
    so memory stays bounded however many requests wait.
    """

    def __init__(self, forward, max_rows: int = 32):
        self.forward, self.max_rows = forward, max_rows
        self.model_lock = threading.Lock()
        self.queue_lock = threading.Lock()
        self.queue: list[dict] = []

    def __call__(self, x: torch.Tensor):
        job = {"x": x, "out": None}
        with self.queue_lock:
            self.queue.append(job)
        while job["out"] is None:
            with self.model_lock:
                if job["out"] is None:  # not done by an earlier pass: take what is queued
                    self._pass()
        return job["out"]

    def _pass(self) -> None:
        with self.queue_lock:
            take, rows = 0, 0
            while take < len(self.queue) and (take == 0 or rows + len(self.queue[take]["x"]) <= self.max_rows):
                rows += len(self.queue[take]["x"])
                take += 1
            jobs, self.queue = self.queue[:take], self.queue[take:]
        x = jobs[0]["x"] if len(jobs) == 1 else torch.cat([j["x"] for j in jobs])
        outputs = self.forward(x)  # arrays (or None) with a row per input row
        start = 0
        for j in jobs:
            n = len(j["x"])
            j["out"] = tuple(None if o is None else o[start:start + n] for o in outputs)
            start += n


class Detector:
    """Backbone -> variant head -> OOD score + threshold; `predict` takes images, not features."""

    def __init__(self, *, variant: str, classes: list[str], backbone: torch.nn.Module,
                 backbone_spec: dict, head: torch.nn.Module | None, head_files: dict[str, bytes],
                 bank: dict[str, np.ndarray], score: dict, max_side: int, max_pixels: int = MAX_PIXELS,
                 max_rows: int | None = None, max_row_bytes: int | None = None,
                 max_request_pixels: int | None = None, path_root: str | None = None,
                 onnx: Path | None = None):
        self.variant = variant
        self.classes = list(classes)
        self.backbone_spec = dict(backbone_spec)
        # A fine-tuned variant's image model (FinetunedMoFE) gives the routed feature itself.
        self.finetuned = backbone_spec["weights"] == "finetuned"
        size = int(backbone_spec["image_size"])
        # The model as built is what a bundle saves (BatchNorm folding renames its tensors).
        self.saved_backbone = backbone
        self.backbone = backbone.eval() if self.finetuned else for_inference(backbone, size)
        # A bundle saved for onnxruntime runs its exported backbone (serving/runtime.py)
        self.session = None
        if onnx is not None and not self.finetuned:
            from mofe_ood.serving.runtime import Session

            self.session = Session(Path(onnx))
        self.prep = Preprocess(size, tuple(backbone_spec["mean"]), tuple(backbone_spec["std"]))
        self.head = head.eval() if head is not None else None
        self.head_files = dict(head_files)
        self.bank = dict(bank)
        self.score_spec = {"name": score["name"], "hyper": dict(score.get("hyper") or {}),
                           "threshold": float(score["threshold"]), "tpr": score.get("tpr")}
        self.threshold = self.score_spec["threshold"]
        self.max_side = int(max_side)
        self.max_pixels = int(max_pixels)
        # Request limits the served model applies (serving/pyfunc.py); None: no limit
        self.max_rows = None if max_rows is None else int(max_rows)
        self.max_row_bytes = None if max_row_bytes is None else int(max_row_bytes)
        self.max_request_pixels = None if max_request_pixels is None else int(max_request_pixels)
        self.path_root = path_root
        self.scorer = self._fit_score()
        self._scored = _Batcher(self.scored)

    def _fit_score(self):
        from mofe_ood import scores

        head = None
        if self.head is not None:  # as evaluate.variant_outputs hands the head to the scores
            weight, bias = self.head.classifier_weights()
            head = (weight.detach().numpy().astype(np.float64), bias.detach().numpy().astype(np.float64))
        return scores.make_score(self.score_spec["name"], **self.score_spec["hyper"]).fit(
            self.bank["features"], self.bank["labels"], self.bank.get("logits"), head)

    # ---- predicting

    @torch.inference_mode()
    def outputs(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed images -> (the feature the score reads, class logits or None)."""
        if self.finetuned:  # as finetune writes features/: NCHW input, the routed feature
            features = self.backbone(x.contiguous())["feature"].float()
        elif self.session is not None:
            features = self.session(x)
        else:
            features = pooled_features(self.backbone, x).float()
        if self.head is None:
            return features.numpy(), None
        result = self.head(features)
        return result["feature"].float().numpy(), result["logits"].float().numpy()

    def scored(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed images -> (OOD score, class logits or None).

        The score runs in the pass too: a KNN score reads its whole bank (7,000 x 1,280
        floats by default) whatever the rows, once per pass instead of once per request.
        """
        feature, logits = self.outputs(x)
        return self.scorer.score(feature, logits), logits

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
                        decoded.append(as_image(images[i], self.max_side, self.max_pixels))
                        good.append(i)
                    except BadImage as err:
                        result.errors[i] = str(err)
                        item = images[i]
                        name = f" {escaped(item)}" if isinstance(item, (str, Path)) else ""
                        log.info("input %d%s: %s%s", i, name, err, f" ({escaped(err.detail)})" if err.detail else "")
                if not good:
                    continue
                x = to_batch(decoded, self.prep)
            ood_score, logits = self._scored(x)
            result.ood_score[good] = ood_score
            if logits is not None:
                result.class_index[good] = logits.argmax(1)
                result.probabilities[good] = torch.softmax(torch.from_numpy(logits), 1).numpy()
        ok = np.array([e is None for e in result.errors], bool)
        result.is_ood[ok] = result.ood_score[ok] < self.threshold
        return result


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
