"""The building blocks of SFT, policy-gradient RL (GRPO) and DPO, with the semantics of CS336's fifth
assignment. Shapes: batch B, sequence T (the shifted, label-aligned length), vocabulary V.

Log-probabilities come per token from the model's hidden states and LM head in chunks of rows
(`get_response_log_probs`), so the (B x T x V) logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from scratchlm.align.rollout import pack

LOGIT_CHUNK_ROWS = 1024  # rows of hidden states turned into logits at a time


def tokenize_prompt_and_output(prompts: Sequence[str], outputs: Sequence[str], tokenizer, pad_id: int | None = None):
    """Prompt + output token ids, right-padded, shifted for next-token prediction.

    Returns input_ids (B, T), labels (B, T) (input_ids shifted left by one) and response_mask (B, T):
    True where the label is a token of the output (not the prompt, not padding); T = the longest
    prompt + output, minus one."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    if pad_id is None:
        pad_id = tokenizer.end_id or 0
    return pack([tokenizer.encode(p) for p in prompts], [tokenizer.encode(o) for o in outputs], pad_id)


def compute_entropy(logits: Tensor) -> Tensor:
    """logits (..., V) -> the entropy of softmax(logits) over V (...), in nats: log Z - E_p[z] on logits
    shifted to a maximum of 0, so the two terms do not cancel at large scales."""
    z = logits - logits.amax(dim=-1, keepdim=True)
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    return log_z.squeeze(-1) - (torch.exp(z - log_z) * z).sum(-1)


def get_response_log_probs(model, input_ids: Tensor, labels: Tensor, return_token_entropy: bool = False) -> dict:
    """log p(labels[b, t] | input_ids[b, :t+1]) as (B, T), and optionally each position's entropy (B, T).

    The LM head runs on LOGIT_CHUNK_ROWS rows of hidden states at a time (each chunk's logits freed
    after its log-softmax; under autograd, recomputed in backward by checkpointing)."""
    hidden = model.hidden_states(input_ids)  # (B, T, d)
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    log_probs, entropies = [], []

    def chunk_stats(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model.lm_head(h).float()
        log_z = torch.logsumexp(logits, dim=-1)
        chosen = logits.gather(-1, y[:, None]).squeeze(-1) - log_z
        return chosen, (compute_entropy(logits) if return_token_entropy else chosen.new_zeros(()))

    for start in range(0, flat.shape[0], LOGIT_CHUNK_ROWS):
        h, y = flat[start : start + LOGIT_CHUNK_ROWS], targets[start : start + LOGIT_CHUNK_ROWS]
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(chunk_stats, h, y, use_reentrant=False)
        else:
            lp, ent = chunk_stats(h, y)
        log_probs.append(lp)
        entropies.append(ent)
    out = {"log_probs": torch.cat(log_probs).view(labels.shape)}
    if return_token_entropy:
        out["token_entropy"] = torch.cat(entropies).view(labels.shape)
    return out


def masked_normalize(tensor: Tensor, mask: Tensor, normalize_constant: float, dim: int | None = None) -> Tensor:
    """The sum of `tensor` where `mask` is True (over `dim`, or everything), divided by a constant."""
    total = (tensor * mask).sum() if dim is None else (tensor * mask).sum(dim)
    return total / normalize_constant


def masked_mean(tensor: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """The mean of `tensor` over the positions where `mask` is True (over `dim`, or everything)."""
    mask = mask.to(tensor.dtype)
    if dim is None:
        return (tensor * mask).sum() / mask.sum()
    return (tensor * mask).sum(dim) / mask.sum(dim)


def sft_microbatch_train_step(
    policy_log_probs: Tensor, response_mask: Tensor, gradient_accumulation_steps: int, normalize_constant: float = 1.0
) -> tuple[Tensor, dict]:
    """Negative log-likelihood of the response tokens: summed per sequence, divided by
    `normalize_constant`, averaged over the batch and divided by the accumulation steps; backward is
    called on it. Returns (that loss, metadata)."""
    per_sequence = masked_normalize(-policy_log_probs, response_mask, normalize_constant, dim=-1)
    loss = per_sequence.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {"response_tokens": response_mask.sum().detach()}


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, str], dict],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[str],
    group_size: int,
    advantage_eps: float = 1e-6,
    normalize_by_std: bool = True,
) -> tuple[Tensor, Tensor, dict]:
    """Rewards of G = group_size consecutive responses per prompt, minus their group's mean (and divided
    by the group's sample standard deviation + eps with `normalize_by_std`). Returns (advantages (B,),
    raw rewards (B,), metadata)."""
    if len(rollout_responses) % group_size:
        raise ValueError(f"{len(rollout_responses)} responses do not split into groups of {group_size}")
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths, strict=True)]
    raw = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    groups = raw.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + advantage_eps)
    meta = {"reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if len(raw) > 1 else 0.0}
    meta |= {key: float(sum(s[key] for s in scores) / len(scores)) for key in scores[0] if key != "reward"}
    return centred.flatten(), raw, meta


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: Tensor, policy_log_probs: Tensor) -> Tensor:
    """Per token: -A * log p, A (B, 1) broadcast over the sequence -> (B, T)."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(
    advantages: Tensor, policy_log_probs: Tensor, old_log_probs: Tensor, cliprange: float
) -> tuple[Tensor, dict]:
    """Per token: -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = exp(log p - log p_old) -> (B, T), and
    metadata["clipped"] (B, T): where the clipped term was the smaller."""
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - cliprange, 1 + cliprange) * advantages
    return -torch.minimum(unclipped, clipped), {"clipped": clipped < unclipped}


LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"]


def compute_policy_gradient_loss(
    policy_log_probs: Tensor,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[Tensor, dict]:
    """Per-token loss (B, T): REINFORCE on raw rewards ("no_baseline"), on group-normalised advantages
    ("reinforce_with_baseline"), or GRPO's clipped objective ("grpo_clip"). Rewards and advantages: (B, 1)."""
    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type == "grpo_clip":
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)
    raise ValueError(f"loss_type: expected no_baseline, reinforce_with_baseline or grpo_clip, got {loss_type!r}")


Normalization = Literal["sequence_mean", "constant", "token"]


def grpo_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    length_normalization: Normalization = "sequence_mean",
    normalize_constant: float | None = None,
    reference_log_probs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict]:
    """One microbatch of a policy-gradient step: the per-token loss aggregated over the response tokens
    by `length_normalization`, divided by the accumulation steps, and backward called on it. With
    `kl_coef` > 0 each token also pays kl_coef x the k3 estimate of KL(policy || reference),
    exp(ref - pi) - (ref - pi) - 1 (unbiased, never negative; `reference_log_probs` (B, T)).

    - "sequence_mean" (GRPO): each sequence's mean over its response tokens, then the batch mean;
    - "constant" (Dr. GRPO): each sequence's sum divided by `normalize_constant` (e.g. the generation
      budget), then the batch mean — no length bias;
    - "token" (DAPO): the sum over every response token of the microbatch over their count."""
    per_token, meta = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange
    )
    if kl_coef:
        log_ratio = reference_log_probs - policy_log_probs
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
        meta["kl"] = masked_mean(kl.detach(), response_mask)
    if length_normalization == "sequence_mean":
        loss = masked_mean(per_token, response_mask, dim=-1).mean()
    elif length_normalization == "constant":
        if not normalize_constant:
            raise ValueError("length_normalization 'constant' needs normalize_constant (e.g. the max response length)")
        loss = masked_normalize(per_token, response_mask, normalize_constant, dim=-1).mean()
    elif length_normalization == "token":
        loss = masked_mean(per_token, response_mask)
    else:
        expected = "sequence_mean, constant or token"
        raise ValueError(f"length_normalization: expected {expected}, got {length_normalization!r}")
    loss = loss / gradient_accumulation_steps
    loss.backward()
    if "clipped" in meta:
        meta["clip_fraction"] = masked_mean(meta["clipped"].float(), response_mask).detach()
    return loss.detach(), meta


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023), per instance: -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) -
    (log pi(y_l) - log ref(y_l)))), the log-probs summed over each response's tokens. Returns (losses,
    chosen rewards, rejected rewards), each (B,); rewards = beta * the log-ratios (TRL's definition)."""
    chosen = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected = beta * (policy_rejected_logps - reference_rejected_logps)
    return -torch.nn.functional.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def response_log_prob(model, tokenizer, prompt: str, response: str) -> Tensor:
    """log pi(response | prompt), summed over the response's tokens (a scalar)."""
    batch = tokenize_prompt_and_output([prompt], [response], tokenizer)
    log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
    return (log_probs * batch["response_mask"]).sum()


def per_instance_dpo_loss(policy, reference, tokenizer, beta: float, prompt: str, chosen: str, rejected: str) -> Tensor:
    """The DPO loss of one preference pair, the reference's log-probs without gradients."""
    with torch.no_grad():
        ref_w, ref_l = (response_log_prob(reference, tokenizer, prompt, r) for r in (chosen, rejected))
    pi_w, pi_l = (response_log_prob(policy, tokenizer, prompt, r) for r in (chosen, rejected))
    return dpo_loss(pi_w[None], pi_l[None], ref_w[None], ref_l[None], beta)[0][0]
