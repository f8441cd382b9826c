"""The MLflow pyfunc around a detector bundle, logged as code (MLflow's "models from code").

register.py logs this file, not a pickled object: MLflow runs it when the model is
loaded, and `load_context` reads the bundle (safetensors + JSON) from the model's
artifacts. Input and output: serving/pyfunc.py. Threads: MOFE_SERVE_THREADS sets the
backbone's thread count for the serving host (default: torch's, one per core): ONNX
Runtime's for a bundle saved for it, torch's otherwise; one forward pass runs at a time
and takes every request queued meanwhile (detector.py).
"""

import os

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class DetectorModel(PythonModel):
    def load_context(self, context):
        import torch

        from mofe_ood.serving.bundle import load
        from mofe_ood.serving.runtime import leave_cores_to

        if os.environ.get("MOFE_SERVE_THREADS"):
            torch.set_num_threads(int(os.environ["MOFE_SERVE_THREADS"]))
        self.detector = load(context.artifacts["detector"])  # ONNX Runtime takes torch's thread count
        leave_cores_to(self.detector.session)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        from mofe_ood.serving.pyfunc import BadRequest, rows_from_input

        batch_size = int((params or {}).get("batch_size") or 64)
        try:
            rows = rows_from_input(model_input, self.detector.max_rows or len(model_input) or 1)
        except BadRequest as err:  # the request itself is malformed: HTTP 400 with what was expected
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return self.detector.predict(rows, batch_size=batch_size).to_frame()


mlflow.models.set_model(DetectorModel())
