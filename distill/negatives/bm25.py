"""BM25 negatives (Robertson & Zaragoza 2009) with `bm25s` (Lù 2024).

Lexical matches a dense model may miss: the query's BM25 top-K, with the same
exclusions, rank window and (when a dense model scores the candidates) score
filters as `dense`. Text is split by `tokenize`: lower-cased words for
alphabetic scripts (English stop words dropped), and for Chinese, Japanese and
Korean runs, which have no spaces, every character and every pair of adjacent
characters (the character uni+bigram scheme of CJK search engines); or jieba
words with `tokenizer="jieba"` when jieba is installed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from labelers.errors import UsageError

from .base import Chosen, MiningBatch, Ranked, CandidateWindow
from .dense import pick
from .window import excluded_mask, rank_window, score_filter_mask

POOLS = ("bm25",)

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_PIECES = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+")
_IS_CJK = re.compile(rf"[{_CJK}]")
TOKENIZERS = ("ngram", "jieba")


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def tokenize(text: str, tokenizer: str = "ngram") -> list[str]:
    tokens: list[str] = []
    stop = _stopwords()
    for piece in _PIECES.findall(text.lower()):
        if not _IS_CJK.match(piece):
            if piece not in stop:
                tokens.append(piece)
        elif tokenizer == "jieba":
            tokens.extend(w for w in _jieba().lcut(piece) if w.strip())
        else:
            tokens.extend(piece)
            tokens.extend(piece[i:i + 2] for i in range(len(piece) - 1))
    return tokens


@lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError as exc:
        raise ImportError("--bm25-tokenizer jieba needs jieba: pip install jieba") from exc
    jieba.setLogLevel(60)
    return jieba


class BM25Index:
    """A bm25s index over passage strings, searched in batches."""

    def __init__(self, passages: Iterable[list[str]], tokenizer: str = "ngram", k1: float = 1.5, b: float = 0.75):
        import bm25s

        if tokenizer not in TOKENIZERS:
            raise UsageError(f"BM25 tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
        self.tokenizer = tokenizer
        tokens = [tokenize(t, tokenizer) for batch in passages for t in batch]
        self.size = len(tokens)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(tokens, show_progress=False)

    def search(self, queries: list[str], k: int) -> Ranked:
        """Top-k rows by BM25 score, best first; passages sharing no term with the query are -1."""
        k = min(k, self.size)
        rows, scores = self.retriever.retrieve([tokenize(q, self.tokenizer) or ["\x00"] for q in queries], k=k,
                                               show_progress=False, n_threads=1)
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        rows[scores <= 0] = -1
        return Ranked(rows, scores)


def select(batch: MiningBatch, num: int, params: CandidateWindow) -> list[Chosen]:
    if batch.bm25 is None:
        raise UsageError("the bm25 strategy needs a BM25 index")
    ranked = batch.bm25
    dropped = excluded_mask(ranked.rows, batch.excluded)
    dense = None
    if batch.score_rows is not None:
        dense = np.stack([batch.score_rows(b, ranked.rows[b].clip(min=0)) for b in range(len(batch))])
        if params.filters_scores:
            dropped |= score_filter_mask(dense, batch.positive_scores, params)
    elif params.filters_scores:
        raise UsageError("score filters on BM25 candidates need a dense --model to score them")
    out = []
    shown = dense if dense is not None else ranked.scores
    for b, (rows, scores) in enumerate(rank_window(ranked.rows, shown, dropped, params.range_min, params.range_max)):
        chosen = pick(len(rows), num, params.sampling, batch.rngs[b])
        out.append(Chosen(rows[chosen], scores[chosen], ["bm25"] * len(chosen)))
    return out
