"""Run by tests/engine/test_resume.py under torchrun (2 processes, gloo on CPU): `resume_worker.py MODE ROOT`.

elastic: resume ROOT's one-process checkpoint (micro_batch 2 x grad_accum 2) on 2 processes; the same flags
         (global batch 8) must be refused on both ranks, grad_accum 1 (global batch 4) must run to the end.
sigterm: a fresh run of 2 processes x grad_accum 1; rank 1 alone receives SIGTERM during step 2, and both
         ranks must stop after that step, with one checkpoint.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import llama_erc.engine.loop  # noqa: E402
from llama_erc.engine.loop import train_loop  # noqa: E402
from llama_erc.engine.runtime import teardown_runtime  # noqa: E402
from tests.engine.helpers import ADAM_EPS, base_cfg, synthetic_sequences, tiny_setup  # noqa: E402

# one run: 24 examples, global batch 4, 4 steps; large Adam eps so that summation order cannot flip an update
RUN = dict(micro_batch=2, adam_eps=ADAM_EPS, lr=1.0, max_steps=4, save_every=100)
N_EXAMPLES = 24
WATCHDOG_S = 240  # a hung worker ends itself (SIGALRM) before the test's own timeout


def _run(root: Path, **kw) -> dict:
    cfg = base_cfg(root, **{**RUN, **kw})
    rt, model, mcfg = tiny_setup(cfg)
    assert rt.world_size == 2, rt
    return train_loop(cfg, rt, model, mcfg, synthetic_sequences(N_EXAMPLES), pad_id=0)


def main(mode: str, root: Path) -> int:
    signal.alarm(WATCHDOG_S)
    rank = int(os.environ["RANK"])
    if mode == "elastic":
        try:
            _run(root, grad_accum=2, resume=True)
        except ValueError as e:
            print(f"rank {rank} refused: {e}", flush=True)
        else:
            print(f"rank {rank}: a resume on 2 processes with global batch 8 was accepted", flush=True)
            return 3
        state = _run(root, grad_accum=1, resume=True)
        assert state["step"] == RUN["max_steps"], state
    elif mode == "sigterm":
        if rank == 1:  # the signal arrives while step 2 (index 1) runs, on this rank only
            lr_at = llama_erc.engine.loop.lr_at

            def lr_at_and_signal(step, *args):
                if step == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                return lr_at(step, *args)
            llama_erc.engine.loop.lr_at = lr_at_and_signal
        state = _run(root, grad_accum=1)
        assert state["step"] == 2 and state.get("interrupted"), state
    teardown_runtime()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], Path(sys.argv[2])))
