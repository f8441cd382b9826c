# The README's two commands: `make run` (the main job) and `make test`.
# Both create the virtual environment on first use and are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
# Tests and the default run never touch a model hub.
export HF_HUB_OFFLINE := 1
# Stage commands (mofe, python) come from the project environment.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: setup run test fashion-mnist services services-down clean

setup: $(VENV)/.installed fashion-mnist

# pip (not uv) on purpose: it takes torch/torchvision from this machine's local files.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[pipeline,dev]'
	touch $@

fashion-mnist:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
		echo "Fashion-MNIST not found in $(FASHION_MNIST_DIR)."; \
		echo "Install the Debian package as root (apt-get install dataset-fashion-mnist), or put the four"; \
		echo "*-ubyte.gz files of Fashion-MNIST in a folder and run: make run FASHION_MNIST_DIR=/that/folder"; \
		exit 1; \
	fi

run: setup
	$(VENV)/bin/dvc repro
	@echo
	@echo "Results: data/ (benchmark + features), models/, reports/ (see README: Outputs)"

test: setup
	$(VENV)/bin/pytest -q

# Local S3 (SeaweedFS, 127.0.0.1:8333, data in .services/); `make services MLFLOW=1` adds
# an MLflow server on :5000. Then: eval "$$(infra/services.sh env)". See infra/README.md.
services: $(VENV)/.installed
	infra/services.sh start $(if $(MLFLOW),--mlflow)

services-down:
	infra/services.sh stop

clean:
	rm -rf data models reports *.tmp kfp_local pipeline.yaml
