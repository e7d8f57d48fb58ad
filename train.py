"""LoRA fine-tuning of a LLaMA-family model: `torchrun --nproc_per_node=1 train.py --model DIR --train_data meld=DIR ...`

Every flag is a field of llama_erc.engine.config.TrainConfig (`python train.py --help`); `--config run.json` sets
many. The same entry point is installed as the `llama-erc-train` console script.
"""
from llama_erc.engine.train import main

if __name__ == "__main__":
    raise SystemExit(main())
