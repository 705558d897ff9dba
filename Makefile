# One virtual environment in .venv holds eventrails and everything its tests need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration e2e crds lint clean

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

crds: $(STAMP)
	$(BIN)/eventrails crds --output crds

clean:
	rm -rf $(VENV) .pytest_cache
