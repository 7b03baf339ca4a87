"""The alignment stages end to end on a tiny task model (1-digit addition, trained here in seconds):
tasks and their splits, pass@k and intervals by hand, SFT / GRPO / DPO / expert iteration each
improving what they should, exact resume, and the command line."""

import itertools
import math
import random

import pytest
import torch

from scratchlm.align import tasks
from scratchlm.align.config import load_align_config
from scratchlm.align.evaluate import pass_at_k, wilson_interval
from scratchlm.align.rewards import answer_tag_reward, countdown_reward
from scratchlm.align.run import held_out_evaluation, run_stage
from scratchlm.align.speedrun import SpeedrunPlan, prepare_task_data, train_base
from scratchlm.cli import main
from scratchlm.infer.generate import load_run


def test_splits_are_disjoint_deterministic_and_solutions_verify():
    train = tasks.take("addition", 2, "train", 0, 3000)
    test = tasks.take("addition", 2, "test", 0, 300)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert tasks.take("addition", 2, "test", 0, 300) == test
    assert tasks.take("addition", 2, "test", 1, 300) != test
    assert all(answer_tag_reward(p.solution, p.answer)["reward"] == 1.0 for p in train[:200])
    assert int(train[0].answer) == sum(map(int, train[0].prompt.rstrip("=").split("+")))
    countdown = tasks.take("countdown", 1, "train", 0, 200)
    assert all(countdown_reward(p.solution, p.answer)["reward"] == 1.0 for p in countdown)
    assert countdown_reward("<answer>1+1</answer>", countdown[0].answer)["reward"] == 0.0


def test_pass_at_k_equals_enumerating_every_draw():
    n = 6
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            draws = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def test_wilson_interval_by_hand():
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 1-digit-addition model that writes `a+b=<answer>c</answer>` but never stops by itself."""
    root = tmp_path_factory.mktemp("align")
    plan = SpeedrunPlan(
        digits=1,
        corpus_problems=2000,
        base_steps=120,
        base_accuracy=0.0,
        out=str(root / "runs"),
        data=str(root / "data"),
    )
    data = prepare_task_data(plan, lambda *a, **k: None)
    return train_base(plan, data, lambda *a, **k: None), plan


def stage(plan, kind, init, name, *sets):
    common = [f'stage="{kind}"', f'init="{init}"', f'out_dir="{plan.out}/{name}"', "task.digits=1",
              "task.max_new_tokens=24", "eval_problems=100", "log_every=1000", "eval_every=1000"]  # fmt: skip
    return load_align_config(None, [*common, *sets])


@pytest.fixture(scope="module")
def sft(base):
    run, plan = base
    config = stage(plan, "sft", run, "sft", "steps=30", "sft.examples=60", "batch_size=32", "optim.lr=1e-3")
    return run_stage(config, quiet=True), config


def exact_match_rate(run_dir, config) -> float:
    """Held-out responses that are exactly the demonstration's form, right answer, then a stop."""
    from scratchlm.align.rollout import sample_rollouts
    from scratchlm.infer.generate import Sampling

    model, tokenizer, _, _ = load_run(run_dir, "cpu")
    problems = tasks.take("addition", 1, "test", 0, config.eval_problems)
    greedy = sample_rollouts(model, tokenizer, [p.prompt for p in problems], 1, Sampling(0.0, 0, 1.0, 24, 0))
    eot = tokenizer.special_ids["<|endoftext|>"]
    hits = [r.text == p.solution and r.response_ids[-1] == eot for r, p in zip(greedy, problems, strict=True)]
    return sum(hits) / len(hits)


def test_sft_raises_held_out_exact_match(base, sft):
    result, config = sft
    assert exact_match_rate(base[0], config) == 0.0  # the base model runs on into another problem
    assert exact_match_rate(config.out_dir, config) >= 0.1
    model, tokenizer, _, _ = load_run(config.out_dir, "cpu")
    after = held_out_evaluation(model, tokenizer, config)
    assert after["format_rate"] > 0.5
    assert after["greedy_accuracy"] == result["eval/accuracy"]  # the checkpoint is the model evaluated


def test_grpo_raises_the_mean_reward_from_a_weak_checkpoint(base, sft):
    _, plan = base
    _, sft_config = sft
    config = stage(plan, "grpo", sft_config.out_dir, "grpo", "steps=12", "batch_size=16", "rollout.group_size=8",
                   "optim.lr=5e-4", "optim.min_lr=5e-4", "optim.warmup_steps=0", "log_every=1")  # fmt: skip
    run_stage(config, quiet=True)
    records = [r for r in _metrics(config.out_dir) if "train/reward" in r]
    first, last = records[:4], records[-4:]
    assert sum(r["train/reward"] for r in last) / 4 > sum(r["train/reward"] for r in first) / 4


def test_dpo_raises_held_out_preference_accuracy(base, sft):
    _, plan = base
    _, sft_config = sft
    # beta 0.5 and the chosen responses' NLL: held-out accuracy 0.55, 0.78 and 0.57 with seeds 0-2 (beta
    # 0.1 without NLL: 0.50-0.70, a tie at 0.5 with seed 0; 60 pairs over few distinct 1-digit problems)
    config = stage(plan, "dpo", sft_config.out_dir, "dpo", "steps=15", "batch_size=32", "dpo.pairs=200",
                   "dpo.test_pairs=60", "optim.lr=5e-4", "eval_every=15", "dpo.beta=0.5", "dpo.nll_coef=1")  # fmt: skip
    run_stage(config, quiet=True)
    evaluations = [r for r in _metrics(config.out_dir) if "eval/preference_accuracy" in r]
    assert evaluations[0]["eval/preference_accuracy"] == 0.5  # the policy is the reference: all ties
    assert evaluations[-1]["eval/preference_accuracy"] > 0.5


def test_expert_iteration_trains_on_its_own_correct_samples(base, sft):
    _, plan = base
    _, sft_config = sft
    config = stage(plan, "ei", sft_config.out_dir, "ei", "steps=4", "batch_size=16", "ei.prompts=16",
                   "ei.steps_per_round=2", "log_every=1")  # fmt: skip
    run_stage(config, quiet=True)
    records = [r for r in _metrics(config.out_dir) if "ei/kept" in r]
    assert len(records) == 4 and all(0 < r["ei/kept"] <= 16 * 8 for r in records)


def test_an_interrupted_stage_resumes_exactly(base, sft, tmp_path):
    """Bit for bit with one thread. With several, PyTorch's CPU embedding backward adds the rows of a
    repeated token (the padding) in a varying order: the weights then differ at ~1e-12, run to run."""
    _, plan = base
    _, sft_config = sft
    sets = ["batch_size=8", "rollout.group_size=4", "optim.lr=3e-4", "optim.min_lr=3e-4", "optim.warmup_steps=0",
            "checkpoint_every=2", "threads=1"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        whole = stage(plan, "grpo", sft_config.out_dir, "whole", "steps=4", *sets)
        run_stage(whole, quiet=True)
        parts = stage(plan, "grpo", sft_config.out_dir, "parts", "steps=2", *sets)
        run_stage(parts, quiet=True)
        run_stage(stage(plan, "grpo", sft_config.out_dir, "parts", "steps=4", *sets), quiet=True)
    finally:
        torch.set_num_threads(threads)
    a, b = (load_run(c.out_dir, "cpu")[0].state_dict() for c in (whole, parts))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_stage_and_eval(base, sft, capsys):
    _, sft_config = sft
    assert main(["align", "eval", "--run", sft_config.out_dir, "--set", "task.digits=1", "--set",
                 "eval_problems=20", "--samples", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "greedy accuracy" in out and "pass@4" in out
    assert main(["align", "grpo", "--set", "grpo.cliprange=-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grpo.cliprange" in err[0] and "-1" in err[0]
    assert main(["align", "sft", "--set", f'init="{sft_config.out_dir}"', "--set",
                 f'out_dir="{sft_config.out_dir}"']) == 1  # fmt: skip
    assert "init and out_dir" in capsys.readouterr().err


def _metrics(run_dir):
    from scratchlm.train.metrics import read_metrics

    return read_metrics(f"{run_dir}/metrics.jsonl")


def test_pass_at_k_is_monotone_and_bounded():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randrange(1, 20)
        c = rng.randrange(0, n + 1)
        values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(0 <= v <= 1 for v in values) and values == sorted(values)
        assert values[0] == pytest.approx(c / n) and not math.isnan(values[-1])
