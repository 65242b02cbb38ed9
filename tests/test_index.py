"""faiss search against brute force, approximate indexes' recall, and the
on-disk embedding cache (reuse, invalidation, resume after a crash)."""
from __future__ import annotations

import numpy as np
import pytest

from distill.data import load_retrieval_set
from distill.index import EmbeddingCache, IndexConfig, build_index, search
from distill.model import BiEncoder


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_in_chunks_equals_brute_force():
    rng = np.random.default_rng(0)
    passages, queries = _unit_rows(rng, 2000, 24), _unit_rows(rng, 97, 24)
    scores, rows = search(build_index(passages), queries, k=10, chunk_rows=16)
    expected = queries @ passages.T
    expected_rows = np.argsort(-expected, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, expected_rows, 1), atol=1e-5)


def test_k_larger_than_corpus_is_clipped():
    rng = np.random.default_rng(1)
    scores, rows = search(build_index(_unit_rows(rng, 5, 8)), _unit_rows(rng, 3, 8), k=100)
    assert rows.shape == (3, 5) and (rows >= 0).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours(kind):
    rng = np.random.default_rng(2)
    centres = _unit_rows(rng, 50, 32)
    passages = centres[rng.integers(0, 50, 5000)] + 0.05 * rng.standard_normal((5000, 32)).astype(np.float32)
    queries = passages[rng.choice(5000, 200, replace=False)] + 0.01 * rng.standard_normal((200, 32)).astype(np.float32)
    _, exact = search(build_index(passages), queries, k=10)
    _, approx = search(build_index(passages, IndexConfig(kind=kind)), queries, k=10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9


def test_cache_reuses_and_invalidates(tiny_bert_dir, small_beir, tmp_path):
    encoder = BiEncoder.load(tiny_bert_dir, device="cpu")
    corpus = load_retrieval_set(small_beir, "test").corpus
    cache = EmbeddingCache(tmp_path / "cache")
    first = np.array(cache.corpus_embeddings(encoder, corpus))
    texts = [t for b in corpus.iter_passages() for t in b]
    np.testing.assert_allclose(first, encoder.encode(texts), atol=1e-6)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = cache.corpus_embeddings(encoder, corpus)
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(np.asarray(again), first)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # other settings or other weights: a new entry
    cache.corpus_embeddings(encoder, corpus, include_title=False)
    with __import__("torch").no_grad():
        next(encoder.backbone.parameters()).add_(0.01)
    cache.corpus_embeddings(encoder, corpus)
    assert len(list((tmp_path / "cache").iterdir())) == 3


class _CrashAfter:
    """Lets `n` encode calls through, then raises like a killed process would stop."""

    def __init__(self, encoder: BiEncoder, n: int):
        self.encoder, self.left = encoder, n

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, *args, **kwargs):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.encoder.encode(*args, **kwargs)


def test_cache_resumes_a_killed_encoding(tiny_bert_dir, small_beir, tmp_path):
    encoder = BiEncoder.load(tiny_bert_dir, device="cpu")
    corpus = load_retrieval_set(small_beir, "test").corpus
    cache = EmbeddingCache(tmp_path / "cache", chunk_rows=16)
    with pytest.raises(KeyboardInterrupt):
        cache.corpus_embeddings(_CrashAfter(encoder, 1), corpus)
    resumed_calls = _CrashAfter(encoder, 99)
    resumed = np.asarray(cache.corpus_embeddings(resumed_calls, corpus))
    assert 99 - resumed_calls.left == -(-len(corpus) // 16) - 1  # the finished chunk was not redone
    fresh = EmbeddingCache(tmp_path / "fresh", chunk_rows=16).corpus_embeddings(encoder, corpus)
    np.testing.assert_array_equal(resumed, np.asarray(fresh))
