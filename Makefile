# The two commands a newcomer needs: `make demo` (the main job) and `make test` (the tests).
# Each one creates or refreshes .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2
# Passive OpenMP waiting: busy-waiting threads slow torch badly when the 2 cores are shared.
export OMP_WAIT_POLICY ?= PASSIVE

# With these settings glibc keeps freed memory instead of returning it to the OS and faulting it back in
# on the next step: the models benchmark runs once with the default allocator and once with them.
MALLOC_BIG := 1000000000
# The speed-ratio benchmarks run under OpenMP's default wait policy, as torch runs for its users: passive waiting
# wakes sleeping threads at every parallel op, which costs small ops most (docs/kronify.md, "OpenMP wait policy").
# The layer benchmark runs once more under PASSIVE, as `make test` and `make demo` run.
DEFAULT_OMP ?= env -u OMP_WAIT_POLICY

.PHONY: venv demo test bench clean

venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"

demo: venv
	$(PY) recipes/table1.py --preset demo

test: venv
	$(PY) -m pytest -q

bench: venv
	$(DEFAULT_OMP) $(PY) -m benchmarks.layers
	OMP_WAIT_POLICY=PASSIVE $(PY) -m benchmarks.layers --processes 3 --stem layers_omp_passive
	$(PY) -m benchmarks.convert
	$(PY) -m benchmarks.loader
	$(DEFAULT_OMP) $(PY) -m benchmarks.models
	$(DEFAULT_OMP) MALLOC_MMAP_THRESHOLD_=$(MALLOC_BIG) MALLOC_TRIM_THRESHOLD_=$(MALLOC_BIG) \
		$(PY) -m benchmarks.models --stem models_malloc_tuned
	$(PY) -m benchmarks.training
	$(PY) -m benchmarks.calibration

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
