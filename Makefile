# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every pmap path runs for real on 2 host CPU devices.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=2 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR ?= workdir/demo

.PHONY: install demo test bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) launch.py --workdir=$(WORKDIR)

test: install
	$(TEST_ENV) $(PY) -m pytest -n 2 --durations=15 tests

bench: install
	$(PY) launch.py --mode=bench --workdir=workdir/bench

clean:
	rm -rf $(VENV) workdir .pytest_cache
