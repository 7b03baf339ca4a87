"""Exactness against tiktoken's GPT-2 encoding. Needs ../shared/data (GPT-2 files and corpora)."""

import pytest
from conftest import ADVERSARIAL, corpus_text

from scratchlm.tokenizer import fast

CORPORA = ["austen.txt.gz", "brown.txt.gz", "enwiki_excerpt.txt.gz", "fortunes.txt.gz", "kjv.txt.gz",
           "linux_doc_rst.txt.gz", "moby_dick.txt.gz", "postgresql-doc-15.txt.gz",
           "python311_doc_html.txt.gz", "sotu.txt.gz"]  # fmt: skip


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2):
    pytest.importorskip("tiktoken")
    return gpt2.to_tiktoken("gpt2")


def test_gpt2_files_load(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.special_ids == {"<|endoftext|>": 50256}
    assert len(gpt2.merges) == 50000


@pytest.mark.parametrize("text", [*ADVERSARIAL, "".join(ADVERSARIAL)])
def test_adversarial_text_matches_tiktoken(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.parametrize("name", CORPORA)
def test_every_corpus_matches_tiktoken(gpt2, tiktoken_gpt2, shared_data, name):
    text = corpus_text(shared_data, name)
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


def test_python_and_c_pretokenizers_agree_on_corpora(shared_data):
    if not fast.HAVE_C:
        pytest.skip("the C pre-tokenizer is not built")
    for name in CORPORA:
        text = corpus_text(shared_data, name)
        assert fast.split(text) == fast.split_reference(text), name
