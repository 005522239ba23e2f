# Two commands do the whole set-up on a fresh machine:
#   make train   # creates .venv, installs, trains the tiny debug BAGEL on the bundled data (CPU)
#   make test    # creates .venv, installs, runs the whole test suite (what CI runs)
#   make test-fast  # the suite without multi-process and long tests (-m "not slow and not dist")
#   make lint    # ruff check (lint rules in pyproject.toml), ruff format --check and make typecheck
#   make typecheck  # mypy over bagel_titan, the plugins and benchmarks/ ([tool.mypy] in pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make TORCH_SPEC="torch==2.11.0" train`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= train_configs/debug_model.toml
# The run folder of CONFIG (<job.dump_folder>/<job.run_name>), where `train` draws loss.png.
RUN ?= outputs/debug
ARGS ?=

.PHONY: setup train test test-fast lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,plot]"
	touch $(STAMP)

# The example data, its tokenizer, question images and a small VAE fitted to its images (about a
# minute of CPU, once; again when its generator changes).
EXAMPLE_DATA := data/example/ae.safetensors

$(EXAMPLE_DATA): $(STAMP) plugins/data/example_data.py plugins/bagel/vae_fit.py
	$(VENV)/bin/bagel-titan-example-data data/example --vae

train: $(STAMP) $(EXAMPLE_DATA)
	$(VENV)/bin/bagel-titan --job.config_file $(CONFIG) $(ARGS)
	$(VENV)/bin/bagel-titan-plot $(RUN)

test: $(STAMP)
	$(PY) -m pytest tests -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow and not dist" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) typecheck

# mypy cannot map `plugins/` to the package name `bagel_titan_plugins` by itself: a link does.
typecheck: $(STAMP)
	mkdir -p build/mypy
	ln -sfn ../../plugins build/mypy/bagel_titan_plugins
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs data/example .pytest_cache
