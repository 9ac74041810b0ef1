# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned at install time so that a CPU machine gets the local 2.13.0 CPU wheel and no CUDA
# packages; pyproject.toml declares the range a GPU user can satisfy.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup train test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)" -e ".[dev]"
	touch $@

train: setup
	$(BIN)/xm2 fit --config config/nano.yaml

test: setup
	$(BIN)/ruff check xm2 callbacks tests scripts benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf artifacts mlruns mlflow.db lightning_logs
