# Two entry points: `make demo` (install + built-in CPU training run) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean ffcv-deps

install: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# x86_64 + Python 3.11: the pinned torch build; elsewhere pip resolves torch>=2.4 from pyproject.
	@if [ "$$(uname -m)" = "x86_64" ] && $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		$(PY) -m pip install --quiet -r requirements-cpu.txt; fi
	$(PY) -m pip install --quiet -e '.[test,dali]'
	@# FFCV (pipelines.convert, data.backend=ffcv) builds from source against system libraries; it is
	@# optional: when it cannot be installed its tests skip and everything else works.
	-@$(MAKE) --no-print-directory ffcv-deps
	-$(PY) -m pip install --quiet 'ffcv==1.0.2' || echo "warning: ffcv not installed (pipelines.convert unavailable)"
	touch $(STAMP)

FFCV_APT := pkg-config libturbojpeg0-dev libopencv-dev
ffcv-deps:
	@if pkg-config --exists libturbojpeg opencv4 2>/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "warning: no apt-get; install $(FFCV_APT) for FFCV"; exit 0; fi; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y --no-install-recommends $(FFCV_APT) >/dev/null \
	  || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends $(FFCV_APT) >/dev/null; } \
	  || echo "warning: could not install $(FFCV_APT) (needed to build FFCV)"

demo: $(STAMP)
	$(PY) -m wcl_fast.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs data
