"""Data curation: raw crawls (WARC / WET / HTML) to training text.

readers (WARC, WET, HTML folders, JSONL, text) -> extract (encoding, resiliparse) -> langid (lid.176.ftz)
-> gopher (quality rules) -> harmful (profanity / fastText) -> quality (a trained classifier) -> pii
(masking) -> dedup (exact documents and lines) and minhash (near duplicates); `pipeline` runs them
sharded and resumable through the executor, `report` says what each removed, `crawl` builds a real
crawl offline. Needs the extra: pip install "scratchlm[curate]".
"""
