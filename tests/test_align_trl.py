"""The alignment building blocks against TRL's on the same tensors: its log-prob and entropy helpers,
and the loss aggregations of its GRPOTrainer (`_compute_loss`, driven with the tensors a rollout would
give it: "grpo" = our per-sequence mean, "dr_grpo" = our constant, "bnpo" = our per-token mean), with
and without its KL term; and a whole DPOTrainer step on exported models against our DPO stage."""

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


def test_a_dpo_step_equals_trls_dpo_trainer_on_an_exported_model(tmp_path):
    """One step of TRL's DPOTrainer on two exported models (policy != reference, so nothing is 0 or ln 2):
    its logged loss, chosen / rejected rewards, margins, accuracy, summed log-probs and gradient norm
    equal our DPO stage's on the ids TRL tokenized."""
    from conftest import synthetic_text

    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from scratchlm.align.config import AlignConfig
    from scratchlm.align.losses import dpo_loss
    from scratchlm.align.stages import DPOStage
    from scratchlm.infer.export import export_huggingface
    from scratchlm.tokenizer.bpe import Tokenizer
    from scratchlm.tokenizer.trainer import train_bpe

    (tmp_path / "corpus.txt").write_text(synthetic_text(5000, seed=0), encoding="utf-8")
    tokenizer = Tokenizer(*train_bpe(tmp_path / "corpus.txt", 300, ["<|endoftext|>"]), ["<|endoftext|>"])
    tokenizer.save(tmp_path / "tok")
    config = ModelConfig(vocab_size=320, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    models = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        torch.manual_seed(seed)
        models[name] = TransformerLM(config).eval()
        export_huggingface(models[name], tmp_path / name, tmp_path / "tok")
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "policy")
    hf_tokenizer.pad_token = "<|endoftext|>"
    data = datasets.Dataset.from_dict(
        {
            "prompt": ["the king", "thou art", "a crown", "Hamlet 42"],
            "chosen": [" doth love", " the queen", " of gold", " is here"],
            "rejected": [" night", " sword day", " x", " naïve café"],
        }
    )
    beta = 0.3
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        beta=beta,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        bf16=False,
    )  # fmt: skip  (bf16=False: TRL's default autocasts to bf16, 1e-3 away from fp32)
    trainer = trl.DPOTrainer(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "policy"),
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "reference"),
        args=args,
        train_dataset=data,
        processing_class=hf_tokenizer,
    )
    pairs = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]
    assert pairs[0][1][-1] == tokenizer.end_id  # TRL appends the end token to each response, as our stages do
    trainer.train()
    theirs = trainer.state.log_history[0]

    stage = DPOStage(AlignConfig(stage="dpo"), models["policy"], tokenizer)
    with torch.no_grad():
        ref_w, ref_l, _ = stage.sequence_log_probs(models["reference"], pairs)
    pi_w, pi_l, _ = stage.sequence_log_probs(models["policy"], pairs)
    losses, reward_w, reward_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
    losses.mean().backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in models["policy"].parameters()]))
    ours = {
        "loss": losses.mean(),
        "rewards/chosen": reward_w.mean(),
        "rewards/rejected": reward_l.mean(),
        "rewards/margins": (reward_w - reward_l).mean(),
        "rewards/accuracies": (reward_w > reward_l).float().mean(),
        "logps/chosen": pi_w.mean(),
        "logps/rejected": pi_l.mean(),
        "grad_norm": grad_norm,
    }
    ours = {key: float(value) for key, value in ours.items()}
    assert abs(ours["rewards/margins"]) > 0.05 and ours["loss"] != pytest.approx(0.6931, abs=1e-3)
    for key, value in ours.items():
        assert value == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
