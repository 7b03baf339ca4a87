"""What a run is built from: the CPU set up, the data checked, the model and optimizer built, a
checkpoint restored, and the precision it trains in. The trainer and the stages after it (evaluation,
generation, fine-tuning) build their runs from these."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import torch
from torch import Tensor

from scratchlm.data.encode import load_tokens
from scratchlm.errors import ScratchLMError
from scratchlm.model.layers import Embedding
from scratchlm.model.transformer import TransformerLM
from scratchlm.optim import SGD, AdaGrad, AdamW, Muon, RMSProp
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.checkpoint import check_compatible, load_state
from scratchlm.train.config import TrainConfig


def setup_cpu(config: TrainConfig, processes: int = 1) -> None:
    """Threads as configured (0 = the cores, shared between the `processes` of a distributed run on
    this machine), and freed memory kept for reuse (`keep_freed_memory`)."""
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // processes))
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the OS.

    By default glibc serves large blocks with fresh pages from the OS and hands them back on free, so a
    training step faults its activations in again page by page: 57,000 page faults a step (228 MB) at
    the small benchmark shape, 3-5% of the step on a 2-core CPU. With the mmap threshold at 1 GiB and
    trimming at 2 GiB the freed blocks are reused and a step faults almost never (what jemalloc or
    tcmalloc would give). The price: the process holds on to its peak memory. Returns whether the
    setting took (False without glibc: macOS, musl).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def build_model(config: TrainConfig, device: torch.device) -> TransformerLM:
    """The configured model on `device`, its projections in float8 where `fp8` asks for it."""
    torch.manual_seed(config.seed)
    model = TransformerLM(config.model).to(device)
    if config.fp8 != "none":
        from scratchlm.kernels.fp8 import check_device, convert_to_fp8

        try:
            check_device(device)
        except ValueError as exc:
            raise ScratchLMError(f"fp8 is {config.fp8!r}: {exc}") from None
        convert_to_fp8(model, config.fp8)
    return model


def build_optimizer(config: TrainConfig, model: TransformerLM, spec: bool = False):
    """The configured optimizer, weight decay on matrices only (not on norm gains). spec: return
    (optimizer class, param groups, keyword arguments) instead, for a wrapper (ZeRO-1) to build it."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    if o.name == "adamw":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        cls, kwargs = AdamW, {"lr": o.lr, "betas": o.betas, "eps": o.eps}
    elif o.name == "muon":  # Muon for the blocks' matrices; AdamW for embeddings, the LM head and gains
        outside = {id(p) for p in (*embedding_tables(model), model.lm_head.weight)}
        matrices = [p for p in params if p.dim() == 2 and id(p) not in outside]
        groups = [{"params": matrices, "muon": True, "lr": o.muon_lr, "lr_scale": o.muon_lr / o.lr,
                   "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.dim() >= 2 and id(p) in outside], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        cls, kwargs = Muon, {"lr": o.lr, "betas": o.betas, "eps": o.eps, "momentum": o.momentum,
                             "ns_dtype": getattr(torch, o.muon_dtype)}  # fmt: skip
    elif o.name == "rmsprop":
        groups, cls, kwargs = params, RMSProp, {"lr": o.lr, "alpha": o.alpha, "eps": o.eps}
    elif o.name == "sgd":
        groups, cls, kwargs = params, SGD, {"lr": o.lr}
    else:
        groups, cls, kwargs = params, AdaGrad, {"lr": o.lr, "eps": o.eps}
    if o.embedding_lr is not None:
        groups = _own_rate(groups, embedding_tables(model), o.embedding_lr, o.embedding_lr / o.lr)
    return (cls, groups, kwargs) if spec else cls(groups, **kwargs)


def embedding_tables(model: TransformerLM) -> list[Tensor]:
    """The lookup tables' weights: the token embeddings and any value embeddings."""
    return [m.weight for m in model.modules() if isinstance(m, Embedding)]


def _own_rate(groups: list, params: list[Tensor], lr: float, lr_scale: float) -> list[dict]:
    """The param groups with `params` taken out of their groups into groups of their own, at lr (and
    lr_scale times the schedule's rate), each with its old group's other settings."""
    if not isinstance(groups[0], dict):  # a plain list of parameters
        groups = [{"params": groups}]
    ids, own = {id(p) for p in params}, []
    for group in groups:
        if taken := [p for p in group["params"] if id(p) in ids]:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            own.append({**group, "params": taken, "lr": lr, "lr_scale": lr_scale})
    return [g for g in groups if g["params"]] + own


def should_compile(config: TrainConfig, device: torch.device) -> bool:
    """`auto`: compile on CUDA, where it pays off in seconds; on CPU the compile time (minutes on two
    cores) outweighs its gain for short runs, so it is opt-in there (`compile = "yes"`)."""
    if config.compile == "auto":
        return device.type == "cuda"
    return config.compile == "yes"


def uses_bf16_autocast(config: TrainConfig, device: torch.device) -> bool:
    """dtype = "bfloat16" means autocast on CUDA; a CPU run is always float32."""
    return device.type == "cuda" and config.dtype == "bfloat16"


def autocast(config: TrainConfig, device: torch.device):
    if uses_bf16_autocast(config, device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_data(config: TrainConfig):
    """The training and validation token arrays and their tokenizer, checked against each other and
    against the model: same tokenizer, ids that fit the vocabulary, at least one window each."""
    train_tokens, train_meta = load_tokens(config.data.train_tokens)
    val_tokens, val_meta = load_tokens(config.data.val_tokens)
    tokenizer = Tokenizer.load(config.data.tokenizer)
    window = config.model.context_length + 1
    for tokens, meta, name in ((train_tokens, train_meta, config.data.train_tokens),
                               (val_tokens, val_meta, config.data.val_tokens)):  # fmt: skip
        if meta["tokenizer"] != tokenizer.fingerprint:
            raise ScratchLMError(
                f"{name} was encoded with tokenizer {meta['tokenizer']}, but data.tokenizer "
                f"({config.data.tokenizer}) is {tokenizer.fingerprint}: re-encode or fix the config"
            )
        if len(tokens) < window:
            raise ScratchLMError(
                f"{name} holds {len(tokens):,} tokens: too few for one window of model.context_length "
                f"{config.model.context_length} + 1; give more text or a shorter context"
            )
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ScratchLMError(
            f"model.vocab_size is {config.model.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens"
        )
    return train_tokens, val_tokens, tokenizer


def restore(model, state: dict, path: Path, config: TrainConfig, optimizer=None, strategy=None) -> None:
    """Load a checkpoint's weights (and optimizer state) into the built model, after checking that it
    was made with this model shape (and this optimizer). strategy: the distributed strategy the model
    trains under, which puts the whole state where its shards live."""
    check_compatible(state, config, path, ("model", "optim") if optimizer is not None else ("model",))
    load_state(state, model, optimizer, str(path), strategy)
