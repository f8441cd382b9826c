"""pipeline.py's jobs apart from wiring the pipeline graph: how each step runs (pods.py: its
pod on a cluster, its container here), local runs and the DockerRunner workaround (local.py),
the KFP backends an IR needs (backends.py), and the server side of `submit` (server.py)."""
