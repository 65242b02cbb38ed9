"""`distill label` end to end on the hf backend: the labels contract, the random
candidates, candidates files, queries without answers, shards, and resuming
after kill -9 to the very same bytes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import kill_9_twice_then_finish, read_jsonl, write_jsonl
from distill.cli import main
from distill.data import load_retrieval_set
from distill.data.records import read_labels
from labelers.backends.hf import HFBackend, HFBackendConfig
from labelers.prompts import load_template
from labelers.reward import RewardInputs

ROOT = Path(__file__).resolve().parents[1]


def label_args(llm: Path, data: Path | str, output: Path, *extra: str) -> list[str]:
    return ["label", "--llm", str(llm), "--data", str(data), "--split", "test", "--output", str(output),
            "--dtype", "float32", "--device", "cpu", "--no-show-progress", *extra]


def test_labels_follow_the_contract_and_equal_direct_scores(tiny_llama_dir, small_beir, tmp_path):
    out = tmp_path / "labels.jsonl"
    assert main(label_args(tiny_llama_dir, small_beir, out)) == 0
    records = read_jsonl(out)
    rset = load_retrieval_set(small_beir, "test")
    assert [r["qid"] for r in records] == rset.queries.ids
    corpus_ids = set(rset.corpus.ids.to_pylist())
    for r in records:
        positives = [p for p, g in rset.qrels[r["qid"]].items() if g > 0]
        assert r["pids"][:r["n_positives"]] == positives
        negatives = r["pids"][r["n_positives"]:]
        assert len(negatives) == 7 and not set(negatives) & set(positives) and len(set(r["pids"])) == len(r["pids"])
        assert set(r["pids"]) <= corpus_ids
        assert len(r["rewards"]) == len(r["n_tokens"]) == len(r["answer_index"]) == len(r["pids"])
        assert r["target"] == "answer" and r["prompt"] == "reward_en_chat" and r["normalization"] == "mean"
        assert all(np.isfinite(r["rewards"])) and max(r["rewards"]) < 0

    # One record recomputed by hand: each (passage, answer) pair alone, best mean log-prob kept.
    r = records[0]
    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32"))
    inputs = RewardInputs(AutoTokenizer.from_pretrained(tiny_llama_dir), load_template("reward_en_chat"))
    query = next(q for q in read_jsonl(small_beir / "queries.jsonl") if q["_id"] == r["qid"])
    passages = {p["_id"]: (p.get("title", "") + " " + p["text"]).strip() for p in read_jsonl(small_beir / "corpus.jsonl")}
    for pid, reward, n_tokens, which in zip(r["pids"], r["rewards"], r["n_tokens"], r["answer_index"]):
        each = [backend.score(*map(lambda x: [x], inputs.build(query["text"], passages[pid], a)))[0]
                for a in query["answers"]]
        best = max(range(len(each)), key=lambda k: each[k].logprob_mean)
        assert which == best and n_tokens == each[best].n_tokens
        assert reward == pytest.approx(each[best].logprob_mean, abs=1e-4)


@pytest.mark.slow
def test_random_candidates_depend_on_the_seed_only(tiny_llama_dir, small_beir, tmp_path):
    runs = {}
    for name, extra in {"a": ["--seed", "3"], "b": ["--seed", "3", "--chunk-size", "2"], "c": ["--seed", "4"]}.items():
        assert main(label_args(tiny_llama_dir, small_beir, tmp_path / f"{name}.jsonl", *extra)) == 0
        runs[name] = [r["pids"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    assert runs["a"] == runs["b"]  # chunking does not change the draw
    assert runs["a"] != runs["c"]


def test_shards_concatenate_to_the_whole_job(tiny_llama_dir, small_beir, tmp_path):
    assert main(label_args(tiny_llama_dir, small_beir, tmp_path / "all.jsonl")) == 0
    parts = []
    for i in range(3):
        assert main(label_args(tiny_llama_dir, small_beir, tmp_path / f"part{i}.jsonl", "--shard", f"{i}/3")) == 0
        parts += read_jsonl(tmp_path / f"part{i}.jsonl")
    whole = read_jsonl(tmp_path / "all.jsonl")
    assert [(r["qid"], r["pids"]) for r in parts] == [(r["qid"], r["pids"]) for r in whole]
    for a, b in zip(parts, whole):
        np.testing.assert_allclose(a["rewards"], b["rewards"], atol=1e-5)


def test_rerun_skips_a_finished_job_and_refuses_changed_settings(tiny_llama_dir, small_beir, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    assert main(label_args(tiny_llama_dir, small_beir, out)) == 0
    before = out.read_bytes()
    assert main(label_args(tiny_llama_dir, small_beir, out)) == 0
    assert "already complete" in capsys.readouterr().out and out.read_bytes() == before
    assert main(label_args(tiny_llama_dir, small_beir, out, "--seed", "9")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed" in err and out.read_bytes() == before
    out.with_name("stray.jsonl").write_text("{}\n")
    assert main(label_args(tiny_llama_dir, small_beir, out.with_name("stray.jsonl"))) == 2
    assert "not written by this job" in capsys.readouterr().err


def test_candidates_file_is_used_and_checked(tiny_llama_dir, small_beir, tmp_path, capsys):
    rset = load_retrieval_set(small_beir, "test")
    qids, pids = rset.queries.ids, rset.corpus.ids.to_pylist()
    candidates = tmp_path / "candidates.jsonl"
    write_jsonl(candidates, [{"qid": qids[0], "pids": pids[:3], "scores": [0.9, 0.8, 0.7], "source": "dense"},
                             {"qid": qids[1], "pids": pids[5:7], "scores": [0.5, 0.4], "source": "dense"}])
    out = tmp_path / "labels.jsonl"
    assert main(label_args(tiny_llama_dir, small_beir, out, "--candidates", str(candidates))) == 0
    records = read_jsonl(out)
    assert [r["qid"] for r in records] == qids[:2]
    for r, listed in zip(records, [pids[:3], pids[5:7]]):
        positives = r["pids"][:r["n_positives"]]
        assert r["pids"][r["n_positives"]:] == [p for p in listed if p not in positives]

    capsys.readouterr()
    for bad, field in [({"qid": qids[0], "pids": ["no-such-passage"]}, "pids"),
                       ({"qid": "no-such-query", "pids": pids[:2]}, "qid"),
                       ({"pids": pids[:2]}, "qid")]:
        write_jsonl(candidates, [{"qid": qids[1], "pids": pids[:2]}, bad])
        assert main(label_args(tiny_llama_dir, small_beir, tmp_path / "bad.jsonl", "--candidates", str(candidates),
                               "--overwrite")) == 2
        err = capsys.readouterr().err.strip()
        assert f'candidates.jsonl:2: field "{field}"' in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_queries_without_answers(tiny_llama_dir, small_beir, tmp_path, capsys):
    queries = read_jsonl(small_beir / "queries.jsonl")
    for q in queries[::2]:
        q.pop("answers")
    write_jsonl(small_beir / "queries.jsonl", queries)
    no_answer = {q["_id"] for q in queries if "answers" not in q}

    assert main(label_args(tiny_llama_dir, small_beir, tmp_path / "upr.jsonl")) == 0
    for r in read_jsonl(tmp_path / "upr.jsonl"):
        expected = ("query", "query_likelihood_en_chat") if r["qid"] in no_answer else ("answer", "reward_en_chat")
        assert (r["target"], r["prompt"]) == expected

    assert main(label_args(tiny_llama_dir, small_beir, tmp_path / "gen.jsonl", "--missing-answers", "generate",
                           "--max-answer-tokens", "6")) == 0
    generated = [r for r in read_jsonl(tmp_path / "gen.jsonl") if r["qid"] in no_answer]
    assert generated and all(r["target"] == "generated_answer" and r["answer"] for r in generated)

    assert main(label_args(tiny_llama_dir, small_beir, tmp_path / "err.jsonl", "--missing-answers", "error")) == 2
    assert "has no answers" in capsys.readouterr().err


def _label_process(llm: Path, output: Path, *extra: str) -> subprocess.Popen:
    args = label_args(llm, "squad-mini", output, "--shard", "0/10", "--chunk-size", "1", "--num-random", "15", *extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_bytes(tiny_llama_dir, tmp_path):
    reference = tmp_path / "reference.jsonl"
    process = _label_process(tiny_llama_dir, reference)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    killed = tmp_path / "killed.jsonl"
    kill_9_twice_then_finish(lambda: _label_process(tiny_llama_dir, killed), killed, max_pause=0.5)
    assert killed.read_bytes() == reference.read_bytes()


def test_relevance_target_with_signals_scores_each_signal_in_one_pass(tiny_llama_dir, small_beir, tmp_path, capsys):
    """`--target relevance` needs no answers; `--signals` adds named signals aligned with pids: the relevance one
    is the rewards themselves, the query one equals a `--target query` run's rewards."""
    queries = read_jsonl(small_beir / "queries.jsonl")
    for q in queries[::2]:
        q.pop("answers")
    write_jsonl(small_beir / "queries.jsonl", queries)
    out, upr = tmp_path / "relevance.jsonl", tmp_path / "upr.jsonl"
    assert main(label_args(tiny_llama_dir, small_beir, out, "--target", "relevance", "--signals", "query",
                           "relevance", "--num-random", "3")) == 0
    assert main(label_args(tiny_llama_dir, small_beir, upr, "--target", "query", "--num-random", "3")) == 0
    records, by_query = read_jsonl(out), {r["qid"]: r for r in read_jsonl(upr)}
    assert len(records) == len(queries)
    for r in records:
        assert (r["target"], r["prompt"]) == ("relevance", "relevance_en_chat") and "answer_index" not in r
        assert list(r["signals"]) == ["query", "relevance"] and r["signals"]["relevance"] == r["rewards"]
        assert r["pids"] == by_query[r["qid"]]["pids"]
        np.testing.assert_allclose(r["signals"]["query"], by_query[r["qid"]]["rewards"], atol=1e-5)
    assert [r.signals["relevance"] for r in read_labels(out)] == [tuple(r["rewards"]) for r in records]

    # one record by hand: log p(Yes) - log p(No) of each passage, scored alone
    r = records[0]
    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32"))
    inputs = RewardInputs(AutoTokenizer.from_pretrained(tiny_llama_dir), load_template("relevance_en_chat"))
    query = next(q for q in queries if q["_id"] == r["qid"])
    passages = {p["_id"]: (p.get("title", "") + " " + p["text"]).strip() for p in read_jsonl(small_beir / "corpus.jsonl")}
    for pid, reward in zip(r["pids"], r["rewards"]):
        prompt, yes, no = inputs.build_relevance(query["text"], passages[pid])
        yes_score, no_score = backend.score([prompt, prompt], [yes, no])
        assert reward == pytest.approx(yes_score.logprob_sum - no_score.logprob_sum, abs=1e-4)

    capsys.readouterr()
    assert main(label_args(tiny_llama_dir, small_beir, tmp_path / "a.jsonl", "--signals", "answer")) == 2
    assert "has no answers, which --signals answer scores" in capsys.readouterr().err
    assert main(label_args(tiny_llama_dir, small_beir, tmp_path / "b.jsonl", "--signals", "query", "bm25")) == 2
    assert "'bm25' is not a signal" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_with_several_signals_then_rerun_gives_the_same_bytes(tiny_llama_dir, tmp_path):
    extra = ("--target", "relevance", "--signals", "relevance", "query", "answer", "--num-random", "5")
    reference = tmp_path / "reference.jsonl"
    process = _label_process(tiny_llama_dir, reference, *extra)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    assert all(set(r["signals"]) == {"relevance", "query", "answer"} for r in read_jsonl(reference))
    killed = tmp_path / "killed.jsonl"
    kill_9_twice_then_finish(lambda: _label_process(tiny_llama_dir, killed, *extra), killed, max_pause=0.5)
    assert killed.read_bytes() == reference.read_bytes()
