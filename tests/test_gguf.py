"""GGUF export: the `gguf` reader (llama.cpp's own package) reads back the tensors and metadata written,
Q8_0 stays within its rounding bound, and `transformers` loading the file gives scratchlm's logits and
tokenization."""

import numpy as np
import pytest
import torch
from conftest import synthetic_text

from scratchlm.errors import ScratchLMError
from scratchlm.model import ModelConfig, TransformerLM
from scratchlm.tokenizer.bpe import Tokenizer
from scratchlm.tokenizer.trainer import train_bpe

gguf = pytest.importorskip("gguf")
from scratchlm.infer.gguf_export import export_gguf, gguf_names, gguf_tensors  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    text = tmp_path_factory.mktemp("corpus") / "text.txt"
    text.write_text(synthetic_text(20000, seed=0), encoding="utf-8")
    vocab, merges = train_bpe(text, 300, ["<|endoftext|>"])
    return Tokenizer(vocab, merges, ["<|endoftext|>"])


def model(vocab_size: int = 320, **options) -> TransformerLM:
    """320 embedding rows for a 300-token tokenizer (padding, as a rounded-up vocab has); non-trivial
    norm gains, so a mix-up of norms would show."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, context_length=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         **options)  # fmt: skip
    m = TransformerLM(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return m


def read_back(path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """(metadata, tensors dequantised to float32 in PyTorch's shape, tensor types) as llama.cpp's reader sees them."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
    return fields, tensors, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
def test_the_gguf_reader_reads_back_the_tensors_and_metadata(tmp_path, tokenizer, file_type):
    m = model()
    path = export_gguf(m, tmp_path / "model.gguf", tokenizer, file_type)
    fields, tensors, types = read_back(path)
    c = m.config
    expected = {"general.architecture": "llama", "llama.context_length": 32, "llama.embedding_length": 64,
                "llama.block_count": 2, "llama.feed_forward_length": c.d_ff, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.rope.freq_base": 10000.0, "llama.vocab_size": 320, "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.eos_token_id": 256}  # fmt: skip
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    ours = gguf_tensors(m)
    assert tensors.keys() == ours.keys() and len(ours) == 3 + 9 * 2
    for name, x in ours.items():
        if x.ndim == 1 or file_type == "f32":
            assert types[name] == "F32" and np.array_equal(tensors[name], x), name
        elif file_type == "f16":
            assert types[name] == "F16" and np.array_equal(tensors[name], x.astype(np.float16).astype(np.float32))
        else:  # Q8_0: blocks of 32 along a row, x = q * d with d = max |x| / 127 stored in fp16 and q rounded:
            # |error| <= d / 2 for the rounding + 127 * d * 2^-11 for the fp16 scale
            assert types[name] == "Q8_0"
            bound = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127 * (0.5 + 127 / 2048)
            assert (np.abs(tensors[name] - x).reshape(-1, 32) <= bound + 1e-7).all(), name
            assert not np.array_equal(tensors[name], x)


def test_vocabulary_merges_padding_and_special_tokens(tmp_path, tokenizer):
    path = export_gguf(model(), tmp_path / "model.gguf", tokenizer)
    fields, _, _ = read_back(path)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 320
    assert tokens[:3] == ["Ā", "ā", "Ă"] and tokens[32] == "Ġ" and tokens[65] == "A"  # GPT-2's printable bytes
    assert tokens[256] == "<|endoftext|>" and types[256] == gguf.TokenType.CONTROL
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)] and set(types[300:]) == {gguf.TokenType.UNUSED}
    assert types[:256] == [gguf.TokenType.NORMAL] * 256
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == len(tokenizer.merges) and all(len(merge.split(" ")) == 2 for merge in merges)


def test_rows_that_q8_0_cannot_pack_fall_back_to_f16_and_tied_embeddings_leave_output_out(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, context_length=16, d_model=48, n_layers=1, n_heads=4, tie_embeddings=True)
    _, _, types = read_back(export_gguf(TransformerLM(config), tmp_path / "m.gguf", None, "q8_0"))
    assert "output.weight" not in types
    assert types["blk.0.attn_q.weight"] == "F16"  # 48 inputs: not whole blocks of 32
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # d_ff 128 inputs


@pytest.mark.parametrize("file_type,options", [("f32", {}), ("f32", {"tie_embeddings": True}), ("q8_0", {})])
def test_transformers_loading_the_gguf_gives_the_same_logits_and_tokens(tmp_path, tokenizer, file_type, options):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it for GGUF
    m = model(**options)
    export_gguf(m, tmp_path / "model.gguf", tokenizer, file_type)
    if file_type != "f32":  # the same model with the file's dequantised weights
        _, tensors, _ = read_back(tmp_path / "model.gguf")
        names = gguf_names(m.config)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(torch.from_numpy(tensors[names[name]]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    ids = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, m(ids), rtol=1e-4, atol=1e-4)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = synthetic_text(400, seed=7) + "<|endoftext|>" + synthetic_text(100, seed=8)
    assert theirs(text)["input_ids"] == tokenizer.encode(text)


def test_bad_targets_are_clear_errors_and_a_crash_leaves_the_old_file(tmp_path, tokenizer, monkeypatch):
    m, path = model(), tmp_path / "model.gguf"
    export_gguf(m, path, tokenizer)
    before = path.read_bytes()
    with pytest.raises(ScratchLMError, match=r"model.gguf exists: give a new path, or --force"):
        export_gguf(m, path, tokenizer)
    with pytest.raises(ScratchLMError, match=r"is a directory: give the GGUF file's path"):
        export_gguf(m, tmp_path, tokenizer)
    with pytest.raises(ScratchLMError, match=r"GGUF file type: expected one of f32, f16, q8_0, q4_0, q4_1, got 'q4'"):
        export_gguf(m, path, tokenizer, "q4", force=True)
    with pytest.raises(ScratchLMError, match="only the Llama architecture"):
        export_gguf(model(norm_position="post"), path, tokenizer, force=True)
    small = ModelConfig(vocab_size=280, context_length=16, d_model=32, n_layers=1, n_heads=2)
    with pytest.raises(ScratchLMError, match="the tokenizer has 300 tokens but the model only 280 embedding rows"):
        export_gguf(TransformerLM(small), path, tokenizer, force=True)

    def crash(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(m, path, tokenizer, "f16", force=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
