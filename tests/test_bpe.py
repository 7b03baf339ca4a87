import json

import pytest
from conftest import ADVERSARIAL, synthetic_text

import scratchlm.tokenizer.bpe as bpe_module
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import Tokenizer, train_bpe

SPECIALS = ["<|endoftext|>", "<|endoftext|><|endoftext|>"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    path.write_text("".join(ADVERSARIAL) * 20 + synthetic_text(8000), encoding="utf-8")
    vocab, merges = train_bpe(path, 500, SPECIALS, workers=1)
    return Tokenizer(vocab, merges, SPECIALS)


@pytest.mark.parametrize("text", [*ADVERSARIAL, "".join(ADVERSARIAL), synthetic_text(500, seed=7)])
def test_roundtrip(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_longest_special_token_wins_and_is_one_id(trained):
    ids = trained.encode("a<|endoftext|><|endoftext|><|endoftext|>b")
    double, single = trained.special_ids[SPECIALS[1]], trained.special_ids[SPECIALS[0]]
    assert ids[1:3] == [double, single]


def test_lone_surrogate_is_a_clear_error(trained):
    with pytest.raises(ScratchLMError, match=r"lone surrogate U\+D800 at character 3"):
        trained.encode("abc\ud800def")


def test_decode_replaces_malformed_utf8_and_rejects_unknown_ids(trained):
    assert trained.decode([trained._byte_ids[0xC3]]) == "\ufffd"  # a lone UTF-8 lead byte
    assert trained.decode([trained._byte_ids[0xC3], trained._byte_ids[0xA9]]) == "é"
    with pytest.raises(ScratchLMError, match="outside the vocabulary"):
        trained.decode([trained.vocab_size])
    with pytest.raises(ScratchLMError, match="outside the vocabulary"):
        trained.decode([-1])


def test_encode_iterable_is_exact_and_lazy(trained, monkeypatch):
    monkeypatch.setattr(bpe_module, "STREAM_BUFFER", 64)  # force many cuts
    text = "".join(ADVERSARIAL) * 3 + synthetic_text(400)
    lines = text.splitlines(keepends=True)
    assert list(trained.encode_iterable(lines)) == trained.encode(text)
    characters = list(text)  # a special token split across many strings
    assert list(trained.encode_iterable(characters)) == trained.encode(text)

    def endless():
        while True:
            yield "the king's crown\n"

    stream = trained.encode_iterable(endless())
    assert len([next(stream) for _ in range(1000)]) == 1000  # lazy: an endless input streams


def test_save_load_roundtrip(trained, tmp_path):
    trained.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
    assert loaded.special_ids == trained.special_ids and loaded.fingerprint == trained.fingerprint
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]


def test_huggingface_export_gives_identical_ids(trained, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    trained.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*ADVERSARIAL, "".join(ADVERSARIAL), synthetic_text(2000, seed=3)]:
        assert hf.encode(text).ids == trained.encode(text), text
        assert hf.decode(trained.encode(text), skip_special_tokens=False) == text


def test_tiktoken_encoding_gives_identical_ids(trained):
    pytest.importorskip("tiktoken")
    enc = trained.to_tiktoken()
    for text in [*ADVERSARIAL, "".join(ADVERSARIAL), synthetic_text(2000, seed=4)]:
        assert enc.encode(text, allowed_special="all") == trained.encode(text), text


def test_mismatched_or_corrupt_files(trained, tmp_path):
    trained.save(tmp_path)
    merges = (tmp_path / "merges.txt").read_text("utf-8").splitlines()
    (tmp_path / "bad_merges.txt").write_text("\n".join([*merges, "onlyonetoken"]), encoding="utf-8")
    with pytest.raises(ScratchLMError, match=r"bad_merges\.txt, line \d+: expected two tokens"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "bad_merges.txt")
    (tmp_path / "other_merges.txt").write_text("#version: 0.2\nzzzz qqqq\n", encoding="utf-8")
    with pytest.raises(ScratchLMError, match="do not belong together"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "other_merges.txt")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ScratchLMError, match=r"broken\.json: not a JSON vocabulary"):
        Tokenizer.from_files(tmp_path / "broken.json", tmp_path / "merges.txt")
    (tmp_path / "small.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(ScratchLMError, match="lacks 255 of the 256 single bytes"):
        Tokenizer.from_files(tmp_path / "small.json", tmp_path / "merges.txt")
    with pytest.raises(ScratchLMError, match="cannot read vocabulary file"):
        Tokenizer.from_files(tmp_path / "missing.json", tmp_path / "merges.txt")
