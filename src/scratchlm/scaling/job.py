"""One run of a sweep, as the executor starts it: `python -m scratchlm.scaling.job RUN_DIR [--threads N]`.

Trains the run's planned config (resuming from its checkpoints if it was interrupted) and writes
`result.json` (whole or not at all) when it has finished; exit status 130 if it was interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scratchlm.atomic import atomic_write_text
from scratchlm.errors import ScratchLMError
from scratchlm.scaling.sweep import RESULT, read_plan, run_result


def run(run_dir: Path, threads: int) -> int:
    from scratchlm.train.evaluate import evaluate_run
    from scratchlm.train.metrics import read_metrics
    from scratchlm.train.trainer import train

    _, config = read_plan(run_dir)
    config.threads = threads
    result = train(config)
    if result.get("interrupted"):
        return 130
    if "val/loss" not in result:  # finished before, interrupted before its result was written
        evaluated = evaluate_run(run_dir)
        result.update({"val/loss": evaluated["loss"], "val/bpb": evaluated["bits_per_byte"]})
    record = run_result(run_dir, result, read_metrics(run_dir / "metrics.jsonl"))
    atomic_write_text(run_dir / RESULT, json.dumps(record, indent=1) + "\n")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scratchlm.scaling.job")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    try:
        sys.exit(run(args.run_dir, args.threads))
    except ScratchLMError as exc:
        print(f"scratchlm: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
