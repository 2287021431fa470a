# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every pmap path runs for real on 2 host CPU devices. Compiled programs are shared between the
# test processes through JAX's persistent cache (.jax_cache/, safe to delete). The oneDNN conv
# backend is tested for real: its tests fail instead of skipping when it is not installed.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=2 TF_CPP_MIN_LOG_LEVEL=2 \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache BOKEH_JAX_TESTS_NEED_ONEDNN=1 \
	BOKEH_JAX_TESTS_NEED_BROWSER=1
# config.model.conv_impl='onednn': oneDNN from PyPI (library, headers, Intel's TBB/SYCL/OpenCL
# runtimes: ~630 MB download, ~1.9 GB in the venv, ~15 s to install).
ONEDNN_PACKAGES := onednn~=2026.1.0 onednn-devel~=2026.1.0
WORKDIR ?= workdir/demo


$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Installs oneDNN into the venv and compiles the custom calls (native/ -> native/build/, g++).
$(VENV)/.onednn: $(VENV)/.installed
	$(PY) -m pip install --quiet $(ONEDNN_PACKAGES)
	$(PY) -c 'from bokeh_jax import onednn; print(onednn.library_path())'
	touch $@

onednn: $(VENV)/.onednn

# The page of --mode=serve is tested in a real headless browser: Debian's chromium (installed
# with apt-get only when missing; ~100 MB), driven by the Playwright package
# (requirements-test.txt; its own browser download is never used).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

browser: $(CHROMIUM) $(VENV)/.installed-test
# `--mode=export`'s LiteRT interpreter (requirements-export.txt); the converters come with jax/TF.
$(VENV)/.export-extras: $(VENV)/.installed requirements-export.txt
	$(PY) -m pip install --quiet -r requirements-export.txt
	touch $@

export-extras: $(VENV)/.export-extras

# The demo's convolutions run on oneDNN where it installs (Linux x86-64), else on XLA.
demo: install
	-$(MAKE) --no-print-directory onednn
	$(PY) launch.py --workdir=$(WORKDIR)

test: install onednn browser export-extras
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile -rs --durations=15 tests

bench: install
	$(PY) launch.py --mode=bench --config=configs/default.py --workdir=workdir/bench

clean:
	rm -rf $(VENV) workdir .pytest_cache .jax_cache native/build
