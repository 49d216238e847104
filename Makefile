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

.PHONY: demo test lint bench clean-venv image-cpu image-gpu cluster-config browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_TORCH_FLAGS) torch==$$(grep -E '^torch==' constraints.txt | cut -d= -f3)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/motiondirector demo --out demo-out

# The web page's browser tests drive Debian's chromium through Playwright (tests/test_serve_web.py).
# Installed here when missing and root + apt-get are available; otherwise those tests skip saying why.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
			|| echo "WARNING: could not install chromium; the browser tests will skip"; \
	else echo "WARNING: $(CHROMIUM) missing and no root/apt-get to install it; the browser tests will skip"; fi

test: $(STAMP) browser
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
