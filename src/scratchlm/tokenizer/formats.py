"""Tokenizer files: GPT-2 `vocab.json` + `merges.txt`, Hugging Face `tokenizer.json`, tiktoken.

GPT-2 stores byte strings as printable unicode strings: each of the 256 byte values maps to one
character (printable bytes to themselves, the rest to U+0100 onwards), so a space is `Ġ`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from scratchlm.atomic import atomic_write_text
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte value to a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_string(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def string_to_token(text: str, where: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError as exc:
        raise ScratchLMError(
            f"{where}: {text!r} is not a GPT-2 byte-level token (character {exc.args[0]!r} maps to no byte)"
        ) from None


def read_vocab_json(path: Path, special_tokens: Sequence[str]) -> dict[int, bytes]:
    """id -> bytes from a GPT-2 `vocab.json` (special tokens are stored as plain strings)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScratchLMError(f"cannot read vocabulary file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScratchLMError(f"{path}: not a JSON vocabulary ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, int) and v >= 0 for v in raw.values()):
        raise ScratchLMError(f"{path}: expected a JSON object mapping token strings to non-negative ids")
    specials = set(special_tokens)
    vocab: dict[int, bytes] = {}
    for text, token_id in raw.items():
        if token_id in vocab:
            raise ScratchLMError(f"{path}: id {token_id} is given to two tokens")
        vocab[token_id] = text.encode() if text in specials else string_to_token(text, f"{path}: token {token_id}")
    return vocab


def read_merges_txt(path: Path) -> list[tuple[bytes, bytes]]:
    """Merges in rank order from a GPT-2 `merges.txt` (an optional `#version` line is skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise ScratchLMError(f"cannot read merges file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScratchLMError(f"{path}: not UTF-8 text ({exc})") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.rstrip("\r").split(" ")
        if len(parts) != 2 or not all(parts):
            raise ScratchLMError(f"{path}, line {number}: expected two tokens separated by one space, got {line!r}")
        where = f"{path}, line {number}"
        merges.append((string_to_token(parts[0], where), string_to_token(parts[1], where)))
    return merges


def write_vocab_json(path: Path, vocab: dict[int, bytes], special_tokens: Sequence[str]) -> None:
    specials = {s.encode() for s in special_tokens}
    special_ids = {i for i, b in vocab.items() if b in specials}
    entries = {(vocab[i].decode() if i in special_ids else token_to_string(vocab[i])): i for i in sorted(vocab)}
    atomic_write_text(path, json.dumps(entries, ensure_ascii=False, indent=1) + "\n")


def write_merges_txt(path: Path, merges: Sequence[tuple[bytes, bytes]]) -> None:
    lines = ["#version: 0.2", *(f"{token_to_string(a)} {token_to_string(b)}" for a, b in merges)]
    atomic_write_text(path, "\n".join(lines) + "\n")


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRETOKENIZER_JSON = {
    "gpt2": _BYTE_LEVEL,
    "digits": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def pretokenizer_of(hf: dict, where: Path) -> str:
    """Which of our pre-tokenizers a `tokenizer.json` describes (its `pre_tokenizer` and `normalizer`);
    anything else is refused rather than encoded differently."""

    def same(ours: dict, theirs) -> bool:
        if not isinstance(theirs, dict) or theirs.get("type") != ours["type"]:
            return False
        if ours["type"] == "Sequence":
            parts = theirs.get("pretokenizers") or []
            return len(parts) == len(ours["pretokenizers"]) and all(map(same, ours["pretokenizers"], parts))
        return all(theirs.get(k, v) == v for k, v in ours.items() if k != "trim_offsets")

    if hf.get("normalizer") is not None:
        raise ScratchLMError(f"{where}: a normalizer ({hf['normalizer'].get('type')}) is not supported: expected none")
    for name, ours in PRETOKENIZER_JSON.items():
        if same(ours, hf.get("pre_tokenizer")):
            return name
    found = json.dumps(hf.get("pre_tokenizer"))[:200]
    raise ScratchLMError(
        f"{where}: pre_tokenizer {found} is not supported: expected GPT-2's ByteLevel, optionally after "
        "Digits(individual_digits=true)"
    )


def read_tokenizer_json(path: Path) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str], str]:
    """(vocab, merges, special tokens, pre-tokenizer) of a byte-level BPE `tokenizer.json` of `tokenizers`."""
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
        model, added = hf["model"], hf.get("added_tokens") or []
        raw_vocab, raw_merges = model["vocab"], model["merges"]
        specials = {t["content"]: t["id"] for t in added}
    except OSError as exc:
        raise ScratchLMError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ScratchLMError(
            f"{path}: expected a tokenizer.json with 'model.vocab' and 'model.merges' ({exc})"
        ) from None
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges"):
        raise ScratchLMError(
            f"{path}: model type {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}, ignore_merges="
            f"{model.get('ignore_merges')}): expected a byte-level BPE without byte fallback or ignore_merges"
        )
    pretokenizer = pretokenizer_of(hf, path)
    vocab: dict[int, bytes] = {}
    for text, token_id in raw_vocab.items():
        vocab[token_id] = text.encode() if text in specials else string_to_token(text, f"{path}: token {token_id}")
    for text, token_id in specials.items():
        vocab[token_id] = text.encode()
    merges = []
    for rank, merge in enumerate(raw_merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if len(parts) != 2:
            raise ScratchLMError(f"{path}: merge {rank} is {merge!r}: expected two tokens")
        merges.append(tuple(string_to_token(part, f"{path}: merge {rank}") for part in parts))
    return vocab, merges, list(specials), pretokenizer


def tokenizer_config(end_token: str | None, chat_template: str | None) -> dict:
    """The `tokenizer_config.json` beside a tokenizer: its end token and chat template, under the keys
    `transformers` reads."""
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if end_token is not None:
        config["eos_token"] = end_token
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def read_tokenizer_config(path: Path) -> dict:
    """{"eos_token", "chat_template"} from a `tokenizer_config.json` (empty when there is none)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScratchLMError(f"{path}: not a readable JSON object ({exc})") from None
    out = {}
    for key in ("eos_token", "chat_template"):
        value = raw.get(key) if isinstance(raw, dict) else None
        if isinstance(value, dict):  # transformers also writes {"content": ...} token objects
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise ScratchLMError(f"{path}: {key} is {value!r}: expected a string")
        if value is not None:
            out[key] = value
    return out


def huggingface_json(
    vocab: dict[int, bytes],
    merges: Sequence[tuple[bytes, bytes]],
    special_ids: dict[str, int],
    pretokenizer: str = "gpt2",
) -> dict:
    """A `tokenizer.json` that `tokenizers.Tokenizer.from_file` loads and that gives identical ids."""
    specials_by_id = {i: s for s, i in special_ids.items()}
    model_vocab = {specials_by_id.get(i) or token_to_string(vocab[i]): i for i in sorted(vocab)}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for s, i in sorted(special_ids.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": PRETOKENIZER_JSON[pretokenizer],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": model_vocab,
            "merges": [[token_to_string(a), token_to_string(b)] for a, b in merges],
        },
    }


def tiktoken_encoding(
    name: str, vocab: dict[int, bytes], merges: Sequence[tuple[bytes, bytes]], special_ids: dict[str, int]
):
    """A `tiktoken.Encoding` with identical ids.

    tiktoken merges by the rank of the merged byte string, so this needs the ids of merge results
    to rise with merge order (true for GPT-2 and for every vocabulary `train_bpe` makes).
    """
    import tiktoken

    id_of = {b: i for i, b in vocab.items() if i not in special_ids.values()}
    previous = -1
    for rank, (a, b) in enumerate(merges):
        token_id = id_of.get(a + b, -1)
        if token_id <= previous:
            raise ScratchLMError(
                f"merge {rank} ({a!r} + {b!r}) does not produce a token with a higher id than the merge before "
                "it: tiktoken cannot express this merge order"
            )
        previous = token_id
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=id_of, special_tokens=dict(special_ids))
