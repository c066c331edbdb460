# Two entry points for a newcomer; each sets itself up (a virtualenv in .venv with the pinned versions).
#   make certify   certify the built-in editors on the built-in model organism and write a report
#   make test      run the project's own test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Number of pytest-xdist workers for the test suite; CI machines have 2 cores.
WORKERS ?= 2

.PHONY: install certify test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Organisms are built first, alone on the CPU: torch processes competing for two cores run several times
# slower than one process at a time. Both steps are no-ops once the cache holds the organisms.
# One torch thread per worker: a plain `pytest -n N` is no run the plugin owns (no editsafety option), so nothing
# else divides the cores, and two workers of two threads each on two cores ran ~10x slower than one process.
certify: install
	$(PY) -m pytest_editsafety zoo build tiny-gpt2
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS)

# The project's own tests are no certification run, so the plugin leaves xdist's scheduling alone: the
# organism tests' xdist groups keep each organism on one worker only under loadgroup.
test: install
	$(PY) -m pytest_editsafety zoo build all
	$(PY) -m pytest tests -n $(WORKERS) --dist loadgroup

bench: install
	$(PY) benchmarks/zoo_build.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
