"""Queries without relevance labels: mine gives each its retriever's pool, label scores the whole pool, train
chooses the positive (teacher, teacher+retriever, answer matching, retriever top 1); false negatives of
labelled data are kept, dropped or made positives."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SQUAD_MINI, read_jsonl, write_jsonl
from distill.cli import main
from distill.data import load_retrieval_set
from distill.data.records import LabelRecord, read_labels
from distill.training.config import TrainConfig
from distill.training.examples import PositiveChoice, examples_from_labels
from distill.training.positives import choose_positive, contains_answer


def test_each_mode_makes_the_hand_computed_choice():
    rewards, retriever = np.array([-1.0, -0.5, -3.0]), np.array([0.9, 0.2, 0.8])
    # z(r) = [0.463, 0.926, -1.389]; z(s) = [0.863, -1.402, 0.539]; fused = [1.326, -0.476, -0.850]
    assert choose_positive("teacher", rewards, retriever, None).index == 1
    assert choose_positive("retriever-top1", rewards, retriever, None).index == 0
    assert choose_positive("teacher+retriever", rewards, retriever, None).index == 0
    matches = np.array([False, True, True])
    assert choose_positive("answer-match", rewards, retriever, matches).index == 2  # best retriever rank matching
    assert choose_positive("answer-match+teacher", rewards, retriever, matches).index == 1  # fused among matches
    none = np.zeros(3, dtype=bool)
    assert choose_positive("answer-match+teacher", rewards, retriever, none).index == 0  # fused over the pool
    assert choose_positive("answer-match", rewards, retriever, none).reason == "no answer match"
    margin = choose_positive("teacher", rewards, retriever, None).score_margin
    assert abs(margin - 0.4629) < 1e-3
    assert choose_positive("teacher", rewards, retriever, None, min_margin=0.5).reason == "not confident"
    assert choose_positive("teacher", np.array([-1.0, -1.0, -2.0]), None, None).reason == "not confident"  # a tie
    with pytest.raises(ValueError, match="needs the retriever's scores"):
        choose_positive("teacher+retriever", rewards, None, None)


def test_answer_matching_normalises_case_punctuation_and_whitespace():
    assert contains_answer("The tower stands in «Paris», France.", ["paris"])
    assert contains_answer("It was  founded in the U.S.A. in 1812", ["u s a"])
    assert contains_answer("Pyotr Ilyich Tchaikovsky wrote it", ["Ilyich  Tchaikovsky"])
    assert not contains_answer("Parisian cafés", ["Paris"])  # whole tokens only
    assert not contains_answer("in 18123", ["1812"])


@pytest.fixture
def query_log(tmp_path) -> Path:
    """squad-mini as a user without relevance labels has it: passages, and questions (half with answers, half
    without), no qrels and no positives."""
    folder = tmp_path / "log"
    folder.mkdir()
    shutil.copy(SQUAD_MINI / "corpus.jsonl", folder / "corpus.jsonl")
    queries = read_jsonl(SQUAD_MINI / "queries.jsonl")[:24]
    for i, q in enumerate(queries):
        q.pop("positives", None)
        if i % 2:
            q.pop("answers", None)
    write_jsonl(folder / "queries.jsonl", queries)
    return folder


@pytest.mark.slow
def test_pools_labels_and_chosen_positives_for_queries_without_qrels(tiny_bert_dir, tiny_llama_dir, query_log,
                                                                     tmp_path, capsys):
    candidates, labels = tmp_path / "cand.jsonl", tmp_path / "labels.jsonl"
    assert main(["mine", "--model", str(tiny_bert_dir), "--data", str(query_log), "--pool-size", "6", "--output",
                 str(candidates), "--no-cache", "--no-show-progress"]) == 0
    pools = read_jsonl(candidates)
    assert len(pools) == 24 and all(len(p["pids"]) == 6 and p["positives"] == [] for p in pools)
    assert all(p["scores"] == sorted(p["scores"], reverse=True) for p in pools)  # the retriever's top 6, in order
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(query_log), "--candidates", str(candidates),
                 "--output", str(labels), "--device", "cpu", "--dtype", "float32", "--no-show-progress"]) == 0
    records = read_jsonl(labels)
    for pool, record in zip(pools, records):
        assert record["pids"] == pool["pids"] and record["n_positives"] == 0
        assert record["retriever_scores"] == pool["scores"]
    with_answers = {q["_id"] for q in read_jsonl(query_log / "queries.jsonl") if q.get("answers")}
    assert {r["target"] for r in records if r["qid"] in with_answers} == {"answer"}
    assert {r["target"] for r in records if r["qid"] not in with_answers} == {"query"}  # UPR
    # the teacher's choice is the pool's best reward; the fused one the best z(r) + z(s)
    rset = load_retrieval_set(query_log, "train", unlabelled=True)
    found = examples_from_labels(read_labels(labels), rset, labels, choice=PositiveChoice("teacher"))
    by_qid = {e.qid: e for e in found.examples}
    for record in records:
        best = record["pids"][int(np.argmax(record["rewards"]))]
        assert rset.corpus.ids_at([by_qid[record["qid"]].positive])[0] == best
        assert best not in rset.corpus.ids_at(by_qid[record["qid"]].pool)
    for mode in ("auto", "teacher", "teacher+retriever", "retriever-top1"):
        capsys.readouterr()
        assert main(["train", "--model", str(tiny_bert_dir), "--data", str(query_log), "--labels", str(labels),
                     "--positives", mode, "--output", str(tmp_path / mode), "--max-steps", "1", "--train-batch-size",
                     "4", "--num-negatives", "3", "--batch-dedup", "none", "--no-cache", "--no-show-progress",
                     "--device", "cpu"]) == 0, mode
        said = capsys.readouterr().out
        assert "positives chosen by" in said, said
    # matching answers needs answers: the half without them is named, in one line
    assert main(["train", "--model", str(tiny_bert_dir), "--data", str(query_log), "--labels", str(labels),
                 "--positives", "answer-match", "--output", str(tmp_path / "am"), "--no-cache",
                 "--no-show-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no reference answers, which --positives answer-match matches" in err[0]


def test_unchosen_passages_holding_an_answer_are_kept_or_dropped_from_the_negatives(query_log):
    rset = load_retrieval_set(query_log, "train", unlabelled=True)
    pids = ("p506", "p513", "p508", "p514", "p521")  # 'Bendigo' is in p506, p508 and p521 only
    passages = rset.corpus.passages_at(rset.corpus.rows_of(list(pids)))
    assert [contains_answer(p, ["Bendigo"]) for p in passages] == [True, False, True, False, True]
    record = LabelRecord("570d2556fed7b91900d45c47", pids, (-1.0, -2.0, -0.5, -3.0, -2.5), 0, 1,
                         retriever_scores=(0.9, 0.8, 0.7, 0.6, 0.5))

    def run(answer_negatives: str):
        found = examples_from_labels([record], rset, Path("labels.jsonl"),
                                     choice=PositiveChoice("answer-match", answer_negatives=answer_negatives))
        (example,) = found.examples
        ids = lambda rows: sorted(rset.corpus.ids_at(rows))  # noqa: E731
        return ids([example.positive]), ids(example.pool), ids(example.positives), found.skipped

    assert run("keep")[:3] == (["p506"], ["p508", "p513", "p514", "p521"], ["p506"])
    positive, pool, masked, skipped = run("drop")  # DPR: the retriever's best match; the other two leave the pool
    assert (positive, pool, masked) == (["p506"], ["p513", "p514"], ["p506", "p508", "p521"])
    assert skipped["answer-containing negatives dropped"] == 2
    with pytest.raises(ValueError, match="--answer-negatives drop needs answer matching"):  # it would do nothing
        TrainConfig(model="m", data="squad-mini", output=Path("o"), labels="labels.jsonl", positives="teacher",
                    answer_negatives="drop")


def test_what_needs_a_positive_is_refused_for_queries_without_qrels(tiny_bert_dir, tiny_llama_dir, query_log,
                                                                   tmp_path, capsys):
    for args, said in ((["mine", "--model", str(tiny_bert_dir), "--strategy", "simans"], "--strategy simans"),
                       (["mine", "--model", str(tiny_bert_dir), "--relative-margin", "0.05"], "margin filters"),
                       (["label", "--llm", str(tiny_llama_dir)], "give --candidates")):
        out = tmp_path / "out.jsonl"
        assert main([*args, "--data", str(query_log), "--output", str(out), "--no-show-progress"]) == 2
        err = capsys.readouterr().err
        assert said in err and "no qrels" in err, err
        assert not out.exists()


def test_false_negatives_are_kept_dropped_or_made_positives(squad_mini_train_labels, tmp_path):
    records = read_labels(squad_mini_train_labels)
    rset = load_retrieval_set("squad-mini", "train")
    first = records[0]
    # the teacher rewards the line's second candidate 2 nats above the positive, the third 0.5 above
    rewards = list(first.rewards)
    rewards[1], rewards[2] = rewards[0] + 2.0, rewards[0] + 0.5
    edited = [LabelRecord(first.qid, first.pids, tuple(rewards), first.n_positives, 1), *records[1:]]
    path = tmp_path / "labels.jsonl"

    def run(mode: str):
        found = examples_from_labels(edited, rset, path, choice=PositiveChoice(false_negatives=mode,
                                                                               false_negative_margin=1.0))
        return [e for e in found.examples if e.qid == first.qid], found.skipped

    rows = rset.corpus.rows_of(list(first.pids))
    kept, _ = run("keep")
    assert len(kept) == 1 and rows[1] in kept[0].pool and rows[2] in kept[0].pool
    dropped, skipped = run("drop")
    assert len(dropped) == 1 and rows[1] not in dropped[0].pool and rows[2] in dropped[0].pool  # 0.5 < margin 1
    assert skipped["false negatives dropped"] >= 1
    promoted, skipped = run("positive")
    assert [e.positive for e in promoted] == [rows[0], rows[1]]  # an extra example with the false negative first
    assert all(rows[1] not in e.pool and rows[1] in e.positives for e in promoted)
    assert promoted[1].positive_reward == rewards[1]
    assert skipped["false negatives made positives"] >= 1


def test_run_chooses_the_supervision_from_the_data_and_says_so(query_log, tmp_path, capsys):
    import yaml

    from distill.supervision import choose_supervision

    queries_only = tmp_path / "queries_only"
    shutil.copytree(query_log, queries_only)
    write_jsonl(queries_only / "queries.jsonl",
                [{k: v for k, v in q.items() if k != "answers"} for q in read_jsonl(query_log / "queries.jsonl")])
    passages_only = tmp_path / "passages_only"
    passages_only.mkdir()
    shutil.copy(query_log / "corpus.jsonl", passages_only / "corpus.jsonl")
    expected = {"squad-mini": "qrels", str(query_log): "answers", str(queries_only): "queries",
                str(passages_only): "raw_text"}
    for data, kind in expected.items():
        assert choose_supervision(data, "train").kind == kind, data
        config = tmp_path / f"{kind}.yaml"
        config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / kind), "data": data, "model": "m", "llm": "l",
                                          "eval_data": "squad-mini"}))
        assert main(["run", str(config), "--dry-run"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])
        names = list(printed)
        assert ("generate" in names) == (kind == "raw_text")
        if kind in ("answers", "queries"):
            assert printed["mine"]["pool_size"] == 16
            assert printed["train"]["positives"] == {"answers": "answer-match+teacher",
                                                     "queries": "teacher+retriever"}[kind]
    with pytest.raises(Exception, match="supervision 'answers' asked for, but the data gives queries"):
        choose_supervision(str(queries_only), "train", "answers")
    with pytest.raises(Exception, match="holds no queries table"):
        choose_supervision(str(passages_only), "train", "qrels")


@pytest.mark.slow
def test_a_run_on_questions_without_qrels_goes_end_to_end(tiny_bert_dir, tiny_llama_dir, query_log, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out), "data": str(query_log), "eval_data": "squad-mini", "model": str(tiny_bert_dir),
        "llm": str(tiny_llama_dir), "show_progress": False, "allow_weak_teacher": True,
        "mine": {"cache": False, "pool_size": 6}, "eval": {"cache": False},
        "label": {"dtype": "float32", "device": "cpu"},
        "train": {"train_batch_size": 4, "num_negatives": 3, "max_steps": 3, "batch_dedup": "none", "cache": False}}))
    assert main(["run", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "supervision: answers (24 train queries without qrels, 12 with reference answers)" in printed
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped"].get("positives chosen by answer-match+teacher (kept)") == 24
    assert all(r["n_positives"] == 0 for r in read_jsonl(out / "labels.jsonl"))
    assert "nDCG@10" in printed and (out / "eval" / "after.json").is_file()


def test_the_demo_trains_from_answers_on_the_embedded_set_and_never_reads_its_withheld_qrels(capsys):
    """examples/demo.yaml (make demo) is the label-free case: squad-qa's train split has answers and no qrels,
    its test split has qrels, and the withheld train qrels beside them are read by no command."""
    from distill.data import load_retrieval_set
    from distill.run_plan import plan
    from distill.supervision import choose_supervision

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"
    train = load_retrieval_set("squad-qa", "train", unlabelled=True)
    test = load_retrieval_set("squad-qa", "test")
    assert not train.labelled and len(train.queries) == 240
    assert all(train.queries.table["answers"].to_pylist())
    assert len(test.queries) == 4905 and not set(train.queries.ids) & set(test.queries.ids)
    assert choose_supervision("squad-qa", "train", "answers").kind == "answers"
    with pytest.raises(Exception, match="no qrels/train.tsv"):  # auto never guesses a mistyped split
        choose_supervision("squad-qa", "train")
    _, stages, supervision = plan(demo)
    assert supervision.kind == "answers"
    settings = {stage.name: cfg for stage, cfg in stages}
    assert settings["mine"].pool_size == 8 and settings["train"].positives == "answer-match+teacher"
    assert "top 8" in supervision.describe(8)
    assert main(["run", str(demo), "--dry-run"]) == 0
    assert "retriever's top 8" in capsys.readouterr().out


def test_the_fitted_fusion_is_the_hand_computed_best_and_never_below_its_best_signal_on_its_evidence():
    import numpy as np

    from distill.training.positives import FusionRule, fit_fusion, hits_known_first

    # three pools of three passages; the known positive is passage 0 each time
    known = [np.array([True, False, False])] * 3
    pools = [  # the teacher is right on pools 0 and 1, the retriever on pool 2 only
        {"teacher": np.array([-1.0, -3.0, -2.0]), "retriever": np.array([0.1, 0.9, 0.5])},
        {"teacher": np.array([-1.0, -1.5, -4.0]), "retriever": np.array([0.2, 0.3, 0.8])},
        {"teacher": np.array([-2.0, -1.0, -3.0]), "retriever": np.array([0.9, 0.2, 0.1])}]
    # by hand, z-scores within each pool: the equal sum ties pools 0 and 1 (z(teacher) = -z(retriever) there) and
    # gets pool 2 ([1.40, 0.66, -2.07]); teacher + 0.5 x retriever gets pools 0 and 1 and misses pool 2
    # ([0.70, 0.94, -1.65]); all three would need a retriever weight in (0.62, 1), which the grid does not hold
    equal = FusionRule((("teacher", 1.0), ("retriever", 1.0)))
    assert [hits_known_first(equal.score(p), k) for p, k in zip(pools, known)] == [False, False, True]
    half = FusionRule((("teacher", 1.0), ("retriever", 0.5)))
    assert [hits_known_first(half.score(p), k) for p, k in zip(pools, known)] == [True, True, False]
    # the teacher alone also gets 2 of 3: the tie goes to the rule with more signals
    rule = fit_fusion(pools, known, "3 answer-matched queries")
    assert rule.accuracy == 2 / 3 and dict(rule.weights) == {"teacher": 1.0, "retriever": 0.5} and not rule.rrf
    assert rule.describe() == ("teacher + 0.5 x retriever, fitted on 3 answer-matched queries (known positive "
                               "first for 67% of them)")
    # on any evidence the fit is never below its best single signal
    rng = np.random.default_rng(0)
    for _ in range(20):
        pools = [{"teacher": rng.normal(size=5), "retriever": rng.normal(size=5), "relevance": rng.normal(size=5)}
                 for _ in range(12)]
        known = [np.eye(5, dtype=bool)[rng.integers(5)] for _ in pools]
        fitted = fit_fusion(pools, known, "x")
        for name in ("teacher", "retriever", "relevance"):
            alone = np.mean([hits_known_first(p[name], k) for p, k in zip(pools, known)])
            assert fitted.accuracy >= alone
