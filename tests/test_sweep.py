"""Sweeps end to end at a tiny scale: runs defined by FLOPs (exact step counts, schedules that end at
them), cached by their resolved config, skipped when done, extended, resumed after an interruption,
and run through the local and the Ray executor; their results feed `scratchlm fit`."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchlm.accounting import training_flops_per_token
from scratchlm.errors import ScratchLMError
from scratchlm.executor import Job, LocalExecutor, python_command
from scratchlm.scaling.sweep import import_results, load_sweep, plan, variants, write_plan
from scratchlm.train.config import TrainConfig
from scratchlm.train.metrics import read_metrics


def spec_text(data_dir: Path, out: Path, budgets: str = "[3e8, 9e8]") -> str:
    return f"""
name = "tiny"
out_dir = {json.dumps(str(out))}
budgets = {budgets}
seeds = [0]
[set]
"data.train_tokens" = {json.dumps(str(data_dir / "train.bin"))}
"data.val_tokens" = {json.dumps(str(data_dir / "val.bin"))}
"data.tokenizer" = {json.dumps(str(data_dir / "tokenizer"))}
"model.vocab_size" = 300
"model.context_length" = 32
"batch_size" = 4
"eval_tokens" = 512
"optim.warmup_steps" = 3
[[shapes]]
"model.d_model" = 16
"model.n_layers" = 1
"model.n_heads" = 2
[[shapes]]
"model.d_model" = 32
"model.n_layers" = 2
"model.n_heads" = 4
"""


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchlm.cli", "sweep", *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_an_ablation_table_groups_seeds_by_variant(data_dir, tmp_path):
    """Two shapes x two seeds at one budget, results by hand: each variant's mean and sample standard
    deviation over its seeds, the change from the first (the baseline), unfinished runs left out."""
    path = tmp_path / "sweep.toml"
    path.write_text(spec_text(data_dir, tmp_path / "out", "[3e8]").replace("seeds = [0]", "seeds = [0, 1]"))
    runs = plan(load_sweep(path))
    bpb = {(16, 0): 2.0, (16, 1): 2.2, (32, 0): 1.9}  # the d 32, seed 1 run has not finished
    rows = [{"key": r.key, "val_bpb": bpb[(r.labels["model.d_model"], r.seed)], "val_loss": 4.0}
            for r in runs if (r.labels["model.d_model"], r.seed) in bpb]  # fmt: skip
    (tmp_path / "done.json").write_text(json.dumps(rows))
    import_results(runs, tmp_path / "done.json")
    base, wide = variants(runs)
    assert base["labels"]["model.d_model"] == 16 and base["seeds"] == [0, 1] and base["baseline"]
    assert base["bpb"] == pytest.approx(2.1) and base["bpb_sd"] == pytest.approx(0.02**0.5)  # sqrt((0.1² + 0.1²) / 1)
    assert wide["seeds"] == [0] and wide["bpb_sd"] is None and wide["bpb_change"] == pytest.approx(-0.2)
    table = sweep("table", str(path))
    assert table.returncode == 0, table.stderr
    assert "| d_model=16, n_layers=1, n_heads=2 | 3e+08 | 2 | 2.1000 ± 0.1414 | baseline |" in table.stdout
    assert "| d_model=32, n_layers=2, n_heads=4 | 3e+08 | 1 | 1.9000 | -0.2000 |" in table.stdout


def test_runs_are_defined_by_their_budget_and_keyed_by_their_config(data_dir, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(spec_text(data_dir, tmp_path / "out"))
    runs = plan(load_sweep(path))
    assert len(runs) == 4 and len({r.key for r in runs}) == 4
    for run in runs:
        per_step = run.config.tokens_per_step * training_flops_per_token(run.config.model)
        assert run.steps == round(run.budget / per_step) and abs(run.flops - run.budget) <= per_step / 2
        assert run.config.max_steps == run.steps and run.config.eval_every == run.steps
        assert run.config.max_minutes == 0 and run.run_dir == tmp_path / "out" / "runs" / run.key
    assert [r.key for r in plan(load_sweep(path))] == [r.key for r in runs]  # the same config, the same key
    # a shape restricted to some budgets runs only at those
    restricted_text = spec_text(data_dir, tmp_path / "out").replace('n_layers" = 2', 'n_layers" = 2\nbudgets = [9e8]')
    path.write_text(restricted_text)
    restricted = plan(load_sweep(path))
    assert [(r.budget, r.labels["model.d_model"]) for r in restricted] == [(3e8, 16), (9e8, 16), (9e8, 32)]
    assert "budgets" not in restricted[-1].labels
    assert restricted[-1].key == runs[-1].key  # the same run whatever the sweep around it


def test_a_run_keeps_its_key_when_the_config_gains_an_option(data_dir, tmp_path, monkeypatch):
    """Keys hash what a run sets apart from the defaults: a later option at its default renames nothing
    (so results committed before it still count), while any value that differs renames the run."""
    import dataclasses

    from scratchlm.scaling import sweep as sweep_module

    path = tmp_path / "sweep.toml"
    path.write_text(spec_text(data_dir, tmp_path / "out"))
    runs = plan(load_sweep(path))
    config = runs[0].config
    assert sweep_module.run_key(config) == runs[0].key
    assert sweep_module.run_key(dataclasses.replace(config, threads=3, out_dir="elsewhere")) == runs[0].key
    assert sweep_module.run_key(dataclasses.replace(config, seed=1)) != runs[0].key
    assert sweep_module.run_key(dataclasses.replace(config, fp8="rowwise")) != runs[0].key

    @dataclasses.dataclass
    class Later(TrainConfig):
        new_option: int = 0

    monkeypatch.setattr(sweep_module, "TrainConfig", Later)
    assert sweep_module.run_key(Later(**vars(config))) == runs[0].key
    assert sweep_module.run_key(Later(**vars(config), new_option=1)) != runs[0].key


def test_a_sweep_runs_skips_what_is_done_and_extends(data_dir, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(spec_text(data_dir, tmp_path / "out"))
    done = sweep("run", str(path), "--workers", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "4 runs, 0 done, 4 to run" in done.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 4
    for result, run in zip(sorted(results, key=lambda r: r["key"]), sorted(plan(load_sweep(path)), key=lambda r: r.key),
                           strict=True):  # fmt: skip
        assert result["steps"] == run.steps and result["flops"] == pytest.approx(run.flops)
        assert result["loss"] == result["val_loss"] > 0 and result["val_bpb"] > 0
        records = read_metrics(run.run_dir / "metrics.jsonl")
        last_lr = [r["lr"] for r in records if "lr" in r][-1]
        assert last_lr == pytest.approx(run.config.optim.min_lr)  # the schedule ends with the run
    assert "parameters,parameters_with_embeddings" in (tmp_path / "out" / "results.csv").read_text()
    again = sweep("run", str(path))
    assert again.returncode == 0 and "4 runs, 4 done, 0 to run" in again.stdout
    # on a new machine (the run directories gone), the committed results.csv counts its runs as done
    committed = tmp_path / "committed.csv"
    committed.write_text((tmp_path / "out" / "results.csv").read_text())
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{**results[0], "key": "0123456789ab"}]))
    shutil.rmtree(tmp_path / "out")
    imported = sweep("import", str(path), str(committed))
    assert imported.returncode == 0, imported.stderr
    assert "imported 4 finished runs" in imported.stdout and "4 of 4 runs done" in imported.stdout
    assert sorted(json.loads((tmp_path / "out" / "results.json").read_text()), key=lambda r: r["key"]) == sorted(
        results, key=lambda r: r["key"])  # the CSV's numbers read back as they were written  # fmt: skip
    assert "imported 0 finished runs from" in (twice := sweep("import", str(path), str(committed)).stdout)
    assert "(4 already done here, 0 not planned by this sweep)" in twice
    other = sweep("import", str(path), str(foreign)).stdout
    assert "imported 0 finished runs" in other and "1 not planned by this sweep" in other
    assert "4 runs, 4 done, 0 to run" in sweep("run", str(path)).stdout
    path.write_text(spec_text(data_dir, tmp_path / "out", "[3e8, 9e8, 2e9]"))
    status = sweep("status", str(path))
    assert "6 runs: 4 done, 0 running, 0 started (resumable), 2 left" in status.stdout
    extended = sweep("run", str(path))
    assert extended.returncode == 0 and "6 runs, 4 done, 2 to run" in extended.stdout
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 6


def test_an_interrupted_run_resumes_where_it_stopped(data_dir, tmp_path):
    path = tmp_path / "sweep.toml"
    one_shape = "[[shapes]]".join(spec_text(data_dir, tmp_path / "out", "[4e9]").split("[[shapes]]")[:2])
    path.write_text(one_shape.replace("seeds = [0]", "seeds = [0]\ncheckpoints = 1000"))  # one every few steps
    [run] = plan(load_sweep(path))
    write_plan(run)
    job = subprocess.Popen(python_command("-m", "scratchlm.scaling.job", str(run.run_dir), "--threads", "1"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 120
    while not list((run.run_dir / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)
    assert job.wait(60) == 130
    assert not (run.run_dir / "result.json").exists()
    status = sweep("status", str(path))
    finished = sweep("run", str(path))
    assert finished.returncode == 0, finished.stderr
    assert "1 started (resumable)" in status.stdout and "1 runs, 0 done, 1 to run" in finished.stdout
    log = (run.run_dir / "job.log").read_text()
    assert "resuming" in log
    assert json.loads((run.run_dir / "result.json").read_text())["steps"] == run.steps


def test_stopping_the_sweep_alone_stops_its_runs_with_a_checkpoint(data_dir, tmp_path):
    """SIGTERM to the sweep's process only (as a scheduler sends it), even one started with SIGINT
    ignored (a background job): it starts no more runs, the running one saves a checkpoint and exits,
    and the sweep says so and exits 130 (resuming from that checkpoint: the test above)."""
    path = tmp_path / "sweep.toml"
    text = spec_text(data_dir, tmp_path / "out", "[4e9]").replace("seeds = [0]", "seeds = [0]\ncheckpoints = 1000")
    path.write_text(text)
    runs = plan(load_sweep(path))
    command = [sys.executable, "-m", "scratchlm.cli", "sweep", "run", str(path)]
    sweep_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    deadline = time.time() + 120
    while not list((runs[0].run_dir / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    sweep_process.send_signal(signal.SIGTERM)
    output, _ = sweep_process.communicate(timeout=60)
    assert sweep_process.returncode == 130, output
    assert f"{runs[0].key}: interrupted (its checkpoint resumes it)" in output
    assert "sweep tiny stopped: 0 of 2 runs done; run it again to go on" in output
    assert not (runs[1].run_dir / "checkpoints").exists()  # the second run never started
    status = sweep("status", str(path))
    assert "0 running, 1 started (resumable), 1 left" in status.stdout  # nothing is left running


def test_the_ray_executor_runs_jobs_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    from scratchlm.executor import RayExecutor

    jobs = [Job(f"j{i}", python_command("-c", f"print({i} * {i})"), tmp_path / f"j{i}.log") for i in range(3)]
    jobs.append(Job("bad", python_command("-c", "raise SystemExit(3)"), tmp_path / "bad.log"))
    ended: dict[str, int] = {}
    executor = RayExecutor(num_cpus=1, local_cpus=2)
    try:
        executor.run(jobs, lambda job, status: ended.__setitem__(job.name, status))
    finally:
        executor.shutdown()
    assert ended == {"j0": 0, "j1": 0, "j2": 0, "bad": 3}
    assert [(tmp_path / f"j{i}.log").read_text().strip() for i in range(3)] == ["0", "1", "4"]


def test_the_local_executor_reports_each_job_as_it_ends(tmp_path):
    jobs = [Job("slow", python_command("-c", "import time; time.sleep(1.5)"), tmp_path / "slow.log"),
            Job("fast", python_command("-c", "pass"), tmp_path / "fast.log")]  # fmt: skip
    order = []
    LocalExecutor(2).run(jobs, lambda job, status: order.append((job.name, status)))
    assert order == [("fast", 0), ("slow", 0)]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("budgets = [3e8, 9e8]", "budgets = []"), "budgets is []; expected a non-empty list"),
        (lambda t: t.replace("budgets = [3e8, 9e8]", 'budgets = ["big"]'), "budgets is ['big']"),
        (lambda t: t.replace("seeds = [0]", "seeds = [-1]"), "seeds is [-1]; expected a non-empty list of integers"),
        (lambda t: t.replace('name = "tiny"', 'name = "tiny"\nbudget = 3'), "unknown field 'budget'"),
        (lambda t: t.replace('"model.n_layers" = 1', '"model.n_layers" = "one"'), "model.n_layers"),
        (
            lambda t: t.replace('"model.n_layers" = 1', '"model.n_layers" = 1\nbudgets = [1e9]'),
            "shapes[0].budgets is [1000000000.0]; expected a non-empty list of the sweep's budgets (3e+08, 9e+08)",
        ),
    ],
)
def test_bad_sweep_files_are_named(data_dir, tmp_path, edit, message):
    path = tmp_path / "sweep.toml"
    path.write_text(edit(spec_text(data_dir, tmp_path / "out")))
    with pytest.raises(ScratchLMError, match=re.escape(message)):
        plan(load_sweep(path))


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("key,val_loss\nabc,4.2\n", "r.csv", "r.csv, run 0: val_bpb is missing"),
        ('{"runs": 3}', "r.json", "expected a sweep's results"),
        ("[{", "r.json", "not valid JSON"),
    ],
)
def test_bad_results_to_import_are_named(data_dir, tmp_path, content, name, message):
    path = tmp_path / "sweep.toml"
    path.write_text(spec_text(data_dir, tmp_path / "out"))
    (tmp_path / name).write_text(content)
    with pytest.raises(ScratchLMError, match=re.escape(message)):
        import_results(plan(load_sweep(path)), tmp_path / name)
    assert not (tmp_path / "out").exists()  # nothing written
