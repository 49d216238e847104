# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv once (idempotent: the stamp file is rebuilt only when the
# dependency files change) and install the exact versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch by default. On a GPU machine: make TORCH_INDEX=https://download.pytorch.org/whl/cu128 ...
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: demo test lint bench clean-venv image-cpu image-gpu cluster-config

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_TORCH_FLAGS) torch==$$(grep -E '^torch==' constraints.txt | cut -d= -f3)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/motiondirector demo --out demo-out

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled OMP_NUM_THREADS=2 $(BIN)/pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)

# Container images for the KubeRay manifests in cluster/ (docs/operations.md). Push them where your
# cluster pulls from: make image-gpu IMAGE=ghcr.io/you/motiondirector && docker push ...
IMAGE ?= registry.example.com/motiondirector
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image-cpu:
	docker build -f cluster/Dockerfile --build-arg FLAVOR=cpu -t $(IMAGE):$(VERSION)-cpu .

image-gpu:
	docker build -f cluster/Dockerfile --build-arg FLAVOR=gpu -t $(IMAGE):$(VERSION)-gpu .

# Regenerate cluster/specs-configmap.yaml (from configs/) and rayservice.yaml's serveConfigV2 (from serve.app).
cluster-config: $(STAMP)
	$(BIN)/python cluster/generate.py
