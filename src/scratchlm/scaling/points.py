"""The runs a scaling fit reads: one `Run` per trained model (N parameters, D tokens, C FLOPs, final
loss), from the CS336 IsoFLOP JSON (`parameters`, `compute_budget`, `final_loss`; D = C / 6N), a CSV
with a header (N or parameters; D or tokens; C, compute or flops; loss — D or C may be left out, as
C = 6 N D), or a sweep's results (`results.json`, with the exact FLOPs the runs spent)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import ScratchLMError


@dataclass(frozen=True)
class Run:
    parameters: float  # N
    tokens: float  # D
    compute: float  # C (FLOPs), the budget the run belongs to
    loss: float


def _number(value, where: str, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (name != "loss" and number <= 0):
        raise ScratchLMError(
            f"{where}: {name} is {value!r}; expected a {'finite' if name == 'loss' else 'positive'} number"
        )
    return number


ALIASES = {
    "parameters": ("parameters", "N", "n", "params"),
    "tokens": ("tokens", "D", "d", "data"),
    "compute": ("compute", "C", "c", "flops", "compute_budget", "budget"),
    "loss": ("loss", "final_loss", "val_loss", "L"),
}


def _field(row: dict, name: str):
    for key in ALIASES[name]:
        if key in row and row[key] not in ("", None):
            return row[key]
    return None


def run_from(row: dict, where: str) -> Run:
    """A Run from a record with any of the ALIASES; the missing one of D and C from C = 6 N D."""
    n, d, c, loss = (_field(row, name) for name in ALIASES)
    if n is None or loss is None or (d is None and c is None):
        raise ScratchLMError(
            f"{where}: expected N (parameters), the loss, and D (tokens) or C (compute); got fields {sorted(row)}"
        )
    n, loss = _number(n, where, "parameters"), _number(loss, where, "loss")
    d = _number(d, where, "tokens") if d is not None else None
    c = _number(c, where, "compute") if c is not None else None
    return Run(n, d if d is not None else c / (6 * n), c if c is not None else 6 * n * d, loss)


def load_runs(path: str | Path) -> list[Run]:
    """Runs from a JSON list of records (the CS336 format, a sweep's results.json) or a CSV file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchLMError(f"{path}: no such file") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        runs = [run_from(row, f"{path}, line {i + 2}") for i, row in enumerate(rows)]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScratchLMError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        data = data.get("runs", data) if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ScratchLMError(f'{path}: expected a JSON list of runs (objects), or {{"runs": [...]}}')
        runs = [run_from(row, f"{path}, run {i}") for i, row in enumerate(data)]
    if len(runs) < 3:
        raise ScratchLMError(f"{path}: {len(runs)} runs; a fit needs at least 3")
    return runs


def by_budget(runs: list[Run], relative: float = 0.05) -> dict[float, list[Run]]:
    """Runs grouped by compute budget: budgets within `relative` of each other are one (a run's exact
    FLOPs differ a little from its nominal budget). Keys: the group's median compute."""
    groups: list[list[Run]] = []
    for run in sorted(runs, key=lambda r: r.compute):
        if groups and run.compute <= groups[-1][0].compute * (1 + relative):
            groups[-1].append(run)
        else:
            groups.append([run])
    return {sorted(r.compute for r in g)[len(g) // 2]: sorted(g, key=lambda r: r.parameters) for g in groups}
