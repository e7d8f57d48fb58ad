"""Launch configuration and input checks shared by the kernel launchers.

Nothing here queries the GPU (no torch.cuda.*), so every launcher also runs under TRITON_INTERPRET=1 on CPU.
Block sizes are powers of two because tl.arange needs one; the masked tail costs idle lanes, not traffic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROW_BYTES = 64 * 1024  # a whole row lives in one program's registers as fp32; past this it spills
TILE_ELEMS = 4096  # elements one program handles (rows are stacked up to this): 8 per thread at 16 warps


def num_warps_for(n_elems: int) -> int:
    """Warps for a tile of n_elems: one per 256 elements, between 1 and 32 (1024 threads, the CUDA limit).

    8 elements per thread is one 16-byte load of bf16 per tensor, and keeps the RMSNorm backward at ~60
    registers (ptxas, sm_90), so two 4096-wide programs fit on an SM; 16384-wide rows reach 16 per thread.
    """
    return min(32, max(1, n_elems // 256))


def row_launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a program that holds a whole row of n elements in fp32."""
    if n < 1:
        raise ValueError(f"row length must be positive, got {n}")
    block = triton.next_power_of_2(n)
    if block * 4 > MAX_ROW_BYTES:
        raise ValueError(f"row of {n} elements needs a {block}-wide fp32 block ({block * 4} B), over the "
                         f"{MAX_ROW_BYTES} B a single program can hold; use the reference op")
    return block, num_warps_for(block)


def rows_per_tile(block_n: int, n_rows: int) -> int:
    """BLOCK_M: rows stacked in one program so narrow rows still fill a TILE_ELEMS tile (power of two)."""
    return min(triton.next_power_of_2(max(n_rows, 1)), max(1, TILE_ELEMS // block_n))


def overridden(block: int, num_warps: int, block_override: int | None, warps_override: int | None,
               what: str) -> tuple[int, int]:
    """(block, num_warps) with the benchmark sweep's overrides applied (None keeps the default); each must be a
    power of two, num_warps at most 32 (1024 threads, the CUDA limit). `what` names the block in errors."""
    block, num_warps = block_override or block, warps_override or num_warps
    if block < 1 or block & (block - 1):
        raise ValueError(f"{what} must be a power of two, got {block}")
    if not 1 <= num_warps <= 32 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    return block, num_warps


def check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the kernels take float32, bfloat16 or float16")


def check_same_device(kernel, **tensors: Tensor) -> torch.device:
    """All tensors on one device the kernel can run on: CUDA, or CPU under the Triton interpreter."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError("tensors must share one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    device = next(iter(devices.values()))
    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type != "cuda" and not (interpreted and device.type == "cpu"):
        raise ValueError(f"Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before "
                         f"`kernels` is imported); got tensors on {device}")
    return device


def in_place_safe() -> bool:
    """Whether an in-place kernel may overwrite its inputs here: not while a torch dispatch mode is active.

    Selective activation checkpointing (torch.utils.checkpoint.create_selective_checkpoint_contexts) sees every
    op of the checkpointed forward through a dispatch mode and keeps the outputs its policy saves (the model's
    matmul outputs: q, k, gate, up), to hand the very same tensors back when the block is recomputed. An
    in-place kernel writing into one of them would make the recomputation start from the rotated q, or a
    backward that overwrote gate would leave a cached gate that is no longer gate. Plain (full) checkpointing
    keeps no op output and needs no mode, so it stays in place. Any other active mode (FlopCounterMode, a test's
    op counter) is refused too: the out-of-place op computes the same bits, so refusing costs only memory.
    """
    return not is_in_torch_dispatch_mode()


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 x -> DTYPE, rounding to nearest even. Use it for every store and emulated rounding to bf16.

    Compiled, x.to(bf16) is the GPU's conversion (cvt.rn.bf16.f32), which already rounds to nearest even, so
    nothing is emulated there. Triton's interpreter (3.x) truncates instead, which doubles the rounding error on
    CPU; under the interpreter only (EMULATE_RNE), bf16 is rounded here with integer ops on the fp32 bits (add
    half an ulp of bf16, plus one if the kept lsb is odd, then drop the low 16 bits), after which the final cast
    is exact. Both give the same bits for every finite x and inf; NaNs stay NaN (payloads may differ).
    """
    if EMULATE_RNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


# True when @triton.jit gave interpreter functions (TRITON_INTERPRET=1 when this module was imported): the very
# decision the decorator made above, so the emulation and the interpreter always go together. A tl.constexpr,
# because a compiled kernel may read a module global only as a constant.
EMULATE_RNE = tl.constexpr(isinstance(cast_rne, InterpretedFunction))
