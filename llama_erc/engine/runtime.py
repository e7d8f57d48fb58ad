"""Process runtime: torchrun environment, device and dtype policy, seeding, RNG state capture.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE. One process (or no torchrun at all) runs single-device;
WORLD_SIZE > 1 initialises torch.distributed (NCCL on GPU, gloo on CPU) and the loop wraps the model in
DistributedDataParallel. Nothing here communicates by hand.

dtype "auto" follows the hardware (`resolve_dtype`): bf16 on a CUDA device that supports it; on a CPU, bf16
only where the CPU has native bf16 matmul (oneDNN's check: AVX512-BF16 or AMX on x86, the BF16 extension on
Arm), fp32 otherwise, because there bf16 is emulated and a bf16 matmul runs many times slower than fp32 (about
13x measured on an AVX2-only EPYC; 7.5x on this project's dev machine with oneDNN capped at AVX2). The choice and
its reason are printed by the run and recorded in its config.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    use_kernels: bool
    dtype_reason: str = ""  # why this dtype (resolve_dtype); "" when it was asked for by name

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_CHOICES = ("auto", *DTYPES)


def _cpu_bf16_matmul_probe(n: int = 256, reps: int = 5) -> bool:
    """Measured: is a bf16 matmul at least as fast as fp32 here? (Only where torch has no oneDNN bf16 check.)"""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.ones(n, 2 * n, dtype=dtype), torch.ones(2 * n, n, dtype=dtype)
        a @ b  # the first call picks a kernel
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(torch.bfloat16) <= best(torch.float32)


def _onednn_bf16_check():
    """oneDNN's own answer (it honours ONEDNN_MAX_CPU_ISA), or None where this torch build has no such op."""
    return getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)


def cpu_has_native_bf16() -> tuple[bool, str]:
    """(whether this CPU runs bf16 matmuls natively, how that was decided)."""
    capability = torch.backends.cpu.get_cpu_capability()
    check = _onednn_bf16_check()
    if check is not None:
        native = bool(check())
        return native, f"CPU capability {capability}, oneDNN native bf16 {'yes' if native else 'no'}"
    native = _cpu_bf16_matmul_probe()
    return native, f"CPU capability {capability}, measured bf16 matmul {'as fast as' if native else 'slower than'} fp32"


def resolve_dtype(requested: str, device: torch.device, trained: str | None = None) -> tuple[torch.dtype, str]:
    """(dtype, reason). `requested` is bf16, fp32 or auto; `trained`, for eval of a fine-tuned run, the dtype the
    run trained in: auto never evaluates an fp32 run in bf16."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return DTYPES[requested], ""
    if trained == "fp32":
        return torch.float32, "auto -> fp32: the run trained in fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"auto -> bf16: {name} supports bf16"
        return torch.float32, f"auto -> fp32: {name} has no bf16 support"
    native, how = cpu_has_native_bf16()
    if native:
        return torch.bfloat16, f"auto -> bf16: this CPU has native bf16 matmul ({how})"
    return torch.float32, (f"auto -> fp32: this CPU has no native bf16 matmul ({how}); bf16 would run many times "
                           "slower than fp32 here")


def setup_runtime(device: str, dtype: str, kernels: str, trained_dtype: str | None = None) -> Runtime:
    """Read torchrun's environment, pick the device and the dtype (resolve_dtype), start the process group when
    WORLD_SIZE > 1."""
    rank, local_rank, world = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    use_kernels = {"on": True, "off": False, "auto": dev.type == "cuda"}[kernels]
    if use_kernels and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernels on with --device cpu needs TRITON_INTERPRET=1 in the environment")
    torch_dtype, reason = resolve_dtype(dtype, dev, trained_dtype)
    if world > 1:  # every rank computes in rank 0's dtype, whatever a probe measured on the others
        holder = [DTYPE_NAMES[torch_dtype], reason]
        dist.broadcast_object_list(holder, src=0)
        torch_dtype, reason = DTYPES[holder[0]], holder[1]
    return Runtime(rank, local_rank, world, dev, torch_dtype, use_kernels, reason)


def teardown_runtime() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every RNG the loop draws from (dropout uses torch's), for exact resume."""
    # plain lists/ints/tensors only, so checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
