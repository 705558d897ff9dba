# One virtual environment in .venv holds eventrails and everything its tests need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration e2e controlplane helm crds clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -ra

unit: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -ra tests/integration

# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from Go modules into
# ~/.cache/eventrails (about 12 minutes cold on 2 cores, then cached).
controlplane:
	scripts/build-controlplane.sh

e2e: $(STAMP) controlplane
	$(BIN)/python -m pytest -ra tests/e2e

crds: $(STAMP)
	$(BIN)/eventrails crds --output crds
	$(BIN)/eventrails crds --output charts/eventrails/crds
	cp operator/eventrails_operator/peering.yaml charts/eventrails/crds/kopf-peering.yaml

# Builds helm from tools/helm into ~/.cache/eventrails/helm (about 6 minutes cold, then cached).
helm:
	scripts/build-helm.sh

clean:
	rm -rf $(VENV) .pytest_cache

# Throughput of the publisher and the dispatcher against raw nats-py; figures in docs/benchmarks.md.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python bench/publisher.py
	$(BIN)/python bench/dispatcher.py
