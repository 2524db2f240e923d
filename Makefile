# The README's commands. Everything installs into ./.venv from PyPI on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= pocl,onnx,serve,docs,dev

.PHONY: demo test test-fast bench docs devices clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# The demo runs on the embedded PoCL device unless KVCL_DEVICE names another one.
demo: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/kvcl demo --device "$${KVCL_DEVICE:-pocl}"

devices: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/kvcl devices

test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q -ra

test-fast: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q -ra -x tests/host

# Jupyter Book: every tutorial notebook executed on the default device; warnings are errors.
docs: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/jupyter-book build --all -W -n --keep-going docs/

bench: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/kvcl bench --json bench-results.json --plot bench-results.png

clean:
	rm -rf $(VENV) build dist docs/_build .pytest_cache .hypothesis
