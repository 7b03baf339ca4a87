"""The curation report: documents and bytes in and out of every stage, why documents were removed, a few
examples of each (kept and removed), the language distribution, PII counts, duplicate cluster sizes
and every input error with its source. `report.json` holds it all; `report.md` is the readable view."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from scratchlm.atomic import atomic_write_text
from scratchlm.curate.stages import STAGES, StageStats


def collect(pipeline) -> dict[str, Any]:
    stages = {s: StageStats() for s in STAGES}
    languages, pii, gopher_rules, errors = Counter(), Counter(), Counter(), []
    for phase in ("filter", "write"):
        for i in range(len(pipeline.shards)):
            shard = json.loads(pipeline.stats_file(phase, i).read_text())
            for name, s in shard["stages"].items():
                stages[name].merge(s)
            languages.update(shard["languages"])
            pii.update(shard["pii"])
            gopher_rules.update(shard.get("gopher_rules", {}))
            errors += shard["errors"]
    examples = pipeline.config.examples
    out = {}
    for name, s in stages.items():
        if s.docs_in == 0:
            continue
        out[name] = {
            "docs_in": s.docs_in,
            "docs_out": s.docs_out,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "reasons": dict(s.reasons.most_common()),
            "kept_examples": s.kept_examples[:examples],
            "removed_examples": s.removed_examples[:examples],
        }
    with np.load(pipeline.work / "clusters.npz") as z:
        sizes = Counter(np.bincount(z["cluster"][z["reason"] != 1]).tolist()) if len(z["cluster"]) else Counter()
    sizes.pop(0, None)
    first = out.get("extract", {"docs_in": 0, "bytes_in": 0})
    last = out[[n for n in STAGES if n in out][-1]] if out else first
    return {
        "docs_in": first["docs_in"],
        "bytes_in": first["bytes_in"],
        "docs_out": last.get("docs_out", 0),
        "bytes_out": last.get("bytes_out", 0),
        "stages": out,
        "languages": dict(languages.most_common()),
        "pii": dict(pii),
        "gopher_rules": dict(gopher_rules.most_common()),
        "near_duplicate_cluster_sizes": {str(k): v for k, v in sorted(sizes.items()) if k > 1},
        "errors": errors,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Curation report",
        "",
        f"{report['docs_in']} documents ({_mb(report['bytes_in'])} MB) in, {report['docs_out']} documents "
        f"({_mb(report['bytes_out'])} MB of text) out.",
        "",
        "| stage | docs in | docs out | removed | MB in | MB out | why removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["stages"].items():
        why = ", ".join(f"{k} {v}" for k, v in s["reasons"].items())
        lines.append(
            f"| {name} | {s['docs_in']} | {s['docs_out']} | {s['docs_in'] - s['docs_out']} | "
            f"{_mb(s['bytes_in'])} | {_mb(s['bytes_out'])} | {why} |"
        )
    if report["gopher_rules"]:
        lines += [
            "",
            "Gopher rules failed (a document can fail several): "
            + ", ".join(f"{k} {v}" for k, v in report["gopher_rules"].items()),
        ]
    if report["languages"]:
        top = list(report["languages"].items())[:15]
        lines += ["", "Languages identified: " + ", ".join(f"{k} {v}" for k, v in top)]
    lines += ["", "PII masked: " + (", ".join(f"{k} {v}" for k, v in report["pii"].items()) or "none")]
    if report["near_duplicate_cluster_sizes"]:
        lines += [
            "",
            "Near-duplicate clusters by size: "
            + ", ".join(f"{k}: {v}" for k, v in report["near_duplicate_cluster_sizes"].items()),
        ]
    lines += ["", f"## Input errors ({len(report['errors'])})", ""]
    lines += [f"- {e['source']}: {e['reason']}" for e in report["errors"][:50]] or ["none"]
    lines += ["", "## Examples", ""]
    for name, s in report["stages"].items():
        for kind in ("removed", "kept"):
            for e in s[f"{kind}_examples"]:
                text = " ".join(e["text"].split())[:200].replace("|", "\\|") or "*(no text)*"
                reason = f" ({e['reason']})" if "reason" in e else ""
                lines.append(f"- **{name}, {kind}{reason}** `{e['id']}`: {text}")
    return "\n".join(lines) + "\n"


def write_report(pipeline) -> dict[str, Any]:
    report = collect(pipeline)
    atomic_write_text(pipeline.out / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(pipeline.out / "report.md", to_markdown(report))
    return report
