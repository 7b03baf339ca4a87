"""Training that outgrows one process: data parallelism and sharding on torch.distributed.

A strategy is a transformation applied to the built model (as torchtitan applies parallelism); the
model's modules and the training loop do not know which one runs. `group` starts and joins the
process group (`scratchlm train --nproc N`, or torchrun); `base` says what a strategy is; one module
each holds our own (`naive`, `flat`, `overlap`, `bucketed`, `zero` for ZeRO-1, `fsdp`) and `native` PyTorch's
(DDP, FSDP2), all behind that one interface, chosen by `[parallel] strategy`.
"""

from __future__ import annotations

from scratchlm.errors import ScratchLMError

STRATEGIES = ("none", "naive", "flat", "overlapped", "bucketed", "zero1", "fsdp", "ddp", "fsdp2")


def make_strategy(parallel, model):
    """The strategy `parallel.strategy` (a `ParallelConfig`) applied to the built `model`."""
    from scratchlm.distributed import base, bucketed, flat, naive, native, overlap, zero

    name = parallel.strategy
    if name == "none":
        raise ScratchLMError(
            f'parallel.strategy is "none" with {base.Strategy(model).world} processes: each would train alone; '
            f"choose one of {', '.join(STRATEGIES[1:])}"
        )
    if name in ("bucketed", "zero1"):
        return (bucketed.BucketedDDP if name == "bucketed" else zero.ZeRO1)(model, parallel.bucket_mb)
    if name == "fsdp":
        from scratchlm.distributed.fsdp import OwnFSDP

        return OwnFSDP(model, parallel.compute_dtype)
    if name == "fsdp2":
        return native.TorchFSDP2(model, parallel.compute_dtype)
    if name == "ddp":
        return native.TorchDDP(model, parallel.find_unused_parameters)
    return {"naive": naive.NaiveDDP, "flat": flat.FlatDDP, "overlapped": overlap.OverlappedDDP}[name](model)
