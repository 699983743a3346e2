# The README's two commands: `make demo` (main job) and `make test` (test suite).
# Each creates .venv in the checkout if missing and installs the package with every extra,
# pinned by constraints.txt so the resolver has nothing to search.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT   ?= out
export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[sim,lerobot,teleop,dev]"
	@touch $(STAMP)

install: $(STAMP)

# Main job. Until the end-to-end world-model demo lands, it records a small real-physics sample
# store and describes it (text report plus a contact sheet PNG).
demo: $(STAMP)
	$(PY) -m tools.sample_store out=$(OUT)/sample.zarr
	$(VENV)/bin/wm-info store=$(OUT)/sample.zarr

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_loader.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(OUT) .pytest_cache
