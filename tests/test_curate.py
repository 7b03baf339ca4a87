"""Curation stages against outside oracles (resiliparse, datasketch, datatrove, Python's codecs), hand-made
edge cases, and the pipeline end to end on a real crawl built offline (the Apache manual and fortunes)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("resiliparse", reason="the curation extra is not installed: pip install 'scratchlm[curate]'")

from scratchlm.curate import crawl
from scratchlm.curate.dedup import duplicated_hashes, first_occurrences, line_hashes, remove_lines, save_counts
from scratchlm.curate.extract import declared_encoding, decode_html, html_to_text
from scratchlm.curate.gopher import GopherRules, gopher_failures
from scratchlm.curate.minhash import (
    MinHasher,
    UnionFind,
    band_keys,
    clusters,
    estimated_jaccard,
    jaccard,
    shingle_hashes,
)
from scratchlm.curate.pii import EMAIL, IP, PHONE, mask_emails, mask_ips, mask_phone_numbers, mask_pii
from scratchlm.data.sources import cache_dir
from scratchlm.errors import ScratchLMError

LANGUAGES = {
    "da": "da",
    "de": "de",
    "en": "en",
    "es": "es",
    "fr": "fr",
    "ja": "ja",
    "ko": "ko",
    "pt-br": "pt",
    "ru": "ru",
    "tr": "tr",
    "zh-cn": "zh",
}


@pytest.fixture(scope="session")
def packages_root() -> Path:
    try:
        return crawl.fetch_packages()
    except (ScratchLMError, FileNotFoundError) as exc:
        pytest.skip(f"the Debian documentation packages could not be fetched: {exc}")


@pytest.fixture(scope="session")
def manual(packages_root) -> Path:
    return packages_root / crawl.MANUAL


def translated_pages(manual: Path, language: str) -> list[Path]:
    """The pages of one language that are real translations (the others are symlinks to English)."""
    return [p for p in sorted((manual / language).glob("*.html")) if not p.is_symlink()]


# --- extraction and encodings


def test_extraction_equals_resiliparse_on_real_pages(manual):
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str

    pages = translated_pages(manual, "en")[:10] + translated_pages(manual, "de")[:5]
    for page in pages:
        raw = page.read_bytes()
        text, encoding, _ = decode_html(raw)
        expected = extract_plain_text(
            bytes_to_str(raw, encoding), preserve_formatting=True, main_content=True, alt_texts=False, list_bullets=True
        )
        assert html_to_text(text) == expected
        assert len(expected) > 200


def test_korean_pages_declared_euc_kr_decode_correctly(manual):
    pages = translated_pages(manual, "ko")
    assert len(pages) >= 10
    for page in pages:
        raw = page.read_bytes()
        name, origin = declared_encoding(raw, "text/html")  # the server sends no charset: the <meta> decides
        assert (name, origin) == ("euc_kr", "meta")
        text, _, _ = decode_html(raw, "text/html")
        assert text == raw.decode("euc_kr", errors="replace")
        assert "\ufffd" not in text
        hangul = sum("\uac00" <= c <= "\ud7a3" for c in text)
        assert hangul > 100, page


def test_encoding_precedence_bom_then_http_then_meta():
    body = '<html><head><meta charset="windows-1252"></head><body>caf\u00e9</body></html>'.encode("cp1252")
    assert declared_encoding(body, None) == ("cp1252", "meta")
    assert declared_encoding(body, "text/html; charset=ISO-8859-1") == ("cp1252", "http")  # latin-1 is 1252
    assert declared_encoding(b"\xef\xbb\xbf" + body, "text/html; charset=euc-kr") == ("utf-8", "bom")
    assert declared_encoding(b"<p>no declaration</p>", "text/html") == (None, "none")
    assert declared_encoding(b"<meta charset=bogus>", "text/html; charset=nonsense") == (None, "none")
    assert decode_html(body)[0].endswith("caf\u00e9</body></html>")


# --- language identification


def test_language_id_on_the_manuals_eleven_languages(manual):
    from scratchlm.curate.langid import LanguageIdentifier

    identifier = LanguageIdentifier()
    right = total = 0
    for directory, code in LANGUAGES.items():
        pages = translated_pages(manual, directory)
        hits = sum(identifier.identify(html_to_text(decode_html(p.read_bytes())[0]))[0] == code for p in pages)
        assert pages and hits / len(pages) >= 0.7, (directory, hits, len(pages))
        right, total = right + hits, total + len(pages)
    assert right / total >= 0.9


def test_language_id_known_texts():
    from scratchlm.curate.langid import LanguageIdentifier

    identifier = LanguageIdentifier()
    language, score = identifier.identify("The quick brown fox jumps over the lazy dog.\nIt was a sunny day.")
    assert language == "en" and score > 0.8
    language, score = identifier.identify("北京是中华人民共和国的首都，也是全国的政治和文化中心。")
    assert language == "zh" and score > 0.8
    assert identifier.identify("   \n ") == ("unknown", 0.0)


def test_missing_language_model_is_a_clear_error(tmp_path):
    from scratchlm.curate.langid import LanguageIdentifier

    with pytest.raises(ScratchLMError, match="language-ID model not found"):
        LanguageIdentifier(tmp_path / "missing.ftz")


# --- PII


@pytest.mark.parametrize("text", ["write to jane.doe@example.com today", "x+tag@mail.example.co.uk", "A_B@uni.edu."])
def test_emails_masked(text):
    masked, n = mask_emails(text)
    assert n == 1 and EMAIL in masked and "@" not in masked


@pytest.mark.parametrize("text", ["user@localhost", "an @ sign", "email at example dot com", "a@b"])
def test_email_near_misses_kept(text):
    assert mask_emails(text) == (text, 0)


@pytest.mark.parametrize(
    "text", ["(555) 123-4567", "555-123-4567", "555.123.4567", "+1 555 123 4567", "1-800-555-1234", "+44 20 7946 0958"]
)
def test_phone_numbers_masked(text):
    masked, n = mask_phone_numbers(f"call {text} now")
    assert (masked, n) == (f"call {PHONE} now", 1)


@pytest.mark.parametrize(
    "text",
    ["in 1984 and 2024", "ISBN 978-3-16-148410-0", "v1.2.3", "12:30:45", "1234 5678", "2024-01-15", "3.14159265358"],
)
def test_phone_near_misses_kept(text):
    assert mask_phone_numbers(text) == (text, 0)


@pytest.mark.parametrize("text", ["192.168.0.1", "8.8.8.8", "2001:db8::ff00:42:8329", "fe80::1ff:fe23:4567:890a"])
def test_ip_addresses_masked(text):
    assert mask_ips(f"host {text} is up") == (f"host {IP} is up", 1)


@pytest.mark.parametrize(
    "text", ["999.1.1.1", "1.2.3", "1.2.3.4.5", "version 10.0.0.1.2", "a ::= b", "std::vector", "12:30:45", ":: ::"]
)
def test_ip_near_misses_kept(text):
    assert mask_ips(text) == (text, 0)


def test_mask_pii_counts_each_kind():
    text = "Mail bob@example.org, call (555) 123-4567, server 10.0.0.1."
    masked, counts = mask_pii(text)
    assert counts == {"email": 1, "phone": 1, "ip": 1}
    assert masked == f"Mail {EMAIL}, call {PHONE}, server {IP}."


# --- harmful content


def test_profanity_classifier_separates_offensive_from_benign():
    from scratchlm.curate.harmful import ProfanityClassifier, load_classifier

    scores = ProfanityClassifier().score(
        ["What a lovely afternoon for a walk in the park.", "shut up you stupid fucking idiot"]
    )
    assert scores[0] < 0.2 < 0.9 < scores[1]
    with pytest.raises(ScratchLMError, match=r"needs harmful\.path"):
        load_classifier("fasttext")


# --- Gopher rules


def words(n: int, word: str = "word") -> str:
    """n words: the word, with "the" and "and" among them (Gopher's stop-word rule)."""
    return " ".join(["the", "and"] + [word] * (n - 2))


def test_gopher_word_count_bounds():
    rules = GopherRules()
    assert gopher_failures(words(50), rules) == []
    assert gopher_failures(words(49), rules) == ["gopher_too_few_words"]
    assert gopher_failures(words(49) + " - -- ... !", rules) == ["gopher_too_few_words"]  # symbols do not count
    assert gopher_failures(words(101), GopherRules(max_words=100)) == ["gopher_too_many_words"]


def test_gopher_mean_word_length_bounds():
    assert gopher_failures(words(60, "abc")) == []
    assert gopher_failures(words(60, "ab")) == ["gopher_mean_word_length"]
    assert gopher_failures(words(60, "abcdefghij")) == []
    assert gopher_failures(words(60, "abcdefghijk")) == ["gopher_mean_word_length"]


def test_gopher_ellipsis_lines():
    lines = [words(10)] * 7 + [words(10) + "..."] * 3
    assert gopher_failures("\n".join(lines)) == []  # exactly 30%
    lines[0] += " …"
    assert gopher_failures("\n".join(lines)) == ["gopher_ellipsis_lines"]


def test_gopher_alphabetic_words():
    assert gopher_failures(words(80) + " " + " ".join(["123"] * 20)) == []  # exactly 80%
    assert gopher_failures(words(79) + " " + " ".join(["123"] * 21)) == ["gopher_alphabetic_words"]


def test_gopher_stop_words():
    spam = " ".join(["cheap", "pills", "casino", "offer"] * 20)
    assert gopher_failures(spam) == ["gopher_stop_words"]
    assert gopher_failures(spam + " the") == ["gopher_stop_words"]
    assert gopher_failures(spam + " the to") == []
    assert gopher_failures(spam, GopherRules(min_stop_words=0)) == []


def test_gopher_agrees_with_datatrove(manual):
    """The same four rules in datatrove's GopherQualityFilter (its other rules off, whitespace words):
    the same verdict on real pages and on every synthetic edge case."""
    from datatrove.data import Document as DatatroveDocument
    from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    theirs = GopherQualityFilter(max_symbol_word_ratio=None, max_bullet_lines_ratio=None, language=Whitespace("en"))
    texts = [html_to_text(decode_html(p.read_bytes())[0]) for p in sorted(manual.glob("*/*.html"))[:300]]
    texts += [
        words(49),
        words(50),
        words(60, "ab"),
        words(60, "abcdefghijk"),
        "\n".join([words(10) + "..."] * 4),
        words(79) + " " + " ".join(["123"] * 21),
        words(60) + " \u00a9 \u2014 \u2022",
        "cheap pills " * 40,
    ]
    disagree = [t[:80] for t in texts if (theirs.filter(DatatroveDocument(t, "x")) is True) != (not gopher_failures(t))]
    assert not disagree


# --- exact dedup


def test_exact_line_dedup_removes_repeated_lines_everywhere(tmp_path):
    docs = [
        "Home | About\nunique one\nshared  line",
        "Home | About\nunique two",
        "shared line\nunique three\nunique three",
    ]
    paths = []
    for i, d in enumerate(docs):  # one shard per document: the global merge joins them
        hashes, counts = line_hashes([d])
        save_counts(tmp_path / f"{i}.npy", hashes, counts)
        paths.append(tmp_path / f"{i}.npy")
    duplicated = duplicated_hashes(paths, ranges=4)
    assert len(duplicated) == 3  # "Home | About", "shared line" (spacing normalised), "unique three"
    assert remove_lines(docs[0], duplicated) == ("unique one", 2)
    assert remove_lines(docs[1], duplicated) == ("unique two", 1)
    assert remove_lines(docs[2], duplicated) == ("", 3)


def test_exact_document_dedup_keeps_the_first():
    hashes = np.array([5, 7, 5, 9, 7, 5], dtype=np.uint64)
    assert first_occurrences(hashes).tolist() == [True, True, False, True, False, False]


# --- MinHash


def _vocab_doc(rng: random.Random, n: int, vocab: list[str]) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def _edit(words_: list[str], k: int, rng: random.Random, vocab: list[str]) -> list[str]:
    out = list(words_)
    for _ in range(k):
        out[rng.randrange(len(out))] = rng.choice(vocab)
    return out


def test_minhash_estimates_agree_with_datasketch_within_the_estimator_error():
    from datasketch import MinHash

    rng, vocab, k = random.Random(0), [f"w{i}" for i in range(5000)], 256
    hasher = MinHasher(num_perm=k, ngram=5, seed=1)
    tolerance = 4 * 0.5 / np.sqrt(k)  # 4 standard deviations of the estimator at its worst (J = 0.5)
    for edits in (2, 10, 40, 100, 250):
        a = _vocab_doc(rng, 500, vocab)
        b = _edit(a, edits, rng, vocab)
        true = jaccard(shingle_hashes(" ".join(a)), shingle_hashes(" ".join(b)))
        ours = estimated_jaccard(hasher.signature(" ".join(a)), hasher.signature(" ".join(b)))
        m1, m2 = MinHash(num_perm=k, seed=2), MinHash(num_perm=k, seed=2)
        m1.update_batch([" ".join(a[i : i + 5]).encode() for i in range(len(a) - 4)])
        m2.update_batch([" ".join(b[i : i + 5]).encode() for i in range(len(b) - 4)])
        theirs = m1.jaccard(m2)
        assert abs(ours - true) < tolerance and abs(theirs - true) < tolerance
        assert abs(ours - theirs) < 2 * tolerance


def test_minhash_c_and_numpy_paths_agree():
    import scratchlm.curate.minhash as mh

    if mh._minhash is None:
        pytest.skip("the C extension scratchlm.curate._minhash is not built")
    texts = ["Ünïcode wörds, MIXED case; and   spacing!", "short", "", "a b c d e f g h 日本語 テキスト x—y"]
    hasher = MinHasher(64, 3, 0)
    c_side = [(hasher.signature(t), shingle_hashes(t, 3)) for t in texts]
    module, mh._minhash = mh._minhash, None
    try:
        for t, (sig, sh) in zip(texts, c_side, strict=True):
            assert np.array_equal(sig, hasher.signature(t)) and np.array_equal(sh, shingle_hashes(t, 3))
    finally:
        mh._minhash = module


def test_minhash_near_duplicate_recall_and_precision():
    """200 documents, 40 of them with 1-3 near-copies (a few words edited): the planted clusters are
    found (recall) and no unrelated documents are joined (precision)."""
    rng, vocab = random.Random(3), [f"w{i}" for i in range(20000)]
    docs, truth = [], []
    for i in range(160):
        docs.append(_vocab_doc(rng, 300, vocab))
        truth.append(i)
        if i < 40:
            for _ in range(rng.randint(1, 3)):
                docs.append(_edit(docs[-1] if rng.random() < 0.3 else docs[truth.index(i)], 4, rng, vocab))
                truth.append(i)
    texts = [" ".join(d) for d in docs]
    sigs = MinHasher(128, 5, 0).signatures(texts)
    found = clusters(band_keys(sigs, 16), lambda j: shingle_hashes(texts[j], 5), threshold=0.8)
    pairs = {(a, b) for a in range(len(docs)) for b in range(a + 1, len(docs))}
    same_truth = {(a, b) for a, b in pairs if truth[a] == truth[b]}
    same_found = {(a, b) for a, b in pairs if found[a] == found[b]}
    recall = len(same_truth & same_found) / len(same_truth)
    precision = len(same_truth & same_found) / max(1, len(same_found))
    assert recall >= 0.9 and precision >= 0.99, (recall, precision)


def test_union_find_roots_are_the_first_member():
    uf = UnionFind(6)
    uf.union(4, 2)
    uf.union(5, 4)
    uf.union(1, 3)
    assert [uf.find(i) for i in range(6)] == [0, 1, 2, 1, 2, 2]


# --- the quality classifier


def test_quality_classifier_separates_reference_text_from_crawl_noise(tmp_path):
    from scratchlm.curate.quality import QualityClassifier, chunks

    corpora = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"
    if not (corpora / "enwiki_excerpt.txt.gz").exists():
        pytest.skip(f"reference corpora not found in {corpora}")
    good = chunks(gzip.decompress((corpora / "enwiki_excerpt.txt.gz").read_bytes()).decode()[:600_000])
    rng = random.Random(0)
    spam = [
        "cheap",
        "best",
        "free",
        "online",
        "buy",
        "discount",
        "casino",
        "pills",
        "deal",
        "offer",
        "click",
        "now",
        "win",
    ]
    bad = [" ".join(rng.choice(spam) for _ in range(rng.randint(100, 300))) for _ in range(150)]
    bad += [("Home | About | Contact | Login\n" * 20) + f"page {i}" for i in range(150)]
    model = QualityClassifier.train(good[::2], bad[::2])
    model.save(tmp_path / "q")
    loaded = QualityClassifier.load(tmp_path / "q")
    good_scores, bad_scores = loaded.score(good[1::2]), loaded.score(bad[1::2])
    assert np.mean(good_scores > 0.5) > 0.95 and np.mean(bad_scores < 0.5) > 0.95
    assert np.allclose(loaded.score(good[:5]), model.score(good[:5]))


# --- readers and bad input


def test_wet_conversion_records_are_read_as_text(tmp_path):
    """Common Crawl's WET files: `conversion` records holding extracted text (written here by warcio)."""
    from io import BytesIO

    warcio = pytest.importorskip("warcio")
    from scratchlm.curate.readers import read_input

    path = tmp_path / "sample.warc.wet.gz"
    texts = ["Ein Haus am See.\nZweite Zeile.", "The second page, in English."]
    with path.open("wb") as f:
        writer = warcio.warcwriter.WARCWriter(f, gzip=True)
        for i, text in enumerate(texts):
            payload = BytesIO(text.encode())
            record = writer.create_warc_record(f"http://example.com/{i}", "conversion", payload=payload,
                                               warc_content_type="text/plain")  # fmt: skip
            writer.write_record(record)
    errors = []
    docs = list(read_input(path, lambda *e: errors.append(e)))
    assert [d.text for d in docs] == texts and [d.url for d in docs] == ["http://example.com/0", "http://example.com/1"]
    assert not errors


def test_truncated_and_corrupt_warcs_are_reported_not_fatal(tmp_path, crawl_warc):
    from scratchlm.curate.readers import read_warc

    data = crawl_warc.read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(data[: len(data) // 5])
    (tmp_path / "junk.warc.gz").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 8)
    errors: list[tuple[str, str]] = []
    docs = list(read_warc(tmp_path / "cut.warc.gz", lambda s, r: errors.append((s, r))))
    assert docs and len(errors) == 1 and "truncated" in errors[0][1] and errors[0][0].startswith("cut.warc.gz#")
    errors.clear()
    assert list(read_warc(tmp_path / "junk.warc.gz", lambda s, r: errors.append((s, r)))) == []
    assert len(errors) == 1 and errors[0][0].startswith("junk.warc.gz")


def test_jsonl_bad_lines_are_reported(tmp_path):
    from scratchlm.curate.readers import read_jsonl

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine", "id": "a"}\nnot json\n{"no_text": 1}\n\n{"text": "also fine"}\n')
    errors: list[tuple[str, str]] = []
    docs = list(read_jsonl(path, lambda s, r: errors.append((s, r))))
    assert [d.id for d in docs] == ["a", "docs.jsonl:5"]
    assert [s for s, _ in errors] == ["docs.jsonl:2", "docs.jsonl:3"]


# --- the pipeline end to end


@pytest.fixture(scope="session")
def crawl_dir(packages_root) -> Path:
    return crawl.build_crawl(cache_dir() / "crawl-test")


@pytest.fixture(scope="session")
def crawl_warc(crawl_dir) -> Path:
    return crawl_dir / "crawl.warc.gz"


def kept_records(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "kept").glob("*.jsonl.gz")) for line in gzip.open(p, "rt")]


def removed_records(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "removed").glob("*.jsonl.gz")) for line in gzip.open(p, "rt")]


@pytest.fixture(scope="session")
def curated(crawl_warc, tmp_path_factory) -> Path:
    from scratchlm.cli import main

    out = tmp_path_factory.mktemp("curated") / "out"
    assert main(["curate", str(crawl_warc), "--out", str(out), "--set", "shard_mb=6"]) == 0
    return out


def test_pipeline_on_the_crawl_removes_what_was_planted(curated, crawl_dir):
    planted = json.loads((crawl_dir / "manifest.json").read_text())["planted"]
    report = json.loads((curated / "report.json").read_text())
    kept, removed = kept_records(curated), removed_records(curated)
    assert report["docs_in"] == len(kept) + len(removed) > 3000
    assert report["docs_out"] == len(kept)
    by = {r["url"].rsplit("/", 1)[-1]: r for r in removed if r.get("url")}
    kept_names = {r["url"].rsplit("/", 1)[-1] for r in kept}
    assert not any(n.startswith(("spam-", "list-", "tiny-")) for n in kept_names)  # Gopher rules
    assert all(by[f"spam-{i}.html"]["removed_by"] == "gopher_stop_words" for i in range(planted["spam_pages"]))
    assert (
        sum(n.startswith("tiny-") and by[n]["removed_by"] == "gopher_too_few_words" for n in by)
        >= planted["tiny_pages"] - 1
    )
    assert all(r.get("language") == "en" for r in kept)
    assert any(r.get("language") == "ko" and r["removed_by"] == "language_not_kept" for r in removed)
    text = "\n".join(r["text"] for r in kept)
    assert "@example.com" not in text and "|||EMAIL_ADDRESS|||" in text
    assert report["stages"]["doc_dedup"]["reasons"]["exact_duplicate"] > 1000  # the symlinked translations
    assert report["stages"]["harmful"]["reasons"]["harmful"] > 0
    assert report["languages"]["ko"] > 20 and len(report["languages"]) >= 10
    assert (curated / "report.md").read_text().startswith("# Curation report")
    text_files = sorted((curated / "text").glob("*.txt"))
    assert text_files and sum(p.read_text().count("<|endoftext|>") for p in text_files) == len(kept)


def small_inputs(tmp_path: Path) -> list[str]:
    site = tmp_path / "site"
    site.mkdir()
    rng = random.Random(0)
    vocab = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "his",
        "her",
        "this",
        "which",
        "or",
        "an",
        "be",
        "are",
    ]
    vocab += [f"topic{i}" for i in range(400)]
    for i in range(30):
        body = "".join(f"<p>The state of {' '.join(rng.choice(vocab) for _ in range(40))}.</p>" for _ in range(4))
        (site / f"page{i}.html").write_text(f"<html><body><nav>Home | Docs</nav>{body}</body></html>")
    (site / "copy.html").write_text((site / "page3.html").read_text())
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(
        json.dumps({"text": "To be and " + " ".join(rng.choice(vocab) for _ in range(120)), "id": "j1"}) + "\nbroken\n"
    )
    return [str(site), str(jsonl)]


def test_job_groups_cover_the_shards_left_once_in_order_with_a_job_per_worker():
    from scratchlm.curate.run import MAX_SHARDS_PER_JOB, job_groups

    assert job_groups([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert job_groups([1, 4], 4) == [[1], [4]]
    many = list(range(3, 3 + 5 * MAX_SHARDS_PER_JOB + 1))
    groups = job_groups(many, 2)
    assert [s for group in groups for s in group] == many
    assert max(map(len, groups)) == MAX_SHARDS_PER_JOB and len(groups) == 6


def test_pipeline_resumes_shard_by_shard_and_refuses_a_changed_config(tmp_path):
    from scratchlm.cli import main

    inputs, out = small_inputs(tmp_path), tmp_path / "out"
    options = ["--out", str(out), "--set", "shard_docs=8", "--set", "harmful.enabled=false", "--workers", "2"]
    assert main(["curate", *inputs, *options]) == 0
    first = kept_records(out)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["doc_dedup"]["reasons"] == {"exact_duplicate": 1}
    assert report["errors"] == [{"source": "more.jsonl:2", "reason": "not JSON (Expecting value)"}]
    # a crash after shard 1's filter and before the rest: its outputs and everything later are gone
    work = out / "work"
    for name in [
        "clusters.npz",
        "duplicated_lines.npy",
        *[p.name for p in work.glob("write-*")],
        *[p.name for p in work.glob("count-*")],
        "filter-00002.stats.json",
    ]:
        (work / name).unlink()
    before = {p: p.stat().st_mtime_ns for p in work.glob("filter-0000[013].stats.json")}
    assert main(["curate", *inputs, *options]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished shards were not redone
    assert kept_records(out) == first
    assert main(["curate", *inputs, "--out", str(out), "--set", "gopher.min_words=5"]) == 1


def test_pipeline_quality_stage_removes_low_scores_and_keeps_the_scores(tmp_path):
    """A classifier trained to prefer "topic0-199" prose over "topic200-399" prose, in the pipeline: the
    pages written in the disliked words are removed as quality_low, every document keeps its score, and
    each score is the classifier's on the extracted text."""
    from scratchlm.cli import main
    from scratchlm.curate.quality import QualityClassifier

    rng = random.Random(1)
    liked, disliked = [f"topic{i}" for i in range(200)], [f"topic{i}" for i in range(200, 400)]

    def prose(words: list[str]) -> str:
        return " ".join(["the", "of", "and"][i % 3] + " " + rng.choice(words) for i in range(150))

    model = QualityClassifier.train([prose(liked) for _ in range(60)], [prose(disliked) for _ in range(60)])
    model.save(tmp_path / "quality")
    inputs = small_inputs(tmp_path)
    for i in range(5):
        (tmp_path / "site" / f"disliked{i}.html").write_text(f"<html><body><p>{prose(disliked)}</p></body></html>")
    sets = ["harmful.enabled=false", "quality.enabled=true", f"quality.model={tmp_path / 'quality'}"]
    sets += ["line_dedup.enabled=false", "quality.min_score=0.5"]
    out = tmp_path / "out"
    assert main(["curate", *inputs, "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    removed = {Path(r["source"]).name: r for r in removed_records(out)}
    assert all(removed[f"disliked{i}.html"]["removed_by"] == "quality_low" for i in range(5))
    low = sum(r["removed_by"] == "quality_low" for r in removed.values())
    assert json.loads((out / "report.json").read_text())["stages"]["quality"]["reasons"] == {"quality_low": low}
    kept = kept_records(out)
    assert kept and all(r["quality_score"] >= 0.5 for r in kept)
    scored = kept + [r for r in removed.values() if "quality_score" in r]
    assert np.allclose([r["quality_score"] for r in scored], model.score([r["text"] for r in scored]), atol=1e-4)


def test_bad_inputs_give_one_line(tmp_path, capsys):
    from scratchlm.cli import main

    assert main(["curate", str(tmp_path / "nothing.warc.gz"), "--out", str(tmp_path / "o")]) == 1
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("a,b\n")
    assert main(["curate", str(tmp_path / "data.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "unknown input kind" in capsys.readouterr().err
    assert main(["curate", str(tmp_path / "data.csv"), "--out", str(tmp_path / "o"), "--set", "minhash.bands=7"]) == 1
    err = capsys.readouterr().err
    assert "multiple of bands" in err and err.count("\n") == 1


def test_relative_input_paths(tmp_path, monkeypatch):
    from scratchlm.curate.readers import read_input

    small_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.txt").write_text("To be, or not to be.")
    [text] = read_input(Path("plain.txt"), lambda *_: None)
    [html] = read_input(Path("site/page0.html"), lambda *_: None)
    assert text.url == (tmp_path / "plain.txt").as_uri() and html.url == (tmp_path / "site" / "page0.html").as_uri()


def test_pipeline_through_ray(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'scratchlm[ray]')")
    from scratchlm.cli import main

    inputs = small_inputs(tmp_path)
    local, distributed = tmp_path / "local", tmp_path / "ray"
    common = ["--set", "shard_docs=8", "--set", "harmful.enabled=false"]
    assert main(["curate", *inputs, "--out", str(local), *common]) == 0
    assert main(["curate", *inputs, "--out", str(distributed), "--executor", "ray", "--workers", "2", *common]) == 0
    assert kept_records(distributed) == kept_records(local)


def test_the_shipped_pipeline_config_is_the_defaults():
    from scratchlm.curate.config import CurateConfig
    from scratchlm.train.config import load_dataclass

    path = Path(__file__).resolve().parents[1] / "configs" / "curate.toml"
    assert load_dataclass(CurateConfig, path) == CurateConfig()
