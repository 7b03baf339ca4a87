"""The per-document stages, in pipeline order, with what each counts: extraction, size limits, language
ID, Gopher rules, harmful content, quality, PII masking. `Filters.apply(docs, stats)` runs them on one
shard; a removed document keeps the name of the stage or rule that removed it."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from scratchlm.curate.config import CurateConfig
from scratchlm.curate.document import Document
from scratchlm.curate.extract import extract
from scratchlm.curate.gopher import GopherRules, gopher_failures
from scratchlm.curate.pii import mask_pii

STAGES = ("extract", "size", "language", "gopher", "harmful", "quality", "doc_dedup", "minhash", "line_dedup")
EXAMPLE_CHARS = 300


@dataclass
class StageStats:
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    reasons: Counter = field(default_factory=Counter)
    kept_examples: list[dict] = field(default_factory=list)
    removed_examples: list[dict] = field(default_factory=list)

    def merge(self, other: dict[str, Any]) -> None:
        for name in ("docs_in", "bytes_in", "docs_out", "bytes_out"):
            setattr(self, name, getattr(self, name) + other[name])
        self.reasons.update(other["reasons"])
        self.kept_examples.extend(other["kept_examples"])
        self.removed_examples.extend(other["removed_examples"])


@dataclass
class ShardStats:
    stages: dict[str, StageStats] = field(default_factory=lambda: {s: StageStats() for s in STAGES})
    languages: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    gopher_rules: Counter = field(default_factory=Counter)  # every rule each document fails, not only the first
    errors: list[dict] = field(default_factory=list)
    examples: int = 3

    def error(self, source: str, reason: str) -> None:
        self.errors.append({"source": source, "reason": reason})

    def record(self, stage: str, doc: Document, size_in: int, removed: str | None) -> None:
        s = self.stages[stage]
        s.docs_in += 1
        s.bytes_in += size_in
        example = {"id": doc.id, "url": doc.url, "text": doc.text[:EXAMPLE_CHARS]}
        if removed:
            doc.removed_by = removed
            s.reasons[removed] += 1
            if len(s.removed_examples) < self.examples:
                s.removed_examples.append({**example, "reason": removed})
        else:
            s.docs_out += 1
            s.bytes_out += len(doc.text.encode("utf-8"))
            if len(s.kept_examples) < self.examples:
                s.kept_examples.append(example)

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": {k: {**vars(v), "reasons": dict(v.reasons)} for k, v in self.stages.items()},
            "languages": dict(self.languages),
            "pii": dict(self.pii),
            "gopher_rules": dict(self.gopher_rules),
            "errors": self.errors,
        }


def _size(doc: Document) -> int:
    return len(doc.raw) if doc.raw is not None else len(doc.text.encode("utf-8"))


class Filters:
    """The per-document stages a config enables, with their models loaded once."""

    def __init__(self, config: CurateConfig) -> None:
        self.config = config
        self.langid = self.harmful = self.quality = None
        if config.language.enabled:
            from scratchlm.curate.langid import LanguageIdentifier

            self.langid = LanguageIdentifier(config.language.model or None)
        if config.harmful.enabled:
            from scratchlm.curate.harmful import load_classifier

            h = config.harmful
            self.harmful = load_classifier(h.model, h.path or None, h.label)
        if config.quality.enabled:
            from scratchlm.curate.quality import QualityClassifier

            if not config.quality.model:
                from scratchlm.errors import ScratchLMError

                raise ScratchLMError("quality.enabled needs quality.model, a classifier from scratchlm curate-quality")
            self.quality = QualityClassifier.load(config.quality.model)
        g = asdict(config.gopher)
        g.pop("enabled")
        self.rules = GopherRules(**g)

    def _per_document(self, doc: Document, stats: ShardStats) -> bool:
        """Extraction, size, language and Gopher rules on `doc` in place; whether it is kept."""
        c = self.config
        size = _size(doc)
        try:
            extract(doc)
        except Exception as exc:  # a page resiliparse or a codec cannot handle: counted, not fatal
            stats.error(doc.id, f"extraction failed ({type(exc).__name__}: {exc})")
            doc.raw = None
            stats.record("extract", doc, size, "extract_failed")
            return False
        stats.record("extract", doc, size, None if doc.text.strip() else "extract_empty")
        if doc.removed_by:
            return False
        size = len(doc.text.encode("utf-8"))
        stats.record("size", doc, size, "size_too_long" if len(doc.text) > c.max_doc_chars else None)
        if doc.removed_by:
            return False
        if self.langid:
            language, score = self.langid.identify(doc.text)
            doc.meta["language"], doc.meta["language_score"] = language, round(score, 4)
            stats.languages[language] += 1
            wrong = bool(c.language.keep) and language not in c.language.keep
            low = score < c.language.min_score
            stats.record("language", doc, size, "language_not_kept" if wrong else "language_low_score" if low else None)
            if doc.removed_by:
                return False
        if c.gopher.enabled:
            failures = gopher_failures(doc.text, self.rules)
            if failures:
                doc.meta["gopher_failures"] = failures
                stats.gopher_rules.update(failures)
            stats.record("gopher", doc, size, failures[0] if failures else None)
        return not doc.removed_by

    def _scored(self, stage: str, docs: list[Document], scores, keep, reason: str, stats: ShardStats) -> list[Document]:
        kept = []
        for doc, score in zip(docs, scores, strict=True):
            doc.meta[f"{stage}_score"] = round(float(score), 4)
            stats.record(stage, doc, len(doc.text.encode("utf-8")), None if keep(score) else reason)
            if not doc.removed_by:
                kept.append(doc)
        return kept

    def apply(self, docs: list[Document], stats: ShardStats) -> list[Document]:
        """Every stage on a shard's documents (classifiers scored in one batch each); those kept. Each
        removed document keeps the name of what removed it in `removed_by`."""
        c = self.config
        kept = [doc for doc in docs if self._per_document(doc, stats)]
        if self.harmful:
            scores = self.harmful.score([d.text for d in kept])
            kept = self._scored("harmful", kept, scores, lambda s: s <= c.harmful.max_score, "harmful", stats)
        if self.quality:
            scores = self.quality.score([d.text for d in kept])
            kept = self._scored("quality", kept, scores, lambda s: s >= c.quality.min_score, "quality_low", stats)
        if c.pii.enabled:
            for doc in kept:
                doc.text, counts = mask_pii(doc.text)
                stats.pii.update(counts)
                if any(counts.values()):
                    doc.meta["pii"] = {k: v for k, v in counts.items() if v}
        return kept
