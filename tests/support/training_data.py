"""Helpers of the training tests: a tiny prepared dataset of UTF-8 bytes (no tokenizer
needed) and the environment of a training subprocess."""

from __future__ import annotations

import json
import os

from did_engine.data.format import wrap_documents, write_manifest, write_split
from support import REPO_DIR

# Public domain: Shakespeare, Sonnet 18, and the King James Version, Genesis 1:1-5.
TEXT = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
In the beginning God created the heaven and the earth.
And the earth was without form, and void; and darkness was upon the face of the deep.
And the Spirit of God moved upon the face of the waters.
And God said, Let there be light: and there was light.
And God saw the light, that it was good: and God divided the light from the darkness.
And God called the light Day, and the darkness he called Night.
And the evening and the morning were the first day.
"""

EOS = 256  # UTF-8 bytes are the tokens 0..255; 256 is BOS/EOS; the model adds the mask (257)


def make_dataset(path, text=TEXT, seq_len=32, val_fraction=0.1) -> str:
    """A prepared dataset of UTF-8 bytes (no tokenizer needed), BD3-LM wrapping."""
    os.makedirs(path, exist_ok=True)
    docs = [list(line.encode()) for line in text.splitlines() if line]
    seqs = wrap_documents(docs, seq_len, EOS, EOS)
    n_val = max(2, int(len(seqs) * val_fraction))
    splits = {"train": write_split(path, "train", seqs[n_val:]), "validation": write_split(path, "validation",
                                                                                          seqs[:n_val])}
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"model": {"type": "bytes"}}, f)
    write_manifest(path, seq_len=seq_len, tokenizer={"kind": "bytes", "vocab_size": 257, "bos_id": EOS,
                                                     "eos_id": EOS}, splits=splits)
    return str(path)



def subprocess_env():
    """The environment of a training subprocess: this checkout importable; the thread count
    left at its default (what users run with), never pinned to one."""
    env = {**os.environ, "PYTHONPATH": REPO_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    return env
