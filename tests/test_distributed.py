"""Data parallelism on torch.distributed (gloo, world size 2, a free port per test; warnings are errors in
the ranks): every strategy against single-process training on the union of the ranks' batches, the
bucketing, the overlap of communication with backward, ZeRO-1's and our FSDP's memory, and `scratchlm train --nproc`
end to end, with resume and a killed rank.

Tolerance: all-reduce sums the ranks' gradients in another order than one process sums its batch, so
fp32 results agree to about 1e-6 relative per step; after a few AdamW steps we allow 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from conftest import synthetic_text, tiny_config
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from scratchlm.distributed import make_strategy
from scratchlm.distributed.base import Strategy
from scratchlm.distributed.bucketed import make_buckets
from scratchlm.distributed.checkpoint import save_sharded_checkpoint
from scratchlm.distributed.fsdp import Unit
from scratchlm.distributed.group import free_port
from scratchlm.distributed.zero import ShardedOptimizer, assign_owners
from scratchlm.errors import ScratchLMError
from scratchlm.model import ModelConfig, TransformerLM, layers
from scratchlm.model.layers import Linear
from scratchlm.optim import AdamW
from scratchlm.train.checkpoint import latest_checkpoint, read_checkpoint
from scratchlm.train.config import ParallelConfig, to_toml

WORLD, BATCH, STEPS, CONTEXT, VOCAB = 2, 3, 4, 16, 64
OURS = ["naive", "flat", "overlapped", "bucketed", "zero1", "fsdp"]
TORCH = ["ddp", "fsdp2"]


def make_model(tied: bool = True, checkpointing: str = "none") -> TransformerLM:
    """Tied embeddings, a frozen parameter (the final norm's gain) and one that never gets a gradient."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, d_model=32, n_layers=2, n_heads=4,
                                      tie_embeddings=tied, activation_checkpointing=checkpointing))  # fmt: skip
    model.ln_final.weight.requires_grad_(False)
    model.unused = nn.Parameter(torch.zeros(5))
    return model


def batches() -> torch.Tensor:
    """(steps, world x batch, context + 1) token windows: the union of the ranks' batches."""
    return torch.randint(0, VOCAB, (STEPS, WORLD * BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(1))


def build(model: nn.Module, spec: bool = False):
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    return (AdamW, groups, kwargs) if spec else AdamW(groups, **kwargs)


def train(strategy: Strategy, optimizer, rank: int, world: int) -> None:
    for windows in batches():
        mine = windows[rank * BATCH * WORLD // world :][: BATCH * WORLD // world]
        with strategy.micro_batch(last=True):
            strategy.loss(mine[:, :-1], mine[:, 1:]).backward()
        strategy.finish_gradients()
        strategy.clip(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.simplefilter("error")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def leave() -> None:
    """End a spawned rank once its results are written. os._exit skips the interpreter's teardown: a
    rank of the overlap test sometimes aborted there ("terminate called without an active exception",
    1 run in 3, after all its work was done and checked), which `scratchlm train` has not shown."""
    dist.barrier()  # a rank that tears down while the other still talks to it aborts
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _strategy_worker(rank: int, port: int, name: str, out: str) -> None:
    _join(rank, port)
    name, _, checkpointing = name.partition("/")
    model = make_model(checkpointing=checkpointing or "none")
    strategy = make_strategy(ParallelConfig(strategy=name, bucket_mb=0.01, find_unused_parameters=True), model)
    optimizer = strategy.optimizer(build)
    train(strategy, optimizer, rank, WORLD)
    state, _ = strategy.full_state(optimizer)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in state.items()}, out)
    leave()


def single_process_parameters() -> dict[str, torch.Tensor]:
    model = make_model()
    train(Strategy(model), build(model), 0, 1)
    return model.state_dict()


@pytest.mark.parametrize("name", [*OURS, *TORCH, "fsdp/blocks", "ddp/every:2", "fsdp2/blocks"])  # name/checkpointing
def test_every_strategy_equals_one_process_on_the_union_of_the_batches(name, tmp_path):
    out = tmp_path / "params.pt"
    mp.spawn(_strategy_worker, args=(free_port(), name, str(out)), nprocs=WORLD)
    got, expected = torch.load(out, weights_only=True), single_process_parameters()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-4, msg=key)
    assert torch.equal(got["unused"], torch.zeros(5)) and torch.equal(got["ln_final.weight"], torch.ones(32))
    assert not torch.equal(got["layers.0.attn.q_proj.weight"], make_model().state_dict()["layers.0.attn.q_proj.weight"])


def test_buckets_close_before_they_pass_the_size():
    mib = 2**18  # float32 elements in one MiB
    params = [nn.Parameter(torch.zeros(n)) for n in (mib, mib, mib, mib, 3 * mib, mib // 2)]
    sizes = lambda buckets: [len(b) for b in buckets]  # noqa: E731
    assert sizes(make_buckets(params, 2.5)) == [2, 2, 1, 1]  # 1+1, 1+1, 3 (alone: larger than a bucket), 0.5
    assert sizes(make_buckets(params, 1)) == [1, 1, 1, 1, 1, 1]
    assert sizes(make_buckets(params, 100)) == [6]


def _overlap_worker(rank: int, port: int, name: str, out: str) -> None:
    _join(rank, port)
    model = make_model(tied=False)
    strategy = make_strategy(ParallelConfig(strategy=name, bucket_mb=0.05), model)
    events: list[str] = []
    real_all_reduce = dist.all_reduce

    def recorded(*args, **kwargs):
        events.append("all_reduce")
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = recorded
    # The embedding's gradient is the last that backward computes (its lookup is the first op of forward).
    model.token_embeddings.weight.register_post_accumulate_grad_hook(lambda p: events.append("backward ends"))
    windows = batches()[0][rank * BATCH :][:BATCH]
    strategy.loss(windows[:, :-1], windows[:, 1:]).backward()
    strategy.finish_gradients()
    dist.all_reduce = real_all_reduce
    model.zero_grad(set_to_none=True)
    if rank == 0:
        Path(out).write_text(json.dumps(events))
    leave()


@pytest.mark.parametrize("name", ["overlapped", "bucketed"])
def test_communication_starts_while_backward_still_runs(name, tmp_path):
    out = tmp_path / "events.json"
    mp.spawn(_overlap_worker, args=(free_port(), name, str(out)), nprocs=WORLD)
    events = json.loads(out.read_text())
    assert events.index("all_reduce") < events.index("backward ends")
    assert events.count("all_reduce") >= 2  # several buckets / one per parameter


def test_owners_are_balanced_by_size():
    assert assign_owners([10, 1, 1, 8, 1, 1], 2) == [0, 1, 1, 1, 0, 1]  # loads 11 and 11
    assert sorted(assign_owners([5] * 6, 3)) == [0, 0, 1, 1, 2, 2]


def _zero_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    model = make_model()
    strategy = make_strategy(ParallelConfig(strategy="zero1", bucket_mb=0.01), model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    train(strategy, optimizer, rank, WORLD)
    state_bytes = [0] * WORLD
    dist.all_gather_object(state_bytes, optimizer.state_bytes())
    full = optimizer.state_dict()  # collective
    if rank == 0:
        torch.save({"params": {k: v.clone() for k, v in model.state_dict().items()}, "bytes": state_bytes,
                    "full_state_keys": sorted(full["state"])}, out)  # fmt: skip
    leave()


def test_zero1_shards_the_optimizer_state_and_equals_torch_adamw(tmp_path):
    out = tmp_path / "zero.pt"
    mp.spawn(_zero_worker, args=(free_port(), str(out)), nprocs=WORLD)
    result = torch.load(out, weights_only=True)
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    train(Strategy(model), optimizer, 0, 1)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(result["params"][key], value, atol=1e-4, rtol=1e-4, msg=key)
    unsharded = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    per_rank = result["bytes"]
    assert sum(per_rank) == pytest.approx(unsharded, rel=0.01)  # all of it is somewhere, once
    assert all(0.3 < b / unsharded < 0.7 for b in per_rank), per_rank  # and about half on each rank
    with_state = [i for i, p in enumerate(params) if p is not model.unused]  # no gradient, no state
    assert result["full_state_keys"] == with_state  # the consolidated state is whole


def _fsdp_memory_worker(rank: int, port: int, out: str) -> None:
    """One training step of an 8-block model under our FSDP, measuring the bytes of parameters that
    exist on this rank (its shards, and every gathered buffer still alive, by a weak reference to its
    storage; the all-gathers' receiving buffers count too) at every module's forward, every block's gradient
    and every regather for backward."""
    _join(rank, port)
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, d_model=64, n_layers=8, n_heads=4,
                                      tie_embeddings=False))  # fmt: skip
    block_bytes = sum(m.weight.numel() * 4 for m in model.layers[0].modules() if isinstance(m, Linear))
    root_bytes = (model.token_embeddings.weight.numel() + model.lm_head.weight.numel()) * 4
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    strategy = make_strategy(ParallelConfig(strategy="fsdp"), model)
    shard_bytes = sum(p.numel() * 4 for p in model.parameters())
    gathered: dict[int, tuple[StorageWeakRef, int]] = {}
    real_prefetch, real_gather, real_unpack = Unit.prefetch, Unit.gather, strategy._unpack

    def record(buffer: torch.Tensor) -> torch.Tensor:
        storage = buffer.untyped_storage()
        gathered[storage.data_ptr()] = StorageWeakRef(storage), storage.nbytes()
        return buffer

    def prefetch(unit: Unit) -> None:  # the buffer an all-gather in flight writes to
        real_prefetch(unit)
        if unit.pending is not None:
            record(unit.pending[1])

    def live() -> int:
        return sum(n for ref, n in gathered.values() if not ref.expired())

    peak = 0

    def measure(*_) -> None:
        nonlocal peak
        peak = max(peak, shard_bytes + live())

    def gather(unit: Unit) -> torch.Tensor:
        if unit.full is None:  # what gather does first, so its receiving buffer is recorded and dropped below
            prefetch(unit)
        received = unit.pending[1].untyped_storage() if unit.pending is not None else None
        address = received.data_ptr() if received is not None else None
        full = record(real_gather(unit))
        if received is not None:  # copied out into `full` and freed
            assert received.nbytes() == 0
            del gathered[address]
        return full

    Unit.prefetch, Unit.gather = prefetch, gather
    copies, real_stack = [], layers.stack_rows
    layers.MERGE_MIN_ROWS = 0  # q, k and v as one product, as at training batch sizes

    def stack_rows(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        stacked = real_stack(weights)
        if len(weights) > 1:
            copies.append(stacked._base is None)
        return stacked

    layers.stack_rows = stack_rows
    strategy._unpack = lambda saved: (real_unpack(saved), measure())[0]
    for module in model.modules():
        module.register_forward_pre_hook(measure)

    def measure_in_backward(module, args, out: torch.Tensor) -> None:
        out.register_hook(measure)

    for block in model.layers:
        block.register_forward_hook(measure_in_backward)
    windows = batches()[0][rank * BATCH :][:BATCH]
    loss = strategy.loss(windows[:, :-1], windows[:, 1:])
    after_forward = live()
    loss.backward()
    strategy.finish_gradients()
    if rank == 0:
        Path(out).write_text(json.dumps({"peak": peak, "after_forward": after_forward, "after_step": live(),
                                         "shards": shard_bytes, "root": root_bytes, "block": block_bytes,
                                         "full": full_bytes, "stacked": copies}))  # fmt: skip
    leave()


def test_own_fsdp_holds_a_fraction_of_the_parameters(tmp_path):
    out = tmp_path / "memory.json"
    mp.spawn(_fsdp_memory_worker, args=(free_port(), str(out)), nprocs=WORLD)
    m = json.loads(out.read_text())
    assert m["shards"] == pytest.approx(m["full"] / WORLD, rel=0.01)  # each rank keeps half the rows
    # At most the root (embeddings and head, whole through forward), the block computing and the next one
    # prefetched exist whole at once; nothing gathered outlives forward (saved-for-backward weights are
    # regathered) or the step.
    assert m["shards"] + m["root"] + m["block"] < m["peak"] <= m["shards"] + m["root"] + 2 * m["block"]
    assert m["peak"] < 0.8 * m["full"], m
    assert m["after_forward"] == 0 and m["after_step"] == 0
    assert m["stacked"] == [False] * 8  # q|k|v: a view of the gathered buffer, not a copy kept for backward


def _failed_save_worker(rank: int, port: int, run: str, out: str) -> None:
    _join(rank, port)
    model = make_model()
    strategy = make_strategy(ParallelConfig(strategy="fsdp"), model)
    optimizer = strategy.optimizer(build)
    train(strategy, optimizer, rank, WORLD)
    save_sharded_checkpoint(run, 1, strategy, optimizer, {"step": 1})
    if rank == 1:  # this rank's disk fills up while it writes its part of the next checkpoint

        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        dcp.FileSystemWriter.write_data = full_disk
    try:
        save_sharded_checkpoint(run, 2, strategy, optimizer, {"step": 2})
        error = ""
    except ScratchLMError as exc:
        error = str(exc)
    errors = [""] * WORLD
    dist.all_gather_object(errors, error)
    if rank == 0:
        Path(out).write_text(json.dumps(errors))
    leave()


def test_a_checkpoint_that_one_rank_fails_to_write_never_becomes_the_latest(tmp_path):
    out = tmp_path / "errors.json"
    mp.spawn(_failed_save_worker, args=(free_port(), str(tmp_path / "run"), str(out)), nprocs=WORLD)
    errors = json.loads(out.read_text())
    assert all("could not write checkpoint" in e and "latest checkpoint is still step_0000001" in e for e in errors)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000001"]  # no half directory
    assert latest_checkpoint(tmp_path / "run").name == "step_0000001"
    assert read_checkpoint(checkpoints / "step_0000001")["step"] == 1


# ------------------------------------------------------------------------------ scratchlm train --nproc

CLI = [sys.executable, "-m", "scratchlm.cli", "train"]


def _config(data_dir: Path, run: Path, tmp_path: Path, name: str, **overrides) -> Path:
    sets = {"max_steps": 20, "eval_every": 10, "checkpoint_every": 10, "log_every": 5, **overrides}
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(tiny_config(data_dir, run, **sets)))
    return path


def _losses(run: Path) -> list[float]:
    return [
        r.get("train/loss", r.get("val/loss"))
        for r in map(json.loads, (run / "metrics.jsonl").read_text().split("\n")[:-1])
    ]


@pytest.mark.parametrize("name", ["bucketed", "fsdp", "fsdp2"])
def test_train_nproc_2_equals_one_process_with_the_global_batch(name, data_dir, tmp_path):
    one = _config(data_dir, tmp_path / "one", tmp_path, "one", batch_size=8)
    two = _config(data_dir, tmp_path / "two", tmp_path, "two", batch_size=4, **{"parallel.strategy": f'"{name}"'})
    assert subprocess.run([*CLI, "--config", one], capture_output=True).returncode == 0
    result = subprocess.run([*CLI, "--config", two, "--nproc", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 processes" in result.stdout and "Warning" not in result.stderr, result.stderr
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)


@pytest.mark.parametrize("name, dtype", [("fsdp", "bfloat16"), ("fsdp", "float16"), ("fsdp2", "bfloat16")])
def test_sharded_training_in_half_precision_stays_near_float32(name, dtype, data_dir, tmp_path):
    """fp32 master weights and gradient reduction, blocks computing in bf16 / fp16: the losses stay
    within 1%."""
    one = _config(data_dir, tmp_path / "one", tmp_path, "one", batch_size=8)
    two = _config(data_dir, tmp_path / "two", tmp_path, "two", batch_size=4,
                  **{"parallel.strategy": f'"{name}"', "parallel.compute_dtype": f'"{dtype}"'})  # fmt: skip
    assert subprocess.run([*CLI, "--config", one], capture_output=True).returncode == 0
    result = subprocess.run([*CLI, "--config", two, "--nproc", "2"], capture_output=True, text=True)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-2)
    assert _losses(tmp_path / "two") != _losses(tmp_path / "one")  # it did compute in bf16


@pytest.mark.parametrize("name", ["zero1", "fsdp", "fsdp2"])
def test_resume_at_the_same_and_at_another_world_size(name, data_dir, tmp_path):
    sets = {"batch_size": 4, "parallel.strategy": f'"{name}"'}
    whole = _config(data_dir, tmp_path / "whole", tmp_path, "whole", **sets)
    assert subprocess.run([*CLI, "--config", whole, "--nproc", "2"], capture_output=True).returncode == 0
    resumed = _config(data_dir, tmp_path / "resumed", tmp_path, "resumed", **sets)
    assert subprocess.run([*CLI, "--config", resumed, "--nproc", "2"], capture_output=True).returncode == 0
    checkpoints = tmp_path / "resumed" / "checkpoints"
    step10 = sorted(checkpoints.glob("step_*"))[0]
    # A DCP directory: each rank wrote its own file, the coordinator the metadata.
    assert sorted(p.name for p in step10.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "run.pt"]
    (checkpoints / "latest").write_text(step10.name + "\n")  # rewind to step 10, then resume
    result = subprocess.run([*CLI, "--config", resumed, "--nproc", "2"], capture_output=True, text=True)
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")  # bit for bit
    # The world-2 checkpoint at step 10, continued by one process with the same global batch.
    state = read_checkpoint(step10)
    assert state["step"] == 10 and state["world_size"] == 2
    shutil.copytree(step10, tmp_path / "single" / "checkpoints" / step10.name)
    (tmp_path / "single" / "checkpoints" / "latest").write_text(step10.name + "\n")
    single = _config(data_dir, tmp_path / "single", tmp_path, "single", batch_size=8)
    result = subprocess.run([*CLI, "--config", single], capture_output=True, text=True)
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr
    assert _losses(tmp_path / "single")[-1] == pytest.approx(_losses(tmp_path / "whole")[-1], rel=1e-3)


def _children(pid: int) -> dict[int, int]:
    """rank -> pid of the processes `pid` started (from /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode().split("\0") if "=" in v)
            ranks[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return ranks


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the ranks through Linux's /proc")
def test_a_killed_rank_stops_the_others_with_a_clear_error(data_dir, tmp_path):
    config = _config(data_dir, tmp_path / "run", tmp_path, "c", max_steps=10**6, eval_every=10**6,
                     checkpoint_every=20, **{"parallel.strategy": '"bucketed"'})  # fmt: skip
    launcher = subprocess.Popen([*CLI, "--config", config, "--nproc", "2"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while latest_checkpoint(tmp_path / "run") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(_children(launcher.pid)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = launcher.communicate(timeout=60)
    assert time.monotonic() - killed_at < 30  # bounded: no hang
    assert launcher.returncode != 0
    assert "scratchlm: error: rank 1 of 2 failed (signal 9); the other ranks were stopped" in err
    state = read_checkpoint(latest_checkpoint(tmp_path / "run"))  # the last complete checkpoint loads
    assert state["step"] % 20 == 0 and not _children(launcher.pid)


def test_speedrun_with_two_processes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(synthetic_text(2000, seed=i), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "scratchlm.cli", "speedrun", "--corpus", str(corpus), "--preset",
                             "tiny", "--minutes", "0.05", "--out", str(tmp_path / "out"), "--nproc", "2"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes (ddp)" in result.stdout and (tmp_path / "out" / "report.md").is_file()
