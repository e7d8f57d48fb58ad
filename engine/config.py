"""Run configuration: frozen dataclasses, and a CLI derived from their fields.

`parse_config(TrainConfig, argv)` applies `--config run.json` first, then the flags; each field appears once,
with its default defined once, here.
"""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

DATA_KINDS = ("meld", "emorynlp", "iemocap", "jsonl", "prompts")


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = "tiny"  # checkpoint dir (Meta/HF layout or one .gguf), a .gguf file, or a preset (random init)
    tokenizer: str = ""  # tokenizer file or dir (data.load_tokenizer); default: found with the checkpoint
    prompt_format: str = "alpaca"  # alpaca (DialogueLLM's ### sections) | chat (the model's own chat template)
    dtype: str = "bf16"  # base weights and activations: bf16 | fp32 (adapters and optimizer are always fp32)
    device: str = "auto"  # auto | cpu | cuda
    kernels: str = "auto"  # Triton kernels: auto (on for CUDA) | on | off
    activation_checkpointing: str = "full"  # none | full | selective (per block, non-reentrant; model/llama.py)
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("wq", "wv")
    fused_lora: bool = False  # one autograd node per adapted linear (model/lora_fused.py); the same function
    # data: "kind=path" items; kind in DATA_KINDS ("prompts" = JSONL of {"prompt", "response"})
    train_data: tuple[str, ...] = ()
    dev_data: tuple[str, ...] = ()
    knowledge: tuple[str, ...] = ()  # "dataset=path" sidecar CSV/JSONL of supplementary knowledge
    context_turns: str = "2"  # previous utterances in each prompt: an integer or "all"
    max_len: int = 512
    packing: bool = False  # pack each micro-batch's examples into rows of <= max_len tokens (no padding waste)
    packed_attention: str = "sdpa"  # with --packing: sdpa (bool block-diagonal mask) | flex (BlockMask; CUDA only)
    share_prefix: bool = False  # with --packing: each row holds the examples' common prompt prefix once
    # ERC levers beyond DialogueLLM's prompt (README, "ERC levers")
    task: str = "erc"  # erc | speaker (InstructERC's speaker-identification warm-up stage; data/prompts.py)
    init_adapters: str = ""  # start the LoRA weights from a run dir or checkpoint dir (e.g. a speaker stage)
    retrieval: str = "none"  # none | tfidf: show the most similar train utterance of another dialogue, with its label
    aux_impact: float = 0.0  # weight alpha of the emotion-impact auxiliary task (next speaker's emotion); 0 = off
    # (its label tokens weigh alpha, ERC's 1; a step's loss is the weighted mean sum w*CE / sum w, engine/loop.py)
    # optimisation
    micro_batch: int = 8
    grad_accum: int = 16  # global batch = micro_batch * grad_accum * world_size (the paper: 128)
    epochs: int = 5
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    # bookkeeping
    out_dir: str = "runs/default"
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 2
    eval_every: int = 0  # 0: evaluate on dev only at the end
    eval_max_examples: int = 0  # 0: the whole dev split
    resume: bool = False

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, ("bf16", "fp32"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("kernels", self.kernels, ("auto", "on", "off"))
        _check_choice("activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))
        _check_choice("packed_attention", self.packed_attention, ("sdpa", "flex"))
        _check_choice("prompt_format", self.prompt_format, ("alpaca", "chat"))
        _check_choice("task", self.task, ("erc", "speaker"))
        _check_choice("retrieval", self.retrieval, ("none", "tfidf"))
        if not 0.0 <= self.aux_impact <= 1.0:
            raise ValueError(f"--aux_impact must be in [0, 1] (the auxiliary loss weight alpha), got {self.aux_impact}")
        if self.task == "speaker" and (self.aux_impact or self.retrieval != "none"):
            raise ValueError("--task speaker is the context-free warm-up stage: it takes no --aux_impact or "
                             "--retrieval")
        if self.task == "speaker" and self.dev_data:
            # the dev evaluator scores emotion label words; a speaker stage is judged by the ERC stage after it
            raise ValueError("--task speaker cannot take --dev_data: dev evaluation scores emotions, not speakers; "
                             "evaluate the ERC stage that continues from it (--init_adapters)")
        if self.packed_attention == "flex" and not self.packing:
            raise ValueError("--packed_attention flex applies to packed rows: add --packing")
        if self.share_prefix and not self.packing:
            raise ValueError("--share_prefix applies to packed rows: add --packing")
        for name in ("lora_rank", "max_len", "micro_batch", "grad_accum", "log_every", "save_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "warmup_steps", "eval_every", "eval_max_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.grad_clip <= 0:
            raise ValueError(f"--grad_clip must be positive, got {self.grad_clip}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("one of --epochs or --max_steps must be positive")
        _check_context_turns(self.context_turns, ("all",))
        for spec in self.train_data + self.dev_data:
            kind = spec.split("=", 1)[0]
            if "=" not in spec or kind not in DATA_KINDS:
                raise ValueError(f"data spec {spec!r} must be KIND=PATH with KIND in {', '.join(DATA_KINDS)}")
        _check_knowledge(self.knowledge, self.train_data + self.dev_data)


@dataclass(frozen=True)
class EvalConfig:
    run: str = ""  # a train.py out_dir (uses best/, else the newest checkpoint) or one checkpoint dir; "" = base only
    data: tuple[str, ...] = ()  # KIND=PATH, an ERC kind (meld, emorynlp, iemocap, jsonl)
    split: str = "test"
    model: str = ""  # base weights; default: the run's --model
    tokenizer: str = ""  # default: the run's, else found beside the model
    prompt_format: str = ""  # alpaca | chat; default: the run's (alpaca without a run)
    knowledge: tuple[str, ...] = ()  # default: the run's
    context_turns: str = ""  # default: the run's (2 without a run)
    max_len: int = 0  # default: the run's (512 without a run)
    n_shots: int = 0  # few-shot demonstrations drawn from the train split (0: zero-shot / as fine-tuned)
    shot_seed: int = 0  # which demonstrations are drawn
    out_dir: str = ""  # default: <run>/eval_<split>_<kind>
    batch_size: int = 8
    max_examples: int = 0  # 0: the whole split
    dtype: str = ""  # default: the run's (bf16 without a run)
    device: str = "auto"
    kernels: str = ""  # default: the run's (auto without a run)
    retrieval: str = ""  # none | tfidf; default: the run's (none without a run)
    calibration: str = "none"  # dev: add the per-label log-prior offsets fit on the dev split (engine/calibration.py)

    def __post_init__(self) -> None:
        _check_choice("split", self.split, ("train", "dev", "test"))
        _check_choice("dtype", self.dtype, ("", "bf16", "fp32"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("kernels", self.kernels, ("", "auto", "on", "off"))
        _check_choice("prompt_format", self.prompt_format, ("", "alpaca", "chat"))
        _check_choice("retrieval", self.retrieval, ("", "none", "tfidf"))
        _check_choice("calibration", self.calibration, ("none", "dev"))
        if self.calibration == "dev" and not self.run:
            raise ValueError("--calibration dev applies a fine-tuned run's offsets: add --run")
        if not self.data:
            raise ValueError("--data KIND=PATH is required")
        for spec in self.data:
            if "=" not in spec or spec.split("=", 1)[0] not in DATA_KINDS[:4]:
                raise ValueError(f"data spec {spec!r} must be KIND=PATH with KIND in {', '.join(DATA_KINDS[:4])}")
        _check_knowledge(self.knowledge, self.data)
        _check_context_turns(self.context_turns, ("all", ""))
        if self.batch_size <= 0 or self.max_examples < 0 or self.max_len < 0 or self.n_shots < 0:
            raise ValueError("--batch_size must be positive, --max_examples, --max_len and --n_shots >= 0")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_context_turns(value, words: tuple[str, ...]) -> None:
    if not (isinstance(value, str) and (value in words or value.isdigit())):
        raise ValueError(f"--context_turns must be a non-negative integer or 'all', got {value!r}")


def _check_knowledge(specs: tuple[str, ...], data_specs: tuple[str, ...]) -> None:
    """Each --knowledge item is DATASET=FILE.csv|.jsonl, DATASET the kind of one of the data specs."""
    kinds = sorted({s.split("=", 1)[0] for s in data_specs})
    for spec in specs:
        kind, eq, path = spec.partition("=")
        if not eq or kind not in DATA_KINDS[:4] or not path:
            raise ValueError(f"knowledge spec {spec!r} must be DATASET=PATH with DATASET in "
                             f"{', '.join(DATA_KINDS[:4])}")
        if Path(path).suffix not in (".csv", ".jsonl"):
            raise ValueError(f"knowledge spec {spec!r}: the sidecar must be a .csv or .jsonl file")
        if kind not in kinds:
            raise ValueError(f"knowledge spec {spec!r} attaches to {kind}, but no data spec is of that kind "
                             f"(data kinds: {', '.join(kinds) or 'none'})")


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
