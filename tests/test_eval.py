"""`distill eval` end to end: the real all-MiniLM-L6-v2 on the embedded set,
checked against sentence-transformers' evaluator; JSON output; cache reuse."""
from __future__ import annotations

import json

import pytest

from distill.cli import main
from distill.data import load_retrieval_set
from distill.metrics import DEFAULT_CUTOFFS


@pytest.mark.slow
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


def test_missing_model_is_one_line_exit_2_naming_the_folder(small_beir, tmp_path, capsys):
    missing = tmp_path / "runs" / "nope" / "model"  # only a path, never a hub id: say it is not there
    for argv in (["eval", "--model", str(missing), "--data", str(small_beir), "--no-cache"],
                 ["label", "--llm", str(missing), "--data", str(small_beir), "--split", "test",
                  "--output", str(tmp_path / "l.jsonl")]):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [f"error: no model folder at {missing} (and it is not a Hugging Face model id)"]
    assert not (tmp_path / "l.jsonl").exists()


@pytest.mark.parametrize("name,ok", [("sentence-transformers/all-MiniLM-L6-v2", True), ("gpt2", True),
                                     ("runs/x/model", False), ("./model", False), ("/abs/model", False),
                                     ("org/name/extra", False)])
def test_only_names_that_cannot_be_hub_ids_must_exist_locally(name, ok):
    from labelers.models import checked_model_source

    if ok:
        assert checked_model_source(name) == name
    else:
        with pytest.raises(FileNotFoundError, match="no model folder"):
            checked_model_source(name)


def test_unknown_split_lists_the_available_ones(small_beir, capsys):
    assert main(["eval", "--model", "x", "--data", str(small_beir), "--split", "dev"]) == 2
    assert "splits here: test" in capsys.readouterr().err


def test_run_file_rescored_gives_the_reported_metrics_and_compares_with_a_baseline(tiny_bert_dir, small_beir,
                                                                                   tmp_path, capsys):
    from distill.data.records import read_trec_run
    from distill.metrics import mean_metrics

    run, out = tmp_path / "runs" / "tiny.trec", tmp_path / "m.json"
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--output", str(out),
                 "--run-file", str(run), "--top-k", "10", "--no-cache", "--no-show-progress"]) == 0
    reported = json.loads(out.read_text())
    lines = [line.split() for line in run.read_text().splitlines()]
    rset = load_retrieval_set(str(small_beir), "test")
    assert {q for q, *_ in lines} == set(rset.queries.ids)
    for qid in rset.queries.ids:
        mine = [row for row in lines if row[0] == qid]
        assert [int(r[3]) for r in mine] == list(range(1, len(mine) + 1)) and len(mine) == 10
        scores = [float(r[4]) for r in mine]
        assert scores == sorted(scores, reverse=True) and {r[1] for r in mine} == {"Q0"}
    rescored = mean_metrics(read_trec_run(run).rankings(), rset.qrels)
    for name, k in DEFAULT_CUTOFFS:
        if k <= 10:
            assert rescored[f"{name}@{k}"] == pytest.approx(reported[f"{name}@{k}"], abs=1e-9)

    # A perfect baseline (each query's relevant passages first): the model's paired gain is its nDCG@10 - 1.
    perfect = tmp_path / "perfect.trec"
    perfect.write_text("".join(f"{q} Q0 {p} {i + 1} {1.0 - i / 100} qrels\n" for q, rel in rset.qrels.items()
                               for i, p in enumerate(sorted(rel))))
    out2 = tmp_path / "m2.json"
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--output", str(out2),
                 "--baseline-run", str(perfect), "--no-cache", "--no-show-progress"]) == 0
    versus = json.loads(out2.read_text())["ndcg@10_vs_baseline"]
    assert versus["mean_difference"] == pytest.approx(reported["ndcg@10"] - 1.0, abs=1e-9)
    assert versus["low"] <= versus["mean_difference"] <= versus["high"] <= 0 and versus["queries"] == len(rset.qrels)
    assert f"against {perfect}" in capsys.readouterr().out


def test_bad_baseline_run_names_file_and_line(tiny_bert_dir, small_beir, tmp_path, capsys):
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 p1 1 0.5 x\nq1 Q0 p2 2 high x\n")
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--baseline-run", str(bad),
                 "--no-cache"]) == 2
    assert f"{bad}:2: field \"score\": not a number" in capsys.readouterr().err
    other = tmp_path / "other.trec"
    other.write_text("nope Q0 p1 1 0.5 x\n")
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--baseline-run", str(other),
                 "--no-cache", "--no-show-progress"]) == 2
    assert "ranks none of the test split's queries" in capsys.readouterr().err
