"""Typed run configuration: dataclasses, loaded from TOML, overridden with `--set section.key=value`.

Every value is checked against its field's type; a wrong key or type names the file, the field and
what was expected.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scratchlm.errors import ScratchLMError
from scratchlm.model.transformer import ModelConfig


@dataclass
class DataConfig:
    """Token arrays written by `scratchlm tokenizer encode` / `scratchlm data prepare`."""

    train_tokens: str = "data/shakespeare/train.bin"
    val_tokens: str = "data/shakespeare/val.bin"
    tokenizer: str = "data/shakespeare/tokenizer"


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "adagrad"] = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int = 2000
    max_minutes: float = 0.0  # > 0: a wall-clock budget; the schedule is fitted to it, and re-fitted at each eval
    eval_every: int = 200
    eval_tokens: int = 200_000
    log_every: int = 10
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # bfloat16 = autocast on CUDA; CPU always float32
    compile: Literal["auto", "yes", "no"] = "auto"
    threads: int = 0  # CPU threads; 0 = all cores
    out_dir: str = "runs/shakespeare"

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step: batch x accumulation steps x context."""
        return self.batch_size * self.grad_accum_steps * self.model.context_length


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a TOML file (or the defaults) with `section.key=value` overrides applied."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ScratchLMError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ScratchLMError(f"{path}: not valid TOML ({exc})") from None
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ScratchLMError(f"--set {override!r}: expected section.key=value, e.g. model.d_model=256")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: take it as a string
        target = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ScratchLMError(f"--set {override!r}: {part} is not a section")
        target[leaf] = value
    return from_dict(TrainConfig, data, source)


def from_dict(cls: type, data: dict[str, Any], source: str, prefix: str = ""):
    """Build dataclass `cls` from a dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ScratchLMError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ScratchLMError(
            f"{source}: unknown key {prefix}{unknown[0]} (valid keys here: {', '.join(sorted(fields))})"
        )
    values = {}
    for name, raw in data.items():
        values[name] = _convert(raw, hints[name], source, f"{prefix}{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ScratchLMError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from None


def _convert(value: Any, hint: Any, source: str, where: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, f"{where}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], source, where)
    if origin is Literal:
        if value not in args:
            raise ScratchLMError(f"{source}: {where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ScratchLMError(f"{source}: {where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, source, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ScratchLMError(f"{source}: {where}: expected {hint.__name__}, got {value!r}")
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
