"""A document as it moves through curation: its text (or, before extraction, its raw bytes), where it
came from, and what each stage recorded about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """id: unique within the crawl (`<input file>#<record>`); source: the file it was read from;
    url: the page's address when it has one; raw: undecoded HTML (None once text is set);
    content_type: the HTTP Content-Type header, for the declared charset; meta: what stages recorded
    (language, scores, counts); removed_by: the stage or rule that removed it, None while kept."""

    id: str
    text: str = ""
    source: str = ""
    url: str | None = None
    raw: bytes | None = None
    content_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    removed_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        record = {"id": self.id, "text": self.text, "source": self.source, "url": self.url, **self.meta}
        if self.removed_by:
            record["removed_by"] = self.removed_by
        return record
