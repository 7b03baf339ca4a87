"""Scaling-law fits against data with a known answer: the CS336 IsoFLOP runs (every point on
L = 2.69 + 1606.4 / N^0.34 + 3210.7 / D^0.36), and synthetic grids from known laws, without and with noise."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.scaling.fit import Parametric, backtest, envelope, fit_all, isoflop_parabolas, parametric
from scratchlm.scaling.points import Run, by_budget, load_runs

ISOFLOPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "scaling" / "isoflops_curves.json"
needs_isoflops = pytest.mark.skipif(not ISOFLOPS.exists(), reason=f"needs the reference runs in {ISOFLOPS}")
CS336_LAW = Parametric(E=2.69, A=1606.4, alpha=0.34, B=3210.7, beta=0.36)


def grid(law: Parametric, budgets, sizes_per_budget=7, spread=16.0, noise=0.0, seed=0) -> list[Run]:
    """Runs at each budget with N spread `spread`x around the law's optimum, D = C / 6N, the law's loss
    times (1 + noise x a standard normal)."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        n_opt = law.optimum(c)["n_opt"]
        for n in n_opt * np.geomspace(spread**-0.5, spread**0.5, sizes_per_budget):
            d = c / (6 * n)
            runs.append(Run(float(n), float(d), float(c), float(law.loss(n, d) * (1 + noise * rng.standard_normal()))))
    return runs


@needs_isoflops
def test_approach_3_recovers_the_constants_of_the_cs336_runs():
    runs = load_runs(ISOFLOPS)
    assert len(runs) == 72 and len(by_budget(runs)) == 9
    fitted = parametric(runs)
    for name in ("E", "A", "alpha", "B", "beta"):
        assert getattr(fitted, name) == pytest.approx(getattr(CS336_LAW, name), rel=1e-3), name


@needs_isoflops
def test_approach_2_gives_the_frontier_exponents_the_cs336_data_implies():
    frontier = isoflop_parabolas(load_runs(ISOFLOPS))
    a, b = CS336_LAW.alpha, CS336_LAW.beta
    assert frontier.n_law.exponent == pytest.approx(b / (a + b), abs=0.005)  # 0.514
    assert frontier.d_law.exponent == pytest.approx(a / (a + b), abs=0.005)  # 0.486
    assert frontier.n_law.exponent + frontier.d_law.exponent == pytest.approx(1.0, abs=1e-9)  # C = 6 N D
    envelope_law = envelope(load_runs(ISOFLOPS)).n_law  # the best run per budget: a coarse grid of N
    assert envelope_law.exponent == pytest.approx(b / (a + b), abs=0.06)


SYNTHETIC = Parametric(E=1.8, A=420.0, alpha=0.31, B=980.0, beta=0.27)
BUDGETS = [1e15, 3e15, 1e16, 3e16, 1e17]


def test_a_noise_free_grid_is_recovered_exactly():
    runs = grid(SYNTHETIC, BUDGETS)
    fitted = parametric(runs)
    for name in ("E", "A", "alpha", "B", "beta"):
        assert getattr(fitted, name) == pytest.approx(getattr(SYNTHETIC, name), rel=1e-4), name
    frontier = isoflop_parabolas(runs)
    a, b = SYNTHETIC.alpha, SYNTHETIC.beta
    assert frontier.n_law.exponent == pytest.approx(b / (a + b), abs=0.01)
    target = 1e18
    for key, value in SYNTHETIC.optimum(target).items():
        assert fitted.optimum(target)[key] == pytest.approx(value, rel=1e-3), key


def test_a_noisy_grid_predicts_within_its_intervals():
    runs = grid(SYNTHETIC, BUDGETS, sizes_per_budget=9, noise=0.003, seed=1)
    report = fit_all(runs, target=1e18, bootstrap=40, seed=0)
    truth = SYNTHETIC.optimum(1e18)
    three = report["approaches"]["approach 3"]
    assert three["values"]["predicted loss"] == pytest.approx(truth["loss"], rel=0.01)
    assert three["values"]["predicted n_opt"] == pytest.approx(truth["n_opt"], rel=0.5)
    low, high = three["intervals"]["predicted loss"]
    assert low <= truth["loss"] <= high and high - low < 0.05 * truth["loss"]
    two = report["approaches"]["approach 2"]["values"]
    assert two["n_opt exponent"] == pytest.approx(SYNTHETIC.beta / (SYNTHETIC.alpha + SYNTHETIC.beta), abs=0.05)
    assert report["approaches"]["approach 2"]["bootstrap"]["used"] >= 35


def test_the_optimum_formula_is_the_minimum_along_the_budget():
    c = 3e17
    n = np.geomspace(1e5, 1e10, 200_001)
    brute = n[np.argmin(SYNTHETIC.loss(n, c / (6 * n)))]
    assert SYNTHETIC.optimum(c)["n_opt"] == pytest.approx(brute, rel=1e-3)


def test_a_budget_that_does_not_bracket_its_minimum_is_left_out_of_approach_2():
    runs = grid(SYNTHETIC, BUDGETS)
    n_opt = SYNTHETIC.optimum(1e18)["n_opt"]
    one_sided = [
        Run(n, 1e18 / (6 * n), 1e18, float(SYNTHETIC.loss(n, 1e18 / (6 * n))))
        for n in n_opt * np.array([0.01, 0.02, 0.04])
    ]  # fmt: skip  all far below the optimum: no minimum
    frontier = isoflop_parabolas(runs + one_sided)
    assert 1e18 not in frontier.budgets and len(frontier.budgets) == len(BUDGETS)


def test_the_backtest_predicts_the_largest_budget_from_the_others():
    runs = grid(SYNTHETIC, BUDGETS)
    exact = backtest(runs)
    assert exact["budget"] == 1e17 and exact["runs"] == 7 and exact["extrapolation"] == pytest.approx(1e17 / 3e16)
    assert exact["approach 3"]["mean abs error"] < 1e-5 and exact["approach 2"]["ratio"] == pytest.approx(1, abs=0.02)
    # a largest budget 5% below the law (a change of regime the smaller budgets cannot show): approach 3,
    # fitted on the others, is 1 / 0.95 - 1 too high on every run; the budget's parabola keeps its minimum
    shifted = [Run(r.parameters, r.tokens, r.compute, r.loss * (0.95 if r.compute == 1e17 else 1)) for r in runs]
    test = backtest(shifted)
    three = test["approach 3"]
    assert three["mean abs error"] == pytest.approx(1 / 0.95 - 1, rel=1e-4)
    assert three["best error"] == pytest.approx(1 / 0.95 - 1, rel=1e-4)
    best = min((r for r in shifted if r.compute == 1e17), key=lambda r: r.loss)
    assert three["best n"] == best.parameters and three["best measured"] == best.loss
    assert three["best predicted"] == pytest.approx(float(SYNTHETIC.loss(best.parameters, best.tokens)), rel=1e-5)
    assert test["approach 2"]["ratio"] == pytest.approx(exact["approach 2"]["ratio"], rel=1e-9)
    assert backtest([r for r in runs if r.compute <= 3e15]) is None  # two budgets: nothing to hold out


def test_runs_load_from_csv_with_c_or_d_left_out(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("N,D,loss\n1e6,2e7,3.5\n2e6,1e7,3.4\n4e6,5e6,3.6\n")
    assert [r.compute for r in load_runs(path)] == [6 * 1e6 * 2e7] * 3
    path.write_text("parameters,compute,loss\n1e6,1.2e14,3.5\n2e6,1.2e14,3.4\n4e6,1.2e14,3.6\n")
    assert [r.tokens for r in load_runs(path)] == [2e7, 1e7, 5e6]


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("N,loss\n1,2\n", "runs.csv", "expected N (parameters), the loss, and D (tokens) or C (compute)"),
        ("N,D,loss\n-5,2,3\n1,2,3\n1,2,3\n", "runs.csv", "runs.csv, line 2: parameters is '-5'; expected a positive"),
        ("N,D,loss\n1,2,3\n", "runs.csv", "1 runs; a fit needs at least 3"),
        ("{not json", "runs.json", "runs.json: not valid JSON"),
        ('{"a": 1}', "runs.json", "expected a JSON list of runs"),
        ('[{"parameters": 1, "compute_budget": 6, "final_loss": "x"}]', "runs.json", "runs.json, run 0: loss is 'x'"),
    ],
)
def test_bad_runs_are_named(tmp_path, text, name, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ScratchLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_runs(path)


def test_fit_command_prints_predictions_and_writes_plots(tmp_path):
    data = tmp_path / "runs.json"
    data.write_text(json.dumps([{"parameters": r.parameters, "tokens": r.tokens, "compute": r.compute, "loss": r.loss}
                                for r in grid(SYNTHETIC, BUDGETS)]))  # fmt: skip
    command = [sys.executable, "-m", "scratchlm.cli", "fit", str(data), "--predict", "1e18", "--bootstrap", "5"]
    done = subprocess.run([*command, "--json", "--plots", str(tmp_path / "plots")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["approaches"]["approach 3"]["values"]["predicted loss"] == pytest.approx(
        SYNTHETIC.optimum(1e18)["loss"], rel=1e-3)  # fmt: skip
    for png in ("isoflops.png", "frontier.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run(command, capture_output=True, text=True).stdout
    assert "approach 2 (IsoFLOP parabolas): N_opt ∝ C^" in table and "prediction at 1.000e+18 FLOPs:" in table
    assert "backtest: refitted without the 1.00e+17 budget's 7 runs" in table
    assert "approach 3: loss off by 0.0%" in table


def test_candidate_shapes_are_judged_with_their_own_flops_per_token():
    from scratchlm.scaling.fit import Candidate

    # the same N with a costlier token (a wide LM head) gets fewer tokens at the same budget
    target = 1e18
    n_opt = SYNTHETIC.optimum(target)["n_opt"]
    candidates = [
        Candidate("small", n_opt / 4, 6 * n_opt / 4),
        Candidate("right", n_opt, 6 * n_opt),
        Candidate("right, costly head", n_opt, 9 * n_opt),
        Candidate("big", n_opt * 4, 24 * n_opt),
    ]
    report = fit_all(grid(SYNTHETIC, BUDGETS), target, bootstrap=5, candidates=candidates)
    values = report["approaches"]["approach 3"]["values"]
    for c in candidates:
        expected = SYNTHETIC.loss(c.parameters, target / c.flops_per_token)
        assert values[f"loss of {c.label}"] == pytest.approx(float(expected), rel=1e-4)
    assert values["loss of right, costly head"] > values["loss of right"]
    assert values["best candidate n"] == pytest.approx(n_opt) and values["best candidate d"] == pytest.approx(
        target / (6 * n_opt))  # fmt: skip
    assert report["candidates"][2] == {"label": "right, costly head", "parameters": n_opt, "flops_per_token": 9 * n_opt}


def test_fit_shapes_come_from_a_sweep_file_with_the_accounting(tmp_path):
    from scratchlm.accounting import training_flops_per_token
    from scratchlm.model import ModelConfig
    from scratchlm.scaling.sweep import load_sweep, shape_candidates

    sweep = tmp_path / "sweep.toml"
    sweep.write_text('name = "s"\nout_dir = "o"\nbudgets = [1e13]\n[set]\n"model.vocab_size" = 4096\n'
                     '[[shapes]]\n"model.d_model" = 64\n"model.n_layers" = 2\n"model.n_heads" = 2\n"optim.lr" = 0.01\n'
                     '[[shapes]]\n"model.d_model" = 64\n"model.n_layers" = 2\n"model.n_heads" = 2\n"optim.lr" = 0.02\n'
                     '[[shapes]]\n"model.d_model" = 128\n"model.n_layers" = 3\n"model.n_heads" = 4\n')  # fmt: skip
    small, large = shape_candidates(load_sweep(sweep))  # the two lr's of one shape are one candidate
    model = ModelConfig(vocab_size=4096, d_model=128, n_layers=3, n_heads=4)
    d_ff = model.d_ff
    assert large.parameters == 3 * (4 * 128 * 128 + 3 * 128 * d_ff)  # per block: attention 4 d^2, SwiGLU 3 d d_ff
    assert large.flops_per_token == training_flops_per_token(model)
    assert small.label == "d_model=64, n_layers=2, n_heads=2"
    data = tmp_path / "runs.json"
    data.write_text(json.dumps([{"parameters": r.parameters, "tokens": r.tokens, "compute": r.compute, "loss": r.loss}
                                for r in grid(SYNTHETIC, BUDGETS)]))  # fmt: skip
    command = [sys.executable, "-m", "scratchlm.cli", "fit", str(data), "--bootstrap", "3", "--shapes", str(sweep)]
    done = subprocess.run([*command, "--predict", "1e16"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "for each candidate shape" in done.stdout and "d_model=128, n_layers=3, n_heads=4" in done.stdout
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 1 and "--shapes: give --predict FLOPs too" in refused.stderr
