# Everything runs inside .venv; `make install` is idempotent (re-runs only when pyproject.toml or constraints.txt changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/quickstart.yaml
# UNTIL=stage_a (or any stage) stops the DAG early; empty runs it to the end (sample).
UNTIL ?=
PYTEST_ARGS ?=

.PHONY: install run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, from the pinned build, so nothing below can pull another one in.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	# constraints.txt: the versions the suite last passed with (pip's resolver backtracks for minutes without them)
	$(PY) -m pip install -e '.[test]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) pipelines/run.py --config $(CONFIG) $(if $(UNTIL),--until $(UNTIL))

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf outputs mlruns.db mlartifacts .pytest_cache
