"""`scratchlm align speedrun`: a task model trained from scratch, then SFT -> GRPO -> DPO (and expert
iteration and an SFT control beside them), evaluated on held-out problems, in one cached, resumable
command that writes `runs/align/report.md`.

  1. data      a byte-level tokenizer and a corpus of solved training problems (`347+125=472`, one a
               line); held-out problems never appear in it (`tasks.split_of`)
  2. base      the trainer (`scratchlm train`) on that corpus, stopped mid-way through the phase change
               in which it learns to add, when it gets 30% of probe problems right (`train_base`): a
               model that half knows the task, and that runs on past its answer into the next problem
  3. sft       a few hundred demonstrations in the answer format
  4. grpo      from the SFT model, on fresh training prompts with the verifier's reward
     control   from the SFT model: more SFT on the same demonstrations, for GRPO's FLOPs
     ei        from the SFT model: expert iteration, for about GRPO's FLOPs
     dpo       from the SFT model: pairs of its own correct and incorrect samples
  5. report    held-out greedy accuracy (95% intervals), sampled pass@1 and pass@k, format rate,
               lengths, entropy and preference accuracy per stage, curves and samples

Every stage is a run directory that resumes from its checkpoint and is skipped when done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from scratchlm.align import tasks
from scratchlm.align.config import AlignConfig, load_align_config
from scratchlm.align.run import held_out_evaluation, run_stage
from scratchlm.atomic import atomic_write_text
from scratchlm.data.encode import encode_files
from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import EOT, load_run
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.config import load_config
from scratchlm.train.metrics import read_metrics

BASE_SETS = [
    "model.vocab_size=257",
    "model.context_length=32",
    "model.d_model=128",
    "model.n_layers=4",
    "model.n_heads=4",
    "batch_size=64",
    "optim.lr=1e-3",
    "optim.min_lr=1e-3",  # constant after warm-up: a run extended by more steps keeps its schedule
    "optim.warmup_steps=50",
    "optim.weight_decay=0.0",
    "eval_every=500",
    "eval_tokens=20000",
    "log_every=100",
    "checkpoint_every=500",
]


@dataclasses.dataclass
class SpeedrunPlan:
    task: str = "addition"
    digits: int = 2
    corpus_problems: int = 20_000  # solved problems the base model pretrains on
    base_steps: int = 800  # the first stretch of the base model's training, then probes every base_probe_every
    base_probe_every: int = 50
    base_max_steps: int = 4000
    base_accuracy: float = 0.3  # greedy, on training problems: where the base model's training stops
    sft_steps: int = 40
    grpo_steps: int = 200
    dpo_steps: int = 500
    out: str = "runs/align"
    data: str = "data/align"
    threads: int = 0


def prepare_task_data(plan: SpeedrunPlan, say) -> Path:
    """The byte-level tokenizer and the base model's token arrays (cached by the plan's task fields)."""
    directory = Path(plan.data) / f"{plan.task}-{plan.digits}-{plan.corpus_problems}"
    if (directory / "done").is_file():
        return directory
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT])
    tokenizer.save(directory / "tokenizer")
    for split, count in (("train", plan.corpus_problems), ("test", max(500, plan.corpus_problems // 20))):
        lines = [p.solved() for p in tasks.take(plan.task, plan.digits, split, "corpus", count)]
        atomic_write_text(directory / f"{split}.txt", "\n".join(lines) + "\n")
        name = "val" if split == "test" else "train"
        encode_files(tokenizer, [directory / f"{split}.txt"], directory / f"{name}.bin", workers=1, progress=False)
    atomic_write_text(directory / "done", "\n")
    say(f"data: {directory} ({plan.corpus_problems:,} solved training problems)")
    return directory


def train_base(plan: SpeedrunPlan, data: Path, say) -> Path:
    """The trainer on the task corpus at a constant rate, in stretches of `base_probe_every` steps from
    `base_steps`, until the model answers `base_accuracy` of a probe set of training problems (greedy).

    Small models learn addition in a phase change (here within ~200 steps), whose timing varies from run
    to run; stopping at an accuracy instead of a step count makes every run's base half know the task,
    which is where alignment has something to do. Each probe is kept in `probes.json`, so an
    interrupted run resumes from its last stretch."""
    from scratchlm.align.evaluate import evaluate_task
    from scratchlm.train.trainer import train

    out = Path(plan.out) / "base"
    record = out / "probes.json"
    probes = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else []
    sets = [
        *BASE_SETS,
        f'data.train_tokens="{data}/train.bin"',
        f'data.val_tokens="{data}/val.bin"',
        f'data.tokenizer="{data}/tokenizer"',
        f'out_dir="{out}"',
        f"threads={plan.threads}",
        'device="cpu"',
    ]
    problems = tasks.take(plan.task, plan.digits, "train", "probe", 200)
    while not probes or (probes[-1]["accuracy"] < plan.base_accuracy and probes[-1]["steps"] < plan.base_max_steps):
        steps = probes[-1]["steps"] + plan.base_probe_every if probes else plan.base_steps
        say(f"base: training {out} to step {steps}")
        train(load_config(None, [*sets, f"max_steps={steps}"]), quiet=True)
        model, tokenizer, _, _ = load_run(out, "cpu")
        result = evaluate_task(model, tokenizer, problems, tasks.reward_function(plan.task), 24)
        probes.append({"steps": steps, "accuracy": result.greedy_accuracy})
        atomic_write_text(record, json.dumps(probes) + "\n")
        say(f"base: step {steps}, {result.greedy_accuracy:.1%} of {len(problems)} training problems right")
    return out


def stage_config(plan: SpeedrunPlan, stage: str, init: Path, name: str, sets: list[str]) -> AlignConfig:
    common = [
        f'stage="{stage}"',
        f'init="{init}"',
        f'out_dir="{Path(plan.out) / name}"',
        f'task.name="{plan.task}"',
        f"task.digits={plan.digits}",
        "task.max_new_tokens=24",
        f"threads={plan.threads}",
    ]
    return load_align_config(None, common + sets)


def total_flops(run: Path) -> float:
    records = [r for r in read_metrics(run / "metrics.jsonl") if "compute/flops" in r]
    return records[-1]["compute/flops"] if records else 0.0


def speedrun(plan: SpeedrunPlan, say=print) -> Path:
    out = Path(plan.out)
    recorded = out / "plan.json"
    text = json.dumps(dataclasses.asdict(plan), indent=1, sort_keys=True) + "\n"
    if recorded.is_file() and recorded.read_text(encoding="utf-8") != text:
        raise ScratchLMError(f"{out} holds the runs of another plan ({recorded}): give another --out, or remove it")
    atomic_write_text(recorded, text)
    data = prepare_task_data(plan, say)
    base = train_base(plan, data, say)
    runs: dict[str, tuple[Path, AlignConfig | None]] = {"base": (base, None)}

    def stage(name: str, kind: str, init: Path, sets: list[str]) -> Path:
        config = stage_config(plan, kind, init, name, sets)
        say(f"{name}: {kind} from {init}")
        run_stage(config, quiet=True)
        runs[name] = (Path(config.out_dir), config)
        return Path(config.out_dir)

    sft = stage(
        "sft",
        "sft",
        base,
        [f"steps={plan.sft_steps}", "sft.examples=300", "batch_size=32", "optim.lr=1e-3", "eval_every=10"],
    )
    grpo = stage(
        "grpo",
        "grpo",
        sft,
        [
            f"steps={plan.grpo_steps}",
            "batch_size=32",
            "rollout.group_size=8",
            "optim.lr=2e-4",
            "optim.min_lr=2e-4",
            "optim.warmup_steps=0",
            "eval_every=25",
            "microbatch_size=256",
        ],
    )
    sft_step_flops = total_flops(sft) / plan.sft_steps
    control_steps = max(1, math.ceil(total_flops(grpo) / sft_step_flops))
    stage(
        "sft-control",
        "sft",
        sft,
        [
            f"steps={control_steps}",
            "sft.examples=300",
            "batch_size=32",
            "optim.lr=2e-4",
            "optim.min_lr=2e-4",
            "optim.warmup_steps=0",
            f"eval_every={max(1, control_steps // 4)}",
        ],
    )
    stage(
        "ei",
        "ei",
        sft,
        [
            f"steps={plan.grpo_steps}",
            "batch_size=32",
            "ei.prompts=32",
            "ei.steps_per_round=1",
            "optim.lr=2e-4",
            "optim.min_lr=2e-4",
            "optim.warmup_steps=0",
            "eval_every=25",
        ],
    )
    stage(
        "dpo",
        "dpo",
        sft,
        [
            f"steps={plan.dpo_steps}",
            "batch_size=32",
            "dpo.pairs=1000",
            "dpo.test_pairs=300",
            "dpo.beta=0.1",
            "dpo.nll_coef=1.0",  # without it both responses' log-probs fall and accuracy with them
            "optim.lr=5e-4",
            "optim.min_lr=5e-5",
            "optim.warmup_steps=0",
            "eval_every=50",
        ],
    )
    write_report(plan, runs, out / "report.md", say)
    return out / "report.md"


def one_line(text: str) -> str:
    """A response as it shows in an indented block: a base model's newlines written as \\n."""
    return text.replace("\n", "\\n")


def write_report(plan: SpeedrunPlan, runs: dict, path: Path, say) -> None:
    rows, samples = [], []
    reference_config = next(c for _, c in runs.values() if c is not None)
    for name, (run, _config) in runs.items():
        model, tokenizer, _, _ = load_run(run, "cpu")
        result = held_out_evaluation(model, tokenizer, reference_config, samples=8)
        records = read_metrics(run / "metrics.jsonl")
        preference = next(
            (r["eval/preference_accuracy"] for r in reversed(records) if "eval/preference_accuracy" in r), None
        )
        low, high = result["greedy_interval"]
        lengths = [result["mean_length_correct"], result["mean_length_incorrect"]]
        rows.append(
            f"| {name} | {result['greedy_accuracy']:.1%} [{low:.1%}, {high:.1%}] | "
            f"{result['sampled_accuracy']:.1%} | {result['pass_at'].get(8, float('nan')):.1%} | "
            f"{result['format_rate']:.1%} | {' / '.join('-' if v is None else f'{v:.1f}' for v in lengths)} | "
            f"{result['token_entropy']:.3f} | {'-' if preference is None else f'{preference:.1%}'} | "
            f"{total_flops(run) / 1e12:.2f} |"
        )
        samples.append(
            f"**{name}**\n\n"
            + "\n".join(
                f"    {e['prompt']}{one_line(e['response']):<24} {'right' if e['correct'] else 'wrong'}"
                for e in result["examples"]
            )
        )
        if (run / "curves.png").is_file():
            shutil.copyfile(run / "curves.png", path.parent / f"{name}-curves.png")
    lines = [
        "# scratchlm align speedrun",
        "",
        f"Task: {plan.task} of up to {plan.digits}-digit numbers, answer most-significant digit first, in "
        "`<answer>...</answer>`. Held-out problems: "
        f"{reference_config.eval_problems} (disjoint from every training problem by a hash of the problem).",
        "",
        "| stage | greedy accuracy [95% CI] | sampled pass@1 | pass@8 | format | tokens (right / wrong) | "
        "entropy (nats) | preference acc. | stage TFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Sampled at temperature 1, 8 samples per problem; pass@8 by the unbiased estimator. Stage FLOPs count "
        "rollouts, reference passes and training (matmuls). `sft-control` continues SFT on the same "
        "demonstrations for GRPO's FLOPs.",
        "",
        "## Samples (greedy, held-out)",
        "",
        *samples,
        "",
        "## Curves",
        "",
        *[f"![{name}]({name}-curves.png)" for name in runs if (path.parent / f"{name}-curves.png").exists()],
        "",
        f"Plan: `{json.dumps(dataclasses.asdict(plan))}`",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
    say(f"report: {path}")
