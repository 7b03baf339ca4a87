"""Metrics: one JSON object per line in `metrics.jsonl`, a console progress line, a loss-curve PNG."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from scratchlm.errors import ScratchLMError


class MetricsLog:
    """Appends `{"step": ..., "time_s": ..., "train/loss": ...}` records, flushed as they come."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLog:
    """What a distributed run's other ranks log to: nothing (rank 0 writes the metrics)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
    """Records of a run; with `up_to_step`, only those at or before it (what a resumed run keeps)."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as exc:
            if number == len(lines) and not text.endswith("\n"):  # torn by a kill in mid-write
                print(f"warning: {path}, line {number}: dropped a record cut short by an interrupted write",
                      file=sys.stderr)  # fmt: skip
                break
            raise ScratchLMError(f"{path}, line {number}: expected a JSON metrics record with a step ({exc})") from None
        records.append(record)
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """Train and validation loss against steps and against wall-clock time, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchlm.atomic import atomic_open

    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, label in ((axes[0], "step", "step"), (axes[1], "time_s", "wall-clock time (s)")):
        if train:
            ax.plot([r[x_key] for r in train], [r["train/loss"] for r in train], label="train", lw=1)
        if val:
            ax.plot([r[x_key] for r in val], [r["val/loss"] for r in val], "o-", label="validation", ms=3)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("scratchlm training loss")
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
