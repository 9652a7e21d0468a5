"""Data: the on-disk token format (format.py), corpus sources, tokenizers and the
`did-engine data prepare` pipeline."""

from did_engine.data.format import (  # noqa: F401
    DatasetError, TokenDataset, read_manifest, wrap_documents, write_manifest, write_split,
)
