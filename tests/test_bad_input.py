# ruff: noqa: E501  (the case tables keep one case a line)
"""The bad-input matrix: every sub-command through the real CLI in a subprocess, and the public API.

Each CLI case asserts a non-zero exit, exactly one `scratchlm: error: ...` line on stderr that names the
file / field / value and what was expected, no traceback, and no new or changed file in the workspace
beyond what the command documents. Each API case asserts `ScratchLMError` with the same kind of message.
Cases that need a read-only mount, a full disk or an immutable directory make them (root, Linux) and
skip with the reason where they cannot.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_text, tiny_config

from scratchlm.data.encode import load_tokens
from scratchlm.data.loader import BatchSampler
from scratchlm.errors import ScratchLMError
from scratchlm.infer import Sampling, generate
from scratchlm.lock import directory_lock
from scratchlm.model import ModelConfig, TransformerLM
from scratchlm.tokenizer import Tokenizer, train_bpe
from scratchlm.train.checkpoint import read_checkpoint
from scratchlm.train.config import OptimConfig, TrainConfig, load_config, to_toml
from scratchlm.train.metrics import read_metrics

# --------------------------------------------------------------------------------------- the workspace


MOUNTS: dict[str, Path] = {}  # "ro", "full", "immutable": what the workspace could make here


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory, data_dir):
    """A workspace: a corpus, a prepared data dir, a trained run, a config, and (where the machine lets
    us) a read-only mount, a nearly full disk and an immutable directory."""
    from scratchlm.train.trainer import train

    root = tmp_path_factory.mktemp("bad-input")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(synthetic_text(1500, seed=i), encoding="utf-8")
    (root / "one.txt").write_text(synthetic_text(500), encoding="utf-8")
    (root / "empty.txt").write_text("")
    (root / "emptydir").mkdir()
    (root / "latin1.txt").write_bytes("abc caf\xe9 ok".encode("latin-1"))
    (root / "a_regular_file").write_text("not a directory\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.md").write_text("mine\n")
    shutil.copytree(data_dir, root / "data")
    config = tiny_config(root / "data", root / "run", max_steps=10, checkpoint_every=10, eval_every=10)
    train(config, quiet=True)
    (root / "train.toml").write_text(to_toml(config))
    try:
        if _mount_tmpfs(root / "ro", "ro,size=1m"):
            MOUNTS["ro"] = root / "ro"
        if _mount_tmpfs(root / "full", "size=96k"):
            MOUNTS["full"] = root / "full"
        (root / "immutable").mkdir()
        if subprocess.run(["chattr", "+i", str(root / "immutable")], capture_output=True).returncode == 0:
            MOUNTS["immutable"] = root / "immutable"
        yield root
    finally:
        for name in ("ro", "full"):
            if name in MOUNTS:
                subprocess.run(["umount", str(MOUNTS.pop(name))], capture_output=True)
        if MOUNTS.pop("immutable", None):
            subprocess.run(["chattr", "-i", str(root / "immutable")], capture_output=True)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path below root: a directory's mode, a file's mode, size and modification time (a
    directory's own time changes whenever a temporary file comes and goes in it: not a change)."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        state[str(path.relative_to(root))] = (
            (st.st_mode,) if path.is_dir() else (st.st_mode, st.st_size, st.st_mtime_ns)
        )
    return state


def scratchlm(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scratchlm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------------------- case helpers


def copy_dir(ws: Path, name: str, src: str) -> Path:
    target = ws / "cases" / name
    shutil.copytree(ws / src, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def data_case(name: str, edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """Train on a copy of the data directory, damaged by `edit`."""

    def setup(ws: Path) -> list[str]:
        data = copy_dir(ws, name, "data")
        edit(data)
        return ["train", "--config", "train.toml", "--set", f'data.train_tokens="{data / "train.bin"}"',
                "--set", f'data.val_tokens="{data / "val.bin"}"', "--set", f'data.tokenizer="{data / "tokenizer"}"',
                "--set", f'out_dir="{ws / "cases" / name / "run"}"']  # fmt: skip

    return setup


def tokenizer_case(name: str, edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """Encode with a copy of the tokenizer, damaged by `edit`."""

    def setup(ws: Path) -> list[str]:
        tok = copy_dir(ws, name, "data/tokenizer")
        edit(tok)
        return ["tokenizer", "encode", "corpus", "--tokenizer", str(tok), "--out", "cases/out.bin"]

    return setup


def run_case(name: str, edit: Callable[[Path], None], command: list[str]) -> Callable[[Path], list[str]]:
    """`command` ({run} standing for the run directory) on a copy of the trained run, damaged by `edit`."""

    def setup(ws: Path) -> list[str]:
        run = copy_dir(ws, name, "run")
        edit(run)
        return [a.replace("{run}", str(run)) for a in command]

    return setup


def resume_case(name: str, edit: Callable[[Path], None], *sets: str) -> Callable[[Path], list[str]]:
    """`scratchlm train` resuming a copy of the trained run, damaged by `edit`."""
    return run_case(name, edit, [*TRAIN, "--set", 'out_dir="{run}"', *sets])


def in_mount(mount: str, make_args: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        if mount not in MOUNTS:
            pytest.skip(f"cannot make a {mount} directory here (needs root: mount / chattr)")
        return make_args(MOUNTS[mount])

    return setup


def big_corpus(ws: Path) -> Path:
    path = ws / "cases" / "big.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(synthetic_text(120_000), encoding="utf-8")
    return path


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


TRAIN = ["train", "--config", "train.toml"]
PROGRESS_BAR = re.compile(r"\[\d\d:\d\d")  # tqdm's elapsed time: a progress line that was running


@dataclass
class Case:
    id: str
    args: list[str] | Callable[[Path], list[str]]
    expect: tuple[str, ...]  # each must appear in the error line
    new_ok: tuple[str, ...] = ()  # paths (relative) the command documents it may create or change
    hold_lock: bool = False  # the test holds the lock on the run directory (`out_dir=`) meanwhile
    exit_code: int = 1
    extra: dict = field(default_factory=dict)


GEN = ["generate", "--run", "run", "--prompt", "the king"]
ACCOUNT = ["account", "--preset", "gpt2-small"]
ENCODE = ["tokenizer", "encode", "corpus", "--tokenizer", "data/tokenizer"]
SIDE = "train.json"

# fmt: off
CASES = [
    # ------------------------------------------------------------- usage
    Case("no-command", [], ("the following arguments are required",), exit_code=2),
    Case("unknown-command", ["fly"], ("invalid choice", "'fly'"), exit_code=2),
    Case("unknown-option", ["tokenizer", "train", "--vocab", "3", "--frobnicate"], ("unrecognized arguments",), exit_code=2),
    # ------------------------------------------------------------- tokenizer train
    Case("vocab-not-int", ["tokenizer", "train", "--vocab-size", "abc"], ("--vocab-size", "expected an integer", "'abc'"), exit_code=2),
    Case("vocab-zero", ["tokenizer", "train", "--vocab-size", "0"], ("--vocab-size", ">= 1", "'0'"), exit_code=2),
    Case("vocab-too-small", ["tokenizer", "train", "--corpus", "corpus", "--vocab-size", "100", "--out", "cases/t"], ("vocab_size 100 is too small", "257")),
    Case("workers-zero", ["tokenizer", "train", "--workers", "0"], ("--workers", ">= 1"), exit_code=2),
    Case("empty-special", ["tokenizer", "train", "--corpus", "corpus", "--special-token", "", "--out", "cases/t"], ("special token ''", "non-empty")),
    Case("corpus-missing", ["tokenizer", "train", "--corpus", "missing.txt", "--out", "cases/t"], ("corpus not found: missing.txt",)),
    Case("corpus-empty-dir", ["tokenizer", "train", "--corpus", "emptydir", "--out", "cases/t"], ("emptydir", "no *.txt or *.txt.gz files")),
    Case("corpus-empty-file", ["tokenizer", "train", "--corpus", "empty.txt", "--out", "cases/t"], ("the corpus is empty", "empty.txt")),
    Case("corpus-not-utf8", ["tokenizer", "train", "--corpus", "latin1.txt", "--out", "cases/t"], ("latin1.txt", "not valid UTF-8 at byte 7")),
    Case("train-out-is-file", ["tokenizer", "train", "--corpus", "corpus", "--out", "a_regular_file"], ("a_regular_file", "is not a directory")),
    Case("train-out-foreign", ["tokenizer", "train", "--corpus", "corpus", "--out", "foreign"], ("foreign", "notes.md", "did not write")),
    Case("train-out-immutable", in_mount("immutable", lambda d: ["tokenizer", "train", "--corpus", "corpus", "--out", str(d / "tok")]), ("cannot write to", "immutable", "Operation not permitted")),
    Case("train-out-readonly", in_mount("ro", lambda d: ["tokenizer", "train", "--corpus", "corpus", "--out", str(d / "tok")]), ("cannot write to", "ro", "Read-only file system")),
    Case("stats-bytes-zero", ["tokenizer", "train", "--stats-bytes", "0"], ("--stats-bytes", ">= 1"), exit_code=2),
    Case("top-negative", ["tokenizer", "train", "--top", "-1"], ("--top", ">= 0", "'-1'"), exit_code=2),
    # ------------------------------------------------------------- tokenizer encode
    Case("encode-no-tokenizer", ["tokenizer", "encode", "corpus", "--out", "x.bin"], ("--tokenizer", "required"), exit_code=2),
    Case("encode-tokenizer-missing", ["tokenizer", "encode", "corpus", "--tokenizer", "nope", "--out", "x.bin"], ("nope is not a tokenizer directory", "tokenizer.json")),
    Case("encode-mixed-tokenizer", tokenizer_case("mixed", lambda t: edit_json(t / "tokenizer.json", model={**json.loads((t / "tokenizer.json").read_text())["model"], "vocab": {"a": 0}})), ("tokenizer.json", "mixes files of two tokenizers")),
    Case("encode-vocab-not-json", tokenizer_case("badvocab", lambda t: write(t / "vocab.json", "{not json")), ("vocab.json", "not a JSON vocabulary")),
    Case("encode-merges-bad-line", tokenizer_case("badmerges", lambda t: write(t / "merges.txt", "#version: 0.2\nĠ t\nthree parts here\n")), ("merges.txt, line 3", "expected two tokens")),
    Case("encode-merges-foreign", tokenizer_case("foreignmerges", lambda t: write(t / "merges.txt", "#version: 0.2\nq z\n")), ("merge 0", "do not belong together")),
    Case("encode-hf-json-garbage", tokenizer_case("badhf", lambda t: write(t / "tokenizer.json", "[1, 2]")), ("tokenizer.json", "expected a tokenizer.json")),
    Case("encode-vocab-missing-bytes", tokenizer_case("fewbytes", lambda t: write(t / "vocab.json", json.dumps({"a": 0}))), ("lacks 255 of the 256 single bytes",)),
    Case("encode-out-is-dir", [*ENCODE, "--out", "emptydir"], ("emptydir is a directory", "token file")),
    Case("encode-out-immutable", in_mount("immutable", lambda d: [*ENCODE, "--out", str(d / "x.bin")]), ("cannot write to", "Operation not permitted")),
    Case("encode-out-readonly", in_mount("ro", lambda d: [*ENCODE, "--out", str(d / "x.bin")]), ("cannot write to", "Read-only file system")),
    Case("encode-disk-full", in_mount("full", lambda d: ["tokenizer", "encode", str(big_corpus(d.parent)), "--tokenizer", "data/tokenizer", "--out", str(d / "x.bin")]), ("x.bin", "No space left on device"), new_ok=("cases", "cases/big.txt")),
    Case("encode-input-missing", [*ENCODE[:2], "missing.txt", *ENCODE[3:], "--out", "x.bin"], ("corpus not found: missing.txt",)),
    Case("encode-input-not-utf8", [*ENCODE[:2], "latin1.txt", *ENCODE[3:], "--out", "x.bin"], ("latin1.txt", "not valid UTF-8 at byte 7")),
    Case("encode-workers-negative", [*ENCODE, "--out", "x.bin", "--workers", "-2"], ("--workers", ">= 1"), exit_code=2),
    # ------------------------------------------------------------- tokenizer stats
    Case("stats-second-file-bad", ["tokenizer", "stats", "--tokenizer", "data/tokenizer", "--text", "one.txt", "latin1.txt"], ("latin1.txt: not valid UTF-8 at byte 7",)),
    Case("stats-tokenizer-missing", ["tokenizer", "stats", "--tokenizer", "nope", "--text", "one.txt"], ("nope is not a tokenizer directory",)),
    # ------------------------------------------------------------- data prepare
    Case("prepare-val-fraction-big", ["data", "prepare", "--val-fraction", "1.5"], ("--val-fraction", "(0, 1)", "'1.5'"), exit_code=2),
    Case("prepare-val-fraction-negative", ["data", "prepare", "--val-fraction", "-1"], ("--val-fraction", "(0, 1)"), exit_code=2),
    Case("prepare-val-fraction-zero", ["data", "prepare", "--val-fraction", "0"], ("--val-fraction", "(0, 1)"), exit_code=2),
    Case("prepare-one-document", ["data", "prepare", "--corpus", "one.txt", "--vocab-size", "300", "--out", "cases/d"], ("need at least two documents", "got 1")),
    Case("prepare-vocab-too-small", ["data", "prepare", "--corpus", "corpus", "--vocab-size", "10", "--out", "cases/d"], ("vocab_size 10 is too small",)),
    Case("prepare-out-is-file", ["data", "prepare", "--corpus", "corpus", "--vocab-size", "300", "--out", "a_regular_file"], ("a_regular_file", "is not a directory")),
    Case("prepare-out-foreign", ["data", "prepare", "--corpus", "corpus", "--vocab-size", "300", "--out", "foreign"], ("foreign", "notes.md", "did not write")),
    # ------------------------------------------------------------- train: the config
    Case("config-missing", ["train", "--config", "missing.toml"], ("config file not found: missing.toml",)),
    Case("config-is-dir", ["train", "--config", "emptydir"], ("emptydir", "got a directory")),
    Case("config-bad-toml", lambda ws: write(ws / "cases" / "bad.toml", "[model\nx=") or ["train", "--config", "cases/bad.toml"], ("bad.toml", "not valid TOML")),
    Case("config-unknown-key", lambda ws: write(ws / "cases" / "k.toml", "[model]\nd_modle = 3\n") or ["train", "--config", "cases/k.toml"], ("k.toml", "unknown key model.d_modle")),
    Case("config-wrong-type", lambda ws: write(ws / "cases" / "t.toml", "batch_size = 'big'\n") or ["train", "--config", "cases/t.toml"], ("t.toml", "batch_size", "expected int", "'big'")),
    Case("config-range-in-file", lambda ws: write(ws / "cases" / "r.toml", "eval_tokens = 0\n") or ["train", "--config", "cases/r.toml"], ("r.toml: eval_tokens", ">= 1", "got 0")),
    *[
        Case(f"set-{key.replace('.', '-')}-{value}", [*TRAIN, "--set", f"{key}={value}"], (f"--set {key}={value}", key, expect, f"got {value}"))
        for key, value, expect in [
            ("batch_size", "0", ">= 1"), ("eval_every", "0", ">= 1"), ("log_every", "0", ">= 1"),
            ("checkpoint_every", "0", ">= 1"), ("model.n_heads", "0", ">= 1"), ("model.context_length", "0", ">= 1"),
            ("threads", "-1", ">= 0"), ("grad_accum_steps", "0", ">= 1"), ("max_steps", "0", ">= 1"),
            ("optim.lr", "-1", "> 0"), ("optim.lr", "nan", "finite"), ("optim.warmup_steps", "-5", ">= 0"),
            ("optim.weight_decay", "-0.1", ">= 0"), ("optim.grad_clip", "-1", ">= 0"), ("model.dropout", "1.5", "[0, 1)"),
            ("max_minutes", "-1", ">= 0"), ("model.vocab_size", "0", ">= 1"), ("model.rope_theta", "0", "> 0"),
        ]
    ],
    Case("set-heads-do-not-divide", [*TRAIN, "--set", "model.d_model=30", "--set", "model.n_heads=4"], ("--set model.", "d_model (30) must be divisible by n_heads (4)")),
    Case("set-odd-head-dim", [*TRAIN, "--set", "model.d_model=24", "--set", "model.n_heads=8"], ("RoPE needs an even head dimension", "24 / 8 = 3")),
    Case("set-kv-heads", [*TRAIN, "--set", "model.n_kv_heads=3"], ("--set model.n_kv_heads=3", "n_heads (4) must be divisible by n_kv_heads (3)")),
    Case("set-betas-length", [*TRAIN, "--set", "optim.betas=[0.9]"], ("--set optim.betas=[0.9]", "expected a list of 2 values")),
    Case("set-betas-range", [*TRAIN, "--set", "optim.betas=[0.9, 1.0]"], ("optim.betas", "[0, 1)", "(0.9, 1.0)")),
    Case("set-min-lr-above-lr", [*TRAIN, "--set", "optim.min_lr=1"], ("--set optim.min_lr=1", "must not exceed lr")),
    Case("set-no-equals", [*TRAIN, "--set", "batch_size"], ("--set 'batch_size'", "expected section.key=value")),
    Case("set-section-not-table", [*TRAIN, "--set", "model=3"], ("--set model=3", "model: expected a table")),
    Case("set-unknown-optimizer", [*TRAIN, "--set", "optim.name=lion"], ("optim.name", "expected one of", "'lion'")),
    Case("set-device-unknown", [*TRAIN, "--set", "device=tpu"], ("unknown device 'tpu'",)),
    Case("set-device-cuda", [*TRAIN, "--set", "device=cuda"], ("'cuda'", "CUDA is not available"), extra={"skip_if_cuda": True}),
    Case("nproc-zero", [*TRAIN, "--nproc", "0"], ("--nproc", ">= 1", "'0'"), exit_code=2),
    Case("nproc-without-strategy", [*TRAIN, "--nproc", "2", "--set", 'parallel.strategy="none"'], ("--nproc 2", 'parallel.strategy "none"', "train alone")),
    Case("set-bucket-mb-zero", [*TRAIN, "--set", "parallel.bucket_mb=0"], ("--set parallel.bucket_mb=0", "> 0")),
    Case("set-strategy-unknown", [*TRAIN, "--set", 'parallel.strategy="zero3"'], ("parallel.strategy", "expected one of", "'zero3'")),
    Case("speedrun-nproc-zero", ["speedrun", "--nproc", "0"], ("--nproc", ">= 1"), exit_code=2),
    Case("set-empty-out-dir", [*TRAIN, "--set", 'out_dir=""'], ("out_dir", "empty string")),
    # ------------------------------------------------------------- train: the data
    Case("data-missing", [*TRAIN, "--set", 'data.train_tokens="missing.bin"'], ("missing.json is missing", "tokenizer encode")),
    Case("sidecar-dtype-int8", data_case("int8", lambda d: edit_json(d / SIDE, dtype="int8")), (SIDE, "'dtype' is 'int8'", "expected 'uint16'")),
    Case("sidecar-dtype-uint32", data_case("uint32", lambda d: edit_json(d / SIDE, dtype="uint32")), (SIDE, "'dtype' is 'uint32'", "expected 'uint16'")),
    Case("bin-truncated", data_case("trunc", lambda d: truncate_half(d / "train.bin")), ("train.bin", "truncated", "sidecar says")),
    Case("bin-odd-bytes", data_case("odd", lambda d: write(d / "train.bin", (d / "train.bin").read_bytes() + b"\0")), ("train.bin", "bytes, but its sidecar says")),
    Case("sidecar-not-json", data_case("notjson", lambda d: write(d / SIDE, "{")), (SIDE, "not a token-array sidecar")),
    Case("sidecar-tokens-wrong-type", data_case("tokstr", lambda d: edit_json(d / SIDE, tokens="many")), (SIDE, "'tokens' is 'many'", "expected an integer")),
    Case("data-other-tokenizer", data_case("othertok", lambda d: edit_json(d / SIDE, tokenizer="0123456789abcdef")), ("train.bin was encoded with tokenizer 0123456789abcdef",)),
    Case("val-too-short", data_case("shortval", lambda d: write(d / "val.bin", b"\1\0" * 5) or edit_json(d / "val.json", tokens=5)), ("val.bin holds 5 tokens", "too few for one window", "context_length 32")),
    Case("vocab-smaller-than-tokenizer", [*TRAIN, "--set", "model.vocab_size=100"], ("model.vocab_size is 100", "300 tokens")),
    # ------------------------------------------------------------- train: the run directory
    Case("resume-other-shape", resume_case("shape", lambda r: None, "--set", "model.d_model=64"), ("step_0000010.pt", "model.d_model is 32 there, 64 here", "--fresh")),
    Case("resume-other-optimizer", resume_case("optim", lambda r: None, "--set", 'optim.name="sgd"'), ("optim.name is 'adamw' there, 'sgd' here",)),
    Case("run-locked", resume_case("locked", lambda r: None), ("is in use by pid", "wait for it"), hold_lock=True),
    Case("out-dir-is-file", [*TRAIN, "--set", 'out_dir="a_regular_file"'], ("a_regular_file exists and is not a directory",)),
    Case("latest-empty", resume_case("emptylatest", lambda r: write(r / "checkpoints" / "latest", "")), ("latest is empty", "step_0000100.pt")),
    Case("latest-dangling", resume_case("dangling", lambda r: write(r / "checkpoints" / "latest", "step_9.pt\n")), ("latest names 'step_9.pt'", "not a checkpoint")),
    Case("checkpoint-truncated", resume_case("ckpt-trunc", lambda r: truncate_half(r / "checkpoints" / "step_0000010.pt")), ("step_0000010.pt", "not a readable scratchlm checkpoint")),
    Case("checkpoint-foreign", resume_case("ckpt-foreign", lambda r: torch.save({"w": 1}, r / "checkpoints" / "step_0000010.pt")), ("step_0000010.pt", "not a scratchlm checkpoint", "'model'")),
    Case("metrics-bad-middle-line", resume_case("metrics", lambda r: write(r / "metrics.jsonl", '{"step": 1}\nnot json\n{"step": 2}\n')), ("metrics.jsonl, line 2", "expected a JSON metrics record")),
    Case("checkpoint-disk-full", in_mount("full", lambda d: [*TRAIN, "--set", f'out_dir="{d / "run"}"']), ("could not write checkpoint", "step_0000010.pt", "No space left on device", "still none"), new_ok=("full/run", "full/run/.lock", "full/run/config.toml", "full/run/metrics.jsonl", "full/run/checkpoints")),
    # ------------------------------------------------------------- eval
    Case("eval-not-a-run", ["eval", "--run", "emptydir"], ("emptydir is not a run directory", "config.toml")),
    Case("eval-no-checkpoint", run_case("nockpt", lambda r: shutil.rmtree(r / "checkpoints"), ["eval", "--run", "{run}"]), ("has no checkpoint yet",)),
    Case("eval-other-shape", ["eval", "--run", "run", "--set", "model.d_model=64"], ("model.d_model is 32 there, 64 here",)),
    Case("eval-tokens-zero", ["eval", "--run", "run", "--set", "eval_tokens=0"], ("--set eval_tokens=0", ">= 1")),
    # ------------------------------------------------------------- generate
    Case("top-p-above-one", [*GEN, "--top-p", "1.5"], ("--top-p", "[0, 1]", "'1.5'"), exit_code=2),
    Case("top-p-negative", [*GEN, "--top-p", "-0.1"], ("--top-p", "[0, 1]"), exit_code=2),
    Case("max-new-negative", [*GEN, "--max-new-tokens", "-3"], ("--max-new-tokens", ">= 1", "'-3'"), exit_code=2),
    Case("max-new-zero", [*GEN, "--max-new-tokens", "0"], ("--max-new-tokens", ">= 1"), exit_code=2),
    Case("temperature-negative", [*GEN, "--temperature", "-1"], ("--temperature", ">= 0"), exit_code=2),
    Case("temperature-nan", [*GEN, "--temperature", "nan"], ("--temperature", "'nan'"), exit_code=2),
    Case("top-k-negative", [*GEN, "--top-k", "-1"], ("--top-k", ">= 0"), exit_code=2),
    Case("seed-negative", [*GEN, "--seed", "-1"], ("--seed", ">= 0"), exit_code=2),
    Case("generate-no-run", ["generate", "--run", "nope", "--prompt", "x"], ("nope is not a run directory",)),
    Case("generate-too-long", [*GEN, "--max-new-tokens", "500"], ("exceeds the context length 32", "at most")),
    Case("generate-empty-prompt", ["generate", "--run", "run", "--prompt", ""], ("every prompt needs at least one token",)),
    Case("generate-empty-stop", [*GEN, "--stop", ""], ("stop", "non-empty strings")),
    # ------------------------------------------------------------- export
    Case("export-not-empty", ["export", "--run", "run", "--out", "foreign"], ("foreign is not empty", "notes.md", "--force")),
    Case("export-out-is-file", ["export", "--run", "run", "--out", "a_regular_file", "--force"], ("a_regular_file", "not a directory")),
    Case("export-no-run", ["export", "--run", "nope", "--out", "cases/hf"], ("nope is not a run directory",)),
    # ------------------------------------------------------------- account
    # ------------------------------------------------------------- bench
    Case("bench-config-and-size", ["bench", "--config", "train.toml", "--size", "cpu-tiny"], ("--config and --size", "give one")),
    Case("bench-unknown-size", ["bench", "--size", "huge"], ("--size", "invalid choice", "'huge'"), exit_code=2),
    Case("bench-steps-zero", ["bench", "--steps", "0"], ("--steps", ">= 1", "'0'"), exit_code=2),
    Case("bench-bad-checkpointing", ["bench", "--set", "model.activation_checkpointing=every:0"], ("activation_checkpointing", "every:K", "'every:0'")),
    Case("bench-context-negative", ["bench", "--context", "-4"], ("--context", ">= 1", "'-4'"), exit_code=2),
    Case("account-batch-negative", [*ACCOUNT, "--batch", "-1"], ("--batch", ">= 1", "'-1'"), exit_code=2),
    Case("account-mfu-zero", [*ACCOUNT, "--mfu", "0"], ("--mfu", "(0, 1]", "'0'"), exit_code=2),
    Case("account-mfu-above-one", [*ACCOUNT, "--mfu", "1.5"], ("--mfu", "(0, 1]"), exit_code=2),
    Case("account-tokens-zero", [*ACCOUNT, "--tokens", "0"], ("--tokens", "> 0"), exit_code=2),
    Case("account-memory-negative", [*ACCOUNT, "--memory-gb", "-1"], ("--memory-gb", "> 0"), exit_code=2),
    Case("account-preset-unknown", ["account", "--preset", "gpt5"], ("--preset", "invalid choice", "'gpt5'"), exit_code=2),
    Case("account-config-missing", ["account", "--config", "missing.toml"], ("config file not found",)),
    Case("account-set-bad", ["account", "--config", "train.toml", "--set", "model.n_heads=0"], ("--set model.n_heads=0", ">= 1")),
    Case("account-seq-above-context", ["account", "--config", "train.toml", "--seq", "100"], ("--seq 100", "context_length 32")),
    Case("account-set-without-config", ["account", "--set", "model.n_layers=8"], ("--set", "--config")),
    # ------------------------------------------------------------- speedrun
    Case("speedrun-minutes-negative", ["speedrun", "--minutes", "-1"], ("--minutes", "> 0", "'-1'"), exit_code=2),
    Case("speedrun-minutes-zero", ["speedrun", "--minutes", "0"], ("--minutes", "> 0"), exit_code=2),
    Case("speedrun-preset-unknown", ["speedrun", "--preset", "huge"], ("--preset", "invalid choice"), exit_code=2),
    Case("speedrun-corpus-missing", ["speedrun", "--corpus", "missing", "--out", "cases/sr"], ("corpus not found: missing",)),
    Case("speedrun-one-document", ["speedrun", "--corpus", "one.txt", "--preset", "tiny", "--out", "cases/sr"], ("need at least two documents",)),
    Case("speedrun-device-unknown", ["speedrun", "--device", "tpu", "--out", "cases/sr"], ("unknown device 'tpu'",)),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input(case: Case, ws: Path):
    if case.extra.get("skip_if_cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (ws / "cases").mkdir(exist_ok=True)
    args = case.args(ws) if callable(case.args) else list(case.args)
    with contextlib.ExitStack() as stack:
        if case.hold_lock:
            run_dir = next(a for a in args if a.startswith("out_dir=")).split("=", 1)[1].strip('"')
            stack.enter_context(directory_lock(run_dir))
        before = snapshot(ws)
        result = scratchlm(args, ws)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == case.exit_code, output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error: "), result.stderr
    for fragment in case.expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    after = snapshot(ws)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    changed -= {p for p in changed if p.endswith("/.lock") and p in before}  # the lock file says who holds it
    assert changed <= set(case.new_ok), f"changed: {sorted(changed - set(case.new_ok))}"


def test_the_matrix_is_large():
    assert len(CASES) + len(API_CASES) >= 80


# --------------------------------------------------------------------------------------- the Python API


def _tokenizer(data_dir: Path) -> Tokenizer:
    return Tokenizer.load(data_dir / "tokenizer")


def _model(data_dir: Path, tmp_path: Path) -> TransformerLM:
    return TransformerLM(tiny_config(data_dir, tmp_path).model)


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(synthetic_text(3000, seed=9), encoding="utf-8")
    return path


def _mixed_dir(data_dir: Path, tmp_path: Path) -> Path:
    """A tokenizer directory whose vocab.json and merges.txt come from another tokenizer."""
    vocab, merges = train_bpe(_text(tmp_path), 280, [])
    Tokenizer(vocab, merges).save(tmp_path / "other")
    mixed = tmp_path / "mixed"
    shutil.copytree(data_dir / "tokenizer", mixed)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tmp_path / "other" / name, mixed / name)
    return mixed


def _copied_tokens(data_dir: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    for suffix in (".bin", ".json"):
        shutil.copy(data_dir / f"val{suffix}", tmp_path / f"v{suffix}")
    damage(tmp_path / "v.bin")
    return tmp_path / "v.bin"


def _written(path: Path, data: bytes | str) -> Path:
    write(path, data)
    return path


BYTES = {i: bytes([i]) for i in range(256)}
# fmt: off
API_CASES: list[tuple[str, Callable[[Path, Path], object], str]] = [
    ("tokenizer-missing-bytes", lambda d, t: Tokenizer({0: b"a"}, []), "lacks 255 of the 256"),
    ("tokenizer-empty-special", lambda d, t: Tokenizer(BYTES, [], [""]), "special token ''"),
    ("tokenizer-special-is-a-string", lambda d, t: Tokenizer(BYTES, [], "<|eot|>"), "expected a list of strings"),
    ("tokenizer-bad-merge", lambda d, t: Tokenizer(BYTES, [(b"a", b"b")]), "merge 0"),
    ("decode-out-of-vocab", lambda d, t: _tokenizer(d).decode([99999]), "token id 99999 is outside the vocabulary (ids 0..299)"),
    ("decode-not-int", lambda d, t: _tokenizer(d).decode(["a"]), "token ids must be integers, got 'a'"),
    ("decode-tensor-out-of-vocab", lambda d, t: _tokenizer(d).decode(torch.tensor([72, 4000])), "token id 4000 is outside"),
    ("encode-lone-surrogate", lambda d, t: _tokenizer(d).encode("a\ud800b"), "lone surrogate U+D800 at character 1"),
    ("load-mixed-directory", lambda d, t: Tokenizer.load(_mixed_dir(d, t)), "mixes files of two tokenizers"),
    ("load-not-a-directory", lambda d, t: Tokenizer.load(t / "nope"), "is not a tokenizer directory"),
    ("save-over-foreign", lambda d, t: _tokenizer(d).save(_written(t / "out" / "mine.txt", "x").parent), "mine.txt"),
    ("train-bpe-missing", lambda d, t: train_bpe(t / "nope.txt", 300), "input file not found"),
    ("train-bpe-vocab-str", lambda d, t: train_bpe(_text(t), "300"), "vocab_size: expected an integer, got '300'"),
    ("train-bpe-empty-special", lambda d, t: train_bpe(_text(t), 300, [""]), "special token ''"),
    ("train-bpe-no-files", lambda d, t: train_bpe([], 300), "no input files"),
    ("trainconfig-batch-zero", lambda d, t: TrainConfig(batch_size=0), "batch_size: expected an integer >= 1, got 0"),
    ("modelconfig-heads", lambda d, t: ModelConfig(d_model=30, n_heads=4), "d_model (30) must be divisible by n_heads (4)"),
    ("optimconfig-min-lr", lambda d, t: OptimConfig(lr=1e-3, min_lr=1e-2), "min_lr (0.01) must not exceed lr (0.001)"),
    ("load-config-override", lambda d, t: load_config(None, ["log_every=0"]), "--set log_every=0: log_every"),
    ("load-tokens-missing-sidecar", lambda d, t: load_tokens(_written(t / "x.bin", b"\0\0")), "x.json is missing"),
    ("load-tokens-truncated", lambda d, t: load_tokens(_copied_tokens(d, t, truncate_half)), "truncated"),
    ("sampler-too-short", lambda d, t: BatchSampler(np.zeros(5, np.uint16), 2, 32, 0, "cpu"), "holds 5 tokens: too few for one window of 32 + 1"),
    ("sampling-top-p", lambda d, t: Sampling(top_p=2.0), "top_p: expected a finite number in [0, 1], got 2.0"),
    ("sampling-max-new", lambda d, t: Sampling(max_new_tokens=-3), "max_new_tokens: expected an integer >= 1, got -3"),
    ("sampling-stop-string", lambda d, t: Sampling(stop="\n"), "stop: expected a list of non-empty strings"),
    ("generate-prompt-string", lambda d, t: generate(_model(d, t), _tokenizer(d), "the king"), "prompts: expected a non-empty list of strings"),
    ("generate-too-long", lambda d, t: generate(_model(d, t), _tokenizer(d), ["the king"], Sampling(max_new_tokens=40)), "exceeds the context length 32"),
    ("load-checkpoint-garbage", lambda d, t: read_checkpoint(_written(t / "c.pt", b"garbage")), "not a readable scratchlm checkpoint"),
    ("read-metrics-bad-line", lambda d, t: read_metrics(_written(t / "m.jsonl", '{"step": 1}\n[1]\n{"step": 3}\n')), "m.jsonl, line 2"),
]
# fmt: on


@pytest.mark.parametrize("name, call, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(name, call, message, data_dir, tmp_path):
    with pytest.raises(ScratchLMError) as info:
        call(data_dir, tmp_path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- what stays accepted


def test_decode_accepts_numpy_and_torch_ids(data_dir):
    tok = _tokenizer(data_dir)
    ids = tok.encode("the king")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == "the king"


def test_top_p_zero_is_greedy(data_dir, tmp_path):
    from scratchlm.infer import Sampling
    from scratchlm.infer.generate import sample_next

    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 4.9]])
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        assert sample_next(logits, Sampling(top_p=0.0), generator).tolist() == [1, 0]


def test_read_metrics_drops_a_torn_last_line(tmp_path, capsys):
    from scratchlm.train.metrics import read_metrics

    write(tmp_path / "m.jsonl", '{"step": 1}\n{"step": 2}\n{"step": 3, "train/lo')
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2]
    assert "cut short by an interrupted write" in capsys.readouterr().err
