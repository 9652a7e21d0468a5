"""On-disk token datasets: what `did-engine data prepare` writes and training reads.

A dataset is a directory::

    manifest.json        everything below, plus the corpus statistics per source
    tokenizer.json       the tokenizer (Hugging Face `tokenizers` format), always present
    train.bin            uint16, [sequences, seq_len], C order (a raw memmap, no header)
    validation.bin       the same for held-out documents

Sequences follow BD3-LM's (MDLM's) wrapping: each document's tokens get EOS appended, the
documents of a split are concatenated, and the stream is cut into pieces of seq_len - 2
tokens, each stored as ``[BOS] + piece + [EOS]``; the tail shorter than a piece is
dropped. With the GPT-2 tokenizer BOS = EOS = 50256 (``<|endoftext|>``), as in BD3-LM.

The model's vocabulary is the tokenizer's plus one mask token (the last id), so token
files never contain ``manifest["model_vocab_size"] - 1``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from did_engine.modeling.checkpoint import atomic_write_bytes, atomic_write_json
from did_engine.errors import UserError

FORMAT = "did_engine.tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"


class DatasetError(UserError):
    """A token dataset that is missing, damaged or does not fit the model, or a source of
    `data prepare` that cannot be read (a missing path, a .jsonl line that is not JSON)."""


def wrap_documents(documents, seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """Token id sequences (lists or arrays) -> uint16 [N, seq_len] sequences with BD3-LM's
    wrapping (module doc). The stream is built straight into uint16 (ids checked per
    document), not as a list of Python ints: a few bytes per token, whatever the corpus."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 (BOS, one token, EOS), got {seq_len}")
    piece = seq_len - 2
    documents = list(documents)  # walked twice
    top = np.iinfo(np.uint16).max
    if not (0 <= bos_id <= top and 0 <= eos_id <= top):
        raise ValueError("token ids must fit in uint16")
    lengths = [len(doc) for doc in documents]
    stream = np.empty(sum(lengths) + len(lengths), dtype=np.uint16)
    at = 0
    for doc, length in zip(documents, lengths):
        ids = np.asarray(doc, dtype=np.int64)
        if length and (ids.min() < 0 or ids.max() > top):
            raise ValueError("token ids must fit in uint16")
        stream[at:at + length] = ids
        stream[at + length] = eos_id
        at += length + 1
    n = len(stream) // piece
    out = np.empty((n, seq_len), dtype=np.uint16)
    out[:, 0], out[:, 1:-1], out[:, -1] = bos_id, stream[: n * piece].reshape(n, piece), eos_id
    return out


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_split(out_dir: str, split: str, sequences: np.ndarray, documents: int | None = None) -> dict:
    """Write one split's uint16 [N, L] array atomically; return its manifest entry."""
    sequences = np.ascontiguousarray(sequences, dtype=np.uint16)
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be [N, seq_len], got shape {sequences.shape}")
    path = os.path.join(out_dir, f"{split}.bin")
    atomic_write_bytes(path, lambda tmp: sequences.tofile(tmp))
    entry = {"file": f"{split}.bin", "sequences": int(sequences.shape[0]), "tokens": int(sequences.size),
             "sha256": sha256_file(path)}
    if documents is not None:
        entry["documents"] = int(documents)
    return entry


def write_manifest(out_dir: str, *, seq_len: int, tokenizer: dict, splits: dict, sources: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Write manifest.json last (atomically): a directory with a manifest is complete.

    tokenizer: {"kind": "gpt2" | "bpe", "vocab_size": int, "bos_id": int, "eos_id": int, ...}
    splits: {split: entry from write_split}
    """
    from did_engine import __version__

    for key in ("kind", "vocab_size", "bos_id", "eos_id"):
        if key not in tokenizer:
            raise ValueError(f"tokenizer description needs {key!r}")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": int(seq_len), "dtype": "uint16",
        "tokenizer": {**tokenizer, "file": TOKENIZER_NAME},
        "model_vocab_size": int(tokenizer["vocab_size"]) + 1,  # + the mask token
        "splits": splits, "sources": sources or {},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "did_engine_version": __version__, **(extra or {}),
    }
    atomic_write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DatasetError(f"{data_dir} has no {MANIFEST_NAME}: not a prepared dataset "
                           "(make one with `did-engine data prepare --out DIR`)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} "
                           f"is not {FORMAT!r} v{FORMAT_VERSION}")
    return manifest


@dataclass
class TokenDataset:
    """One split of a prepared dataset as a read-only memmap; items are int64 [seq_len] tensors."""

    data_dir: str
    split: str = "train"
    verify: bool = False  # check the file's sha256 against the manifest (reads the whole file)

    def __post_init__(self):
        self.manifest = read_manifest(self.data_dir)
        if self.split not in self.manifest["splits"]:
            raise DatasetError(f"{self.data_dir} has no split {self.split!r} "
                               f"(it has {sorted(self.manifest['splits'])})")
        entry = self.manifest["splits"][self.split]
        path = os.path.join(self.data_dir, entry["file"])
        self.seq_len = int(self.manifest["seq_len"])
        expected = entry["sequences"] * self.seq_len * 2
        if not os.path.isfile(path) or os.path.getsize(path) != expected:
            raise DatasetError(f"{path} is missing or not {expected} bytes ({entry['sequences']} x {self.seq_len} "
                               "uint16): re-run `did-engine data prepare`")
        if self.verify and sha256_file(path) != entry["sha256"]:
            raise DatasetError(f"{path}: sha256 differs from the manifest (damaged file)")
        self.array = np.memmap(path, dtype=np.uint16, mode="r", shape=(entry["sequences"], self.seq_len))

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.data_dir, TOKENIZER_NAME)

    @property
    def model_vocab_size(self) -> int:
        return int(self.manifest["model_vocab_size"])

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return torch.from_numpy(self.array[index].astype(np.int64))

    def batch(self, indices) -> torch.Tensor:
        """int64 [len(indices), seq_len] for a sequence of row indices."""
        return torch.from_numpy(self.array[np.asarray(indices, dtype=np.int64)].astype(np.int64))
