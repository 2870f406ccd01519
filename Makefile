# Everything runs inside .venv; `make install` is idempotent (re-runs only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/quickstart.yaml
# The DAG runs prepare -> stage_a today; encode, stage_b and sample join as they land (issues #5, #6).
UNTIL ?= stage_a
PYTEST_ARGS ?=

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, from the pinned build, so nothing below can pull another one in.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) pipelines/run.py --config $(CONFIG) --until $(UNTIL)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf outputs mlruns.db mlartifacts .pytest_cache
