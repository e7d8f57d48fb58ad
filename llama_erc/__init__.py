"""llama_erc: a from-scratch LoRA fine-tuning engine for the LLaMA family, and the emotion recognition in
conversations (ERC) system that runs on it (a reproduction of DialogueLLM, arXiv 2310.11374).

The rooms, each importing only the ones listed after it:
    kernels/     fused ops (Triton RMSNorm, SwiGLU, RoPE; the one-node LoRA linear) and their pure-torch twins
    model/       the LLaMA-family model, weight loading (Meta, HF, GGUF), LoRA and PEFT's adapter format
    data/        corpora -> dialogues -> prompts -> tokens -> training Sequences; tokenizers; the dataset registry
    engine/      config, the one model build, the training step and loop, checkpoints, evaluation
    benchmarks/  throughput and memory against transformers + PEFT, the kernel benchmark, provenance
    demo/        the bundled demo set and the demos `make demo` / `make demo-tiny` run
imports run  kernels -> (torch, triton);  model -> kernels;  data -> nothing of ours;  engine -> model, data;
benchmarks -> engine;  demo and the faces (train.py, eval.py, bench.py) -> the package.
"""
