# tid-d2: two commands. Each sets up its own environment (idempotent) and then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tid-d2-installed-v1

.PHONY: setup demo test bench bench-quick clean

$(STAMP): scripts/setup_env.sh setup.py
	VENV=$(VENV) bash scripts/setup_env.sh

setup: $(STAMP)

# Main job (FCOS): teacher (trained once, cached) and student alone side by side -> TID student,
# one table on tid_shapes_test. `.venv/bin/python tools/demo.py --family retinanet` for RetinaNet.
demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run_benchmark.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run_benchmark.py --quick

clean:
	rm -rf output
