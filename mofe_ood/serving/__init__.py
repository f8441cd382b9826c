"""Serving: what happens after the pipeline (ours).

- detector.py: the Detector, which only predicts;
- bundle.py: a Detector from pipeline folders, saved as / loaded from a bundle;
- pyfunc.py + model.py: the bundle as an MLflow pyfunc (per-row answers, input limits);
- runtime.py: the backbone on ONNX Runtime.
The registry's rules (the promotion gate, the tracking connection) are mofe_ood/registry/.
"""
