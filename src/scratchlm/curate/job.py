"""Shards of one phase of a curation run, as a job for the executor (one process for several shards, so
the classifiers load once; each shard is marked finished on its own):

python -m scratchlm.curate.job OUT PHASE SHARD[,SHARD...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from scratchlm.curate.pipeline import Pipeline
from scratchlm.errors import ScratchLMError


def main(argv: list[str] | None = None) -> int:
    out, phase, shards = argv if argv is not None else sys.argv[1:]
    try:
        pipeline = Pipeline.open(Path(out))
        for shard in shards.split(","):
            pipeline.run_shard(phase, int(shard))
    except ScratchLMError as exc:
        print(f"scratchlm curate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
