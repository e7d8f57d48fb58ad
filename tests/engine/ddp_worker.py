"""Run by tests/engine/test_ddp.py under torchrun: trains the tiny model on synthetic data, rank 0 saves."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llama_erc.engine.loop import train_loop  # noqa: E402
from llama_erc.engine.runtime import teardown_runtime  # noqa: E402
from tests.engine.helpers import ADAM_EPS, base_cfg, synthetic_sequences, tiny_setup  # noqa: E402

if __name__ == "__main__":
    cfg = base_cfg(Path(sys.argv[1]), micro_batch=2, grad_accum=2, max_steps=3, adam_eps=ADAM_EPS, lr=1.0,
                   base_quant=sys.argv[2] if len(sys.argv) > 2 else "none",
                   activation_checkpointing=sys.argv[3] if len(sys.argv) > 3 else "none")
    rt, model, mcfg = tiny_setup(cfg)
    assert rt.world_size == 2, rt
    train_loop(cfg, rt, model, mcfg, synthetic_sequences(24), pad_id=0)
    teardown_runtime()
