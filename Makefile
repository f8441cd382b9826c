# The README's two commands: `make run` (the main job) and `make test`; `make test-fast`
# (no image, containers, dvc repro or whole pipelines) and `make lint` while working.
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

.PHONY: setup run test test-fast lint fashion-mnist services services-down image image-push lock clean plots-template

setup: $(VENV)/.installed fashion-mnist

# pip (not uv) on purpose: it takes torch/torchvision from this machine's local files.
# requirements.lock pins every package, for this environment and the image alike.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c requirements.lock -e '.[pipeline,dev]'
	touch $@

# After changing dependencies in pyproject.toml: re-resolve and pin (then commit the lock).
lock:
	$(PY) -m pip install -e '.[pipeline,dev]'
	{ sed -n '1,2p' requirements.lock; $(PY) -m pip freeze --exclude-editable --all | grep -v '^pip=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# The component image (infra/Dockerfile) with docker or podman, tagged with the commit.
# Where no registry answers, it first makes a local Debian base (debootstrap). See infra/README.md.
image:
	infra/image.sh build

# The commit's image into a registry a cluster pulls from: make image-push REGISTRY=host[:port]/path
image-push:
	infra/image.sh push $(REGISTRY)

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

# The tests not marked slow (see pyproject.toml's markers): minutes, not the suite's hour.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Local S3 (SeaweedFS, 127.0.0.1:8333, data in .services/); `make services MLFLOW=1` adds
# an MLflow server on :5000; where podman is installed, its Docker API socket too (for
# `pipeline.py run --runner docker`). Then: eval "$$(infra/services.sh env)". See infra/README.md.
services: $(VENV)/.installed
	infra/services.sh start $(if $(MLFLOW),--mlflow)
	if command -v podman >/dev/null; then infra/image.sh api start; fi

services-down:
	infra/image.sh api stop
	infra/services.sh stop

# reports/headline.json stays: it is committed (DVC's metrics, read from git for every commit).
clean:
	rm -rf data models *.tmp kfp_local pipeline.yaml $(filter-out reports/headline.json,$(wildcard reports/*))

# The page `dvc plots show` writes, with vega inline so it draws offline (infra/plots/build_template.py).
# Committed: run only to change a pinned version. Needs npm and the npm registry.
plots-template:
	$(PY) infra/plots/build_template.py
