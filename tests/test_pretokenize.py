import random

import pytest
from conftest import ADVERSARIAL, synthetic_text

from scratchlm.tokenizer.fast import split
from scratchlm.tokenizer.pretokenize import GPT2_REGEX, SpecialTokenSplitter


def test_gpt2_pattern_pieces():
    assert split("Hello world, it's 42!") == ["Hello", " world", ",", " it", "'s", " 42", "!"]
    assert split("a  \n\n b") == ["a", "  \n\n", " b"]
    assert split("x   ") == ["x", "   "]


def test_special_tokens_split_longest_first():
    splitter = SpecialTokenSplitter(["<|a|>", "<|a|><|a|>"])
    assert list(splitter.split("x<|a|><|a|>y<|a|>")) == [
        ("x", False),
        ("<|a|><|a|>", True),
        ("y", False),
        ("<|a|>", True),
    ]


def _pieces(splitter: SpecialTokenSplitter, text: str) -> list[str]:
    out = []
    for segment, special in splitter.split(text):
        out.extend([segment] if special else GPT2_REGEX.findall(segment))
    return out


@pytest.mark.parametrize("specials", [[], ["<|endoftext|>"], ["<|endoftext|>", "x\ny"]])
def test_safe_cut_never_changes_pretokens(specials):
    """Pre-tokenizing the two sides of a cut gives exactly the pre-tokens of the whole (str and bytes)."""
    splitter = SpecialTokenSplitter(specials)
    rng = random.Random(1)
    texts = [*ADVERSARIAL, synthetic_text(300), "x\ny a x\ny\n b"]
    checked = 0
    for _ in range(400):
        text = "".join(rng.sample(texts, 3))
        for prefix_len in sorted(rng.sample(range(len(text) + 1), min(5, len(text) + 1))):
            prefix = text[:prefix_len]
            cut = splitter.safe_cut(prefix)
            if cut == 0:
                continue
            checked += 1
            assert _pieces(splitter, text[:cut]) + _pieces(splitter, text[cut:]) == _pieces(splitter, text)
            raw = text.encode()
            byte_cut = splitter.safe_cut(prefix.encode())
            assert byte_cut > 0
            left, right = raw[:byte_cut].decode(), raw[byte_cut:].decode()  # never inside a character
            assert _pieces(splitter, left) + _pieces(splitter, right) == _pieces(splitter, text)
    assert checked > 200
