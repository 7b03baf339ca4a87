import itertools
from collections import Counter

import pytest
from conftest import synthetic_text

from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer.pretokenize import GPT2_REGEX
from scratchlm.tokenizer.trainer import train_bpe, train_bpe_from_counts


def naive_bpe(text: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[bytes, bytes]]:
    """Textbook BPE, recounting every pair after every merge: the oracle for the incremental trainer."""
    import regex

    segments = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
    counts = Counter(p for s in segments for p in GPT2_REGEX.findall(s))
    words = {tuple(bytes([b]) for b in w.encode()): c for w, c in counts.items()}
    merges = []
    n_tokens = 256 + len(special_tokens)
    seen = {bytes([b]) for b in range(256)}
    while n_tokens < vocab_size:
        pairs = Counter()
        for w, c in words.items():
            for pair in itertools.pairwise(w):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        if best[0] + best[1] not in seen:
            seen.add(best[0] + best[1])
            n_tokens += 1
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    text = synthetic_text(6000) + "<|endoftext|>" + synthetic_text(3000, seed=1)
    path.write_text(text, encoding="utf-8")
    return path, text


def test_matches_textbook_bpe(corpus):
    path, text = corpus
    vocab, merges = train_bpe(path, 350, ["<|endoftext|>"], workers=1)
    assert merges == naive_bpe(text, 350, ["<|endoftext|>"])
    assert len(vocab) == 350
    assert vocab[256] == b"<|endoftext|>"
    assert [vocab[i] for i in range(256)] == [bytes([b]) for b in range(256)]


def test_worker_count_does_not_change_the_result(corpus, monkeypatch):
    import scratchlm.tokenizer.pretokenize as pretokenize

    path, _ = corpus
    one = train_bpe(path, 350, ["<|endoftext|>"], workers=1)
    monkeypatch.setattr(pretokenize, "CHUNK_BYTES", 4096)  # many chunks, spread over processes
    monkeypatch.setattr(pretokenize.read_chunks, "__defaults__", (4096,))
    two = train_bpe(path, 350, ["<|endoftext|>"], workers=2)
    assert one == two


def test_special_tokens_are_never_merged(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("<|endoftext|>a<|endoftext|>b<|endoftext|>" * 200 + "hello hello", encoding="utf-8")
    vocab, merges = train_bpe(path, 300, ["<|endoftext|>"], workers=1)
    for token in list(vocab.values())[257:]:
        assert b"<|" not in token and b"|>" not in token
    assert (b"h", b"e") in merges or (b"l", b"l") in merges


def test_tie_break_prefers_lexicographically_greater_pair():
    _vocab, merges = train_bpe_from_counts({"ab": 5, "cd": 5, "ba": 5}, 257)
    assert merges == [(b"c", b"d")]
    _vocab, merges = train_bpe_from_counts({"ab": 5, "cd": 5, "ba": 5}, 259)
    assert merges == [(b"c", b"d"), (b"b", b"a"), (b"a", b"b")]


def test_vocab_too_small_and_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ScratchLMError, match="too small"):
        train_bpe(empty, 256, ["<|endoftext|>"])
    with pytest.raises(ScratchLMError, match="empty"):
        train_bpe(empty, 300, ["<|endoftext|>"])
    with pytest.raises(ScratchLMError, match="not found"):
        train_bpe(tmp_path / "missing.txt", 300)


def test_invalid_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\n" * 10 + b"caf\xe9\n")
    with pytest.raises(ScratchLMError, match=r"bad\.txt: not valid UTF-8 at byte 123"):
        train_bpe(bad, 300, workers=1)


def _c_merge_built():
    from scratchlm.tokenizer import trainer

    return trainer._merge is not None


@pytest.mark.skipif(not _c_merge_built(), reason="the C merge loop is not built")
def test_c_merge_loop_equals_python_reference(corpus):
    from scratchlm.tokenizer.trainer import count_pretokens

    counts = count_pretokens([corpus[0]], ["<|endoftext|>"], workers=1)
    c = train_bpe_from_counts(counts, 350, ["<|endoftext|>"], use_c=True)
    assert c == train_bpe_from_counts(counts, 350, ["<|endoftext|>"], use_c=False)


@pytest.mark.skipif(not _c_merge_built(), reason="the C merge loop is not built")
@pytest.mark.parametrize("name", ["moby_dick.txt.gz", "python311_doc_html.txt.gz"])
def test_c_merge_loop_equals_python_reference_on_real_text(shared_data, name):
    from conftest import corpus_text

    from scratchlm.tokenizer import fast

    counts = Counter()
    fast.count_pretokens(corpus_text(shared_data, name)[:1_500_000], counts)
    c = train_bpe_from_counts(counts, 3000, ["<|endoftext|>"], use_c=True)
    assert c == train_bpe_from_counts(counts, 3000, ["<|endoftext|>"], use_c=False)
