"""Our optimizers against torch.optim, the schedule by hand, clipping against clip_grad_norm_."""

import copy
import itertools
import math

import pytest
import torch

from scratchlm.optim import SGD, AdaGrad, AdamW, Muon, RMSProp, clip_grad_norm, cosine_lr
from scratchlm.optim.adamw import newton_schulz


def _twin_models(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    b = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    b.load_state_dict(a.state_dict())
    return a, b


def _run(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 10, generator=g)
        y = torch.randn(16, 3, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fused", [False, True])  # our operations, and PyTorch's fused kernel behind AdamW
def test_adamw_matches_torch_for_1000_steps(fused):
    ours_model, ref_model = _twin_models()
    kwargs = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW(ours_model.parameters(), fused=fused, **kwargs)
    assert opt.fused is fused
    ours = _run(ours_model, opt, 1000)
    ref = _run(ref_model, torch.optim.AdamW(ref_model.parameters(), foreach=False, **kwargs), 1000)
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-7)
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_with_param_groups_and_state_dict_roundtrip(fused):
    model, _ = _twin_models()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-2, fused=fused)
    _run(model, opt, 5)
    clone, _ = _twin_models()
    clone.load_state_dict(model.state_dict())
    groups = [
        {"params": [p for p in clone.parameters() if p.dim() >= 2]},
        {"params": [p for p in clone.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt2 = AdamW(groups, lr=1e-2, fused=fused)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if through a file: no shared tensors
    assert _run(model, opt, 5, seed=9) == _run(clone, opt2, 5, seed=9)


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (lambda p: SGD(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
        (lambda p: SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        (lambda p: AdaGrad(p, lr=0.05), lambda p: torch.optim.Adagrad(p, lr=0.05)),
        (lambda p: RMSProp(p, lr=1e-3), lambda p: torch.optim.RMSprop(p, lr=1e-3)),
        (
            lambda p: RMSProp(p, lr=1e-3, alpha=0.9, weight_decay=0.01),
            lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, weight_decay=0.01),
        ),
    ],
)
def test_sgd_adagrad_and_rmsprop_match_torch(ours, ref):
    a, b = _twin_models()
    assert _run(a, ours(a.parameters()), 200) == pytest.approx(_run(b, ref(b.parameters()), 200), rel=1e-5, abs=1e-7)


def test_cosine_schedule_by_hand():
    lr = [cosine_lr(t, 1.0, 0.1, 10, 110) for t in range(115)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0  # linear warm-up reaches max at its last step
    assert lr[10] < 1.0 and lr[10] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 100)))
    assert lr[59] == pytest.approx(0.55)  # half-way through the decay
    assert lr[109] == 0.1 and lr[114] == 0.1  # exactly min at the last step, and after
    assert all(x >= y for x, y in itertools.pairwise(lr[9:]))  # never rises after warm-up
    assert cosine_lr(0, 1.0, 0.0, 0, 11) == 1.0 and cosine_lr(10, 1.0, 0.0, 0, 11) == 0.0


def test_clip_matches_torch_and_skips_missing_grads():
    a, b = _twin_models()
    x = torch.randn(4, 10) * 100
    for model in (a, b):
        loss = model(x).pow(2).sum()
        loss.backward()
        model[0].bias.grad = None  # a parameter without gradient
    ours = clip_grad_norm(a.parameters(), 1.0)
    ref = torch.nn.utils.clip_grad_norm_([p for p in b.parameters() if p.grad is not None], 1.0)
    torch.testing.assert_close(ours, ref)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in a.parameters() if p.grad is not None]))
    assert total.item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_parameters_with_different_step_counts_match_torch(fused):
    """A parameter without a gradient is skipped and its step count lags; each keeps its own bias correction."""
    a, b = _twin_models()
    opts = (AdamW(a.parameters(), lr=1e-2, fused=fused), torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False))
    x = torch.randn(8, 10)
    for step in range(20):
        for model, opt in zip((a, b), opts, strict=True):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if step % 3 == 0:
                model[0].bias.grad = None
            opt.step()
    assert opts[0].state[a[0].bias]["step"] == 13 and opts[0].state[a[0].weight]["step"] == 20
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_adamw_refuses_parameters_it_cannot_take():
    with pytest.raises(ValueError, match="one dtype"):
        AdamW([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], fused=True)
    assert not AdamW([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2).double())]).fused


def test_course_schedule_by_hand():
    from scratchlm.optim.schedule import lr_cosine_schedule

    lr = [lr_cosine_schedule(it, 1.0, 0.1, 7, 21) for it in range(25)]
    assert lr[0] == 0.0 and lr[1] == pytest.approx(1 / 7) and lr[6] == pytest.approx(6 / 7)  # lr(0) = 0
    assert lr[7] == 1.0 and lr[14] == pytest.approx(0.55) and lr[21] == pytest.approx(0.1)  # cosine
    assert lr[22] == 0.1 and lr[24] == 0.1  # min_lr after the cycle


def test_trainer_schedule_is_the_course_schedule_one_step_on():
    from scratchlm.optim.schedule import lr_cosine_schedule

    for warmup, total in ((10, 110), (1, 50), (30, 31)):
        for step in range(total + 3):
            expected = lr_cosine_schedule(step + 1, 3e-3, 3e-4, warmup, total)
            assert cosine_lr(step, 3e-3, 3e-4, warmup, total) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_schedule_stays_monotone_when_the_length_is_refitted():
    from scratchlm.optim.schedule import DecaySchedule

    fixed = DecaySchedule(1.0, 0.1, 10)
    assert [fixed(t, 110) for t in range(110)] == [cosine_lr(t, 1.0, 0.1, 10, 110) for t in range(110)]
    schedule, lrs = DecaySchedule(1.0, 0.1, 10), []
    for step in range(300):  # the budget re-fits the length: 200 -> 120 (slower) -> 300 (faster again)
        total = 200 if step < 50 else 120 if step < 90 else 300
        lrs.append(schedule(step, total))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # never rises after warm-up
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_warmup_stable_decay_by_hand():
    """cooldown 0.4: max_lr for the first 60% of the decay, then a straight line (or half cosine) to min_lr."""
    from scratchlm.optim.schedule import DecaySchedule, cooled_down

    assert cooled_down(0.0, 1.0, 0.1, "linear", 0.4) == 1.0 and cooled_down(0.6, 1.0, 0.1, "linear", 0.4) == 1.0
    assert cooled_down(0.8, 1.0, 0.1, "linear", 0.4) == pytest.approx(0.55)
    assert cooled_down(0.7, 1.0, 0.1, "linear", 0.4) == pytest.approx(1.0 - 0.25 * 0.9)
    assert cooled_down(0.8, 1.0, 0.1, "cosine", 0.4) == pytest.approx(0.55)
    assert cooled_down(0.7, 1.0, 0.1, "cosine", 0.4) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert cooled_down(1.0, 1.0, 0.1, "linear", 0.4) == pytest.approx(0.1)
    schedule = DecaySchedule(1.0, 0.0, 10, shape="linear", cooldown=0.5)  # decay positions run over steps 9..109
    lrs = [schedule(t, 110) for t in range(110)]
    assert lrs[9] == lrs[59] == 1.0 and lrs[84] == pytest.approx(0.5) and lrs[109] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))


def written_out_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """X_0 = G / ||G||_F (transposed if tall); X_{k+1} = a X + b (X X^T) X + c (X X^T)^2 X."""
    x = (g / (g.norm() + 1e-7)).double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        x = 3.4445 * x - 4.7750 * (x @ x.T) @ x + 2.0315 * (x @ x.T) @ (x @ x.T) @ x
    return (x.T if tall else x).float()


@pytest.mark.parametrize("shape", [(20, 10), (3, 20), (16, 16)])
def test_newton_schulz_pushes_singular_values_towards_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g)
    torch.testing.assert_close(out, written_out_newton_schulz(g, 5), rtol=1e-4, atol=1e-5)
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(out.flatten(), (u @ vh).flatten(), dim=0) > 0.95
    batch = torch.stack([g, 3 * g.flip(0)])  # a batch of matrices: each as if alone
    torch.testing.assert_close(newton_schulz(batch), torch.stack([out, newton_schulz(3 * g.flip(0))]))
    coarse = newton_schulz(g, dtype=torch.bfloat16)  # bf16 iterations: a few % off, still near-orthogonal
    assert coarse.dtype == torch.bfloat16 and (coarse.float() - out).norm() < 0.05 * out.norm()
    singular = torch.linalg.svdvals(coarse.float())
    assert singular.min() > 0.55 and singular.max() < 1.3, singular


def test_muon_is_its_written_out_definition_and_adamw_elsewhere():
    a, b = _twin_models()
    matrices = lambda m: [m[0].weight, m[2].weight]  # noqa: E731
    rest = lambda m: [m[0].bias, m[2].bias]  # noqa: E731
    opt = Muon([{"params": matrices(a), "muon": True, "lr": 0.02, "weight_decay": 0.01},
                {"params": rest(a), "lr": 3e-3, "weight_decay": 0.0}], momentum=0.9)  # fmt: skip
    adamw = torch.optim.AdamW(rest(b), lr=3e-3, weight_decay=0.0, foreach=False)
    buffers = [torch.zeros_like(w) for w in matrices(b)]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(16, 10, generator=g), torch.randn(16, 3, generator=g)
        for model in (a, b):
            model.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
        opt.step()
        adamw.step()
        with torch.no_grad():
            for w, buffer in zip(matrices(b), buffers, strict=True):
                buffer.mul_(0.9).add_(w.grad)
                update = written_out_newton_schulz(w.grad + 0.9 * buffer, 5)
                w.mul_(1 - 0.02 * 0.01).sub_(0.02 * max(1, w.shape[0] / w.shape[1]) ** 0.5 * update)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="matrices"):
        Muon([{"params": rest(a), "muon": True}])


@pytest.mark.parametrize("fused", [True, False])
def test_decoding_after_a_step_uses_the_updated_weights(fused):
    """The decoding path caches weights by their version counter; an optimizer step must bump it (the
    fused kernel does not by itself), or generation during training (RL rollouts) reads stale weights."""
    from scratchlm.model.config import ModelConfig
    from scratchlm.model.transformer import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=32, context_length=8, d_model=16, n_layers=1, n_heads=2))
    ids = torch.tensor([[1, 2, 3]])

    def decode_logits() -> torch.Tensor:
        with torch.no_grad():
            caches = model.new_caches(1)
            model(ids[:, :2], caches=caches)
            return model(ids[:, 2:], caches=caches)[0, -1]

    decode_logits()  # builds the decoding weights' cache
    optimizer = AdamW(model.parameters(), lr=0.1, fused=fused)
    model.loss(ids, ids).backward()
    optimizer.step()
    with torch.no_grad():
        expected = model(ids)[0, -1]
    torch.testing.assert_close(decode_logits(), expected, rtol=1e-5, atol=1e-5)


def test_muon_dtype_from_the_config_reaches_newton_schulz(monkeypatch):
    from scratchlm.model.config import ModelConfig
    from scratchlm.model.transformer import TransformerLM
    from scratchlm.optim import adamw
    from scratchlm.train.config import load_config
    from scratchlm.train.setup import build_optimizer

    seen = []
    real = adamw.newton_schulz
    monkeypatch.setattr(
        adamw, "newton_schulz", lambda g, steps, dtype: (seen.append(dtype), real(g, steps, dtype=dtype))[1]
    )
    model = TransformerLM(ModelConfig(vocab_size=32, context_length=8, d_model=16, n_layers=1, n_heads=2))
    for dtype in ("float32", "bfloat16"):
        optimizer = build_optimizer(load_config(None, ['optim.name="muon"', f'optim.muon_dtype="{dtype}"']), model)
        model.loss(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])).backward()
        optimizer.step()
        assert set(seen) == {getattr(torch, dtype)}
        seen.clear()


def test_embedding_lr_gives_the_lookup_tables_their_own_rate_and_keeps_them_out_of_muon():
    from scratchlm.model.config import ModelConfig
    from scratchlm.model.transformer import TransformerLM
    from scratchlm.train.config import load_config
    from scratchlm.train.setup import build_optimizer

    model = TransformerLM(
        ModelConfig(vocab_size=32, context_length=8, d_model=16, n_layers=2, n_heads=2, value_embeddings=True)
    )
    tables = {id(model.token_embeddings.weight), *(id(t.weight) for t in model.value_embeddings)}
    for name in ("muon", "adamw", "sgd"):
        config = load_config(None, [f'optim.name="{name}"', "optim.lr=0.002", "optim.embedding_lr=0.05"])
        groups = build_optimizer(config, model).param_groups
        own = [g for g in groups if {id(p) for p in g["params"]} == tables]
        assert len(own) == 1 and own[0]["lr"] == 0.05 and own[0]["lr_scale"] == pytest.approx(25)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each once
        assert not any(g.get("muon") and {id(p) for p in g["params"]} & tables for g in groups)
        if name != "sgd":
            assert own[0]["weight_decay"] == 0.1  # the matrices' decay, as before
    without = build_optimizer(load_config(None, ['optim.name="muon"']), model).param_groups
    assert not any(g.get("muon") and {id(p) for p in g["params"]} & tables for g in without)
