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

# The install takes about 10 GiB (PyTorch pulls its CUDA libraries from PyPI even for CPU use);
# --no-cache-dir keeps pip from storing a second copy of the wheels (~4 GiB) in ~/.cache.
$(STAMP): pyproject.toml constraints.txt
	@free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt 11 ]; then \
	  echo "warning: $$free GiB free on $$(pwd); the install needs about 10 GiB" >&2; fi
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e ".[sim,lerobot,teleop,dev,vae]"
	@touch $(STAMP)

install: $(STAMP)

# Main job: expert demonstrations -> world model -> MPC to goals in another arm of the maze, beside a
# random-action baseline (time on a 2-core CPU: BENCHMARKS.md). Writes $(OUT)/demo/results.json.
demo: $(STAMP)
	$(VENV)/bin/wm-demo out=$(OUT)/demo

# Two pytest processes (pytest-xdist), each taking whole test files (their module fixtures, trained
# models among them, built once); `pytest tests/test_x.py` runs one file in this process.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_sim.py
	$(PY) benchmarks/bench_predictor.py
	$(PY) benchmarks/bench_policy.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(OUT) .pytest_cache
