PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test install lint serve clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,dev]'
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no test: that is a failure here, like any non-zero exit.
# Lint first (a second): the style guide asks for ruff-clean code, so CI holds it.
test: lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check hornet_bundle hornet_cli model_export service tests bench
	$(VENV)/bin/ruff format --check hornet_bundle hornet_cli model_export service tests bench

serve: $(STAMP)
	$(VENV)/bin/hornet serve

clean:
	rm -rf $(VENV) .pytest_cache
