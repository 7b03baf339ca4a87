"""Readers: WARC and WET files (gzipped or not, via `fastwarc`), folders of HTML, JSONL and plain text.

Each yields `Document`s. A record that cannot be read (a truncated or corrupt WARC, a JSONL line that
is not JSON, an undecodable file) is reported to `on_error(source, reason)` and skipped: one bad record
never stops the run.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from scratchlm.curate.document import Document
from scratchlm.errors import ScratchLMError

ErrorSink = Callable[[str, str], None]
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc.gz")


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "html-dir"
    if name.endswith(WARC_SUFFIXES):
        return "warc"
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if name.endswith(HTML_SUFFIXES):
        return "html"
    if name.endswith((".txt", ".txt.gz")):
        return "text"
    raise ScratchLMError(
        f"{path}: unknown input kind; expected .warc[.gz], .wet[.gz], .jsonl[.gz], .html, .txt[.gz] or a folder of HTML"
    )


def read_warc(path: Path, on_error: ErrorSink) -> Iterator[Document]:
    """HTTP responses (raw HTML, decoded later by extraction) and WET conversion records (text)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    index, truncated = 0, False
    try:
        with open(path, "rb") as stream:
            records = ArchiveIterator(
                stream, record_types=WarcRecordType.response | WarcRecordType.conversion, parse_http=True
            )
            for index, record in enumerate(records):
                url = (record.headers.get("WARC-Target-URI") or "").strip("<>") or None
                doc_id = f"{path.name}#{index}"
                try:
                    body = record.reader.read()
                except Exception as exc:  # a record cut short inside its body
                    on_error(doc_id, f"unreadable record body ({exc})")
                    continue
                if len(body) < record.content_length:
                    on_error(doc_id, f"truncated record: {len(body)} of {record.content_length} bytes")
                    truncated = True
                    continue
                if record.record_type == WarcRecordType.conversion:
                    yield Document(doc_id, body.decode("utf-8", errors="replace"), str(path), url)
                    continue
                content_type = record.http_headers.get("Content-Type", "") if record.http_headers else ""
                if record.http_headers and record.http_headers.status_code != 200:
                    continue
                if content_type and "html" not in content_type.lower():
                    continue
                yield Document(doc_id, source=str(path), url=url, raw=body, content_type=content_type)
    except Exception as exc:  # fastwarc raises plain exceptions on a damaged stream
        on_error(f"{path.name}#{index}", f"corrupt or truncated WARC ({exc}); records after it skipped")
        return
    if not truncated and path.name.endswith(".gz") and (problem := _gzip_problem(path)):
        on_error(f"{path.name}#{index + 1}", f"truncated WARC ({problem}); the records after #{index} are lost")


def _gzip_problem(path: Path) -> str | None:
    """Why a gzip file is damaged (fastwarc stops quietly at a cut member), or None."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        return str(exc)
    return None


def read_html_file(path: Path, doc_id: str) -> Document:
    return Document(doc_id, source=str(path), url=path.absolute().as_uri(), raw=path.read_bytes())


def read_jsonl(path: Path, on_error: ErrorSink) -> Iterator[Document]:
    """One JSON object per line with a "text" field (and optionally "id", "url"; the rest is kept as meta)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    on_error(where, f"not JSON ({exc.msg})")
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    on_error(where, 'expected an object with a string "text" field')
                    continue
                doc_id = str(record.pop("id", where))
                text, url = record.pop("text"), record.pop("url", None)
                yield Document(doc_id, text, str(path), url, meta=record)
    except (OSError, EOFError) as exc:
        on_error(path.name, f"unreadable ({exc})")


def read_text(path: Path, on_error: ErrorSink) -> Iterator[Document]:
    """A whole text file as one document."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:
        on_error(path.name, f"unreadable ({exc})")
        return
    yield Document(path.name, data.decode("utf-8", errors="replace"), str(path), path.absolute().as_uri())


def read_input(path: Path, on_error: ErrorSink) -> Iterator[Document]:
    """Every document of one input file (a folder of HTML is read by `html_files` in shards)."""
    kind = kind_of(path)
    if kind == "warc":
        yield from read_warc(path, on_error)
    elif kind == "jsonl":
        yield from read_jsonl(path, on_error)
    elif kind == "html":
        yield read_html_file(path, path.name)
    elif kind == "text":
        yield from read_text(path, on_error)
    else:
        raise ScratchLMError(f"{path}: a folder is read file by file (html_files)")


def html_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.lower().endswith(HTML_SUFFIXES))
