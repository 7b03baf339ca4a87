"""The whole LM against a reference written independently here from torch.nn.functional."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from scratchlm.checks import ConfigError
from scratchlm.model import ModelConfig, TransformerLM, head


def reference_lm(params: dict, config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """A from-the-paper Llama-style forward pass over a state dict (interleaved-pair RoPE), with the
    nanoGPT speedrun's value embeddings (added to each layer's values) and U-net skips (the output of
    layer i joins the input of layer n - 1 - i, for i < n // 2, times a weight) where configured."""
    b, s = ids.shape
    d, h, kv = config.d_model, config.n_heads, config.n_kv_heads
    dh = d // h
    freqs = config.rope_theta ** (-torch.arange(0, dh, 2).float() / dh)
    angles = torch.arange(s).float()[:, None] * freqs
    rot = torch.polar(torch.ones_like(angles), angles)

    def rope(t):
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], dh // 2, 2))
        return torch.view_as_real(tc * rot).flatten(-2)

    def norm(t, w):
        return F.rms_norm(t, (d,), w, eps=1e-5)

    x = F.embedding(ids, params["token_embeddings.weight"])
    n, outputs = config.n_layers, {}
    for i in range(n):

        def p(name, i=i):
            return params[f"layers.{i}.{name}.weight"]

        if config.unet_skips and i >= n - n // 2:
            x = x + params["skip_weights"][n - 1 - i] * outputs[n - 1 - i]
        y = norm(x, p("ln1"))
        q = rope(F.linear(y, p("attn.q_proj")).view(b, s, h, dh).transpose(1, 2))
        k = rope(F.linear(y, p("attn.k_proj")).view(b, s, kv, dh).transpose(1, 2))
        v = F.linear(y, p("attn.v_proj"))
        if config.value_embeddings:
            v = v + F.embedding(ids, params[f"value_embeddings.{i}.weight"])
        v = v.view(b, s, kv, dh).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + F.linear(a.transpose(1, 2).reshape(b, s, d), p("attn.output_proj"))
        y = norm(x, p("ln2"))
        x = x + F.linear(F.silu(F.linear(y, p("ffn.w1"))) * F.linear(y, p("ffn.w3")), p("ffn.w2"))
        outputs[i] = x
    return F.linear(norm(x, params["ln_final.weight"]), params["lm_head.weight"])


def randomize_gains_and_extras(model: TransformerLM) -> None:
    """Norm gains, value embeddings and skip weights away from their initial ones and zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")) or name == "skip_weights":
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.startswith("value_embeddings."):
                p.normal_()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("seq", [16, 5])  # full context and shorter than it
@pytest.mark.parametrize("extras", [{}, {"value_embeddings": True, "unet_skips": True, "n_layers": 5}])
def test_lm_matches_reference(fused, n_kv_heads, seq, extras):
    torch.manual_seed(0)
    config = ModelConfig(**{"vocab_size": 97, "context_length": 16, "d_model": 32, "n_layers": 2, "n_heads": 4,
                            "n_kv_heads": n_kv_heads, "fused_kernels": fused, **extras})  # fmt: skip
    model = TransformerLM(config)
    randomize_gains_and_extras(model)
    ids = torch.randint(0, 97, (3, seq))
    torch.testing.assert_close(
        model(ids), reference_lm(dict(model.named_parameters()), config, ids), rtol=1e-4, atol=1e-4
    )


def test_state_dict_names_and_counts():
    config = ModelConfig(vocab_size=50, context_length=8, d_model=16, n_layers=1, n_heads=2)
    model = TransformerLM(config)
    names = set(model.state_dict())
    assert {"token_embeddings.weight", "layers.0.attn.q_proj.weight", "layers.0.ffn.w1.weight", "ln_final.weight",
            "lm_head.weight"} <= names  # fmt: skip
    d, ff = 16, config.d_ff
    assert model.num_parameters() == 2 * 50 * d + (4 * d * d + 3 * d * ff + 2 * d) + d
    tied = TransformerLM(
        ModelConfig(vocab_size=50, context_length=8, d_model=16, n_layers=1, n_heads=2, tie_embeddings=True)
    )
    assert tied.lm_head.weight is tied.token_embeddings.weight
    assert tied.num_parameters() == model.num_parameters() - 50 * d


@pytest.mark.parametrize(
    "options",
    [
        dict(norm_position="post"),
        dict(position_embedding="none"),
        dict(ffn="silu"),
        dict(ffn="relu2"),
        dict(value_embeddings=True, unet_skips=True),
        dict(value_embeddings=True, unet_skips=True, activation_checkpointing="blocks"),
        dict(n_kv_heads=1),
        dict(tie_embeddings=True),
        dict(dropout=0.1),
    ],
)
def test_variants_run_and_learn(options):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=31, context_length=12, d_model=32, n_layers=2, n_heads=4, **options))
    ids = torch.randint(0, 31, (4, 12))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5  # memorises a fixed batch


@pytest.mark.parametrize("fused", [False, True])
def test_dropout_is_on_in_training_only(fused):
    config = ModelConfig(vocab_size=31, context_length=12, d_model=32, n_layers=2, n_heads=4, fused_kernels=fused)
    torch.manual_seed(0)
    plain = TransformerLM(config)
    dropped = TransformerLM(ModelConfig(**{**config.__dict__, "dropout": 0.2}))
    dropped.load_state_dict(plain.state_dict())  # dropout has no parameters: the same names
    x, y = torch.randint(0, 31, (2, 4, 12))
    dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))
    dropped.train()
    torch.manual_seed(1)
    first = dropped.loss(x, y)
    assert first.item() != pytest.approx(plain.loss(x, y).item(), rel=1e-4)
    assert dropped.loss(x, y).item() != first.item()  # a new mask
    torch.manual_seed(1)
    assert dropped.loss(x, y).item() == first.item()  # the masks come from torch's RNG


def test_too_long_input_is_a_clear_error():
    model = TransformerLM(ModelConfig(vocab_size=10, context_length=4, d_model=8, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="exceeds the context length 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=11, context_length=6, d_model=8, n_layers=1, n_heads=2, fused_kernels=False)
    model = TransformerLM(config).double()
    ids = torch.randint(0, 11, (2, 6))
    w = model.layers[0].attn.q_proj.weight

    def loss_fn():
        return F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())

    loss_fn().backward()
    eps = 1e-6
    for idx in [(0, 0), (3, 5), (7, 2)]:
        with torch.no_grad():
            w[idx] += eps
            up = loss_fn().item()
            w[idx] -= 2 * eps
            down = loss_fn().item()
            w[idx] += eps
        assert abs((up - down) / (2 * eps) - w.grad[idx].item()) < 1e-6


@pytest.mark.parametrize("vocab", [97, 5000])
def test_fused_head_loss_matches_logits_then_cross_entropy(vocab, monkeypatch):
    """The chunked LM head + loss: same loss and same gradients as logits -> F.cross_entropy."""
    monkeypatch.setattr(head, "MIN_ROWS", 1)
    monkeypatch.setattr(head, "BLOCK_BYTES", 100 * 4 * vocab)  # at most 100 rows a block
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, context_length=16, d_model=32, n_layers=1, n_heads=4)
    fused = TransformerLM(config)
    plain = TransformerLM(ModelConfig(**{**vars(config), "fused_kernels": False}))
    plain.load_state_dict(fused.state_dict())
    ids, targets = torch.randint(0, vocab, (20, 13)), torch.randint(0, vocab, (20, 13))  # 260 rows: 87, 87, 86
    assert head.block_rows(260, vocab) == 87
    loss_fused = fused.loss(ids, targets)
    loss_ref = F.cross_entropy(plain(ids).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss_fused, loss_ref)
    (2 * loss_fused).backward()
    (2 * loss_ref).backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused.loss(ids, targets), loss_ref)


def test_head_blocks_hold_at_most_64_mib_of_logits_in_equal_blocks():
    assert head.block_rows(2048, 10_000) == 1024  # 1677 rows fit: two blocks
    assert head.block_rows(2048, 50_257) == 293  # 333 fit: seven blocks
    assert head.block_rows(10, 10_000) == 10
    assert head.block_rows(0, 10_000) == 1  # an empty batch still gets a loop step
    assert head.block_rows(5000, 10**7) == head.MIN_ROWS  # a huge vocabulary still gets MIN_ROWS rows


def test_fused_head_without_autograd_computes_only_the_loss():
    """Under no_grad (evaluation) the head does the logits' matmul and nothing of the gradients'
    (FlopCounterMode counts 2 N d V, not 3x that), and gives the same loss."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight = torch.randn(300, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (300,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = head.lm_head_cross_entropy(hidden, weight, targets)
    assert counter.get_total_flops() == 2 * 300 * 16 * 97
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets))


def test_fused_head_loss_is_exact_and_finite_for_huge_logits():
    torch.manual_seed(0)
    hidden = (torch.randn(50, 16) * 1000).requires_grad_()  # logits of order 1e4
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    loss = head.lm_head_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets))
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_fused_head_under_autocast_matches_the_plain_expression(monkeypatch):
    """Under bf16 autocast the fused head multiplies in bf16 as F.linear would and keeps the loss and the
    weight's gradient in float32: the same loss and gradients as autocast's logits -> F.cross_entropy."""
    monkeypatch.setattr(head, "BLOCK_BYTES", 50 * 4 * 300)  # 50 rows a block: several
    monkeypatch.setattr(head, "MIN_ROWS", 1)
    torch.manual_seed(0)
    hidden = torch.randn(130, 32, requires_grad=True)
    weight = (0.3 * torch.randn(300, 32)).requires_grad_()
    targets = torch.randint(0, 300, (130,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.lm_head_cross_entropy(hidden, weight, targets)
        want = F.cross_entropy(F.linear(hidden, weight), targets)
    assert loss.dtype == want.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    grads = torch.autograd.grad(loss, (hidden, weight))
    want_grads = torch.autograd.grad(want, (hidden, weight))
    for g, w in zip(grads, want_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(head.lm_head_cross_entropy(hidden, weight, targets), loss)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason='needs Triton (pip install "scratchlm[triton]")')
def test_fused_head_through_the_triton_rows_kernel(monkeypatch):
    """The head's path on CUDA, with the Triton cross-entropy kernel (run here by the Triton
    interpreter): the same loss and gradients as logits -> F.cross_entropy."""
    from scratchlm.model import kernels

    monkeypatch.setattr(kernels, "triton_kernels_apply", lambda *tensors: True)
    monkeypatch.setattr(head, "BLOCK_BYTES", 40 * 4 * 97)
    monkeypatch.setattr(head, "MIN_ROWS", 1)
    torch.manual_seed(0)
    hidden, weight = torch.randn(100, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (100,))
    loss = head.lm_head_cross_entropy(hidden, weight, targets)
    want = F.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(loss, want)
    for g, w in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(want, (hidden, weight)),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_fused_head_loss_refuses_a_second_backward():
    hidden, weight = torch.randn(8, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
    loss = head.lm_head_cross_entropy(hidden, weight, torch.randint(0, 11, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("mode", ["blocks", "every:2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_identical_gradients(mode, dropout):
    base = ModelConfig(vocab_size=300, context_length=64, d_model=64, n_layers=3, n_heads=4, dropout=dropout)
    grads = {}
    for checkpointing in ("none", mode):
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(**{**vars(base), "activation_checkpointing": checkpointing}))
        ids = torch.randint(0, 300, (4, 64))
        torch.manual_seed(1)  # the same dropout masks, drawn again by the recomputation
        model.loss(ids, ids.roll(-1, 1)).backward()
        grads[checkpointing] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads["none"].items():
        assert torch.equal(grads[mode][name], grad), name


def test_activation_checkpointing_takes_none_blocks_or_every_k():
    assert [ModelConfig(n_layers=5, activation_checkpointing="every:2").is_checkpointed(i) for i in range(5)] == [
        True, False, True, False, True]  # fmt: skip
    assert ModelConfig(n_layers=3, activation_checkpointing="blocks").checkpointed_layers == 3
    for bad in ("every:0", "every:x", "all", ""):
        with pytest.raises(ConfigError, match=r"activation_checkpointing.*every:K"):
            ModelConfig(activation_checkpointing=bad)
