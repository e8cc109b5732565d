# Two entry points: `make demo` (install + built-in CPU training run) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# x86_64 + Python 3.11: the pinned torch build; elsewhere pip resolves torch>=2.4 from pyproject.
	@if [ "$$(uname -m)" = "x86_64" ] && $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		$(PY) -m pip install --quiet -r requirements-cpu.txt; fi
	$(PY) -m pip install --quiet -e '.[test,dali]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m wcl_fast.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs data
