"""pipeline.py's jobs apart from the pipeline graph: the KFP backends the IR runs on
(backends.py) and the server side of `submit` (server.py)."""
