"""Chinchilla's three ways to find the compute-optimal model from a set of runs (Hoffmann et al., 2022).

1. The lower envelope: at each compute budget the run with the lowest loss; power laws
   N_opt = a C^alpha and D_opt = b C^beta through those.
2. IsoFLOP profiles: at each budget a parabola of the loss in log N, its minimum N_opt (and D_opt, by
   the budget's log D against log N), then the same power laws through the minima.
3. The parametric loss L(N, D) = E + A / N^alpha + B / D^beta, fitted by a Huber loss (delta 1e-3) on
   log L. For fixed (alpha, beta) the model is linear in (E, A, B), so they are solved exactly
   (non-negative least squares) inside a search over the exponents (variable projection, from a grid);
   then all five are polished together by L-BFGS-B with the analytic gradient and tolerances near
   machine precision (the defaults stop early even on noise-free data). The optimum at compute C,
   with C = 6 N D: N_opt = G (C / 6)^(beta / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta)).

Every fit has bootstrap intervals: the runs are resampled with replacement (within each budget for
1 and 2) and the fit repeated; the 2.5 and 97.5 percentiles bound each quantity. And a backtest: the
fits redone without the largest budget predict it, a check of the extrapolation before one is paid for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize, nnls

from scratchlm.errors import ScratchLMError
from scratchlm.scaling.points import Run, by_budget

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x^exponent, fitted by least squares in log-log."""

    coefficient: float
    exponent: float

    def __call__(self, x: float) -> float:
        return self.coefficient * x**self.exponent

    @classmethod
    def fit(cls, x: list[float], y: list[float]) -> PowerLaw:
        if len(x) < 2:
            raise ScratchLMError(f"a power law needs at least 2 points, got {len(x)}")
        exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
        return cls(float(math.exp(log_coefficient)), float(exponent))


@dataclass
class Frontier:
    """The compute-optimal points per budget and the power laws through them (approaches 1 and 2).
    parabolas: per budget (a, b, c) of loss = a (ln N)^2 + b ln N + c (approach 2 only)."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss_opt: list[float]
    n_law: PowerLaw
    d_law: PowerLaw
    parabolas: list[tuple[float, float, float]] | None = None

    def predict(self, compute: float) -> dict[str, float]:
        """N_opt and D_opt at `compute` (these approaches predict no loss: that needs the floor E)."""
        return {"n_opt": self.n_law(compute), "d_opt": self.d_law(compute)}


def _frontier(budgets, n_opt, d_opt, loss_opt, parabolas=None) -> Frontier:
    return Frontier(list(budgets), list(n_opt), list(d_opt), list(loss_opt), PowerLaw.fit(budgets, n_opt),
                    PowerLaw.fit(budgets, d_opt), parabolas)  # fmt: skip


def envelope(runs: list[Run]) -> Frontier:
    """Approach 1: at each budget the run with the lowest loss."""
    best = [(c, min(group, key=lambda r: r.loss)) for c, group in by_budget(runs).items()]
    return _frontier([c for c, _ in best], [r.parameters for _, r in best], [r.tokens for _, r in best],
                     [r.loss for _, r in best])  # fmt: skip


def isoflop_parabolas(runs: list[Run]) -> Frontier:
    """Approach 2: per budget with at least 3 sizes, the minimum of a parabola in ln N (budgets whose
    parabola has no minimum within the sizes run are left out: their runs do not bracket the optimum)."""
    budgets, n_opt, d_opt, loss_opt, parabolas = [], [], [], [], []
    for c, group in by_budget(runs).items():
        log_n = np.log([r.parameters for r in group])
        if len(set(log_n)) < 3:
            continue
        a, b, k = np.polyfit(log_n, [r.loss for r in group], 2)
        x = -b / (2 * a) if a > 0 else math.nan
        if not log_n.min() <= x <= log_n.max():  # no minimum, or one outside the sizes run: not bracketed
            continue
        slope, intercept = np.polyfit(log_n, np.log([r.tokens for r in group]), 1)  # D at fixed C against N
        budgets.append(c)
        n_opt.append(math.exp(x))
        d_opt.append(math.exp(intercept + slope * x))
        loss_opt.append(float(k - b * b / (4 * a)))
        parabolas.append((float(a), float(b), float(k)))
    if len(budgets) < 2:
        raise ScratchLMError(
            f"approach 2 needs at least 2 budgets whose runs (3 or more sizes) bracket a minimum; got {len(budgets)}"
        )
    return _frontier(budgets, n_opt, d_opt, loss_opt, parabolas)


@dataclass(frozen=True)
class Parametric:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n, d):
        return (
            self.E
            + self.A / np.asarray(n, dtype=float) ** self.alpha
            + self.B / np.asarray(d, dtype=float) ** self.beta
        )

    def optimum(self, compute: float) -> dict[str, float]:
        """N_opt, D_opt and the loss there, for C = 6 N D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (compute / 6) ** (b / (a + b))
        d = compute / (6 * n)
        return {"n_opt": float(n), "d_opt": float(d), "loss": float(self.loss(n, d))}

    def predict(self, compute: float) -> dict[str, float]:
        return self.optimum(compute)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative."""
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)), np.clip(r, -delta, delta)


class _Problem:
    def __init__(self, runs: list[Run], delta: float) -> None:
        self.log_n = np.log([r.parameters for r in runs])
        self.log_d = np.log([r.tokens for r in runs])
        self.loss = np.array([r.loss for r in runs])
        self.log_loss = np.log(self.loss)
        self.delta = delta
        self.scale = 1 / (len(runs) * delta * delta)  # objective values near 1 at residuals near delta

    def linear_part(self, alpha: float, beta: float) -> tuple[float, float, float]:
        """(E, A, B) >= 0 minimising the squared error of L for these exponents (exact on exact data)."""
        design = np.stack([np.ones_like(self.log_n), np.exp(-alpha * self.log_n), np.exp(-beta * self.log_d)], 1)
        column_scale = np.abs(design).max(0)
        solution, _ = nnls(design / column_scale, self.loss)
        return tuple(float(v) for v in solution / column_scale)

    def objective(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Huber on ln L over theta = (E, ln A, alpha, ln B, beta), with its gradient."""
        e, log_a, alpha, log_b, beta = theta
        term_n = np.exp(log_a - alpha * self.log_n)
        term_d = np.exp(log_b - beta * self.log_d)
        predicted = e + term_n + term_d
        if np.any(predicted <= 0):
            return 1e30, np.zeros(5)
        value, slope = _huber(np.log(predicted) - self.log_loss, self.delta)
        weight = slope / predicted
        grad = np.array([weight.sum(), (weight * term_n).sum(), -(weight * term_n * self.log_n).sum(),
                         (weight * term_d).sum(), -(weight * term_d * self.log_d).sum()])  # fmt: skip
        return float(value.sum() * self.scale), grad * self.scale

    def profile(self, exponents: np.ndarray) -> float:
        """The objective at these exponents with the linear part solved."""
        e, a, b = self.linear_part(*exponents)
        if a <= 0 or b <= 0:
            return 1e30
        return self.objective(np.array([e, math.log(a), exponents[0], math.log(b), exponents[1]]))[0]


TIGHT = {"ftol": 1e-15, "gtol": 1e-13, "maxiter": 20_000, "maxfun": 40_000}
BOUNDS = [(None, None), (None, None), (1e-3, 3.0), (None, None), (1e-3, 3.0)]


def parametric(runs: list[Run], delta: float = HUBER_DELTA, start: Parametric | None = None) -> Parametric:
    """Approach 3 (see the module's docstring). `start`: skip the grid and begin there (the bootstrap)."""
    if len(runs) < 5:
        raise ScratchLMError(f"approach 3 fits 5 parameters: it needs at least 5 runs, got {len(runs)}")
    problem = _Problem(runs, delta)
    if start is None:
        grid = [(a, b) for a in np.linspace(0.05, 1.5, 30) for b in np.linspace(0.05, 1.5, 30)]
        exponents = np.array(min(grid, key=lambda ab: problem.profile(np.array(ab))))
    else:
        exponents = np.array([start.alpha, start.beta])
    # Stops when the exponents move less than 1e-10 and the objective less than 1e-14 (it is scaled to
    # about 1 for residuals of delta): on noisy data the Huber objective is flat and kinked near its
    # minimum, and a tighter fatol only spends evaluations (80,000 of them, 10 s, in one bootstrap sample).
    exponents = minimize(problem.profile, exponents, method="Nelder-Mead",
                         options={"xatol": 1e-10, "fatol": 1e-14, "maxfev": 5_000}).x  # fmt: skip
    e, a, b = problem.linear_part(*exponents)
    theta = np.array([e, math.log(max(a, 1e-300)), exponents[0], math.log(max(b, 1e-300)), exponents[1]])
    polished = minimize(problem.objective, theta, jac=True, method="L-BFGS-B", bounds=BOUNDS, options=TIGHT)
    if polished.fun <= problem.objective(theta)[0]:
        theta = polished.x
    e, log_a, alpha, log_b, beta = (float(v) for v in theta)
    return Parametric(e, math.exp(log_a), alpha, math.exp(log_b), beta)


def _resample(runs: list[Run], rng: np.random.Generator, within_budgets: bool) -> list[Run]:
    if not within_budgets:
        return [runs[i] for i in rng.integers(0, len(runs), len(runs))]
    out = []
    for group in by_budget(runs).values():
        out += [group[i] for i in rng.integers(0, len(group), len(group))]
    return out


def _interval(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else []


def fit_approaches(runs: list[Run]) -> dict[str, Frontier | Parametric]:
    return {"approach 1": envelope(runs), "approach 2": isoflop_parabolas(runs), "approach 3": parametric(runs)}


def backtest(runs: list[Run]) -> dict | None:
    """The check a prediction can get before its budget is spent: refit without the largest budget and
    predict that budget's runs, extrapolating by the ratio of the two largest budgets. Approach 3 predicts
    each held-out run's loss from its N and D (the error is predicted / measured - 1); approach 2's power
    law predicts N_opt there, against the minimum of that budget's own parabola. None with fewer than 3
    budgets; an approach that cannot be fitted on what is left is left out."""
    groups = by_budget(runs)
    if len(groups) < 3:
        return None
    largest, *_ = budgets = sorted(groups, reverse=True)
    held, rest = groups[largest], [r for c in budgets[1:] for r in groups[c]]
    report: dict = {"budget": largest, "extrapolation": largest / budgets[1], "runs": len(held)}
    try:
        law = parametric(rest)
    except ScratchLMError:
        law = None
    if law is not None:
        measured = np.array([r.loss for r in held])
        errors = law.loss([r.parameters for r in held], [r.tokens for r in held]) / measured - 1
        best = int(np.argmin(measured))
        report["approach 3"] = {"mean abs error": float(np.abs(errors).mean()), "best n": held[best].parameters,
                                "best measured": float(measured[best]),
                                "best predicted": float(measured[best] * (1 + errors[best])),
                                "best error": float(errors[best])}  # fmt: skip
    try:
        before, after = isoflop_parabolas(rest), isoflop_parabolas(runs)
    except ScratchLMError:
        before = after = None
    if before is not None and largest in after.budgets:
        predicted, measured_n = before.n_law(largest), after.n_opt[after.budgets.index(largest)]
        report["approach 2"] = {"predicted n_opt": predicted, "measured n_opt": measured_n,
                                "ratio": predicted / measured_n}  # fmt: skip
    return report


@dataclass(frozen=True)
class Candidate:
    """A model shape the prediction may choose: its N and its exact training FLOPs per token (attention
    and the LM head included, which C = 6 N D leaves out and which matter for small models)."""

    label: str
    parameters: float
    flops_per_token: float


def fit_all(
    runs: list[Run],
    target: float | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    fits: dict | None = None,
    candidates: list[Candidate] = (),
) -> dict:
    """The three approaches (`fits`, fitted here if not given), their parameters and (for `target` FLOPs)
    predictions, each with a 95% bootstrap interval from `bootstrap` resamples. With `candidates`,
    approach 3 also predicts the loss of each candidate shape trained on target / its FLOPs per token
    tokens, and which of them is best. "backtest": the fits' prediction of their own largest budget."""
    rng = np.random.default_rng(seed)
    fits = fits or fit_approaches(runs)
    report = {}
    for name, fitted in fits.items():
        samples: dict[str, list[float]] = {}
        for _ in range(bootstrap):
            try:
                if name == "approach 3":
                    again = parametric(_resample(runs, rng, False), start=fitted)
                else:
                    again = (envelope if name == "approach 1" else isoflop_parabolas)(_resample(runs, rng, True))
            except (ScratchLMError, np.linalg.LinAlgError, ValueError):
                continue  # a resample without enough distinct runs
            for key, value in _summary(again, target, candidates).items():
                samples.setdefault(key, []).append(value)
        summary = _summary(fitted, target, candidates)
        report[name] = {
            "fit": _describe(fitted),
            "values": summary,
            "intervals": {key: _interval(samples.get(key, [])) for key in summary},
            "bootstrap": {"resamples": bootstrap, "used": len(next(iter(samples.values()), []))},
        }
    return {"runs": len(runs), "budgets": sorted(by_budget(runs)), "target": target, "approaches": report,
            "candidates": [asdict(c) for c in candidates], "backtest": backtest(runs)}  # fmt: skip


def _summary(fitted: Frontier | Parametric, target: float | None, candidates: list[Candidate] = ()) -> dict:
    if isinstance(fitted, Parametric):
        values = {k: v for k, v in asdict(fitted).items()}
        a, b = fitted.alpha, fitted.beta
        values["n_opt exponent"], values["d_opt exponent"] = b / (a + b), a / (a + b)
        if target is not None and candidates:
            losses = [float(fitted.loss(c.parameters, target / c.flops_per_token)) for c in candidates]
            for c, loss in zip(candidates, losses, strict=True):
                values[f"loss of {c.label}"] = loss
            best = candidates[int(np.argmin(losses))]
            values["best candidate n"], values["best candidate d"] = best.parameters, target / best.flops_per_token
    else:
        values = {"n_opt exponent": fitted.n_law.exponent, "n_opt coefficient": fitted.n_law.coefficient,
                  "d_opt exponent": fitted.d_law.exponent, "d_opt coefficient": fitted.d_law.coefficient}  # fmt: skip
    if target is not None:
        values.update({f"predicted {k}": v for k, v in fitted.predict(target).items()})
    return values


def _describe(fitted: Frontier | Parametric) -> dict:
    if isinstance(fitted, Parametric):
        return asdict(fitted)
    return {"budgets": fitted.budgets, "n_opt": fitted.n_opt, "d_opt": fitted.d_opt, "loss_opt": fitted.loss_opt,
            "parabolas": fitted.parabolas}  # fmt: skip
