"""LoRA fine-tuning of LLaMA 2: `torchrun --nproc_per_node=1 train.py --model DIR --train_data meld=DIR ...`

Every flag is a field of engine.config.TrainConfig (`python train.py --help`); `--config run.json` sets many.
"""
from __future__ import annotations

import sys

from engine.config import TrainConfig, parse_config
from engine.loop import NonFiniteError


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(TrainConfig, argv)
        from engine.train import train  # after argument errors, so --help stays fast
        state = train(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad arguments, data or checkpoints: DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done at step {state['step']}" + (" (interrupted; resume with --resume)" if state.get("interrupted")
                                             else "") + f"; outputs in {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
