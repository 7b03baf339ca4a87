"""One shard of one phase of a curation run, as a job for the executor:

python -m scratchlm.curate.job OUT PHASE SHARD
"""

from __future__ import annotations

import sys
from pathlib import Path

from scratchlm.curate.pipeline import Pipeline
from scratchlm.errors import ScratchLMError


def main(argv: list[str] | None = None) -> int:
    out, phase, shard = argv if argv is not None else sys.argv[1:]
    try:
        Pipeline.open(Path(out)).run_shard(phase, int(shard))
    except ScratchLMError as exc:
        print(f"scratchlm curate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
