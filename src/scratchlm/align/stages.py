"""The four alignment stages, each one optimizer step at a time (`step`), on the building blocks of
`scratchlm.align.losses`. The loop around them (checkpoints, exact resume, metrics, evaluation,
Ctrl-C) is `scratchlm.align.run`; each stage's randomness is a function of (seed, step), and what it
built from an earlier model (expert iteration's data, DPO's pairs) is in its `state_dict`, so a
resumed stage continues exactly.

- `SFTStage`: next-token NLL of fixed demonstrations (prompt -> solution), token-mean.
- `ExpertIterationStage`: every `steps_per_round` steps, sample G answers to fresh prompts with the
  current model, keep the correct ones, and do SFT on them.
- `GRPOStage`: G rollouts per prompt, group-normalised rewards, the clipped policy-gradient loss over
  one or more epochs (off-policy after the first), an optional KL penalty towards the starting model.
- `DPOStage`: pairs (a correct and an incorrect sample of the starting model for one prompt), the DPO
  loss against the frozen starting model, an optional NLL term on the chosen responses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from scratchlm.accounting import forward_flops
from scratchlm.align import tasks
from scratchlm.align.config import AlignConfig
from scratchlm.align.losses import (
    compute_group_normalized_rewards,
    dpo_loss,
    get_response_log_probs,
    grpo_microbatch_train_step,
    sft_microbatch_train_step,
)
from scratchlm.align.rollout import Rollout, pack, pack_rollouts, sample_rollouts
from scratchlm.infer.generate import Sampling

Update = Callable[[], float]  # clip, step the optimizer, zero the gradients; returns the norm before clipping


def step_seed(config: AlignConfig, step: int, salt: int = 0) -> int:
    return (config.seed * 1_000_003 + step * 7_919 + salt) % 2**62


def microbatches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class Stage:
    """What the loop drives. `reference`: the frozen starting model (DPO, GRPO's KL), else None."""

    needs_reference = False

    def __init__(self, config: AlignConfig, model, tokenizer, reference=None) -> None:
        self.config, self.model, self.tokenizer, self.reference = config, model, tokenizer, reference
        self.pad = tokenizer.end_id or 0
        self.eot = [tokenizer.end_id] if tokenizer.end_id is not None else []
        self.reward_fn = tasks.reward_function(config.task.name)
        self.forward_flops_per_token = forward_flops(model.config, 1, 1)["total"]

    def flops(self, forward_tokens: int = 0, trained_tokens: int = 0) -> float:
        """Matmul FLOPs of forward-only tokens (rollouts, reference passes) and trained tokens (3x)."""
        return self.forward_flops_per_token * (forward_tokens + 3 * trained_tokens)

    def prepare(self, say) -> None:
        """Build what the stage needs from the starting model (once, on a fresh start)."""

    def step(self, step: int, update: Update) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Stage-specific held-out figures, beside the task evaluation the loop runs."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def train_problems(self, step: int, count: int) -> list[tasks.Problem]:
        t = self.config.task
        return tasks.take_for(t, self.tokenizer, "train", f"{t.seed}:{step}", count)

    def rollouts(self, prompts: Sequence[str], step: int) -> list[Rollout]:
        r, t = self.config.rollout, self.config.task
        sampling = Sampling(r.temperature, 0, r.top_p, t.max_new_tokens, step_seed(self.config, step, 1))
        return sample_rollouts(self.model, self.tokenizer, prompts, r.group_size, sampling)


class SFTStage(Stage):
    def __init__(self, config: AlignConfig, model, tokenizer, reference=None) -> None:
        super().__init__(config, model, tokenizer, reference)
        t = config.task
        demos = tasks.take_for(t, tokenizer, "train", t.seed, config.sft.examples)
        self.examples = [(tokenizer.encode(p.prompt), tokenizer.encode(p.solution) + self.eot) for p in demos]

    def batch_indices(self, step: int) -> list[int]:
        """The examples of `step`: consecutive slices of a fresh permutation per epoch."""
        n, size = len(self.examples), self.config.batch_size
        out = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            order = list(range(n))
            random.Random(step_seed(self.config, epoch, 2)).shuffle(order)
            out.append(order[offset])
        return out

    def sft_step(self, examples: list[tuple[list[int], list[int]]], update: Update) -> dict:
        batch = pack([p for p, _ in examples], [r for _, r in examples], self.pad)
        mask = batch["response_mask"]
        tokens_per_sequence = float(mask.sum()) / len(examples)  # so the loss is the token mean
        parts = microbatches(len(examples), self.config.microbatch_size)
        total = 0.0
        for part in parts:
            log_probs = get_response_log_probs(self.model, batch["input_ids"][part], batch["labels"][part])["log_probs"]
            # Each part's mean counts by its share of the batch (the last part may be shorter).
            loss, _ = sft_microbatch_train_step(
                log_probs, mask[part], len(examples) / (part.stop - part.start), tokens_per_sequence
            )
            total += float(loss)
        return {"train/loss": total, "train/grad_norm": update(), "flops": self.flops(0, batch["input_ids"].numel())}

    def step(self, step: int, update: Update) -> dict:
        return self.sft_step([self.examples[i] for i in self.batch_indices(step)], update)


class ExpertIterationStage(SFTStage):
    """Expert iteration: its SFT data are the current model's own correct samples, renewed every round."""

    def __init__(self, config: AlignConfig, model, tokenizer, reference=None) -> None:
        Stage.__init__(self, config, model, tokenizer, reference)
        self.examples: list[tuple[list[int], list[int]]] = []
        self.round, self.round_reward, self.round_flops = -1, 0.0, 0.0

    def new_round(self, step: int) -> None:
        self.round = step // self.config.ei.steps_per_round
        problems = self.train_problems(-1 - self.round, self.config.ei.prompts)  # apart from GRPO's streams
        rollouts = self.rollouts([p.prompt for p in problems], -1 - self.round)
        g = self.config.rollout.group_size
        rewards = [self.reward_fn(r.text, problems[i // g].answer)["reward"] for i, r in enumerate(rollouts)]
        self.round_reward = sum(rewards) / len(rewards)
        self.round_flops = self.flops(sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts))
        self.examples = [(r.prompt_ids, r.response_ids) for r, ok in zip(rollouts, rewards, strict=True) if ok == 1.0]

    def step(self, step: int, update: Update) -> dict:
        sampled = 0.0
        if step // self.config.ei.steps_per_round != self.round:
            self.new_round(step)
            sampled = self.round_flops
        metrics = {"train/reward": self.round_reward, "ei/kept": len(self.examples), "flops": sampled}
        if not self.examples:  # nothing correct to learn from this round
            return metrics
        trained = self.sft_step([self.examples[i] for i in self.batch_indices(step)], update)
        return metrics | trained | {"flops": sampled + trained["flops"]}

    def state_dict(self) -> dict:
        return {"round": self.round, "round_reward": self.round_reward, "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.round_reward, self.examples = state["round"], state["round_reward"], state["examples"]


class GRPOStage(Stage):
    @property
    def needs_reference(self) -> bool:
        return self.config.grpo.kl_coef > 0

    def step(self, step: int, update: Update) -> dict:
        c, g = self.config, self.config.grpo
        problems = self.train_problems(step, c.batch_size)
        rollouts = self.rollouts([p.prompt for p in problems], step)
        answers = [p.answer for p in problems for _ in range(c.rollout.group_size)]
        advantages, raw, meta = compute_group_normalized_rewards(
            self.reward_fn,
            [r.text for r in rollouts],
            answers,
            c.rollout.group_size,
            normalize_by_std=g.normalize_by_std,
        )
        # Sequences whose group's rewards are all equal have zero advantage, so zero loss and gradient:
        # they are left out of the passes (the batch mean still counts them) unless a KL term or raw
        # rewards give them a gradient.
        informative = g.kl_coef == 0 and g.loss_type != "no_baseline" and g.length_normalization != "token"
        keep = [i for i in range(len(rollouts)) if advantages[i] != 0] if informative else list(range(len(rollouts)))
        metrics = {
            "train/reward": meta["reward_mean"],
            "train/format": meta.get("format_reward", 0.0),
            "grpo/trained_sequences": len(keep),
            "grpo/response_tokens": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
            "flops": self.flops(sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)),
        }
        if not keep:
            return metrics
        batch = pack_rollouts([rollouts[i] for i in keep], self.pad)
        adv, rewards = advantages[keep, None], raw[keep, None]
        parts = microbatches(len(keep), c.microbatch_size)
        with torch.no_grad():
            old = self._log_probs(self.model, batch, parts) if g.loss_type == "grpo_clip" else None
            ref = self._log_probs(self.reference, batch, parts) if g.kl_coef else None
        losses, clipped = [], []
        for _ in range(g.epochs_per_rollout):
            total = 0.0
            for part in parts:
                log_probs = get_response_log_probs(self.model, batch["input_ids"][part], batch["labels"][part])
                loss, info = grpo_microbatch_train_step(
                    log_probs["log_probs"],
                    batch["response_mask"][part],
                    len(rollouts) / (part.stop - part.start),
                    g.loss_type,
                    rewards[part],
                    adv[part],
                    None if old is None else old[part],
                    g.cliprange,
                    g.length_normalization,
                    c.task.max_new_tokens,
                    None if ref is None else ref[part],
                    g.kl_coef,
                )
                total += float(loss)
                if "clip_fraction" in info:
                    clipped.append(float(info["clip_fraction"]))
            metrics["train/grad_norm"] = update()
            losses.append(total)
        metrics["train/loss"] = losses[0]
        passes = int(old is not None) + int(ref is not None)
        metrics["flops"] += self.flops(
            passes * batch["input_ids"].numel(), g.epochs_per_rollout * batch["input_ids"].numel()
        )
        if clipped:
            metrics["grpo/clip_fraction"] = sum(clipped) / len(clipped)
        return metrics

    @staticmethod
    def _log_probs(model, batch: dict, parts: list[slice]) -> Tensor:
        return torch.cat(
            [get_response_log_probs(model, batch["input_ids"][p], batch["labels"][p])["log_probs"] for p in parts]
        )


Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen, rejected ids


class DPOStage(Stage):
    needs_reference = True

    def __init__(self, config: AlignConfig, model, tokenizer, reference=None) -> None:
        super().__init__(config, model, tokenizer, reference)
        self.pairs: list[Pair] = []
        self.test_pairs: list[Pair] = []

    def prepare(self, say) -> None:
        t = self.config.task
        self.pairs = self.make_pairs(tasks.problems(t.name, t.digits, "train", f"{t.seed}:dpo"), self.config.dpo.pairs)
        self.test_pairs = self.make_pairs(
            tasks.problems(t.name, t.digits, "test", f"{t.seed}:dpo"), self.config.dpo.test_pairs
        )
        say(f"dpo: {len(self.pairs)} training and {len(self.test_pairs)} held-out pairs from the starting model")

    def make_pairs(self, stream, count: int) -> list[Pair]:
        """(prompt, a correct sample, an incorrect sample) for prompts where the starting model gives
        both among its G samples; a correct demonstration stands in where none of them is correct."""
        pairs: list[Pair] = []
        for attempt in range(50):
            if len(pairs) >= count:
                break
            problems = [next(stream) for _ in range(max(32, (count - len(pairs)) // 2))]
            rollouts = self.rollouts([p.prompt for p in problems], 10_000_000 + attempt)
            g = self.config.rollout.group_size
            for i, problem in enumerate(problems):
                group = rollouts[i * g : (i + 1) * g]
                right = [r for r in group if self.reward_fn(r.text, problem.answer)["reward"] == 1.0]
                wrong = [r for r in group if self.reward_fn(r.text, problem.answer)["reward"] < 1.0]
                if wrong and len(pairs) < count:
                    chosen = right[0].response_ids if right else self.tokenizer.encode(problem.solution) + self.eot
                    pairs.append((group[0].prompt_ids, chosen, wrong[0].response_ids))
        return pairs

    def sequence_log_probs(self, model, pairs: Sequence[Pair]) -> tuple[Tensor, Tensor, Tensor]:
        """Summed response log-probs of the chosen and the rejected responses (each (B,)), and the
        chosen responses' token counts."""
        batch = pack([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs], self.pad)
        log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        sums = (log_probs * batch["response_mask"]).sum(-1)
        n = len(pairs)
        return sums[:n], sums[n:], batch["response_mask"][:n].sum(-1)

    def step(self, step: int, update: Update) -> dict:
        c = self.config
        rng = random.Random(step_seed(c, step, 3))
        chosen_pairs = [self.pairs[rng.randrange(len(self.pairs))] for _ in range(c.batch_size)]
        parts = microbatches(len(chosen_pairs), max(1, c.microbatch_size // 2))
        total, accuracy, margin = 0.0, 0.0, 0.0
        for part in parts:
            pairs = chosen_pairs[part]
            with torch.no_grad():
                ref_w, ref_l, _ = self.sequence_log_probs(self.reference, pairs)
            pi_w, pi_l, lengths = self.sequence_log_probs(self.model, pairs)
            losses, reward_w, reward_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, c.dpo.beta)
            loss = losses.sum() / len(chosen_pairs)
            if c.dpo.nll_coef:
                loss = loss + c.dpo.nll_coef * (-pi_w / lengths).sum() / len(chosen_pairs)
            loss.backward()
            total += float(loss.detach())
            accuracy += float((reward_w > reward_l).sum()) / len(chosen_pairs)
            margin += float((reward_w - reward_l).sum()) / len(chosen_pairs)
        tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in chosen_pairs)  # policy trained, reference forward
        return {
            "train/loss": total,
            "dpo/reward_accuracy": accuracy,
            "dpo/margin": margin,
            "train/grad_norm": update(),
            "flops": self.flops(tokens, tokens),
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out preference accuracy: the policy's implicit reward ranks chosen above rejected."""
        if not self.test_pairs:
            return {}
        hits = []
        for part in microbatches(len(self.test_pairs), max(1, self.config.microbatch_size // 2)):
            pairs = self.test_pairs[part]
            pi_w, pi_l, _ = self.sequence_log_probs(self.model, pairs)
            ref_w, ref_l, _ = self.sequence_log_probs(self.reference, pairs)
            margins = (pi_w - ref_w) - (pi_l - ref_l)
            hits += ((margins > 0).float() + 0.5 * (margins == 0).float()).tolist()  # a tie is a coin flip
        return {"eval/preference_accuracy": sum(hits) / len(hits)}

    def state_dict(self) -> dict:
        return {"pairs": self.pairs, "test_pairs": self.test_pairs}

    def load_state_dict(self, state: dict) -> None:
        self.pairs, self.test_pairs = state["pairs"], state["test_pairs"]


STAGES: dict[str, type[Stage]] = {"sft": SFTStage, "ei": ExpertIterationStage, "grpo": GRPOStage, "dpo": DPOStage}
