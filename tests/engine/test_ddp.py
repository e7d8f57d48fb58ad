"""torchrun --nproc_per_node=2 on CPU (gloo) ends with the same adapters as one process, same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_erc.engine.checkpoint import list_checkpoints
from llama_erc.engine.loop import train_loop

from tests.engine.helpers import ADAM_EPS, base_cfg, synthetic_sequences, tiny_setup


# nf4: the packed base is a frozen uint8 parameter; block: the adapters are inputs of one autograd node per block,
# whose gradients leave it once each (DDP's hooks), compared with a single process without checkpointing
@pytest.mark.parametrize("base_quant,checkpointing", [("none", "none"), ("nf4", "none"), ("none", "block")])
def test_two_process_ddp_matches_single_process(tmp_path, base_quant, checkpointing):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path / "ddp"), base_quant, checkpointing], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = load_file(str(list_checkpoints(tmp_path / "ddp" / "run")[-1] / "adapters.safetensors"))

    cfg = base_cfg(tmp_path / "single", micro_batch=2, grad_accum=4, max_steps=3, adam_eps=ADAM_EPS,
                   lr=1.0, base_quant=base_quant)  # same global batch of 8 as 2 ranks x 2 x 2
    rt, model, mcfg = tiny_setup(cfg)
    train_loop(cfg, rt, model, mcfg, synthetic_sequences(24), pad_id=0)
    single = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(ddp) == set(single)
    for name, x in single.items():
        torch.testing.assert_close(ddp[name], x, rtol=1e-5, atol=1e-7, msg=name)
