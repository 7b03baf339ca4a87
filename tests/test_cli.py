"""The real `scratchlm` command in a subprocess."""

import subprocess
import sys

from conftest import synthetic_text


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scratchlm.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_train_encode_stats(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"{i}.txt").write_text(synthetic_text(2000, seed=i), encoding="utf-8")
    tok = tmp_path / "tok"
    result = run("tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tok))
    assert result.returncode == 0, result.stderr
    assert "bytes/token" in result.stdout and "word" in result.stdout
    assert (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file() and (tok / "tokenizer.json").is_file()

    result = run("tokenizer", "encode", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "t.bin"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.bin").stat().st_size > 0 and (tmp_path / "t.json").is_file()

    result = run("tokenizer", "stats", "--tokenizer", str(tok), "--text", str(corpus / "0.txt"), "--top", "3")
    assert result.returncode == 0, result.stderr
    assert "longest tokens" in result.stdout


def test_errors_exit_nonzero_with_one_clear_line(tmp_path):
    result = run("tokenizer", "train", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("scratchlm: error: corpus not found")
    (tmp_path / "c.txt").write_text("some text here")
    result = run(
        "tokenizer",
        "train",
        "--corpus",
        str(tmp_path / "c.txt"),
        "--vocab-size",
        "100",
        "--out",
        str(tmp_path / "t"),
    )
    assert result.returncode == 1 and "too small" in result.stderr
    assert not (tmp_path / "t").exists()
    result = run(
        "tokenizer",
        "encode",
        str(tmp_path / "c.txt"),
        "--tokenizer",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "o.bin"),
    )
    assert result.returncode == 1 and "not a tokenizer directory" in result.stderr
    assert not (tmp_path / "o.bin").exists()
