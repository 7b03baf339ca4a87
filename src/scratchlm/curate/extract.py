"""HTML to text: the page's encoding, then its main content as text with line breaks (`resiliparse`).

The encoding follows the HTML standard's order: a byte-order mark, then the charset of the HTTP
Content-Type header, then the page's own `<meta charset>` / `<meta http-equiv>` in its first 1024
bytes, and only then a guess from the bytes (uchardet). Labels map to the standard's encodings
(ISO-8859-1 means windows-1252, as browsers read it). Detection that ignores the declaration misreads
pages such as the Apache manual's Korean ones, declared EUC-KR.
"""

from __future__ import annotations

import codecs
import re

from scratchlm.curate.document import Document

_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.I)
_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([\w.:-]+)", re.I)
PRESCAN_BYTES = 1024


def _known(label: str | None) -> str | None:
    """The Python codec for an encoding label, following the HTML standard's mapping; None if unknown."""
    if not label:
        return None
    from resiliparse.parse.encoding import map_encoding_to_html5

    name = map_encoding_to_html5(label.strip().lower(), fallback_utf8=False)
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def declared_encoding(body: bytes, content_type: str | None) -> tuple[str | None, str]:
    """(codec, where it came from: "bom", "http", "meta"), or (None, "none") when nothing declares it."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name, "bom"
    if content_type and (match := _HEADER_CHARSET.search(content_type)) and (name := _known(match.group(1))):
        return name, "http"
    if (match := _META_CHARSET.search(body[:PRESCAN_BYTES])) and (name := _known(match.group(1).decode("ascii"))):
        return ("utf-8" if name.startswith("utf-16") else name), "meta"  # a byte-read meta cannot be UTF-16
    return None, "none"


def decode_html(body: bytes, content_type: str | None = None) -> tuple[str, str, str]:
    """(text, codec, where it came from: bom / http / meta / detected)."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    name, origin = declared_encoding(body, content_type)
    if name is None:
        name, origin = _known(detect_encoding(body)) or "utf-8", "detected"
    return bytes_to_str(body, name, errors="replace", strip_bom=True), name, origin


def html_to_text(html: str) -> str:
    """The main content as text, block structure kept as line breaks."""
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, preserve_formatting=True, main_content=True, alt_texts=False, list_bullets=True)


def extract(doc: Document) -> Document:
    """Decode and extract a raw page in place (a document that already has text is left as it is)."""
    if doc.raw is not None:
        html, encoding, origin = decode_html(doc.raw, doc.content_type)
        doc.text, doc.raw = html_to_text(html), None
        doc.meta["encoding"], doc.meta["encoding_from"] = encoding, origin
    return doc
