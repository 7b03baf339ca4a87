import json

import numpy as np
import pytest
from conftest import ADVERSARIAL, synthetic_text

import scratchlm.data.encode as encode_module
from scratchlm.data.encode import encode_files, load_tokens
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    texts = [synthetic_text(3000, seed=i) + "".join(ADVERSARIAL) for i in range(3)]
    paths = []
    for i, text in enumerate(texts):
        paths.append(root / f"doc{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    vocab, merges = train_bpe(paths, 400, ["<|endoftext|>"], workers=1)
    return root, paths, texts, Tokenizer(vocab, merges, ["<|endoftext|>"])


@pytest.mark.parametrize("workers", [1, 2])
def test_token_array_equals_encode(setup, monkeypatch, workers):
    root, paths, texts, tok = setup
    monkeypatch.setattr(encode_module, "ENCODE_CHUNK_BYTES", 2048)  # many chunks per file
    out = root / f"out{workers}.bin"
    meta = encode_files(tok, paths, out, workers=workers, progress=False)
    tokens, meta_loaded = load_tokens(out)
    eot = tok.special_ids["<|endoftext|>"]
    expected = [i for text in texts for i in [*tok.encode(text), eot]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert meta == meta_loaded and meta["tokens"] == len(expected)
    assert meta["bytes"] == sum(len(t.encode()) for t in texts) and meta["tokenizer"] == tok.fingerprint


def test_invalid_utf8_leaves_no_output(setup, tmp_path):
    _, paths, _, tok = setup
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n" * 1000 + b"\xff\xfe")
    out = tmp_path / "out.bin"
    with pytest.raises(ScratchLMError, match=r"bad\.txt: not valid UTF-8 at byte 10000"):
        encode_files(tok, [paths[0], bad], out, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == [bad]  # no partial .bin, no temp file, no sidecar


def test_uint32_for_large_vocabularies():
    assert encode_module.token_dtype(65536) == np.uint16
    assert encode_module.token_dtype(65537) == np.uint32


def test_missing_sidecar(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0\0")
    with pytest.raises(ScratchLMError, match=r"x\.json is missing"):
        load_tokens(tmp_path / "x.bin")
    (tmp_path / "x.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(ScratchLMError, match="not a token-array sidecar"):
        load_tokens(tmp_path / "x.bin")
