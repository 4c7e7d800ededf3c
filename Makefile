# Two entry points, each creating .venv on first use:
#   make demo   install, then run the whole pipeline on the built-in synthetic set (~4 min install + ~8 min run on 2 CPU cores)
#   make test   install (plus test-only tools), then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install install-test demo test bench clean

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/lock.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements/test.txt
	$(PIP) install -r requirements/test.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/wsss demo

test: install-test
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) .cache runs
