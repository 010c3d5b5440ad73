PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The test-only OpenMMLab environment of the cross-checks (docs/cross-checks.md).
MM_VENV ?= .venv-mm
MM_STAMP := $(MM_VENV)/.installed
# The exact versions the tests run on: pip constraints over the whole closure of the
# export and dev extras, made by docker/lock_requirements.py (docs/deploy.md), so that a
# dependency's new release cannot change CI between two commits; the same file holds the
# build backend that makes the editable install (setuptools) to its version.
CONSTRAINTS := .ci/constraints.txt

.PHONY: test install mm-env lint serve clean

# `make test` builds .venv and .venv-mm at the same time (each is mostly unpacking wheels).
MAKEFLAGS += --jobs=2

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint $(CONSTRAINTS) --build-constraint $(CONSTRAINTS) \
		-e '.[export,dev]'
	touch $(STAMP)

install: $(STAMP)

$(MM_STAMP): tools/make_mm_env.sh .ci/constraints-mm.txt
	tools/make_mm_env.sh $(MM_VENV) $(PYTHON)

mm-env: $(MM_STAMP)

# pytest exits 5 when it collects no test: that is a failure here, like any non-zero exit.
# Lint first (a second): the style guide asks for ruff-clean code, so CI holds it.
# The cross-checks against mmseg/mmdet run in $(MM_VENV), made first, once (2 CPU-minutes;
# 9-14 minutes of wall time measured on a loaded 2-core machine, most of it unpacking torch).
# Two pytest workers (pytest-xdist), each taking whole files (module fixtures built once):
# much of the suite waits on server processes, so two workers on two cores halve the wall
# time; the slowest tests are listed at the end. The two environments install side by side.
test: lint mm-env
	HORNET_MM_VENV=$(MM_VENV) $(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check hornet_bundle hornet_cli model_export service tests bench
	$(VENV)/bin/ruff format --check hornet_bundle hornet_cli model_export service tests bench

serve: $(STAMP)
	$(VENV)/bin/hornet serve

clean:
	rm -rf $(VENV) $(MM_VENV) .pytest_cache
