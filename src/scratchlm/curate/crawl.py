"""Build a real web crawl offline: HTML documentation from Debian packages, plus noisier pages made
from the `fortunes` collections, served from a loopback HTTP server and recorded by `wget --warc-file`.

    python -m scratchlm.curate.crawl --out data/crawl          # -> data/crawl/crawl.warc.gz + manifest.json

The Apache manual (`apache2-doc`) is the core: 11 languages, the Korean pages declared EUC-KR in their
`<meta>` only (the server sends no charset), many pages duplicated across languages as symlinks to the
English one, and navigation boilerplate on every page. The noisy site adds what a crawl has and
documentation lacks, each in a known amount recorded in `manifest.json`: fortune pages (some of them
offensive), pages with e-mail addresses, phone numbers and IP addresses, near-duplicate copies of
manual pages, keyword-spam and ellipsis-list pages, and near-empty pages.

The .deb files are fetched with `apt-get download` into the cache (`$SCRATCHLM_CACHE/debs`) and
unpacked there with `dpkg-deb -x`; nothing is installed and nothing downloaded is committed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import html
import json
import random
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from scratchlm.atomic import atomic_directory
from scratchlm.data.sources import cache_dir
from scratchlm.errors import ScratchLMError

PACKAGES = ("apache2-doc", "fortunes", "fortunes-min")
MANUAL = "usr/share/doc/apache2-doc/manual"
FORTUNES = "usr/share/games/fortunes"
OFFENSIVE = ("drugs", "ethnic", "men-women", "sex")  # the collections whose fortunes are often crude


def fetch_packages(packages: tuple[str, ...] = PACKAGES, cache: Path | None = None) -> Path:
    """Download and unpack the packages once; the root they are unpacked under."""
    root = (cache or cache_dir()) / "debs"
    unpacked = root / "root"
    for package in packages:
        marker = root / f"{package}.unpacked"
        if marker.exists():
            continue
        root.mkdir(parents=True, exist_ok=True)
        before = set(root.glob("*.deb"))
        result = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
        debs = sorted(set(root.glob(f"{package}_*.deb")) - before) or sorted(root.glob(f"{package}_*.deb"))
        if result.returncode != 0 or not debs:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no .deb was downloaded"]
            raise ScratchLMError(f"could not fetch the Debian package {package} with apt-get download: {reason[0]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
        marker.touch()
    return unpacked


def _page(title: str, paragraphs: list[str]) -> str:
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    nav = '<div id="nav"><a href="/">Home</a> | <a href="/noisy/">Pages</a> | <a href="/manual/">Manual</a></div>'
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f"<body>{nav}<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def read_fortunes(directory: Path, name: str) -> list[str]:
    path = directory / name
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    return [f.strip() for f in text.split("\n%\n") if f.strip()]


def _pii_paragraph(rng: random.Random) -> tuple[str, dict[str, int]]:
    user = rng.choice(["alice", "bob.smith", "j_doe", "maria+news", "webmaster"])
    email = f"{user}{rng.randint(1, 99)}@{rng.choice(['example.com', 'mail.example.org', 'uni.edu'])}"
    phone = rng.choice(["(555) {a}-{b}", "555-{a}-{b}", "+1 555 {a} {b}", "555.{a}.{b}"]).format(
        a=rng.randint(100, 999), b=rng.randint(1000, 9999)
    )
    ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
    text = (
        f"For questions about the schedule write to {email} or call {phone} during office hours. "
        f"The staging server answers at {ip}; please do not share this address outside the team."
    )
    return text, {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "IP_ADDRESS": 1}


def _near_duplicate(text: str, rng: random.Random, edits: int = 3) -> str:
    words = text.split()
    for _ in range(min(edits, len(words))):
        words[rng.randrange(len(words))] = rng.choice(["indeed", "also", "new", "updated"])
    return " ".join(words)


def build_noisy_site(site: Path, packages_root: Path, seed: int = 0) -> dict:
    """Write the noisy pages under `site/noisy/`; what was planted, by kind."""
    rng = random.Random(seed)
    out = site / "noisy"
    out.mkdir(parents=True)
    fortunes_dir = packages_root / FORTUNES
    planted: dict[str, int] = {
        "fortune_pages": 0,
        "offensive_fortune_pages": 0,
        "pii_pages": 0,
        "near_duplicate_pages": 0,
        "spam_pages": 0,
        "ellipsis_pages": 0,
        "tiny_pages": 0,
    }
    pages: list[tuple[str, str]] = []
    collections = sorted(p.name for p in fortunes_dir.iterdir() if p.is_file() and "." not in p.name)
    for name in collections:
        fortunes = read_fortunes(fortunes_dir, name)
        for i in range(0, len(fortunes), 12):
            pages.append((f"fortunes-{name}-{i // 12}.html", _page(f"Fortunes: {name}", fortunes[i : i + 12])))
            planted["fortune_pages"] += 1
            planted["offensive_fortune_pages"] += name in OFFENSIVE
    words = [
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
    for i in range(40):
        text, _ = _pii_paragraph(rng)
        filler = read_fortunes(fortunes_dir, "wisdom")[i * 3 : i * 3 + 8] or ["Contact details follow."]
        pages.append((f"contact-{i}.html", _page(f"Contact page {i}", [*filler, text])))
        planted["pii_pages"] += 1
    for i in range(30):
        pages.append((f"spam-{i}.html", _page("Best deals", [" ".join(rng.choice(words) for _ in range(300))])))
        pages.append(
            (f"list-{i}.html", _page("More", [f"{rng.choice(words)} {rng.choice(words)}..." for _ in range(60)]))
        )
        pages.append((f"tiny-{i}.html", _page("Untitled", ["Coming soon."])))
        planted["spam_pages"] += 1
        planted["ellipsis_pages"] += 1
        planted["tiny_pages"] += 1
    manual_en = sorted((packages_root / MANUAL / "en").glob("*.html"))
    for i, source in enumerate(rng.sample(manual_en, min(40, len(manual_en)))):
        raw = source.read_bytes().decode("utf-8", errors="replace")
        from resiliparse.extract.html2text import extract_plain_text

        paragraphs = [line for line in extract_plain_text(raw, main_content=True).splitlines() if line.strip()]
        copy = [_near_duplicate(p, rng) if j % 5 == 0 else p for j, p in enumerate(paragraphs)]
        pages.append((f"mirror-{i}.html", _page(f"Mirror of {source.stem}", copy)))
        planted["near_duplicate_pages"] += 1
    for name, text in pages:
        (out / name).write_text(text, encoding="utf-8")
    links = "\n".join(f'<li><a href="{name}">{name}</a></li>' for name, _ in pages)
    (out / "index.html").write_text(f"<html><body><ul>{links}</ul></body></html>\n", encoding="utf-8")
    return planted


class _QuietHandler(SimpleHTTPRequestHandler):
    extensions_map: ClassVar[dict[str, str]] = {**SimpleHTTPRequestHandler.extensions_map, ".html": "text/html"}

    def log_message(self, format: str, *args) -> None:
        pass


def record_warc(site: Path, warc_prefix: Path) -> Path:
    """Serve `site` on 127.0.0.1 and record a recursive crawl of it into `<warc_prefix>.warc.gz`."""
    if shutil.which("wget") is None:
        raise ScratchLMError("building the crawl needs wget (Debian package wget)")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        tmp = warc_prefix.parent / "wget-tmp"
        command = [
            "wget",
            "--recursive",
            "--level=inf",
            "--no-parent",
            "--no-verbose",
            "--delete-after",
            "--no-directories",
            "--reject-regex",
            r"\.(png|gif|jpg|css|js)$",
            "--directory-prefix",
            str(tmp),
            f"--warc-file={warc_prefix}",
            "--no-warc-keep-log",
            f"http://127.0.0.1:{port}/noisy/",
            f"http://127.0.0.1:{port}/manual/",
        ]
        subprocess.run(command, capture_output=True)  # wget exits 8 on any 404; the WARC is what counts
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        server.shutdown()
    warc = warc_prefix.with_name(warc_prefix.name + ".warc.gz")
    if not warc.exists():
        raise ScratchLMError(f"wget wrote no WARC file at {warc}")
    return warc


def build_crawl(out: Path, seed: int = 0, cache: Path | None = None) -> Path:
    """The crawl in `out` (crawl.warc.gz + manifest.json), built as a unit; `out` when it already exists."""
    if (out / "manifest.json").exists():
        return out
    root = fetch_packages(cache=cache)
    with atomic_directory(out, owned=("crawl.warc.gz", "manifest.json")) as tmp:
        site = tmp / "site"
        site.mkdir()
        (site / "manual").symlink_to((root / MANUAL).resolve())
        planted = build_noisy_site(site, root, seed)
        warc = record_warc(site, tmp / "crawl")
        shutil.rmtree(site)
        digest = hashlib.sha256(warc.read_bytes()).hexdigest()
        manifest = {"warc": warc.name, "sha256": digest, "packages": list(PACKAGES), "seed": seed, "planted": planted}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/crawl", help="directory for crawl.warc.gz and manifest.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = build_crawl(Path(args.out), args.seed)
    except ScratchLMError as exc:
        print(f"build_crawl: error: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((out / "manifest.json").read_text())
    size = (out / "crawl.warc.gz").stat().st_size
    print(f"crawl: {out / 'crawl.warc.gz'} ({size / 1e6:.1f} MB); planted: {manifest['planted']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
