"""Run configuration: frozen dataclasses, the sub-configs they derive, and a CLI derived from their fields.

TrainConfig is what train.py takes, one flag per field. It inherits the data wing's fields (data.DataConfig: the
data specs, the prompt and the ERC levers) and derives, once, the objects the rest of the engine is handed:
`cfg.data` (DataConfig), `cfg.lora` (model.LoRAConfig), `cfg.optim` (engine.optim.OptimConfig) and `cfg.layout`
(engine.packing.BatchLayout).
EvalConfig is eval.py's; the fields it takes "from the run" are resolved by `resolve_run_config`.

`parse_config(TrainConfig, argv)` applies `--config run.json` first, then the flags; each field appears once,
with its default defined once, here or in its wing.
"""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

from llama_erc.data import ERC_KINDS, DataConfig
from llama_erc.data.sets import check_choice, check_context_turns, check_knowledge, check_specs, parse_spec
from llama_erc.engine.optim import OptimConfig
from llama_erc.engine.packing import BatchLayout
from llama_erc.engine.runtime import DTYPE_CHOICES
from llama_erc.model import ACTIVATION_CHECKPOINTING, LoRAConfig
from llama_erc.model.quant import BASE_QUANT


@dataclass(frozen=True)
class TrainConfig(DataConfig):
    """LoRA fine-tuning of a LLaMA-family model: `torchrun train.py --model DIR --train_data meld=DIR ...`"""
    # model
    model: str = "tiny"  # checkpoint dir (Meta/HF layout or one .gguf), a .gguf file, or a preset (random init)
    tokenizer: str = ""  # tokenizer file or dir (data.load_tokenizer); default: found with the checkpoint
    dtype: str = "auto"  # base weights and activations: auto (engine/runtime.py) | bf16 | fp32 (adapters: fp32)
    device: str = "auto"  # auto | cpu | cuda
    kernels: str = "auto"  # Triton kernels: auto (on for CUDA) | on | off
    # auto (engine/memory.py: none if one micro-batch's activations fit the free memory, else block, else full) |
    # none | full | selective | block (per transformer block; model/llama.py, model/recompute.py)
    activation_checkpointing: str = "auto"
    base_quant: str = "none"  # frozen base held quantized: none | gguf (the file's blocks) | nf4 | q8_0 (model/quant.py)
    # LoRA
    lora_rank: int = LoRAConfig.rank  # each default is defined once, in its sub-config
    lora_alpha: float = LoRAConfig.alpha
    lora_dropout: float = LoRAConfig.dropout
    lora_targets: tuple[str, ...] = LoRAConfig.targets
    fused_lora: bool = False  # one autograd node per adapted linear (kernels/lora_linear.py); the same function
    init_adapters: str = ""  # start the LoRA weights from a run dir or checkpoint dir (e.g. a speaker stage)
    # batch layout: the same update whichever is chosen (engine/packing.py)
    packing: bool = False  # pack each micro-batch's examples into rows of <= max_len tokens (no padding waste)
    packed_attention: str = "sdpa"  # with --packing: sdpa (bool block-diagonal mask) | flex (BlockMask; CUDA only)
    share_prefix: bool = False  # with --packing: each row holds the examples' common prompt prefix once
    # with --packing: micro-batches in a few fixed shapes, each shape's forward + backward one CUDA graph replayed
    # (engine/graphs.py), and the dev evaluations' score batches likewise (forward only); one process only; on a
    # CPU the same fixed-shape batches run eagerly
    cuda_graphs: bool = False
    # optimisation (OptimConfig)
    micro_batch: int = 8
    grad_accum: int = 16  # global batch = micro_batch * grad_accum * world_size (the paper: 128)
    epochs: int = 5
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = OptimConfig.lr
    min_lr: float = OptimConfig.min_lr
    warmup_steps: int = OptimConfig.warmup_steps
    weight_decay: float = OptimConfig.weight_decay
    beta1: float = OptimConfig.beta1
    beta2: float = OptimConfig.beta2
    adam_eps: float = OptimConfig.adam_eps
    grad_clip: float = OptimConfig.grad_clip
    seed: int = 1234
    # bookkeeping
    out_dir: str = "runs/default"
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 2
    eval_every: int = 0  # 0: evaluate on dev only at the end
    eval_max_examples: int = 0  # 0: the whole dev split
    eval_batch_size: int = 0  # examples per forward pass in dev evaluation; 0: --micro_batch
    resume: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()  # the data fields (data/sets.py)
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("kernels", self.kernels, ("auto", "on", "off"))
        check_choice("activation_checkpointing", self.activation_checkpointing, ("auto", *ACTIVATION_CHECKPOINTING))
        check_choice("base_quant", self.base_quant, BASE_QUANT)
        check_choice("packed_attention", self.packed_attention, ("sdpa", "flex"))
        if self.packed_attention == "flex" and not self.packing:
            raise ValueError("--packed_attention flex applies to packed rows: add --packing")
        if self.share_prefix and not self.packing:
            raise ValueError("--share_prefix applies to packed rows: add --packing")
        if self.cuda_graphs and not self.packing:
            raise ValueError("--cuda_graphs packs micro-batches into fixed shapes: add --packing")
        if self.cuda_graphs and self.packed_attention != "sdpa":
            raise ValueError(f"--cuda_graphs takes --packed_attention sdpa, got {self.packed_attention!r} (a "
                             "BlockMask is built on the device every micro-batch, outside the graph's inputs)")
        for name in ("lora_rank", "micro_batch", "grad_accum", "log_every", "save_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "eval_every", "eval_max_examples", "eval_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("one of --epochs or --max_steps must be positive")
        _ = self.optim  # OptimConfig checks lr, min_lr, warmup_steps and grad_clip

    @property
    def data(self) -> DataConfig:
        """The data wing's fields as a DataConfig of their own (data/sets.py)."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in fields(DataConfig)})

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(**{f.name: getattr(self, f.name) for f in fields(OptimConfig)})

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(packing=self.packing, max_len=self.max_len, flex=self.packed_attention == "flex",
                           share_prefix=self.share_prefix, fixed_shapes=self.cuda_graphs)

    @property
    def dev_batch_size(self) -> int:
        return self.eval_batch_size or self.micro_batch


@dataclass(frozen=True)
class EvalConfig:
    """Label-restricted evaluation of a run (or a base model) on an ERC split: `python eval.py --run R --data ...`"""
    run: str = ""  # a train.py out_dir (uses best/, else the newest checkpoint) or one checkpoint dir; "" = base only
    data: tuple[str, ...] = ()  # KIND=PATH, an ERC kind (data.ERC_KINDS)
    split: str = "test"
    model: str = ""  # base weights; default: the run's --model
    tokenizer: str = ""  # default: the run's, else found beside the model
    prompt_format: str = ""  # alpaca | chat; default: the run's (alpaca without a run)
    knowledge: tuple[str, ...] = ()  # default: the run's
    context_turns: str = ""  # default: the run's (2 without a run)
    max_len: int = 0  # default: the run's (512 without a run)
    retrieval: str = ""  # none | tfidf; default: the run's (none without a run)
    kernels: str = ""  # default: the run's (auto without a run)
    base_quant: str = ""  # none | gguf | nf4 | q8_0; default: the run's (a run's adapters need its own base)
    n_shots: int = 0  # few-shot demonstrations drawn from the train split (0: zero-shot / as fine-tuned)
    shot_seed: int = 0  # which demonstrations are drawn
    out_dir: str = ""  # default: <run>/eval_<split>_<kind>
    batch_size: int = 8
    max_examples: int = 0  # 0: the whole split
    dtype: str = "auto"  # auto (engine/runtime.py; never bf16 for a run trained in fp32) | bf16 | fp32
    device: str = "auto"
    calibration: str = "none"  # dev | dev-insample: per-label offsets fit on the dev split (engine/calibration.py)
    calibration_metric: str = "weighted_f1"  # weighted_f1 | macro_f1: what --calibration dev's strength is chosen for
    allow_overlap: bool = False  # score a split the run's training dialogues share utterances with (data/leaks.py)
    cuda_graphs: bool = False  # fixed-shape score batches, each shape's forward a CUDA graph (eagerly off CUDA)

    def __post_init__(self) -> None:
        check_choice("split", self.split, ("train", "dev", "test"))
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("kernels", self.kernels, ("", "auto", "on", "off"))
        check_choice("base_quant", self.base_quant, ("", *BASE_QUANT))
        check_choice("prompt_format", self.prompt_format, ("", "alpaca", "chat"))
        check_choice("retrieval", self.retrieval, ("", "none", "tfidf"))
        check_choice("calibration", self.calibration, ("none", "dev", "dev-insample"))
        check_choice("calibration_metric", self.calibration_metric, ("weighted_f1", "macro_f1"))
        if self.calibration != "none" and not self.run:
            raise ValueError(f"--calibration {self.calibration} applies a fine-tuned run's offsets: add --run")
        if not self.data:
            raise ValueError("--data KIND=PATH is required")
        check_specs(self.data, ERC_KINDS)
        check_knowledge(self.knowledge, self.data)
        check_context_turns(self.context_turns, ("all", ""))
        if self.batch_size <= 0 or self.max_examples < 0 or self.max_len < 0 or self.n_shots < 0:
            raise ValueError("--batch_size must be positive, --max_examples, --max_len and --n_shots >= 0")


# EvalConfig fields that default to the run's value (the run's TrainConfig, or TrainConfig's default without a
# run): unset ("", 0, ()) means "as the run", anything else overrides it.
RUN_DEFAULTS = ("model", "tokenizer", "prompt_format", "knowledge", "context_turns", "max_len", "retrieval",
                "kernels", "base_quant")


def resolve_run_config(cfg: EvalConfig, run: TrainConfig | None) -> TrainConfig:
    """The configuration an evaluation runs: the run's (TrainConfig's defaults without a run), scoring eval's
    --data as a run scores its dev data (emotion labels; the run's knowledge sidecars kept for the corpora
    scored), with every RUN_DEFAULTS field that `cfg` sets in place of the run's."""
    run = run or TrainConfig()
    kinds = {parse_spec(spec)[0] for spec in cfg.data}
    resolved = {"train_data": (), "dev_data": cfg.data, "task": "erc", "aux_impact": 0.0, "init_adapters": "",
                "knowledge": tuple(k for k in run.knowledge if parse_spec(k)[0] in kinds)}
    resolved.update({name: getattr(cfg, name) for name in RUN_DEFAULTS if getattr(cfg, name) not in ("", 0, ())})
    return replace(run, **resolved)


def _field_parser(tp) -> typing.Callable[[str], object]:
    """The argparse `type` for a dataclass field's annotation (tuples are comma-separated)."""
    if tp in ("tuple[str, ...]", tuple[str, ...]):
        return lambda s: tuple(x for x in s.split(",") if x)
    return {"int": int, "float": float, "str": str, int: int, float: float, str: str}[tp]


_INT_OR_WORD = {"context_turns"}  # str fields whose value may also be written as a JSON integer


def _from_json(name: str, tp, value, source: Path):
    """A --config value as its field's type. JSON's natural type is accepted (numbers, true/false, a list of
    strings or one comma-separated string); anything else is a ValueError naming the field."""
    def wrong(expected: str) -> ValueError:
        return ValueError(f"--config {source}: {name!r} must be {expected}, got {value!r} ({type(value).__name__})")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if tp in ("bool", bool):
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if tp in ("int", int):
        if is_int:
            return value
        raise wrong("an integer")
    if tp in ("float", float):
        if is_int or isinstance(value, float):
            return float(value)
        raise wrong("a number")
    if tp in ("tuple[str, ...]", tuple[str, ...]):
        if isinstance(value, str):
            return _field_parser(tp)(value)
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return tuple(value)
        raise wrong("a list of strings")
    if isinstance(value, str):
        return value
    if name in _INT_OR_WORD and is_int:
        return str(value)
    raise wrong("an integer or a string" if name in _INT_OR_WORD else "a string")


def parse_config(cls, argv: list[str] | None = None):
    """Build `cls` from `--config file.json` (optional) and then one `--field value` flag per field."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    base: dict = {}
    if known.config is not None:
        try:
            base = json.loads(known.config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {known.config}: {e}") from None
        if not isinstance(base, dict):
            raise ValueError(f"--config {known.config}: must hold a JSON object of field: value")
        unknown = set(base) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"--config {known.config}: unknown keys {sorted(unknown)}")
        base = {f.name: _from_json(f.name, f.type, base[f.name], known.config) for f in fields(cls) if f.name in base}

    parser = argparse.ArgumentParser(parents=[pre], description=cls.__doc__)
    for f in fields(cls):
        default = base.get(f.name, f.default if f.default is not MISSING else None)
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(f"--{f.name}", type=_field_parser(f.type), default=default,
                                help=f"default: {default!r}")
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return cls(**args)


def config_to_json(cfg) -> str:
    return json.dumps(asdict(cfg), indent=2, sort_keys=True)
