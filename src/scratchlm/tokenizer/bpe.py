"""The BPE `Tokenizer`: encode, decode, lazy streaming encode, save and load.

Encoding a text: split off special tokens, pre-tokenize the rest with the GPT-2 pattern, then run
BPE on each pre-token (cached: natural text repeats its words). BPE on one pre-token starts from its
UTF-8 bytes and repeatedly merges the adjacent pair whose merge was learned earliest
(`fast.bpe_reference`, or the same loop in C).

Pre-tokenizers: "gpt2" (the GPT-2 pattern alone, what `train_bpe` learns with) and "digits" (every
number character its own piece first, then the GPT-2 pattern on the rest: SmolLM2's and StarCoder's
tokenizers, `Digits(individual_digits=True)` in `tokenizers`, "smollm" in llama.cpp).

Beside the vocabulary a tokenizer knows its end token (what ends a generation: `<|endoftext|>` for
scratchlm's own, `<|im_end|>` for a chat model) and optionally a chat template (Jinja, as in
`transformers`), both kept in `tokenizer_config.json` the way `transformers` keeps them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex

from scratchlm.atomic import atomic_directory, atomic_write_text
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import fast, formats
from scratchlm.tokenizer.pretokenize import SpecialTokenSplitter

CACHE_LIMIT = 1 << 20  # distinct pre-tokens remembered before the cache is cleared
STREAM_BUFFER = 1 << 16  # characters gathered by encode_iterable before it looks for a cut
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")  # what `save` writes
PRETOKENIZERS = ("gpt2", "digits")
DEFAULT_END = "<|endoftext|>"
_NUMBER = regex.compile(r"(\p{N})")  # what `tokenizers`' Digits splits off (Rust's char::is_numeric)


class _PieceCache(dict):
    """pre-token -> token ids; a miss runs BPE. Looked up with `dict.__getitem__` at C speed."""

    def __init__(self, bpe) -> None:
        super().__init__()
        self._bpe = bpe

    def __missing__(self, piece: str) -> list[int]:
        if len(self) >= CACHE_LIMIT:
            self.clear()
        ids = self[piece] = self._bpe(piece)
        return ids


def _raise_template_error(message: str):
    import jinja2

    raise jinja2.TemplateError(message)


class Tokenizer:
    """Byte-level BPE tokenizer.

    vocab: id -> bytes (must hold all 256 single bytes); merges: in rank order; special_tokens: strings
    that are never split (added to the vocabulary if missing); pretokenizer: "gpt2" or "digits";
    end_token: the special token that ends a generation (default `<|endoftext|>` when it is special);
    chat_template: a Jinja template over `messages` (as `transformers` applies it), or None.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
        pretokenizer: str = "gpt2",
        end_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        if pretokenizer not in PRETOKENIZERS:
            raise ScratchLMError(f"pretokenizer: expected one of {', '.join(PRETOKENIZERS)}, got {pretokenizer!r}")
        self.pretokenizer = pretokenizer
        self.chat_template = chat_template
        self.vocab = dict(vocab)
        self.merges = list(merges)
        check_special_tokens(special_tokens or [])
        self.special_tokens = list(dict.fromkeys(special_tokens or []))
        self._id_of: dict[bytes, int] = {}
        for token_id in sorted(self.vocab):  # on duplicate byte strings the lowest id wins
            self._id_of.setdefault(self.vocab[token_id], token_id)
        # Pretrained vocabularies may leave out bytes their data never had (SmolLM2 lacks 21 control and
        # non-UTF-8 bytes): such bytes are dropped from the input, as `tokenizers` and llama.cpp drop them.
        # A vocabulary without every printable ASCII byte is not a byte-level one at all.
        missing = [b for b in range(256) if bytes([b]) not in self._id_of]
        if any(0x20 <= b < 0x7F for b in missing):
            raise ScratchLMError(
                f"the vocabulary lacks {len(missing)} of the 256 single bytes (first: {missing[0]}): "
                "a byte-level BPE vocabulary must hold every byte (at least every printable ASCII one)"
            )
        self.special_ids: dict[str, int] = {}
        for token in self.special_tokens:
            token_id = self._id_of.get(token.encode())
            if token_id is None:
                token_id = max(self.vocab) + 1
                self.vocab[token_id] = token.encode()
                self._id_of[token.encode()] = token_id
            self.special_ids[token] = token_id
        if end_token is None and DEFAULT_END in self.special_ids:
            end_token = DEFAULT_END
        if end_token is not None and end_token not in self.special_ids:
            raise ScratchLMError(f"end token {end_token!r}: expected one of the special tokens, not an ordinary string")
        self.end_token = end_token
        self._byte_ids = [self._id_of.get(bytes([b])) for b in range(256)]  # None: a byte that is dropped
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            ids = (self._id_of.get(a), self._id_of.get(b), self._id_of.get(a + b))
            if None in ids:
                raise ScratchLMError(
                    f"merge {rank} ({a!r} + {b!r}) uses or makes a token that is not in the vocabulary: "
                    "the vocab and merges files do not belong together"
                )
            self._ranks.setdefault((ids[0], ids[1]), (rank, ids[2]))
        self.splitter = SpecialTokenSplitter(self.special_tokens)
        bpe_function = fast.bpe_function_reference if missing else fast.bpe_function  # C wants every byte
        self._cache = _PieceCache(bpe_function(self._ranks, self._byte_ids))

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        special_tokens: Sequence[str] | None = None,
    ) -> Tokenizer:
        """Load GPT-2 format files (`vocab.json`, `merges.txt`)."""
        specials = list(special_tokens or [])
        return cls(
            formats.read_vocab_json(Path(vocab_path), specials),
            formats.read_merges_txt(Path(merges_path)),
            specials,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer directory written by `save` (special tokens come from `tokenizer.json`),
        checking that its three files describe one tokenizer."""
        directory = Path(directory)
        hf_path = directory / "tokenizer.json"
        if not hf_path.is_file():
            raise ScratchLMError(f"{directory} is not a tokenizer directory: {hf_path.name} is missing")
        try:
            hf = json.loads(hf_path.read_text("utf-8"))
            specials = [t["content"] for t in hf["added_tokens"]]
            hf_model = hf["model"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ScratchLMError(
                f"{hf_path}: expected a tokenizer.json with 'added_tokens' and 'model' ({exc})"
            ) from None
        extras = formats.read_tokenizer_config(directory / "tokenizer_config.json")
        tokenizer = cls(
            formats.read_vocab_json(directory / "vocab.json", specials),
            formats.read_merges_txt(directory / "merges.txt"),
            specials,
            formats.pretokenizer_of(hf, hf_path),
            extras.get("eos_token"),
            extras.get("chat_template"),
        )
        tokenizer._check_matches(hf_model, hf_path)
        return tokenizer

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Tokenizer:
        """A byte-level BPE `tokenizer.json` of `tokenizers` (what Hugging Face model directories hold),
        with the end token and chat template of a `tokenizer_config.json` beside it if given."""
        path = Path(path)
        vocab, merges, specials, pretokenizer = formats.read_tokenizer_json(path)
        extras = formats.read_tokenizer_config(Path(config_path)) if config_path else {}
        return cls(vocab, merges, specials, pretokenizer, extras.get("eos_token"), extras.get("chat_template"))

    def _check_matches(self, hf_model: dict, hf_path: Path) -> None:
        """Raise unless a tokenizer.json's vocabulary and merges are this tokenizer's (a directory whose
        files come from two tokenizers must not load)."""
        expected = formats.huggingface_json(self.vocab, self.merges, self.special_ids, self.pretokenizer)["model"]
        merges = [m.split(" ") if isinstance(m, str) else m for m in hf_model.get("merges") or []]
        if hf_model.get("vocab") != expected["vocab"]:
            what = f"its vocabulary ({len(hf_model.get('vocab') or {}):,} tokens) differs from vocab.json's"
        elif merges != expected["merges"]:
            what = f"its merges ({len(merges):,}) differ from merges.txt's ({len(expected['merges']):,})"
        else:
            return
        raise ScratchLMError(f"{hf_path}: {what}: the directory mixes files of two tokenizers; train or save it again")

    def save(self, directory: str | os.PathLike) -> None:
        """Write `vocab.json`, `merges.txt` (GPT-2 format) and a Hugging Face `tokenizer.json`, as a
        unit: into a temporary directory renamed into place, so a crash never mixes two tokenizers."""
        with atomic_directory(directory, TOKENIZER_FILES) as tmp:
            formats.write_vocab_json(tmp / "vocab.json", self.vocab, self.special_tokens)
            formats.write_merges_txt(tmp / "merges.txt", self.merges)
            hf = formats.huggingface_json(self.vocab, self.merges, self.special_ids, self.pretokenizer)
            atomic_write_text(tmp / "tokenizer.json", json.dumps(hf, ensure_ascii=False) + "\n")
            extras = formats.tokenizer_config(self.end_token, self.chat_template)
            atomic_write_text(tmp / "tokenizer_config.json", json.dumps(extras, indent=1, ensure_ascii=False) + "\n")

    def to_tiktoken(self, name: str = "scratchlm"):
        """A `tiktoken.Encoding` that gives the same ids (special tokens allowed via `allowed_special`)."""
        if self.pretokenizer != "gpt2":
            raise ScratchLMError(f"tiktoken has the GPT-2 pattern only, and this tokenizer's is {self.pretokenizer!r}")
        return formats.tiktoken_encoding(name, self.vocab, self.merges, self.special_ids)

    # ----------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    @property
    def end_id(self) -> int | None:
        """The id of the end token (None for a tokenizer without one)."""
        return None if self.end_token is None else self.special_ids[self.end_token]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{"role", "content"}, ...]) under this tokenizer's chat template,
        rendered as `transformers` renders it (Jinja2, sandboxed)."""
        if self.chat_template is None:
            raise ScratchLMError("this tokenizer has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_template_error  # as transformers gives templates
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   eos_token=self.end_token)  # fmt: skip
        except jinja2.TemplateError as exc:
            raise ScratchLMError(f"the chat template refused the messages ({exc})") from None

    @property
    def fingerprint(self) -> str:
        """A short hash of vocab, merges and special tokens: what identifies this tokenizer."""
        h = hashlib.sha256()
        for token_id in sorted(self.vocab):
            h.update(
                token_id.to_bytes(4, "little") + len(self.vocab[token_id]).to_bytes(2, "little") + self.vocab[token_id]
            )
        for a, b in self.merges:
            h.update(len(a).to_bytes(2, "little") + a + len(b).to_bytes(2, "little") + b)
        h.update("\0".join(self.special_tokens).encode())
        if self.pretokenizer != "gpt2":  # (so that fingerprints made before pre-tokenizers were a choice hold)
            h.update(b"\0pretokenizer=" + self.pretokenizer.encode())
        return h.hexdigest()[:16]

    # ----------------------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special tokens in the text become their ids."""
        ids: list[int] = []
        try:
            for segment, is_special in self.splitter.split(text):
                if is_special:
                    ids.append(self.special_ids[segment])
                elif self.pretokenizer == "digits":
                    for part in _NUMBER.split(segment):
                        if part:
                            fast.encode_pieces(part, self._cache, ids)
                else:
                    fast.encode_pieces(segment, self._cache, ids)
        except UnicodeEncodeError as exc:
            raise _surrogate_error(text) from exc
        return ids

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open file): yields exactly `encode("".join(...))`.

        Holds at most a buffer of about `STREAM_BUFFER` characters plus the current line in memory.
        """
        parts: list[str] = []
        size = 0
        for text in iterable:
            parts.append(text)
            size += len(text)
            if size < STREAM_BUFFER:
                continue
            buffer = "".join(parts)
            cut = self.splitter.safe_cut(buffer)
            if cut:
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
            parts, size = [buffer], len(buffer)
        buffer = "".join(parts)
        if buffer:
            yield from self.encode(buffer)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """ids: a list of ints, or a 1-D numpy array or torch tensor of integers."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy / torch: plain ints
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in self.vocab)
            if isinstance(bad, int):
                raise ScratchLMError(
                    f"token id {bad} is outside the vocabulary (ids 0..{self.vocab_size - 1})"
                ) from None
            raise ScratchLMError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})") from None


def check_special_tokens(tokens: Sequence[str]) -> None:
    """Special tokens are a list of non-empty strings (an empty one would match between every two bytes)."""
    if isinstance(tokens, str | bytes):
        raise ScratchLMError(
            f"special tokens: expected a list of strings, got the single {type(tokens).__name__} {tokens!r}"
        )
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise ScratchLMError(f"special token {token!r}: expected a non-empty string")


def _surrogate_error(text: str) -> ScratchLMError:
    position = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)
    return ScratchLMError(
        f"the text holds a lone surrogate U+{ord(text[position]):04X} at character {position}, "
        "which has no UTF-8 form and cannot be encoded"
    )
