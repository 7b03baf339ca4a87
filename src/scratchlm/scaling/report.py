"""`scratchlm fit`: the three approaches' results and predictions as a readable report."""

from __future__ import annotations


def _with_interval(values: dict, intervals: dict, key: str, fmt: str) -> str:
    low_high = intervals.get(key) or []
    bounds = f" [{format(low_high[0], fmt)}, {format(low_high[1], fmt)}]" if low_high else ""
    return f"{format(values[key], fmt)}{bounds}"


def format_fit(report: dict) -> str:
    budgets = report["budgets"]
    a = report["approaches"]
    first = a["approach 1"]
    lines = [
        f"{report['runs']} runs at {len(budgets)} budgets ({budgets[0]:.2e} to {budgets[-1]:.2e} FLOPs); "
        f"95% bootstrap intervals from {first['bootstrap']['resamples']} resamples",
        "",
    ]
    titles = {"approach 1": "lower envelope", "approach 2": "IsoFLOP parabolas"}
    for name, title in titles.items():
        v, i = a[name]["values"], a[name]["intervals"]
        lines.append(f"{name} ({title}): N_opt ∝ C^{_with_interval(v, i, 'n_opt exponent', '.4f')}, "
                     f"D_opt ∝ C^{_with_interval(v, i, 'd_opt exponent', '.4f')}")  # fmt: skip
    v, i = a["approach 3"]["values"], a["approach 3"]["intervals"]
    lines += [
        "approach 3 (parametric): L(N, D) = E + A / N^alpha + B / D^beta with",
        *(f"  {key:<6} {_with_interval(v, i, key, '.6g')}" for key in ("E", "A", "alpha", "B", "beta")),
        f"  N_opt ∝ C^{_with_interval(v, i, 'n_opt exponent', '.4f')}, "
        f"D_opt ∝ C^{_with_interval(v, i, 'd_opt exponent', '.4f')}",
    ]
    if report["target"] is not None:
        lines += ["", f"prediction at {report['target']:.3e} FLOPs:"]
        for name in ("approach 1", "approach 2", "approach 3"):
            v, i = a[name]["values"], a[name]["intervals"]
            text = (f"  {name}: N_opt {_with_interval(v, i, 'predicted n_opt', '.4g')}, "
                    f"D_opt {_with_interval(v, i, 'predicted d_opt', '.4g')}")  # fmt: skip
            if "predicted loss" in v:
                text += f", loss {_with_interval(v, i, 'predicted loss', '.4f')}"
            lines.append(text)
    if report["target"] is not None and "best candidate n" in a["approach 3"]["values"]:
        v, i = a["approach 3"]["values"], a["approach 3"]["intervals"]
        lines += ["", f"approach 3 at {report['target']:.3e} FLOPs for each candidate shape (tokens = budget / its "
                  "training FLOPs per token):"]  # fmt: skip
        for candidate in report["candidates"]:
            tokens = report["target"] / candidate["flops_per_token"]
            loss = _with_interval(v, i, f"loss of {candidate['label']}", ".4f")
            lines.append(
                f"  {candidate['label']:<40} N {candidate['parameters']:10.4g}  tokens {tokens:10.4g}  loss {loss}"
            )
        lines.append(f"  best: N {_with_interval(v, i, 'best candidate n', '.4g')}, "
                     f"tokens {_with_interval(v, i, 'best candidate d', '.4g')}")  # fmt: skip
    if test := report.get("backtest"):
        lines += ["", f"backtest: refitted without the {test['budget']:.2e} budget's {test['runs']} runs, then "
                  f"predicting them ({test['extrapolation']:.3g}x beyond the budgets left):"]  # fmt: skip
        if three := test.get("approach 3"):
            lines.append(f"  approach 3: loss off by {100 * three['mean abs error']:.1f}% on average; the best run "
                         f"(N {three['best n']:.4g}) {three['best predicted']:.4f} predicted, "
                         f"{three['best measured']:.4f} measured ({100 * three['best error']:+.1f}%)")  # fmt: skip
        if two := test.get("approach 2"):
            lines.append(f"  approach 2: N_opt {two['predicted n_opt']:.4g} predicted, {two['measured n_opt']:.4g} "
                         f"from the budget's own parabola ({two['ratio']:.2f}x)")  # fmt: skip
    if report.get("plots"):
        lines += ["", "plots: " + ", ".join(report["plots"])]
    return "\n".join(lines)


def format_variants(rows: list[dict]) -> str:
    """`sweep.variants` as a Markdown table: each variant's validation bits per byte and loss, mean +-
    sample standard deviation over its seeds, and the change of the mean from the baseline (the first
    variant at its budget)."""

    def spread(row: dict, name: str) -> str:
        sd = row[f"{name}_sd"]
        return f"{row[name]:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")

    lines = ["| variant | budget | seeds | bits/byte | vs. baseline | loss |", "|---|---|---|---|---|---|"]
    for row in rows:
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["labels"].items()) or "(the base config)"
        change = "baseline" if row["baseline"] else f"{row['bpb_change']:+.4f}"
        lines.append(f"| {label} | {row['budget']:.2g} | {len(row['seeds'])} | {spread(row, 'bpb')} | {change} | "
                     f"{spread(row, 'loss')} |")  # fmt: skip
    return "\n".join(lines)
