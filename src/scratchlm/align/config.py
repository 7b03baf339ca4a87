"""Typed configuration of an alignment stage, loaded from TOML and overridden with `--set`, like
training's (`scratchlm.train.config`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scratchlm.align.tasks import TASKS
from scratchlm.checks import ConfigError, above, at_least, between, check_fields
from scratchlm.train.config import OptimConfig, load_dataclass


@dataclass
class TaskConfig:
    name: str = "addition"
    digits: int = field(default=3, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))  # the training problems' stream
    max_new_tokens: int = field(default=24, metadata=at_least(1))
    # "plain": the bare prompt (`23+45=`); "chat": asked in words through the tokenizer's chat template
    prompt: Literal["plain", "chat"] = "plain"

    def __post_init__(self) -> None:
        check_fields(self)
        if self.name not in TASKS:
            raise ConfigError("name", f"expected one of {', '.join(map(repr, TASKS))}, got {self.name!r}")


@dataclass
class SFTConfig:
    examples: int = field(default=1000, metadata=at_least(1))  # demonstrations (training problems)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RolloutConfig:
    group_size: int = field(default=8, metadata=at_least(1))  # G responses per prompt
    temperature: float = field(default=1.0, metadata=above(0))
    top_p: float = field(default=1.0, metadata=between(0, 1, low_open=True))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class GRPOConfig:
    loss_type: Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"] = "grpo_clip"
    epochs_per_rollout: int = field(default=1, metadata=at_least(1))  # > 1: off-policy epochs (clipped)
    cliprange: float = field(default=0.2, metadata=above(0))
    normalize_by_std: bool = True
    length_normalization: Literal["sequence_mean", "constant", "token"] = "sequence_mean"
    kl_coef: float = field(default=0.0, metadata=at_least(0))  # > 0: a KL penalty towards the starting model

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DPOConfig:
    beta: float = field(default=0.1, metadata=above(0))
    nll_coef: float = field(default=0.0, metadata=at_least(0))  # > 0: plus the chosen responses' NLL per token
    pairs: int = field(default=2000, metadata=at_least(1))  # training pairs, from the starting model's samples
    test_pairs: int = field(default=300, metadata=at_least(1))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class EIConfig:
    prompts: int = field(default=256, metadata=at_least(1))  # per round, each sampled group_size times
    steps_per_round: int = field(default=20, metadata=at_least(1))  # SFT steps on the round's correct samples

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class AlignOptimConfig(OptimConfig):
    """Training's optimizer settings with fine-tuning's defaults: a lower rate, a short warm-up, no decay."""

    lr: float = field(default=1e-3, metadata=above(0))
    min_lr: float = field(default=1e-4, metadata=at_least(0))
    warmup_steps: int = field(default=10, metadata=at_least(0))
    weight_decay: float = field(default=0.0, metadata=at_least(0))


@dataclass
class AlignConfig:
    stage: Literal["sft", "ei", "grpo", "dpo"] = "sft"
    init: str = "runs/align/base"  # the run whose model this stage starts from
    out_dir: str = "runs/align/sft"
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: AlignOptimConfig = field(default_factory=AlignOptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ei: EIConfig = field(default_factory=EIConfig)
    steps: int = field(default=100, metadata=at_least(1))
    batch_size: int = field(default=32, metadata=at_least(1))  # sequences (sft, ei), prompts (grpo), pairs (dpo)
    microbatch_size: int = field(default=64, metadata=at_least(1))  # sequences per forward/backward
    eval_every: int = field(default=25, metadata=at_least(1))
    eval_problems: int = field(default=300, metadata=at_least(1))  # held-out problems
    log_every: int = field(default=5, metadata=at_least(1))
    checkpoint_every: int = field(default=50, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))
    threads: int = field(default=0, metadata=at_least(0))

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("init", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(name, "expected a directory, got an empty string")


def load_align_config(path: str | Path | None, overrides: Sequence[str] = ()) -> AlignConfig:
    return load_dataclass(AlignConfig, path, overrides)
