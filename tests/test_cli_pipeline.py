"""The pipeline through the real `scratchlm` command: prepare -> train -> eval -> generate -> export."""

import json
import subprocess
import sys

import pytest
from conftest import synthetic_text


def scratchlm(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "scratchlm.cli", *args], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_prepare_train_eval_generate_export(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"doc{i}.txt").write_text(synthetic_text(3000, seed=i), encoding="utf-8")
    out = scratchlm("data", "prepare", "--corpus", str(docs), "--vocab-size", "300", "--val-fraction", "0.2",
                    "--out", "data", cwd=tmp_path).stdout  # fmt: skip
    assert "validation: 1 documents" in out or "validation: 2 documents" in out

    sets = ["model.vocab_size=300", "model.context_length=32", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "batch_size=4", "max_steps=12", "eval_every=6", "eval_tokens=256",
            "log_every=3", "checkpoint_every=6", 'out_dir="run"', 'data.train_tokens="data/train.bin"',
            'data.val_tokens="data/val.bin"', 'data.tokenizer="data/tokenizer"']  # fmt: skip
    train = scratchlm("train", *[arg for s in sets for arg in ("--set", s)], cwd=tmp_path).stdout
    assert "validation: loss" in train and "MFU" in train and "ETA" in train
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final_val = [r for r in records if "val/loss" in r][-1]
    assert final_val["step"] == 12 and (tmp_path / "run" / "loss.png").is_file()

    evaluated = scratchlm("eval", "--run", "run", cwd=tmp_path).stdout
    assert f"validation loss {final_val['val/loss']:.4f}" in evaluated and "bits/byte" in evaluated

    gen = scratchlm("generate", "--run", "run", "--prompt", "the king", "--max-new-tokens", "8", "--seed", "1",
                    cwd=tmp_path)  # fmt: skip
    assert gen.stdout.startswith("the king") and "decode" in gen.stderr and "tok/s" in gen.stderr
    gen8 = scratchlm("generate", "--run", "run", "--prompt", "the king", "--max-new-tokens", "8", "--weights", "int8",
                     cwd=tmp_path)  # fmt: skip
    assert gen8.stdout.startswith("the king") and "| int8 |" in gen8.stderr
    plain = scratchlm("generate", "--run", "run", "--prompt", "the king", "--max-new-tokens", "12",
                      "--temperature", "0", cwd=tmp_path)  # fmt: skip
    for draft in ("ngram", "run"):  # the run drafting for itself
        spec = scratchlm("generate", "--run", "run", "--prompt", "the king", "--max-new-tokens", "12",
                         "--temperature", "0", "--draft", draft, cwd=tmp_path)  # fmt: skip
        assert spec.stdout == plain.stdout and "drafts accepted" in spec.stderr

    pytest.importorskip("transformers")
    scratchlm("export", "--run", "run", "--out", "hf", cwd=tmp_path)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}

    gguf = pytest.importorskip("gguf")
    out = scratchlm("export", "--run", "run", "--format", "gguf", "--dtype", "q8_0", "--out", "m.gguf", cwd=tmp_path)
    assert "GGUF, Q8_0" in out.stdout
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["llama.block_count"].contents() == 1 and len(reader.tensors) == 3 + 9
    again = subprocess.run([sys.executable, "-m", "scratchlm.cli", "export", "--run", "run", "--format", "gguf",
                            "--out", "m.gguf"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert again.returncode == 1
    assert again.stderr.strip().endswith("m.gguf exists: give a new path, or --force to replace it")
