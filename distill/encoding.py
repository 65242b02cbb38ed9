"""The encoder and search settings that `eval` and `mine` share.

A stage's config dataclass inherits `EncodingSettings`, so every such stage has
the same flags with the same defaults, written once here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .index import IndexConfig, default_cache_dir
from .model import BiEncoder


@dataclass(kw_only=True)
class EncodingSettings:
    batch_size: int = field(default=64, metadata={"volatile": True, "help": "texts per encoder batch"})
    include_title: bool = field(default=True, metadata={"help": "embed passages as 'title text' (BEIR's convention)"})
    cache_dir: Path | None = field(default_factory=default_cache_dir,
                                   metadata={"volatile": True, "help": "embedding cache (corpus and queries); --no-cache to disable"})
    cache: bool = field(default=True, metadata={"volatile": True, "help": "use the embedding cache"})
    index: str = field(default="flat", metadata={"help": "faiss index kind", "choices": ["flat", "ivf", "hnsw"]})
    device: str | None = field(default=None, metadata={"volatile": True, "help": "torch device (default: cuda if available, else cpu)"})
    trust_remote_code: bool = field(default=False, metadata={"volatile": True, "help": "allow the model's own code to run"})
    pooling: str | None = field(default=None, metadata={"help": "override pooling", "choices": ["cls", "mean"]})
    query_prefix: str | None = field(default=None, metadata={"help": "override the query instruction prefix"})
    passage_prefix: str | None = field(default=None, metadata={"help": "override the passage prefix"})
    max_query_length: int | None = field(default=None, metadata={"help": "override query max tokens"})
    max_passage_length: int | None = field(default=None, metadata={"help": "override passage max tokens"})

    def load_encoder(self, model: str) -> BiEncoder:
        return BiEncoder.load(model, trust_remote_code=self.trust_remote_code, device=self.device,
                              pooling=self.pooling, query_prefix=self.query_prefix,
                              passage_prefix=self.passage_prefix, max_query_length=self.max_query_length,
                              max_passage_length=self.max_passage_length)

    @property
    def cache_path(self) -> Path | None:
        return self.cache_dir if self.cache else None

    def index_config(self) -> IndexConfig:
        return IndexConfig(kind=self.index)
