"""`scratchlm curate`: plan the shards, then run the pipeline's phases, the per-shard ones as executor
jobs (local processes, or Ray), resuming whatever an earlier run of the same config left done."""

from __future__ import annotations

import time
from pathlib import Path

from scratchlm.curate.config import CurateConfig
from scratchlm.curate.pipeline import Pipeline, cpu_count, plan_shards
from scratchlm.curate.report import write_report
from scratchlm.errors import ScratchLMError
from scratchlm.executor import Job, LocalExecutor, RayExecutor, python_command

MAX_SHARDS_PER_JOB = 8  # a job's process loads the models once for all its shards


def job_groups(left: list[int], workers: int) -> list[list[int]]:
    """The shards left, in order, cut into one job per worker or more, at most MAX_SHARDS_PER_JOB shards
    a job (so progress and load balance stay fine-grained)."""
    size = max(1, min(MAX_SHARDS_PER_JOB, -(-len(left) // workers)))
    return [left[i : i + size] for i in range(0, len(left), size)]


def _run_phase(pipeline: Pipeline, phase: str, executor, workers: int, print_fn) -> None:
    left = pipeline.left(phase)
    total, started = len(pipeline.shards), time.perf_counter()
    if not left:
        print_fn(f"  {phase}: {total} shards done before")
        return
    logs = pipeline.work / "logs"
    jobs = [
        Job(
            ",".join(map(str, group)),
            python_command("-m", "scratchlm.curate.job", str(pipeline.out), phase, ",".join(map(str, group))),
            logs / f"{phase}-{group[0]:05d}.log",
        )
        for group in job_groups(left, workers)
    ]
    failed, finished = [], total - len(left)

    def done(job: Job, status: int) -> None:
        nonlocal finished
        if status:
            failed.append(f"shards {job.name} (exit {status}; see {job.log})")
            return
        finished += job.name.count(",") + 1
        elapsed = time.perf_counter() - started
        eta = elapsed / (finished - (total - len(left))) * (total - finished)
        print_fn(f"  {phase}: {finished}/{total} shards, {elapsed:.0f} s, ETA {eta:.0f} s")

    executor.run(jobs, done)
    if failed:
        reasons = [(Path(f.split("see ")[1].rstrip(")")).read_text().strip().splitlines() or [""])[-1] for f in failed]
        raise ScratchLMError(f"{phase}: {len(failed)} shards failed: {failed[0]}: {reasons[0]}")


def curate(
    inputs: list[Path],
    config: CurateConfig,
    config_toml: str,
    out: Path,
    executor: str = "local",
    workers: int = 0,
    ray_address: str | None = None,
    print_fn=print,
) -> dict:
    shards = plan_shards(inputs, config.shard_docs, config.shard_mb)
    pipeline = Pipeline(out, config, shards)
    pipeline.claim(config_toml)
    workers = workers or cpu_count()
    print_fn(f"curate: {len(inputs)} inputs in {len(shards)} shards -> {out}, {workers} workers on {executor}")
    runner = RayExecutor(ray_address, num_cpus=1, local_cpus=workers) if executor == "ray" else LocalExecutor(workers)
    try:
        _run_phase(pipeline, "filter", runner, workers, print_fn)
        survivors = pipeline.survivors()
        print_fn(
            f"  clusters: {int((survivors['reason'] == 1).sum())} exact and "
            f"{int((survivors['reason'] == 2).sum())} near duplicates"
        )
        _run_phase(pipeline, "count", runner, workers, print_fn)
        print_fn(f"  lines: {len(pipeline.duplicated_lines())} distinct lines occur more than once")
        _run_phase(pipeline, "write", runner, workers, print_fn)
    finally:
        if executor == "ray":
            runner.shutdown()
    report = write_report(pipeline)
    print_fn(
        f"kept {report['docs_out']} of {report['docs_in']} documents; {out / 'kept'}/*.jsonl.gz, "
        f"{out / 'text'}/*.txt, {out / 'report.md'}"
    )
    return report
