"""`kill -9` at random moments, many during checkpoint writes: each resume continues the uninterrupted
run's trajectory bit for bit, no temporary files pile up, and metrics.jsonl has no gaps or duplicates."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tiny_config

from scratchlm.train.checkpoint import latest_checkpoint, read_checkpoint
from scratchlm.train.config import to_toml

CLI = [sys.executable, "-m", "scratchlm.cli", "train", "--config"]
STEPS = 240
LOG_EVERY = 5


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if ".tmp" in p.name]


def trajectory(run: Path) -> list[dict]:
    """The metrics records without the wall-clock fields (which differ between any two runs)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s" and not k.startswith("perf/")} for r in records]


def logged_steps(run: Path) -> list[int]:
    """Steps logged so far (a live process may be halfway through writing the last line)."""
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            steps.append(json.loads(line)["step"])
    return steps


def test_sigkill_at_random_moments_resumes_bit_for_bit(tmp_path, data_dir):
    # A checkpoint after every step: most of the time goes into writing them, so most kills land mid-write.
    overrides = {"max_steps": STEPS, "checkpoint_every": 1, "eval_every": 60, "log_every": LOG_EVERY}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for run in (reference, killed):
        (tmp_path / f"{run.name}.toml").write_text(to_toml(tiny_config(data_dir, run, **overrides)))
    assert subprocess.run([*CLI, tmp_path / "reference.toml"], capture_output=True).returncode == 0

    rng = random.Random(0)
    kills, mid_write = 0, 0
    while kills < 8:
        proc = subprocess.Popen([*CLI, tmp_path / "killed.toml"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start_step = read_checkpoint(latest_checkpoint(killed))["step"] if latest_checkpoint(killed) else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # wait until it trains past where it began
            if (killed / "metrics.jsonl").is_file() and any(s > start_step for s in logged_steps(killed)):
                break
            time.sleep(0.01)
        if kills % 2:  # every other kill lands as soon as a checkpoint is being written
            while proc.poll() is None and not any(".step_" in p.name for p in temporaries(killed)):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0, 0.25))
        if proc.poll() is not None:
            break  # it finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_write += any(".step_" in p.name for p in temporaries(killed))
        assert len(temporaries(killed)) <= 2  # at most what the killed process was writing; the last ones are gone
    assert kills >= 5, "the run finished before it could be killed often enough"
    assert mid_write >= 1, "no kill landed during a checkpoint write"

    result = subprocess.run([*CLI, tmp_path / "killed.toml"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert trajectory(killed) == trajectory(reference)  # every loss, lr, grad norm and evaluation
    steps = [s for s, r in zip(logged_steps(killed), trajectory(killed), strict=True) if "train/loss" in r]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))  # no gaps, no duplicates
    final, expected = (read_checkpoint(latest_checkpoint(run)) for run in (killed, reference))
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    states = zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values(), strict=True)
    for state, expected_state in states:  # AdamW's moments and step counts
        for name, value in expected_state.items():
            assert torch.equal(torch.as_tensor(state[name]), torch.as_tensor(value)), name
    assert temporaries(killed) == []
