"""The data layer: every file the project reads is read here, and checked once.

- `retrieval`: BEIR-style retrieval sets (corpus, queries, qrels) as Arrow tables;
- `records`: the files stages write for each other (candidates, labels, generations, TREC runs, the training
  log), each as a frozen dataclass with one reader;
- `progress`: the progress files of resumable jobs, verified against their output;
- `errors`, `sources`, `tables`: the file:line:field error contract, raw record sources, checked columns.

This module only re-exports.
"""
from __future__ import annotations

from .errors import DataError, Problem, ProblemLog
from .retrieval import (EMBEDDED_SETS, Corpus, Queries, RetrievalSet, data_digest, data_files, format_passage,
                        has_table, load_corpus, load_corpus_of, load_qrels_for, load_queries, load_retrieval_set,
                        resolve_data_dir)

__all__ = ["Corpus", "Queries", "RetrievalSet", "DataError", "Problem", "ProblemLog", "EMBEDDED_SETS", "has_table",
           "data_files", "data_digest", "load_corpus", "load_corpus_of", "load_qrels_for", "load_queries", "load_retrieval_set",
           "resolve_data_dir", "format_passage"]
