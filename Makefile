# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -q

.PHONY: install demo test test-slow test-all lint mutate clean-runs

install: $(STAMP)

# torch first from the CPU wheel (a bare `torch` would pull several GB of CUDA), then the
# package with [dev], then DeepSpeed, which builds against the installed torch.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	$(PIP) install -q --disable-pip-version-check --no-build-isolation deepspeed
	touch $(STAMP)

demo: install
	$(PY) -m lightning_r1v2.demo

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

# undefined names and unused imports (pyflakes, from [dev])
lint: install
	$(PY) -m pyflakes lightning_r1v2 cli.py benchmarks tests

# only the end-to-end runs marked slow (about 9 minutes on 2 cores; not in CI, see .ci/run)
test-slow: install
	$(PY) -m pytest $(PYTEST_ARGS) -m slow

# both
test-all: install
	$(PY) -m pytest $(PYTEST_ARGS) -m "slow or not slow"

# mutation testing (not part of make test): one small fault at a time in a copy of the tree, the
# tests mapped to the faulty file run against it; prints the score and the survivors (tests/README.md)
mutate: install
	OMP_NUM_THREADS=1 $(PY) tests/mutate.py $(MUTATE_ARGS)

clean-runs:
	rm -rf runs
