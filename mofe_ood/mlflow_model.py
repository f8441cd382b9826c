"""The MLflow pyfunc around a `Detector` bundle, logged as code (MLflow's "models from code").

register.py logs this file, not a pickled object: MLflow runs it when the model
is loaded, and `load_context` reads the bundle (safetensors + JSON) from the
model's artifacts. Input: a DataFrame with one row per image and a column
`image` (encoded file bytes; base64 in JSON requests) or `path` (a file the
loading process can read). Output: class, probability, probabilities,
ood_score (higher = more ID), is_ood, error (set for unreadable images).
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class DetectorModel(PythonModel):
    def load_context(self, context):
        from mofe_ood.inference import Detector

        self.detector = Detector.load(context.artifacts["detector"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mofe_ood.inference import images_from_input

        batch_size = int((params or {}).get("batch_size") or 64)
        return self.detector.predict(images_from_input(model_input), batch_size=batch_size).to_frame()


mlflow.models.set_model(DetectorModel())
