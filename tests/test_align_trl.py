"""The alignment building blocks against TRL's on the same tensors: its log-prob and entropy helpers,
and the loss aggregations of its GRPOTrainer (`_compute_loss`, driven with the tensors a rollout would
give it: "grpo" = our per-sequence mean, "dr_grpo" = our constant, "bnpo" = our per-token mean), with
and without its KL term."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from scratchlm.align.losses import compute_entropy, get_response_log_probs, grpo_microbatch_train_step
from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import TransformerLM

trl_utils = pytest.importorskip("trl.trainer.utils", reason="TRL is the oracle here: pip install trl")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")


def test_response_log_probs_and_entropy_equal_trls_helpers():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=50, context_length=16, d_model=32, n_layers=2, n_heads=4)).eval()
    ids = torch.randint(0, 50, (3, 12))
    ours = get_response_log_probs(model, ids[:, :-1], ids[:, 1:], return_token_entropy=True)
    with torch.no_grad():
        logits = model(ids[:, :-1])
    torch.testing.assert_close(ours["log_probs"], trl_utils.selective_log_softmax(logits, ids[:, 1:]))
    torch.testing.assert_close(ours["token_entropy"], trl_utils.entropy_from_logits(logits))
    torch.testing.assert_close(compute_entropy(logits * 30), trl_utils.entropy_from_logits(logits * 30))


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_grpo_loss(loss_type: str, logps, old, ref, advantages, mask, epsilon: float, beta: float, max_len: int):
    """TRL's GRPOTrainer._compute_loss on these tensors (its model forward replaced by them)."""
    trainer = SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=epsilon, epsilon_high=epsilon, max_completion_length=max_len,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, accelerator=_Accelerator(),
        model=SimpleNamespace(training=True), _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )  # fmt: skip
    b = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}  # fmt: skip
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("trl_type", "ours"), [("grpo", "sequence_mean"), ("dr_grpo", "constant"), ("bnpo", "token")])
def test_grpo_loss_aggregations_equal_trls(trl_type, ours, beta):
    torch.manual_seed(1)
    b, t, max_len = 6, 9, 12
    logps = (torch.randn(b, t) * 0.3 - 1.0).requires_grad_()
    old = (logps + torch.randn(b, t) * 0.2).detach()  # off-policy: some ratios clip
    ref = (logps + torch.randn(b, t) * 0.1).detach()
    advantages = torch.randn(b)
    mask = torch.arange(t)[None, :] < torch.tensor([9, 3, 5, 7, 1, 8])[:, None]

    theirs = trl_grpo_loss(trl_type, logps, old, ref, advantages, mask, 0.2, beta, max_len)
    (expected_grad,) = torch.autograd.grad(theirs, logps)
    loss, _ = grpo_microbatch_train_step(logps, mask, 1, "grpo_clip", advantages=advantages[:, None],
                                         old_log_probs=old, cliprange=0.2, length_normalization=ours,
                                         normalize_constant=max_len, reference_log_probs=ref, kl_coef=beta)  # fmt: skip
    torch.testing.assert_close(loss, theirs.detach())
    torch.testing.assert_close(logps.grad, expected_grad)
