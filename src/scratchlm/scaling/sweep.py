"""Sweeps: a grid of training runs, each defined by its compute budget.

A sweep file (TOML) names the budgets, the model shapes, optional grid fields (any config field:
learning rate, optimizer, architecture options), the seeds, fixed overrides and a base config:

    name = "isoflop"
    out_dir = "runs/sweeps/isoflop"
    base_config = "configs/corpora-4k.toml"      # optional; the built-in defaults otherwise
    budgets = [1e13, 3e13, 1e14]                 # FLOPs per run
    seeds = [0]
    [set]                                        # every run
    "batch_size" = 16
    [[shapes]]                                   # one table per model shape
    "model.d_model" = 64
    "model.n_layers" = 2
    budgets = [1e13, 3e13]                       # optional: only at these budgets (default: all of them)
    [grid]                                       # optional: the cross product with the shapes
    "optim.lr" = [1e-3, 3e-3]

Each run trains exactly budget / (FLOPs per step) steps (the accounting's exact training FLOPs per
token), and its learning-rate schedule decays over exactly those steps, since a run cut mid-schedule
is no optimum. Runs are keyed by their resolved config (a hash), so a run is done once whatever the
sweep around it: re-running a sweep skips what is done, resumes what was interrupted (from its
checkpoints) and runs what is new; extending the grid extends the sweep.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.accounting import matmul_parameters, parameter_counts, training_flops_per_token
from scratchlm.atomic import atomic_write_text
from scratchlm.errors import ScratchLMError
from scratchlm.train.config import TrainConfig, load_config, load_config_text, to_toml

PLAN, RESULT = "planned.toml", "result.json"


@dataclass
class SweepSpec:
    name: str
    out_dir: str
    budgets: list[float]
    shapes: list[dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0])
    base_config: str | None = None
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    checkpoints: int = 4  # per run, for resuming


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep file, every field checked; errors name the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScratchLMError(f"sweep file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScratchLMError(f"{path}: not valid TOML ({exc})") from None
    known = set(SweepSpec.__dataclass_fields__)
    if unknown := sorted(set(data) - known):
        raise ScratchLMError(f"{path}: unknown field {unknown[0]!r}; expected {', '.join(sorted(known))}")
    for name in ("name", "out_dir", "budgets", "shapes"):
        if name not in data:
            raise ScratchLMError(f"{path}: {name} is missing")

    def fail(name: str, expected: str) -> ScratchLMError:
        return ScratchLMError(f"{path}: {name} is {data[name]!r}; expected {expected}")

    budgets, seeds = data["budgets"], data.get("seeds", [0])
    if not isinstance(budgets, list) or not budgets or not all(
        isinstance(b, int | float) and not isinstance(b, bool) and b > 0 for b in budgets):  # fmt: skip
        raise fail("budgets", "a non-empty list of positive numbers (FLOPs)")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise fail("seeds", "a non-empty list of integers >= 0")
    shapes = data["shapes"]
    if not isinstance(shapes, list) or not shapes or not all(isinstance(s, dict) for s in shapes):
        raise fail("shapes", "one or more [[shapes]] tables")
    for i, shape in enumerate(shapes):
        if "budgets" in shape and (not isinstance(shape["budgets"], list) or not shape["budgets"]
                                   or not set(shape["budgets"]) <= set(budgets)):  # fmt: skip
            raise ScratchLMError(f"{path}: shapes[{i}].budgets is {shape['budgets']!r}; expected a non-empty "
                                 f"list of the sweep's budgets ({', '.join(f'{b:g}' for b in budgets)})")  # fmt: skip
    grid = data.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise fail("grid", "a table of non-empty lists")
    checkpoints = data.get("checkpoints", 4)
    if not isinstance(checkpoints, int) or checkpoints < 1:
        raise fail("checkpoints", "an integer >= 1")
    return SweepSpec(str(data["name"]), str(data["out_dir"]), [float(b) for b in budgets], shapes, seeds,
                     data.get("base_config"), dict(data.get("set", {})), grid, checkpoints)  # fmt: skip


@dataclass
class PlannedRun:
    key: str
    budget: float
    seed: int
    labels: dict[str, Any]  # the shape's and the grid point's fields
    config: TrainConfig
    steps: int

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def flops(self) -> float:
        """What the run spends: its steps x tokens per step x training FLOPs per token."""
        return self.steps * self.config.tokens_per_step * training_flops_per_token(self.config.model)


def _set(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON numbers, strings, booleans and lists are TOML too


def _flat(record: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in record.items():
        out.update(_flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name: value})
    return out


def run_key(config: TrainConfig) -> str:
    """A run's name: the hash of what its resolved config sets apart from the defaults (out_dir and
    threads excluded). An option added to the config later, at a default that does what runs did before
    it, renames no run, so results from before it (`import_results`) still count; the other side of it:
    a changed default does not rename the runs that relied on the old one, so a sweep pins in its base
    config or [set] whatever it must keep."""
    defaults = _flat(dataclasses.asdict(TrainConfig()))
    mine = {k: v for k, v in _flat(dataclasses.asdict(config)).items() if k not in ("out_dir", "threads")}
    diff = {k: v for k, v in mine.items() if k not in defaults or defaults[k] != v}
    return hashlib.sha256(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:12]


def plan(spec: SweepSpec) -> list[PlannedRun]:
    """Every run of the sweep, in order of budget, shape, grid point and seed."""
    points = [dict(zip(spec.grid, values, strict=True)) for values in itertools.product(*spec.grid.values())]
    runs = []
    for budget, shape, point, seed in itertools.product(spec.budgets, spec.shapes, points or [{}], spec.seeds):
        if budget not in shape.get("budgets", [budget]):
            continue
        labels = {**{k: v for k, v in shape.items() if k != "budgets"}, **point}
        overrides = [_set(k, v) for k, v in {**spec.set, **labels}.items()] + [f"seed={seed}"]
        config = load_config(spec.base_config, overrides)
        steps = max(1, round(budget / (config.tokens_per_step * training_flops_per_token(config.model))))
        fixed = [f"max_steps={steps}", "max_minutes=0", f"eval_every={steps}", "threads=0", 'out_dir="run"',
                 f"checkpoint_every={max(1, math.ceil(steps / spec.checkpoints))}",
                 f"log_every={max(1, min(config.log_every, steps // 10))}",
                 f"optim.warmup_steps={min(config.optim.warmup_steps, steps // 5)}"]  # fmt: skip
        config = load_config(spec.base_config, overrides + fixed)
        key = run_key(config)
        config.out_dir = str(Path(spec.out_dir) / "runs" / key)
        runs.append(PlannedRun(key, budget, seed, labels, config, steps))
    return runs


def shape_candidates(spec: SweepSpec) -> list:
    """The sweep's distinct model shapes as candidates for a prediction (`fit.Candidate`): N as the fits
    count it and the exact training FLOPs per token of each."""
    from scratchlm.scaling.fit import Candidate

    out: dict[str, Candidate] = {}
    for shape in spec.shapes:
        model_fields = {k: v for k, v in shape.items() if k.startswith("model.")}
        config = load_config(spec.base_config, [_set(k, v) for k, v in {**spec.set, **model_fields}.items()])
        m = config.model
        label = ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in model_fields.items())
        out[label] = Candidate(label, matmul_parameters(m) - m.vocab_size * m.d_model, training_flops_per_token(m))
    return list(out.values())


def write_plan(run: PlannedRun) -> Path:
    """The run's resolved config, in its directory, for the job to train from."""
    path = run.run_dir / PLAN
    meta = {"key": run.key, "budget": run.budget, "seed": run.seed, "labels": run.labels, "steps": run.steps}
    atomic_write_text(path, f"# sweep run {json.dumps(meta)}\n" + to_toml(run.config))
    return path


def read_plan(run_dir: Path) -> tuple[dict, TrainConfig]:
    text = (run_dir / PLAN).read_text(encoding="utf-8")
    meta = json.loads(text.splitlines()[0].removeprefix("# sweep run "))
    return meta, load_config_text(text, str(run_dir / PLAN))


def run_result(run_dir: Path, train_result: dict, records: list[dict]) -> dict:
    """What `results.json` keeps of a finished run: its place in the sweep, its sizes, tokens, FLOPs and losses."""
    meta, config = read_plan(run_dir)
    m = config.model
    counts = parameter_counts(m)
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    tokens = train_result["step"] * config.tokens_per_step
    return {
        "key": meta["key"], "budget": meta["budget"], "seed": meta["seed"], **meta["labels"],
        "parameters": matmul_parameters(m) - m.vocab_size * m.d_model,  # N: matmul, without embeddings
        "parameters_with_embeddings": matmul_parameters(m), "parameters_total": counts["total"],
        "tokens": tokens, "compute": meta["budget"], "flops": tokens * training_flops_per_token(m),
        "steps": train_result["step"], "train_loss": train_losses[-1] if train_losses else None,
        "loss": train_result["val/loss"], "val_loss": train_result["val/loss"], "val_bpb": train_result["val/bpb"],
        "wall_s": records[-1].get("time_s") if records else None,
    }  # fmt: skip


def read_result(run: PlannedRun) -> dict | None:
    try:
        return json.loads((run.run_dir / RESULT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _csv_value(column: str, text: str) -> Any:
    """A results.csv cell as `collect` wrote it: "" for None, Python's int and float reprs, strings."""
    if text == "":
        return None
    if column == "key":
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results_file(path: Path) -> list[dict]:
    """The records of a sweep's results.json or results.csv (as `collect` writes them)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchLMError(f"{path}: no such file") from None
    if path.suffix.lower() == ".csv":
        rows = [{k: _csv_value(k, v or "") for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScratchLMError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ScratchLMError(f"{path}: expected a sweep's results (a JSON list of runs, or a CSV with a header)")
    for i, row in enumerate(rows):
        if missing := sorted({"key", "val_loss", "val_bpb"} - {k for k, v in row.items() if v is not None}):
            raise ScratchLMError(f"{path}, run {i}: {missing[0]} is missing; expected the columns sweep run writes")
    return rows


def import_results(runs: list[PlannedRun], path: Path) -> tuple[int, int, int]:
    """Mark the runs that `path` (results.json or .csv, from this sweep on another machine or an earlier
    session) holds as done, as if they had finished here: their plan and result.json are written, so
    `sweep run` skips them and `collect` reports them. A run matches by key (`run_key`): a row whose
    config this sweep does not plan (a changed base config or shape) is not imported.
    Returns (imported, already done here, not in this sweep)."""
    by_key = {run.key: run for run in runs}
    imported = present = foreign = 0
    for row in read_results_file(path):
        run = by_key.get(str(row["key"]))
        if run is None:
            foreign += 1
        elif read_result(run) is not None:
            present += 1
        else:
            write_plan(run)
            atomic_write_text(run.run_dir / RESULT, json.dumps(row, indent=1) + "\n")
            imported += 1
    return imported, present, foreign


def variants(runs: list[PlannedRun]) -> list[dict]:
    """The finished runs grouped by budget and by shape / grid point, their seeds together, in the plan's
    order (an ablation's table): each group's labels, budget, seeds, and the mean and sample standard
    deviation (None for one seed) of validation bits per byte and loss, with the mean's difference from
    the first group at the same budget (the baseline)."""
    groups: dict[tuple, dict] = {}
    for run in runs:
        result = read_result(run)
        if result is None:
            continue
        fresh = {"labels": run.labels, "budget": run.budget, "seeds": [], "bpb": [], "loss": []}
        group = groups.setdefault((run.budget, json.dumps(run.labels, sort_keys=True)), fresh)
        group["seeds"].append(run.seed)
        group["bpb"].append(result["val_bpb"])
        group["loss"].append(result["val_loss"])
    rows, baselines = [], {}
    for group in groups.values():
        row = {"labels": group["labels"], "budget": group["budget"], "seeds": group["seeds"]}
        for name in ("bpb", "loss"):
            values = group[name]
            row[name] = statistics.fmean(values)
            row[f"{name}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        baseline = baselines.setdefault(group["budget"], row)
        row["baseline"], row["bpb_change"] = row is baseline, row["bpb"] - baseline["bpb"]
        rows.append(row)
    return rows


def collect(spec: SweepSpec, runs: list[PlannedRun]) -> list[dict]:
    """The finished runs' results, written to out_dir/results.json and results.csv (each whole or not at all)."""
    results = [r for r in (read_result(run) for run in runs) if r is not None]
    out = Path(spec.out_dir)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    columns = list(dict.fromkeys(key for r in results for key in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(results)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    return results
