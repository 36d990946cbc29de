# Every target bootstraps .venv on first use; the stamp files make a second run install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check --quiet
# torch is pinned only here and in the lock (pyproject keeps torch>=2.4): 2.13.0 is the CPU build on
# this machine's disk. Every other distribution that make installs is pinned in requirements.lock
# (tools/lock.py checks it first: a broken lock is one line and exit 1). `make lock` re-resolves it.
TORCH_PIN := torch==2.13.0
LOCK := requirements.lock
CHECK_LOCK = $(PYTHON) tools/lock.py check $(LOCK)
# the extras of the development environment; "all" is every user-facing extra
DEV_EXTRAS := dev,all,baselines
STAMP := $(VENV)/.stamp-dev
DOCS_STAMP := $(VENV)/.stamp-docs
PYTEST := $(PY) -m pytest
# Triton kernels are tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set
# before triton is imported, so the kernel tests run in a pytest process of their own).
PYTEST_ARGS ?= -q

.PHONY: demo test test-all test-latest lock wheel-check bench bench-quick bench-workloads gpu-check docs lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# $(call INSTALL,python,pip constraint args): one environment, bootstrapped the same way each time.
# backpack (via curvlinops) pulls the registry's torchvision, which fails to import beside the CPU
# torch and breaks `import transformers`; neither curvlinops nor backpack needs it.
define INSTALL
	$(1) -m pip --disable-pip-version-check --quiet install $(2) --upgrade pip setuptools wheel
	$(1) -m pip --disable-pip-version-check --quiet install $(2) $(TORCH_PIN)
	$(1) -m pip --disable-pip-version-check --quiet install $(2) -e ".[$(DEV_EXTRAS)]"
	$(1) -m pip --disable-pip-version-check --quiet uninstall -y torchvision
endef

# $(call RUN_TESTS,python[,environment]): the fast suite (the kernels under Triton's interpreter,
# in a process of their own)
define RUN_TESTS
	TRITON_INTERPRET=1 $(2) $(1) -m pytest $(PYTEST_ARGS) -m "not slow" tests/kernels
	$(2) $(1) -m pytest $(PYTEST_ARGS) -m "not slow" --ignore=tests/kernels
endef

$(STAMP): pyproject.toml $(LOCK) | $(PY)
	@$(CHECK_LOCK)
	$(call INSTALL,$(PY),-c $(LOCK))
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	@$(CHECK_LOCK)
	$(PIP) install -c $(LOCK) -e ".[docs]"
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/curvopt bench --problem softmax --threads 1

test: $(STAMP)
	$(call RUN_TESTS,$(PY))

# Build the wheel, install it with the locked torch into a fresh venv and, from outside the source
# tree, smoke-test it twice: alone (a plain `pip install curvopt`), then with [bench,gpu]. CI runs it.
WHEEL_VENV := build/wheel-venv
WHEEL_PIP = $(WHEEL_VENV)/bin/python -m pip --disable-pip-version-check --quiet
wheel-check: $(STAMP)
	rm -rf build/wheel $(WHEEL_VENV)
	$(PIP) wheel --no-deps --no-build-isolation --wheel-dir build/wheel .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_PIP) install -c $(LOCK) $(TORCH_PIN)
	$(WHEEL_PIP) install -c $(LOCK) build/wheel/curvopt-*.whl
	cd $(WHEEL_VENV) && bin/python $(CURDIR)/.ci/wheel_smoke.py plain
	$(WHEEL_PIP) install -c $(LOCK) "$$(ls build/wheel/curvopt-*.whl)[bench,gpu]"
	cd $(WHEEL_VENV) && bin/python $(CURDIR)/.ci/wheel_smoke.py extras

# Re-resolve requirements.lock: a fresh venv (.venv-lock) gets the newest versions that pyproject
# allows (torch pinned), the lock is written from it, then .venv is rebuilt from it and the suite runs.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	$(call INSTALL,.venv-lock/bin/python,)
	.venv-lock/bin/python -m pip --disable-pip-version-check --quiet install -e ".[docs]"
	# torchvision is installed (then removed) by every bootstrap: pin the version pip picks for it
	.venv-lock/bin/python -m pip --disable-pip-version-check --quiet install torchvision $(TORCH_PIN)
	$(PYTHON) tools/lock.py write .venv-lock/bin/python $(LOCK)
	rm -rf .venv-lock
	rm -f $(STAMP) $(DOCS_STAMP)
	$(MAKE) test

# The newest versions that pyproject allows, without the lock, in a venv of their own (.venv-latest;
# not in CI): a release that breaks curvopt shows up here first. docs/installation.md keeps the last
# result. CURVOPT_UNLOCKED tells the lock's own test that this environment is not the locked one.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	$(call INSTALL,.venv-latest/bin/python,)
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	$(call RUN_TESTS,.venv-latest/bin/python,CURVOPT_UNLOCKED=1)

# test-all also runs the property-based tests (tests/fuzz) with a large example budget.
test-all: $(STAMP)
	TRITON_INTERPRET=1 $(PYTEST) $(PYTEST_ARGS) tests/kernels
	HYPOTHESIS_PROFILE=thorough $(PYTEST) $(PYTEST_ARGS) --ignore=tests/kernels

# Full runs take tens of minutes and refresh the figures under docs/img; `make bench-quick` is a
# smoke run (a few minutes) that writes its figures under results/quick instead.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

# Optimizers on workloads (issue #23): MFAC vs AdamW, SGD, SOAP, Muon, PSGD on a char-level GPT-2,
# a digits autoencoder and a digits CNN; about 40 minutes on one CPU thread. JSON and tables in
# results/workloads/, plots in docs/img/workloads_*.png.
bench-workloads: $(STAMP)
	$(PY) benchmarks/workloads.py

# Every GPU figure in one command (benchmarks/gpu_check.py: five parts with their own budgets, under
# 8 minutes on an H200; report in results/gpu/). Without CUDA it is a dry run of well under a minute
# (also run by `make test`). On the GPU machine, which has its own Python and no registry access,
# skip the venv and run from the source tree:  CURVOPT_NO_VENV=1 make gpu-check
GPU_CHECK_PY = $(if $(CURVOPT_NO_VENV),$(PYTHON),$(PY))
GPU_CHECK_ARGS ?=

gpu-check: $(if $(CURVOPT_NO_VENV),,$(STAMP))
	PYTHONPATH=. $(GPU_CHECK_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# mkdocstrings reads the source statically and cannot follow the package-dir mapping of kernels/,
# so the docs are built from a plain (non-editable) copy of the package under build/docs-pkg.
docs: $(DOCS_STAMP)
	rm -rf build/docs-pkg
	$(PIP) install --no-deps --no-build-isolation --target build/docs-pkg .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .venv-lock .venv-latest site build *.egg-info
