"""The MLflow pyfunc around a detector bundle, logged as code (MLflow's "models from code").

register.py logs this file, not a pickled object: MLflow runs it when the model is
loaded, and `load_context` reads the bundle (safetensors + JSON) from the model's
artifacts. Input and output: serving/pyfunc.py. Threads: MOFE_SERVE_THREADS sets the
backbone's thread count for the serving host (default: torch's, one per core): ONNX
Runtime's for a bundle saved for it, torch's otherwise; one forward pass runs at a time
and takes every request queued meanwhile (detector.py).

What a client sees of a failure is a message from a fixed vocabulary (pyfunc.py); a
bug's traceback goes to the server's log only (MLflow would send it, with the server's
paths, in the response).
"""

import logging
import os

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

log = logging.getLogger("mofe_ood.serving")


class DetectorModel(PythonModel):
    def load_context(self, context):
        import torch

        from mofe_ood.serving.bundle import load
        from mofe_ood.serving.runtime import leave_cores_to

        if os.environ.get("MOFE_SERVE_THREADS"):
            torch.set_num_threads(int(os.environ["MOFE_SERVE_THREADS"]))
        self.detector = load(context.artifacts["detector"])  # ONNX Runtime takes torch's thread count
        leave_cores_to(self.detector.session)
        if not log.handlers and log.getEffectiveLevel() > logging.INFO:  # why each row failed: the server's log
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

        from mofe_ood.serving.pyfunc import BadRequest, batch_size_from, rows_from_input

        d = self.detector
        try:
            batch_size = batch_size_from(params, d.max_rows)
            rows = rows_from_input(model_input, d.max_rows or len(model_input) or 1, max_row_bytes=d.max_row_bytes,
                                   max_request_pixels=d.max_request_pixels, max_pixels=d.max_pixels,
                                   path_root=d.path_root)
            return d.predict(rows, batch_size=batch_size).to_frame()
        except BadRequest as err:  # the request itself is malformed: HTTP 400 with what was expected
            raise MlflowException.invalid_parameter_value(str(err)) from None
        except Exception:
            log.exception("scoring a request failed")
            raise MlflowException("internal error while scoring (details in the server's log)",
                                  error_code=INTERNAL_ERROR) from None


mlflow.models.set_model(DetectorModel())
