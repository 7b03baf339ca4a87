"""The GPU paths, checked against the CPU (skipped on machines without CUDA, such as CI).

The model, its options, torch.compile, bf16 autocast, our AdamW, the trainer (resume included) and
decoding with the KV cache: each on the GPU against the same thing on the CPU or in float32.
"""

import copy

import pytest
import torch
from conftest import tiny_config

from scratchlm.infer.generate import Sampling, generate
from scratchlm.model import ModelConfig, TransformerLM
from scratchlm.optim import AdamW
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.metrics import read_metrics
from scratchlm.train.setup import build_model
from scratchlm.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def small_model(**options) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=500, context_length=64, d_model=64, n_layers=2, n_heads=4, **options))


def loss_and_grads(model: TransformerLM, x, y, loss_fn=None) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = (loss_fn or model.loss)(x, y)
    loss.backward()
    return loss.item(), {name: p.grad.float().cpu() for name, p in model.named_parameters()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def no_tf32():
    """Float32 matmuls in full float32 (PyTorch's default), whatever an earlier test set."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("seq", [64, 37])  # the context length, and shorter
@pytest.mark.parametrize(
    "options",
    [{}, {"n_kv_heads": 2}, {"tie_embeddings": True}, {"norm_position": "post"}, {"position_embedding": "none"},
     {"ffn": "silu"}, {"fused_kernels": False}],
)  # fmt: skip
def test_loss_and_gradients_on_cuda_match_the_cpu(options, seq):
    cpu = small_model(**options)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x, y = torch.randint(0, 500, (2, 4, seq))
    cpu_loss, cpu_grads = loss_and_grads(cpu, x, y)
    gpu_loss, gpu_grads = loss_and_grads(gpu, x.to(CUDA), y.to(CUDA))
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    for name, grad in cpu_grads.items():
        assert relative_error(gpu_grads[name], grad) < 1e-4, name


def test_bf16_autocast_stays_near_float32():
    model = small_model().to(CUDA)
    x, y = torch.randint(0, 500, (2, 8, 64), device=CUDA)
    exact_loss, exact_grads = loss_and_grads(model, x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, x, y)
    assert loss == pytest.approx(exact_loss, rel=1e-2)
    for name, grad in exact_grads.items():
        assert torch.isfinite(grads[name]).all() and relative_error(grads[name], grad) < 5e-2, name


def test_a_bfloat16_model_runs_on_cuda():
    model = small_model().to(CUDA)
    x, y = torch.randint(0, 500, (2, 4, 64), device=CUDA)
    exact_loss, _ = loss_and_grads(model, x, y)
    loss, grads = loss_and_grads(model.to(torch.bfloat16), x, y)
    assert loss == pytest.approx(exact_loss, rel=2e-2)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_loss_matches_eager(autocast):
    model = small_model().to(CUDA)
    x, y = torch.randint(0, 500, (2, 4, 64), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        eager_loss, eager_grads = loss_and_grads(model, x, y)
        compiled_loss, compiled_grads = loss_and_grads(model, x, y, torch.compile(model.loss))
    tolerance = 1e-2 if autocast else 1e-5
    assert compiled_loss == pytest.approx(eager_loss, rel=tolerance)
    for name, grad in eager_grads.items():
        assert relative_error(compiled_grads[name], grad) < 10 * tolerance, name


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_on_cuda_matches_torch(fused):
    ours, ref = small_model().to(CUDA), small_model().to(CUDA)
    settings = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizers = AdamW(ours.parameters(), fused=fused, **settings), torch.optim.AdamW(ref.parameters(), **settings)
    assert optimizers[0].fused is fused
    x, y = torch.randint(0, 500, (2, 4, 64), device=CUDA)
    for _ in range(100):
        for model, optimizer in zip((ours, ref), optimizers, strict=True):
            loss_and_grads(model, x, y)
            optimizer.step()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_training_on_cuda_learns_and_resumes(data_dir, tmp_path):
    """bf16 autocast and torch.compile, as `device = "auto"` picks them on a GPU, and dropout; a run
    rewound to its step-10 checkpoint continues the same trajectory (the CUDA RNG comes back with it),
    to float rounding: GPU kernels need not be bit-reproducible."""
    config = tiny_config(data_dir, tmp_path / "run", device='"cuda"', max_steps=20, **{"model.dropout": 0.1})
    full = train(config, quiet=True)
    straight = [r["train/loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert straight[-1] < straight[0] and full["val/bpb"] > 0
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    (tmp_path / "run" / "checkpoints" / "latest").write_text(ckpts[0].name)
    resumed_result = train(config, quiet=True)
    resumed = [r["train/loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert resumed == pytest.approx(straight, rel=1e-4)
    assert resumed_result["val/loss"] == pytest.approx(full["val/loss"], rel=1e-4)


def test_greedy_decoding_on_cuda_matches_the_cpu(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path)
    tokenizer = Tokenizer.load(config.data.tokenizer)
    cpu = build_model(config, torch.device("cpu"))
    gpu = copy.deepcopy(cpu).to(CUDA)
    prompts = ["the king", "and the queen"]  # of different lengths: left padding too
    sampling = Sampling(temperature=0.0, max_new_tokens=16)
    on_cpu, _ = generate(cpu, tokenizer, prompts, sampling)
    on_gpu, _ = generate(gpu, tokenizer, prompts, sampling)
    assert [g.token_ids for g in on_gpu] == [g.token_ids for g in on_cpu]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_trains_alike_with_our_triton_attention_and_sdpa(dtype):
    pytest.importorskip("triton")
    from scratchlm.kernels import attention_choice

    model = small_model().to(CUDA, dtype)
    x = torch.randint(0, 500, (4, 64), device=CUDA)
    results = {}
    for name in ("triton", "sdpa"):
        with attention_choice.forced(name):
            results[name] = loss_and_grads(model, x, x.roll(-1, 1))
    (loss_t, grads_t), (loss_s, grads_s) = results["triton"], results["sdpa"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(loss_t - loss_s) <= tol * abs(loss_s)
    for name in grads_s:
        assert relative_error(grads_t[name], grads_s[name]) <= 5 * tol, name


def test_the_fused_head_under_autocast_matches_the_plain_one():
    """On CUDA the fused head multiplies in bf16 and takes the Triton cross-entropy kernel."""
    fused, plain = small_model().to(CUDA), small_model(fused_kernels=False).to(CUDA)
    x, y = torch.randint(0, 500, (2, 8, 64), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused_loss, fused_grads = loss_and_grads(fused, x, y)
        plain_loss, plain_grads = loss_and_grads(plain, x, y)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
    for name, grad in plain_grads.items():
        assert relative_error(fused_grads[name], grad) < 5e-2, name


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_matmuls_on_cuda_stay_near_bf16(recipe):
    from scratchlm.kernels.fp8 import convert_to_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9 or later")
    model = small_model().to(CUDA)
    x, y = torch.randint(0, 500, (2, 8, 64), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        base_loss, base_grads = loss_and_grads(model, x, y)
        convert_to_fp8(model, recipe)
        loss, grads = loss_and_grads(model, x, y)
    assert loss == pytest.approx(base_loss, rel=2e-2)
    for name, grad in base_grads.items():
        assert torch.isfinite(grads[name]).all() and relative_error(grads[name], grad) < 0.15, name
