#!/usr/bin/env bash
# Everything a lent GPU session measures, in parts that each fit one 10-minute device call.
#
#   bash scripts/gpu_session.sh check   # GPU tests (kernels, flex_attention, fused LoRA), kernel bench, 7B memory
#                                       (full and selective activation checkpointing)
#   bash scripts/gpu_session.sh erc     # bench.py on real MELD batches: our variants vs HF + PEFT, eval throughput
#   bash scripts/gpu_session.sh erc32   # the same at micro-batch 32 (bigger GEMMs; the paper's global batch is 128)
#   bash scripts/gpu_session.sh fixed   # bench.py, fixed-length rows of 512: MFU
#   bash scripts/gpu_session.sh quant   # the quantized frozen base (model/quant.py): 7B memory with NF4 / Q8_0 beside
#                                       bf16, tokens/s side by side (bench.py variants), the dequantization tests
#   bash scripts/gpu_session.sh all     # one call of at most 8 minutes (DEADLINE_S, default 470 s of commands):
#                                       the GPU tests, the kernel timer and a launch-config sweep of the new kernels,
#                                       7B memory (block recompute, NF4), fixed 8 x 512 and ERC micro-batch 8 against
#                                       HF + PEFT bf16 (block, CUDA graphs, NF4), decoding vs generate
#   DRY=1 bash scripts/gpu_session.sh all   # the same steps on a CPU with tiny shapes: checks the script, times nothing
#
# Results go to $OUT (the device tool's folder; default benchmarks/results/gpu) and are committed from there under
# benchmarks/results/ with the device, date and commit they carry. The real MELD files and the LLaMA 2 tokenizer
# are read from $SHARED (default .gpu/shared, an ignored folder: copy ../shared/data/meld and
# ../shared/tokenizer there and carry it; they are never committed; the erc part stops without them). Each step has its own time limit, so one hang cannot take the
# others' results with it; the step's log says what happened. The device receives the tree without .git, so
# pass the commit it is: `GIT_COMMIT=<sha> bash scripts/gpu_session.sh check` (llama_erc/benchmarks/provenance.py).
set -uo pipefail
part=${1:?usage: scripts/gpu_session.sh check|erc|erc32|fixed|quant|all}
OUT=${OUT:-benchmarks/results/gpu}
SHARED=${SHARED:-.gpu/shared}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
log="$OUT/$part.log"

DEADLINE_S=${DEADLINE_S:-0}  # 0: no overall limit; `all` sets one so the whole call fits the device tool's budget
run() {  # run LIMIT_S CMD...: one step, its output appended to the part's log
    local limit=$1; shift
    if (( DEADLINE_S > 0 )); then  # never past the deadline: a step gets what is left, or is skipped
        local left=$(( DEADLINE_S - SECONDS ))
        if (( left < 15 )); then echo "=== skipped (${left}s left of ${DEADLINE_S}s): $*" | tee -a "$log"; return; fi
        (( limit > left )) && limit=$left
    fi
    echo "=== $(date -u +%FT%TZ) limit ${limit}s: $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

data_args=()
if [[ -f "$SHARED/tokenizer/llama2/tokenizer.model" && -d "$SHARED/data/meld" ]]; then
    data_args=(--meld "$SHARED/data/meld" --tokenizer "$SHARED/tokenizer/llama2/tokenizer.model")
fi

case $part in
check)
    { nvidia-smi; echo "commit ${GIT_COMMIT:-unknown (set GIT_COMMIT)}"
      $PY -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())'; } 2>&1 | tee -a "$log"
    run 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests
    run 200 $PY -m llama_erc.benchmarks.kernels --reps 30 --out "$OUT/kernels.json"  # 3 repeats x 30 calls, profiled + host-timed
    run 120 $PY -m llama_erc.benchmarks.train_memory --out "$OUT/train_memory.json"
    run 120 $PY -m llama_erc.benchmarks.train_memory --checkpointing selective --out "$OUT/train_memory_selective.json"
    ;;
erc|erc32)
    if [[ ${#data_args[@]} -eq 0 ]]; then
        echo "erc: no $SHARED/data/meld and $SHARED/tokenizer/llama2/tokenizer.model; copy ../shared there and carry it" \
            | tee -a "$log" >&2
        exit 2
    fi
    if [[ $part == erc32 ]]; then
        run 560 $PY bench.py --mode erc "${data_args[@]}" --out "$OUT" --micro-batch 32 --eval-examples 0 \
            --variants packing+prefix,packing+prefix+fused+selective
        exit
    fi
    # our configurations one after the other, then the HF baselines, on the same batches: ratios from one run
    run 560 $PY bench.py --mode erc "${data_args[@]}" --out "$OUT" \
        --variants base,packing,packing+prefix,packing+flex,packing+prefix+fused,packing+prefix+selective,packing+prefix+fused+selective,packing+prefix+fused+selective+compile
    ;;
fixed)
    run 400 $PY bench.py --mode fixed --seq-len 512 --eval-examples 0 --out "$OUT" \
        --variants base,fused,selective,fused+selective,fused+selective+compile
    ;;
quant)
    # the dequantization kernels' own rows are in `check`'s kernel benchmark (forward only, % of copy bandwidth)
    run 120 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_dequant_gguf.py tests/kernels/test_dequant_nf4.py
    for bq in none nf4 q8_0; do
        run 150 $PY -m llama_erc.benchmarks.train_memory --base_quant $bq --out "$OUT/train_memory_$bq.json"
    done
    run 400 $PY bench.py --mode fixed --seq-len 512 --eval-examples 0 --out "$OUT" --systems ours \
        --variants base,nf4,q8_0,fused,fused+nf4
    ;;
all)
    # Issue 19 + the quantized base in one device call. Order: what decides defaults first, so a step that
    # runs out of time loses the least. DRY=1: CPU, tiny shapes, nothing timed is meaningful.
    (( DEADLINE_S > 0 )) || DEADLINE_S=470  # the global default 0 means "none" for the other parts
    if [[ ${DRY:-0} == 1 ]]; then
        small=(--smoke) mem=(--preset tiny --device cpu --dtype fp32 --steps 1) bench=(--device cpu --steps 1 --warmup 0)
        sweep=(--smoke --only "rope_qk fwd" "swiglu bwd")
    else
        small=(--reps 20) mem=() bench=(--steps 6 --warmup 2)
        sweep=(--reps 20 --repeats 3 --only "rope_qk fwd" "swiglu bwd")  # ~75 configs, each compiled once
    fi
    { nvidia-smi 2>/dev/null || echo "no nvidia-smi (DRY=${DRY:-0})"; echo "commit ${GIT_COMMIT:-unknown (set GIT_COMMIT)}"
      $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'; } 2>&1 | tee -a "$log"
    if [[ ${DRY:-0} != 1 ]]; then  # the GPU tests of the new paths (CUDA graphs, block recompute, kernels)
        run 90 $PY -m pytest -q -x -p no:cacheprovider -m gpu tests/engine/test_graphs.py tests/model/test_recompute.py \
            tests/kernels/test_rope_qk.py tests/kernels/test_swiglu.py tests/engine/test_supervised_gather.py \
            tests/engine/test_decode.py
    fi
    run 60 $PY -m llama_erc.benchmarks.kernels "${small[@]}" --out "$OUT/kernels.json"
    for ck in block none; do  # does "none" fit 8 x 512 at 7B (what `auto` would pick), and what block keeps
        run 35 $PY -m llama_erc.benchmarks.train_memory "${mem[@]}" --checkpointing $ck --out "$OUT/train_memory_$ck.json"
    done
    run 35 $PY -m llama_erc.benchmarks.train_memory "${mem[@]}" --checkpointing block --base_quant nf4 \
        --out "$OUT/train_memory_block_nf4.json"
    run 110 $PY bench.py --mode fixed --seq-len 512 "${bench[@]}" --eval-examples 0 --out "$OUT" \
        --systems ours,hf_peft_bf16 --variants fused,fused+block,fused+block+nf4
    if [[ ${#data_args[@]} -gt 0 ]]; then  # real MELD prompts: micro-batch 8, launch-bound, where graphs matter
        run 100 $PY bench.py --mode erc "${data_args[@]}" "${bench[@]}" --checkpointing off --eval-examples 64 \
            --out "$OUT" --systems ours,hf_peft_bf16 --variants packing+prefix+fused,packing+prefix+fused+graphs
    else
        echo "=== skipped erc: no $SHARED/data/meld and $SHARED/tokenizer/llama2/tokenizer.model (carry them)" | tee -a "$log"
    fi
    # last: it takes whatever time is left (each config compiles once); the winners go to the JSON it writes
    run 60 $PY -m llama_erc.benchmarks.kernel_sweep "${sweep[@]}" --out "$OUT/kernel_sweep.json"
    echo "=== all: ${SECONDS}s of ${DEADLINE_S}s" | tee -a "$log"
    ;;
*)
    echo "unknown part $part: check, erc, erc32, fixed, quant or all" >&2; exit 2 ;;
esac
