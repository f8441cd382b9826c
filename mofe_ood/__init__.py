"""OOD detection with vision foundation models and a Mixture of Feature Experts (MoFE).

The ML core (backbones, mofe, mixup, scores, metrics) imports with torch, timm,
numpy and scikit-learn alone; DVC, Kubeflow and MLflow are imported only by the
modules that talk to them.
"""

__version__ = "0.1.0"
