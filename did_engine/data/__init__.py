"""Data: the on-disk token format (format.py), corpus sources (sources.py), tokenizers
(tokenizer.py) and the dataset pipeline behind `did-engine data prepare` (prepare.py)."""

from did_engine.data.format import (  # noqa: F401
    DatasetError, TokenDataset, read_manifest, wrap_documents, write_manifest, write_split,
)
from did_engine.data.sources import (  # noqa: F401
    BUILTIN_SOURCES, DEFAULT_SOURCES, Document, SourceUnavailable,
)
from did_engine.data.tokenizer import Tokenizer  # noqa: F401

# prepare.py (the pipeline) is imported on use: `from did_engine.data.prepare import prepare, PrepareConfig`.
