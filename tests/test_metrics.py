"""Our metrics against sentence-transformers' InformationRetrievalEvaluator
(an independent implementation) on the same run, and one worked example."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distill.data.records import ranked
from distill.metrics import mean_metrics, ndcg_at_k


def _evaluator_class():
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import InformationRetrievalEvaluator
    return InformationRetrievalEvaluator


def test_metrics_equal_sentence_transformers_on_a_random_run_with_ties():
    rng = np.random.default_rng(7)
    corpus = {f"d{i:03d}": f"doc {i}" for i in range(300)}
    queries = {f"q{i}": f"query {i}" for i in range(150)}
    pids = list(corpus)
    qrels = {q: {p: 1 for p in rng.choice(pids, size=rng.integers(1, 6), replace=False)} for q in queries}
    # scores on a coarse grid, so ties are common and tie-breaking matters
    hits = {q: [(p, float(s)) for p, s in zip(rng.choice(pids, 120, replace=False), rng.integers(0, 40, 120) / 40)]
            for q in queries}
    for q in list(queries)[:30]:  # make sure many queries do find their passages
        hits[q] += [(p, 1.0) for p in qrels[q] if p not in dict(hits[q])]
    ours = mean_metrics(ranked(hits), qrels)

    evaluator = _evaluator_class()(queries, corpus, {q: set(d) for q, d in qrels.items()}, mrr_at_k=[10],
                                   ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[1, 5, 10, 100],
                                   map_at_k=[100], write_csv=False)
    result_list = [[{"corpus_id": p, "score": s} for p, s in hits[q]] for q in evaluator.queries_ids]
    theirs = evaluator.compute_metrics(result_list)
    assert ours["ndcg@10"] == pytest.approx(theirs["ndcg@k"][10], abs=1e-9)
    assert ours["mrr@10"] == pytest.approx(theirs["mrr@k"][10], abs=1e-9)
    assert ours["map@100"] == pytest.approx(theirs["map@k"][100], abs=1e-9)
    for k in (1, 5, 10, 100):
        assert ours[f"recall@{k}"] == pytest.approx(theirs["recall@k"][k], abs=1e-9)
    assert 0 < ours["ndcg@10"] < 1


def test_worked_example():
    # ranking a, b, c, d; relevant: b and e (e never retrieved)
    rankings = {"q": ["a", "b", "c", "d"]}
    qrels = {"q": {"b": 1, "e": 1, "c": 0}}
    m = mean_metrics(rankings, qrels)
    assert m["recall@1"] == 0 and m["recall@5"] == 0.5
    assert m["mrr@10"] == 0.5
    assert m["map@100"] == pytest.approx((1 / 2) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_graded_ndcg_uses_linear_gain():
    relevant = {"a": 2, "b": 1}
    assert ndcg_at_k(["a", "b"], relevant, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "a"], relevant, 10) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_query_missing_from_run_counts_as_zero():
    m = mean_metrics({"q1": ["a"]}, {"q1": {"a": 1}, "q2": {"b": 1}})
    assert m["recall@1"] == 0.5 and m["ndcg@10"] == 0.5


def _sign_flip_p_value(d):
    """Fisher's randomization test by enumerating every sign vector (slow, obviously correct)."""
    import itertools

    observed, hits, total = abs(sum(d) / len(d)), 0, 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        flipped = abs(sum(s * x for s, x in zip(signs, d)) / len(d))
        hits += flipped >= observed - 1e-12
        total += 1
    return hits / total


def test_randomization_p_value_equals_full_enumeration_of_sign_flips():
    from distill.metrics import compare_paired

    rng = np.random.default_rng(3)
    for shift in (0.0, 0.05, 0.2):
        a = rng.uniform(0, 1, 10)
        b = np.clip(a + shift + rng.normal(0, 0.15, 10), 0, 1)
        got = compare_paired(a, b, np.random.default_rng(0))
        assert got.p_value == pytest.approx(_sign_flip_p_value(list(b - a)), abs=1e-12)
        assert got.mean_difference == pytest.approx(float(np.mean(b - a)), abs=1e-15)
    constant = compare_paired([0.1] * 6, [0.3] * 6, rng)  # every query +0.2: only the two all-same flips tie
    assert constant.p_value == pytest.approx(_sign_flip_p_value([0.2] * 6)) and constant.low == constant.high
    same = compare_paired([0.4, 0.7, 0.1], [0.4, 0.7, 0.1], rng)
    assert same.p_value == 1.0 and same.mean_difference == same.low == same.high == 0.0


@pytest.mark.slow
def test_bootstrap_interval_matches_the_normal_theory_width_on_many_queries():
    from distill.metrics import compare_paired

    rng = np.random.default_rng(11)
    a = rng.uniform(0, 1, 4000)
    b = a + rng.normal(0.02, 0.3, 4000)
    got = compare_paired(a, b, np.random.default_rng(0))
    d = b - a
    half_width = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert got.low < got.mean_difference < got.high
    assert (got.high - got.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert (got.low + got.high) / 2 == pytest.approx(d.mean(), abs=0.1 * half_width)
    again = compare_paired(a, b, np.random.default_rng(0))
    assert (again.low, again.high, again.p_value) == (got.low, got.high, got.p_value)
    assert "CI" in got.describe() and "4000 queries" in got.describe()
