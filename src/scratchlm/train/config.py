"""Typed run configuration: dataclasses, loaded from TOML, overridden with `--set section.key=value`.

Every value is checked against its field's type and range (declared beside the field, `scratchlm.checks`);
a wrong key, type or value names where it came from (the file or the `--set`), the field and what was
expected.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scratchlm.checks import ConfigError, above, at_least, between, check_fields
from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig


@dataclass
class DataConfig:
    """Token arrays written by `scratchlm tokenizer encode` / `scratchlm data prepare`."""

    train_tokens: str = "data/shakespeare/train.bin"
    val_tokens: str = "data/shakespeare/val.bin"
    tokenizer: str = "data/shakespeare/tokenizer"

    def __post_init__(self) -> None:
        for name in ("train_tokens", "val_tokens", "tokenizer"):
            if not getattr(self, name).strip():
                raise ConfigError(name, "expected a path, got an empty string")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "adagrad", "rmsprop", "muon"] = "adamw"
    lr: float = field(default=3e-3, metadata=above(0))
    min_lr: float = field(default=3e-4, metadata=at_least(0))
    warmup_steps: int = field(default=100, metadata=at_least(0))
    # After warm-up: lr for the first 1 - cooldown of the run, then down to min_lr along `decay`
    decay: Literal["cosine", "linear"] = "cosine"
    cooldown: float = field(default=1.0, metadata=between(0, 1, low_open=True))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=between(0, 1, high_open=True))
    eps: float = field(default=1e-8, metadata=above(0))
    weight_decay: float = field(default=0.1, metadata=at_least(0))
    grad_clip: float = field(default=1.0, metadata=at_least(0))  # 0 disables clipping
    alpha: float = field(default=0.99, metadata=between(0, 1, high_open=True))  # rmsprop: the squares' decay
    # muon: the blocks' matrices take Muon at lr x muon_lr / lr (following the schedule), the rest AdamW at lr
    momentum: float = field(default=0.95, metadata=between(0, 1, high_open=True))
    muon_lr: float = field(default=0.02, metadata=above(0))
    muon_dtype: Literal["float32", "bfloat16"] = "float32"  # what Newton-Schulz computes in
    # The token embeddings' own peak rate (following the schedule, scaled like muon_lr); None: lr.
    # Each row is updated only when its token occurs, so rare tokens learn slowly at the head's rate.
    embedding_lr: float | None = field(default=None, metadata=above(0))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_lr > self.lr:
            raise ConfigError(("min_lr", "lr"), f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g})")


@dataclass
class ParallelConfig:
    """How a run with several processes (`scratchlm train --nproc N`, torchrun) splits the work:
    `scratchlm.distributed`. batch_size is per process; the global batch is the sum over them."""

    strategy: Literal["none", "naive", "flat", "overlapped", "bucketed", "zero1", "fsdp", "ddp", "fsdp2"] = "ddp"
    bucket_mb: float = field(default=25.0, metadata=above(0))  # bucketed, zero1
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # fsdp, fsdp2: the dtype blocks compute in
    find_unused_parameters: bool = False  # ddp: the model has a parameter that gets no gradient

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batch_size: int = field(default=16, metadata=at_least(1))
    grad_accum_steps: int = field(default=1, metadata=at_least(1))
    max_steps: int = field(default=2000, metadata=at_least(1))
    # > 0: a wall-clock budget; the schedule is fitted to it, and re-fitted at each eval
    max_minutes: float = field(default=0.0, metadata=at_least(0))
    eval_every: int = field(default=200, metadata=at_least(1))
    eval_tokens: int = field(default=200_000, metadata=at_least(1))
    log_every: int = field(default=10, metadata=at_least(1))
    checkpoint_every: int = field(default=500, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # bfloat16 = autocast on CUDA; CPU always float32
    fp8: Literal["none", "tensorwise", "rowwise"] = "none"  # the blocks' matmuls in float8 (H100 class; CPU emulates)
    compile: Literal["auto", "yes", "no"] = "auto"
    threads: int = field(default=0, metadata=at_least(0))  # CPU threads; 0 = all cores
    out_dir: str = "runs/shakespeare"

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.out_dir.strip():
            raise ConfigError("out_dir", "expected a directory, got an empty string")
        if self.optim.name == "muon" and self.parallel.strategy in ("fsdp", "fsdp2"):
            raise ConfigError(
                ("optim.name", "parallel.strategy"),
                f'Muon orthogonalises whole matrices; parallel.strategy "{self.parallel.strategy}" gives each rank '
                'rows of them: use another strategy (e.g. "ddp" or "zero1") or optimizer',
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step: batch x accumulation steps x context."""
        return self.batch_size * self.grad_accum_steps * self.model.context_length


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a TOML file (or the defaults) with `section.key=value` overrides applied.

    Every key, type and range is checked; an error names where the bad value came from: the file, or
    the `--set` override.
    """
    return load_dataclass(TrainConfig, path, overrides)


def load_dataclass(cls: type, path: str | Path | None, overrides: Sequence[str] = ()):
    """Config dataclass `cls` from a TOML file (or its defaults) with `section.key=value` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ScratchLMError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ScratchLMError(f"{path}: expected a TOML config file, got a directory") from None
        except OSError as exc:
            raise ScratchLMError(f"cannot read config file {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ScratchLMError(f"{path}: not valid TOML ({exc})") from None
    origins: dict[str, str] = {}  # dotted key -> the override that set it
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ScratchLMError(f"--set {override!r}: expected section.key=value, e.g. model.d_model=256")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: take it as a string
        target = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ScratchLMError(f"--set {override}: {'.'.join(parents[: i + 1])} is not a section")
        target[leaf] = value
        origins[key] = f"--set {override}"
    return from_dict(cls, data, lambda where: origins.get(where, source))


def load_config_text(text: str, source: str) -> TrainConfig:
    """A TrainConfig from TOML text (e.g. the copy a checkpoint holds); `source` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScratchLMError(f"{source}: not valid TOML ({exc})") from None
    return from_dict(TrainConfig, data, source)


def from_dict(cls: type, data: dict[str, Any], source: str | Callable[[str], str], prefix: str = ""):
    """Build dataclass `cls` from a dict, checking every key, type and range.

    source: where the values come from (a file name), or a function of the dotted key that says so.
    """
    source_of = source if callable(source) else (lambda where, s=source: s)
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ScratchLMError(f"{source_of(where)}: {where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ScratchLMError(
            f"{source_of(prefix + unknown[0])}: unknown key {prefix}{unknown[0]} "
            f"(valid keys here: {', '.join(sorted(fields))})"
        )
    values = {name: _convert(raw, hints[name], source_of, f"{prefix}{name}") for name, raw in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:
        error = exc.prefixed(prefix)
        origin = next((source_of(f) for f in error.fields if source_of(f).startswith("--set")), None)
        raise ScratchLMError(f"{origin or source_of(error.fields[0])}: {error}") from None


def _convert(value: Any, hint: Any, source_of: Callable[[str], str], where: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source_of, f"{where}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], source_of, where)
    if origin is Literal:
        if value not in args:
            raise ScratchLMError(
                f"{source_of(where)}: {where}: expected one of {', '.join(map(repr, args))}, got {value!r}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ScratchLMError(f"{source_of(where)}: {where}: expected a list, got {value!r}")
        return [_convert(v, args[0], source_of, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ScratchLMError(f"{source_of(where)}: {where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _convert(v, a, source_of, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ScratchLMError(f"{source_of(where)}: {where}: expected {hint.__name__}, got {value!r}")
    return value


def to_toml(config: TrainConfig) -> str:
    """The config as TOML (round-trips through load_config)."""
    top, sections = [], []
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, dict):
            lines = [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
            sections.append(f"[{name}]\n" + "\n".join(lines))
        else:
            top.append(f"{name} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
