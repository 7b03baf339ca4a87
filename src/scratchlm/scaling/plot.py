"""The fits as pictures (PNG, written whole or not at all): the IsoFLOP curves with their parabolas
and minima, and the compute-optimal frontier (N_opt against C) of each approach with the prediction."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from scratchlm.atomic import atomic_write_bytes
from scratchlm.scaling.fit import Frontier, Parametric
from scratchlm.scaling.points import Run, by_budget


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_isoflops(runs: list[Run], parabolas: Frontier, path: Path) -> Path:
    """Loss against N per budget, each with approach 2's parabola and its minimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(by_budget(runs))))
    fitted = dict(zip(parabolas.budgets, zip(parabolas.parabolas, parabolas.n_opt, parabolas.loss_opt, strict=True),
                      strict=True))  # fmt: skip
    for colour, (budget, group) in zip(colours, by_budget(runs).items(), strict=True):
        n = np.array([r.parameters for r in group])
        axes.scatter(n, [r.loss for r in group], color=colour, s=14, label=f"{budget:.1e} FLOPs")
        if budget in fitted:
            (a, b, c), n_opt, loss_opt = fitted[budget]
            x = np.linspace(np.log(n.min()), np.log(n.max()), 100)
            axes.plot(np.exp(x), a * x * x + b * x + c, color=colour, linewidth=1)
            axes.scatter([n_opt], [loss_opt], color=colour, marker="*", s=90, edgecolor="black", linewidth=0.5)
    axes.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOP profiles (approach 2)")
    axes.legend(fontsize=7, ncol=2)
    path = _save(figure, path)
    plt.close(figure)
    return path


def plot_frontier(frontiers: dict[str, Frontier], parametric: Parametric, target: float | None, path: Path) -> Path:
    """N_opt against C: approaches 1 and 2's points and power laws, approach 3's optimum, the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    budgets = [c for f in frontiers.values() for c in f.budgets] + ([target] if target else [])
    c = np.geomspace(min(budgets), max(budgets), 100)
    for (name, frontier), colour in zip(frontiers.items(), ("tab:blue", "tab:orange"), strict=False):
        axes.scatter(frontier.budgets, frontier.n_opt, color=colour, s=18)
        axes.plot(c, frontier.n_law(c), color=colour, label=f"{name}: N_opt ∝ C^{frontier.n_law.exponent:.3f}")
    optimum = [parametric.optimum(x)["n_opt"] for x in c]
    exponent = parametric.beta / (parametric.alpha + parametric.beta)
    axes.plot(c, optimum, color="tab:green", linestyle="--", label=f"approach 3: N_opt ∝ C^{exponent:.3f}")
    if target:
        axes.scatter([target], [parametric.optimum(target)["n_opt"]], color="tab:red", marker="*", s=120,
                     zorder=3, label=f"prediction at {target:.1e} FLOPs")  # fmt: skip
    axes.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="compute-optimal N",
             title="compute-optimal model size")  # fmt: skip
    axes.legend(fontsize=8)
    path = _save(figure, path)
    plt.close(figure)
    return path
