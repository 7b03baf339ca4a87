from conftest import ADVERSARIAL

from scratchlm.tokenizer.simple import ByteTokenizer, CharTokenizer, WordTokenizer, compression_ratio


def test_baselines_roundtrip_and_compression():
    text = "".join(ADVERSARIAL)
    for tok in (ByteTokenizer(), CharTokenizer(text), WordTokenizer(text)):
        assert tok.decode(tok.encode(text)) == text
    assert compression_ratio("héllo", len(ByteTokenizer().encode("héllo"))) == 1.0
    assert compression_ratio("héllo", len(CharTokenizer("héllo").encode("héllo"))) == 6 / 5
    assert compression_ratio("to be or not", len(WordTokenizer("to be or not").encode("to be or not"))) == 12 / 4


def test_unknowns():
    assert CharTokenizer("ab").encode("abc") == [1, 2, 0]
    word = WordTokenizer("the king")
    assert word.encode("the queen") == [word.stoi["the"], 0]
