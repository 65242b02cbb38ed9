"""Each sampler's contract on real data: squad-mini passages and queries, a real
encoder and a real faiss index; SimANS's draws against its formula."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from distill.data import load_retrieval_set
from distill.index import build_index, corpus_embeddings, search
from distill.model import BiEncoder
from distill.negatives import STRATEGIES, MiningBatch, Ranked, CandidateWindow, query_rng, teacher_exclusions
from distill.negatives.bm25 import BM25Index, tokenize
from distill.negatives.window import score_filter_mask
from distill.negatives.simans import sample_without_replacement, simans_log_probabilities
from distill.negatives.uniform import draw_uniform

NUM = 5


@pytest.fixture(scope="module")
def mined(tiny_bert_dir):
    """squad-mini train queries with dense and BM25 pools, positives, and a scorer."""
    rset = load_retrieval_set("squad-mini", "train")
    encoder = BiEncoder.load(str(tiny_bert_dir), device="cpu")
    passages = corpus_embeddings(encoder, rset.corpus, cache_dir=None)
    queries = encoder.encode(rset.queries.texts, kind="query")
    qids = rset.queries.ids
    positives = [rset.corpus.rows_of([p for p, g in rset.qrels[q].items() if g > 0]) for q in qids]
    depth = 60
    scores, rows = search(build_index(passages), queries, depth)
    bm25 = BM25Index(rset.corpus.iter_passages()).search(rset.queries.texts, depth)
    titles = np.array(rset.corpus.table["title"].to_pylist())
    same_doc = [np.flatnonzero(np.isin(titles, titles[p])) for p in positives]
    return dict(rset=rset, passages=passages, queries=queries, qids=qids, positives=positives,
                dense=Ranked(rows, scores), bm25=bm25, same_doc=same_doc)


def make_batch(m, seed=0) -> MiningBatch:
    score_rows = lambda b, rows: m["passages"][np.asarray(rows, dtype=np.int64)] @ m["queries"][b]  # noqa: E731
    positive_scores = np.array([score_rows(b, p).min() for b, p in enumerate(m["positives"])])
    return MiningBatch(qids=m["qids"], excluded=m["positives"], rngs=[query_rng(seed, q) for q in m["qids"]],
                       corpus_size=len(m["rset"].corpus), positive_scores=positive_scores, dense=m["dense"],
                       bm25=m["bm25"], same_doc=m["same_doc"], score_rows=score_rows)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_no_positive_is_ever_a_negative(mined, strategy):
    chosen = STRATEGIES[strategy].select(make_batch(mined), NUM, CandidateWindow(range_max=40))
    assert len(chosen) == len(mined["qids"])
    total = 0
    for c, positives in zip(chosen, mined["positives"]):
        assert not set(c.rows.tolist()) & set(positives.tolist())
        assert len(set(c.rows.tolist())) == len(c.rows) <= NUM
        assert ((c.rows >= 0) & (c.rows < len(mined["rset"].corpus))).all()
        total += len(c.rows)
    assert total >= (0.5 if strategy == "same_doc" else 0.95) * NUM * len(chosen)  # same-article pools run short


def full_ranking(m, b):
    """Every passage by descending s(q, d), positives removed: the slow, obvious reference."""
    scores = m["passages"] @ m["queries"][b]
    order = [int(r) for r in np.argsort(-scores, kind="stable") if r not in set(m["positives"][b].tolist())]
    return order, scores


@pytest.mark.parametrize("sampling", ["top", "random"])
def test_dense_respects_the_rank_window(mined, sampling):
    params = CandidateWindow(range_min=5, range_max=25, sampling=sampling)
    chosen = STRATEGIES["dense"].select(make_batch(mined, seed=3), NUM, params)
    for b, c in enumerate(chosen):
        order, scores = full_ranking(mined, b)
        ranked = scores[order]  # exact ties may be ordered either way, so compare scores, not ids
        assert ((c.scores <= ranked[5] + 1e-5) & (c.scores >= ranked[24] - 1e-5)).all()
        if sampling == "top":
            np.testing.assert_allclose(c.scores, ranked[5:5 + NUM], atol=1e-5)


def test_margin_filters_follow_their_formulas():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, size=(6, 30))
    positive = np.array([0.8, 0.5, -0.2, 0.0, 0.9, -0.7])
    for params in (CandidateWindow(absolute_margin=0.1), CandidateWindow(relative_margin=0.05),
                   CandidateWindow(max_score=0.6), CandidateWindow(min_score=-0.5)):
        got = score_filter_mask(scores, positive, params)
        for b in range(6):
            for k in range(30):
                s, p = scores[b, k], positive[b]
                want = ((params.absolute_margin is not None and s + params.absolute_margin > p)
                        or (params.relative_margin is not None and s > p - abs(p) * params.relative_margin)
                        or (params.max_score is not None and s > params.max_score)
                        or (params.min_score is not None and s < params.min_score))
                assert got[b, k] == want


def test_dense_margin_keeps_only_candidates_below_the_positive(mined):
    batch = make_batch(mined)
    chosen = STRATEGIES["dense"].select(batch, NUM, CandidateWindow(absolute_margin=0.05, range_max=60))
    for b, c in enumerate(chosen):
        assert (c.scores + 0.05 <= batch.positive_scores[b] + 1e-6).all()
        order, scores = full_ranking(mined, b)
        allowed = [scores[r] for r in order if scores[r] + 0.05 <= batch.positive_scores[b]]
        np.testing.assert_allclose(c.scores, allowed[:len(c.rows)], atol=1e-5)


def simans_reference(scores, positive, a, b):
    weights = np.array([np.exp(-a * (s - positive - b) ** 2) for s in scores])
    return weights / weights.sum()


def test_simans_single_draw_frequencies_match_the_formula():
    scores = np.linspace(-1.0, 1.0, 21)
    positive, a, b = 0.3, 4.0, -0.2
    log_p = simans_log_probabilities(scores, positive, a, b)
    rng = np.random.default_rng(1)
    draws = np.array([sample_without_replacement(log_p, 1, rng)[0] for _ in range(100_000)])
    counts = np.bincount(draws, minlength=len(scores))
    expected = simans_reference(scores, positive, a, b) * len(draws)
    assert chisquare(counts, expected).pvalue > 0.01
    peak = int(np.argmax(counts))
    assert peak == int(np.argmin(np.abs(scores - (positive + b))))  # peak where s = s+ + b


def test_simans_without_replacement_first_draw_is_the_formula_and_draws_are_distinct():
    scores = np.random.default_rng(2).uniform(0.0, 1.0, 12)
    log_p = simans_log_probabilities(scores, 0.5, 8.0, 0.0)
    rng = np.random.default_rng(3)
    firsts = []
    for _ in range(100_000 // 4):
        drawn = sample_without_replacement(log_p, 4, rng)
        assert len(set(drawn.tolist())) == 4
        firsts.append(drawn[0])
    counts = np.bincount(firsts, minlength=len(scores))
    assert chisquare(counts, np.exp(log_p) * len(firsts)).pvalue > 0.01


def test_simans_sampler_favours_candidates_scored_like_the_positive(mined):
    batch = make_batch(mined)
    # the tiny random encoder's scores lie within ~0.01 of each other: a must be large to be selective
    params = CandidateWindow(range_max=60, simans_a=1e6)
    chosen_gap, window_gap, nearest_gap = [], [], []
    for b, c in enumerate(STRATEGIES["simans"].select(batch, NUM, params)):
        order, scores = full_ranking(mined, b)
        gaps = np.abs(scores[order[:60]] - batch.positive_scores[b])
        chosen_gap.append(np.abs(c.scores - batch.positive_scores[b]).mean())
        window_gap.append(gaps.mean())
        nearest_gap.append(np.sort(gaps)[:NUM].mean())
    # far nearer to the best possible (the NUM candidates scored most like the positive) than a uniform draw
    best, uniform, got = np.mean(nearest_gap), np.mean(window_gap), np.mean(chosen_gap)
    assert got - best < 0.25 * (uniform - best)


def test_same_seed_same_draws_other_seed_other_draws(mined):
    params = CandidateWindow(range_max=40)
    for strategy in ("random", "simans", "same_doc"):
        one = STRATEGIES[strategy].select(make_batch(mined, seed=7), NUM, params)
        two = STRATEGIES[strategy].select(make_batch(mined, seed=7), NUM, params)
        other = STRATEGIES[strategy].select(make_batch(mined, seed=8), NUM, params)
        assert all((x.rows == y.rows).all() for x, y in zip(one, two))
        assert any(len(x.rows) != len(z.rows) or (x.rows != z.rows).any() for x, z in zip(one, other))


def test_random_is_uniform_and_never_excluded():
    excluded = np.array([0, 3, 5])
    rng = np.random.default_rng(0)
    draws = np.concatenate([draw_uniform(10, excluded, 3, rng) for _ in range(20_000)])
    assert not set(draws.tolist()) & {0, 3, 5}
    counts = np.bincount(draws, minlength=10)[[1, 2, 4, 6, 7, 8, 9]]
    assert chisquare(counts).pvalue > 0.01
    assert len(draw_uniform(5, np.array([0, 1, 2]), 4, rng)) == 2  # only two passages allowed


def test_same_doc_draws_only_from_the_positives_article(mined):
    chosen = STRATEGIES["same_doc"].select(make_batch(mined), NUM, CandidateWindow())
    titles = mined["rset"].corpus.table["title"].to_pylist()
    for c, positives in zip(chosen, mined["positives"]):
        assert {titles[r] for r in c.rows} <= {titles[p] for p in positives}


def test_hybrid_mixes_both_pools(mined):
    chosen = STRATEGIES["hybrid"].select(make_batch(mined), 6, CandidateWindow(range_max=40))
    sources = [s for c in chosen for s in c.sources]
    assert 0.3 < sources.count("bm25") / len(sources) < 0.7


def test_bm25_ranks_lexical_matches_first_and_splits_chinese():
    assert tokenize("战国无双 The cat") == ["战", "国", "无", "双", "战国", "国无", "无双", "cat"]
    index = BM25Index([["the cat sat on the mat", "dogs bark loudly", "a cat and a dog"], ["战国时代的历史"]])
    ranked = index.search(["cat", "战国", "zebra"], k=4)
    assert set(ranked.rows[0][:2].tolist()) == {0, 2} and ranked.rows[0][2] == -1
    assert ranked.rows[1][0] == 3
    assert (ranked.rows[2] == -1).all()


def test_teacher_filter_excludes_candidates_rated_like_a_positive():
    from distill.data.records import LabelRecord

    labels = [LabelRecord("q1", ("p", "a", "b", "c"), (-1.0, -0.5, -1.0, -2.0), 1, line=1),
              LabelRecord("q2", ("p1", "p2", "x"), (-1.0, -3.0, -2.5), 2, line=2)]
    assert teacher_exclusions(labels) == {"q1": ["a", "b"], "q2": ["x"]}
