"""The main job end to end through the real CLI, on a tiny preset and a small corpus: every artifact,
caching, and resuming an interrupted run instead of starting over."""

import json
import os
import signal
import subprocess
import sys

from conftest import synthetic_text

from scratchlm.speedrun import PRESETS, predict, steps_for_epochs, training_precision
from scratchlm.train.config import load_config


def test_cpu_preset_is_the_shakespeare_cpu_config():
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "configs" / "shakespeare-cpu.toml")
    preset = load_config(None, PRESETS["cpu"]["sets"])
    assert config.model == preset.model and config.optim == preset.optim and config.batch_size == preset.batch_size


def test_gpu_preset_caps_the_passes_over_the_data():
    import torch

    config = load_config(None, PRESETS["gpu"]["sets"])
    assert config.model.dropout > 0 and PRESETS["gpu"]["max_epochs"] == 16
    # 16 passes over Shakespeare's 1,396,175 training tokens at 64 x 512 tokens a step: 681.7 -> 682 steps.
    config.max_steps = steps_for_epochs(16, 1_396_175, config)
    assert config.max_steps == 682
    # The tokens to train on: the budget's worth at the predicted speed, or the cap's if fewer.
    assert predict(config, torch.device("cpu"), 1e6, 10.0)["tokens"] == 682 * 64 * 512
    assert predict(config, torch.device("cpu"), 1e-9, 10.0)["tokens"] < 682 * 64 * 512
    # Its memory is accounted as it trains: bf16 autocast on CUDA, float32 elsewhere.
    assert training_precision(load_config(None, [*PRESETS["gpu"]["sets"], 'device="cuda"'])) == "bf16-mixed"
    assert training_precision(load_config(None, [*PRESETS["gpu"]["sets"], 'device="cpu"'])) == "fp32"


def test_speedrun_end_to_end_with_resume(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"work{i}.txt").write_text(synthetic_text(5000, seed=i), encoding="utf-8")
    command = [sys.executable, "-m", "scratchlm.cli", "speedrun", "--corpus", str(corpus), "--preset", "tiny",
               "--minutes", "0.5", "--out", str(tmp_path / "out")]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    # First run: interrupted during training.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 10:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    out = tmp_path / "out"
    for artifact in ["data/tokenizer/vocab.json", "data/tokenizer/merges.txt", "data/tokenizer/tokenizer.json",
                     "data/train.bin", "data/val.bin", "data/split.json", "run/checkpoints/latest"]:  # fmt: skip
        assert (out / artifact).is_file(), artifact
    assert not (out / "report.md").exists()
    interrupted_at = max(json.loads(line)["step"] for line in (out / "run/metrics.jsonl").read_text().splitlines())

    # Second run: the data stages are cached, training resumes from the checkpoint and finishes.
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cached:" in result.stdout and "resuming" in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and min(s for s in steps if s > interrupted_at) > interrupted_at
    report = (out / "report.md").read_text()
    for section in ["bits per byte", "## Samples", "## Predicted vs measured", "## Accounting", "## Tokenizer",
                    "## Environment", "scratchlm generate --run", "run/loss.png"]:  # fmt: skip
        assert section in report, section
    assert (out / "run/loss.png").stat().st_size > 1000
