# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every pmap path runs for real on 2 host CPU devices. Compiled programs are shared between the
# test processes through JAX's persistent cache (.jax_cache/, safe to delete).
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=2 TF_CPP_MIN_LOG_LEVEL=2 \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache
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
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile -rs --durations=15 tests

bench: install
	$(PY) launch.py --mode=bench --config=configs/default.py --workdir=workdir/bench

clean:
	rm -rf $(VENV) workdir .pytest_cache .jax_cache
