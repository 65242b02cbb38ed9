"""`distill eval` end to end: the real all-MiniLM-L6-v2 on the embedded set,
checked against sentence-transformers' evaluator; JSON output; cache reuse."""
from __future__ import annotations

import json

import pytest

from distill.cli import main
from distill.data import load_retrieval_set
from distill.metrics import DEFAULT_CUTOFFS


def test_minilm_eval_matches_sentence_transformers(minilm_dir, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from test_metrics import _evaluator_class

    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(minilm_dir), "--data", "squad-mini", "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--no-show-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "200 test queries" in printed
    ours = json.loads(out.read_text())
    for name, k in DEFAULT_CUTOFFS:
        assert 0.0 <= ours[f"{name}@{k}"] <= 1.0

    rset = load_retrieval_set("squad-mini", "test")
    ids = rset.corpus.table["id"].to_pylist()
    texts = [t for batch in rset.corpus.iter_passages() for t in batch]
    evaluator = _evaluator_class()(dict(zip(rset.queries.ids, rset.queries.texts)), dict(zip(ids, texts)),
                                   {q: set(d) for q, d in rset.qrels.items()}, mrr_at_k=[10], ndcg_at_k=[10],
                                   accuracy_at_k=[1], precision_recall_at_k=[1, 10], map_at_k=[100], write_csv=False)
    theirs = evaluator(SentenceTransformer(str(minilm_dir), device="cpu"))
    assert ours["ndcg@10"] == pytest.approx(theirs["cosine_ndcg@10"], abs=1e-4)
    assert ours["mrr@10"] == pytest.approx(theirs["cosine_mrr@10"], abs=1e-4)
    assert ours["recall@10"] == pytest.approx(theirs["cosine_recall@10"], abs=1e-4)
    assert ours["ndcg@10"] > 0.5  # a real model on real data, not noise


def test_second_eval_reads_the_cache_and_gives_the_same_metrics(tiny_bert_dir, small_beir, tmp_path):
    cache = tmp_path / "cache"
    runs = []
    for i in range(2):
        out = tmp_path / f"m{i}.json"
        assert main(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--output", str(out),
                     "--cache-dir", str(cache), "--no-show-progress"]) == 0
        runs.append(json.loads(out.read_text()))
    assert len(list(cache.iterdir())) == 2  # one entry for the passages, one for the queries
    assert {k: v for k, v in runs[0].items() if "@" in k} == {k: v for k, v in runs[1].items() if "@" in k}


def test_missing_model_is_one_line_exit_2(small_beir, tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "nope"), "--data", str(small_beir), "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")


def test_unknown_split_lists_the_available_ones(small_beir, capsys):
    assert main(["eval", "--model", "x", "--data", str(small_beir), "--split", "dev"]) == 2
    assert "splits here: test" in capsys.readouterr().err
