# Two commands matter: `make demo` and `make test`. Both set everything up from nothing
# (virtual environment, package, Fashion-MNIST) and are fast the second time.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair known to work on the development machine; override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.edgeprune-installed
PYTEST_ARGS ?=

.PHONY: setup data demo test test-slow lint clean

setup: $(STAMP) data

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,ray]'
	@touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (gzipped IDX files); nothing is downloaded at run time.
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

demo: setup
	$(VENV)/bin/edgeprune run

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check edgeprune tests bench

clean:
	rm -rf $(VENV) runs/* .pytest_cache
