"""`distill mine` end to end: contract, shards, kill -9, exports, the teacher
filter, and the same negatives as sentence-transformers' miner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_9_twice_then_finish, read_jsonl, write_jsonl
from distill.cli import main
from distill.data import load_retrieval_set
from distill.model import BiEncoder

ROOT = Path(__file__).resolve().parents[1]


def mine_args(model: Path | None, output: Path, cache: Path, *extra: str) -> list[str]:
    return ["mine", *(["--model", str(model)] if model else []), "--data", "squad-mini", "--split", "train",
            "--output", str(output), "--cache-dir", str(cache), "--no-show-progress", *extra]


@pytest.mark.slow
def test_candidates_contract(tiny_bert_dir, tmp_path):
    out = tmp_path / "cand.jsonl"
    assert main(mine_args(tiny_bert_dir, out, tmp_path / "cache", "--num-negatives", "6")) == 0
    rset = load_retrieval_set("squad-mini", "train")
    records = read_jsonl(out)
    assert [r["qid"] for r in records] == rset.queries.ids
    encoder = BiEncoder.load(str(tiny_bert_dir), device="cpu")
    texts = dict(zip(rset.queries.ids, rset.queries.texts))
    for r in records[:40]:
        positives = [p for p, g in rset.qrels[r["qid"]].items() if g > 0]
        assert r["positives"] == positives and len(r["pids"]) == 6 and not set(r["pids"]) & set(positives)
        assert r["source"] == "dense" and r["score_kind"] == "dense"
        assert r["scores"] == sorted(r["scores"], reverse=True)
        q = encoder.encode([texts[r["qid"]]], kind="query")[0]
        d = encoder.encode(rset.corpus.passages_at(rset.corpus.rows_of(r["pids"] + positives)), kind="passage")
        np.testing.assert_allclose(d @ q, r["scores"] + r["positive_scores"], atol=1e-4)


def test_query_text_in_the_corpus_is_never_its_negative(tiny_bert_dir, tmp_path, copy_of_squad_mini):
    queries = read_jsonl(copy_of_squad_mini / "queries.jsonl")
    corpus = read_jsonl(copy_of_squad_mini / "corpus.jsonl")
    corpus.append({"_id": "echo", "title": "", "text": queries[0]["text"]})  # a passage that is the query itself
    write_jsonl(copy_of_squad_mini / "corpus.jsonl", corpus)
    out = tmp_path / "cand.jsonl"
    args = mine_args(tiny_bert_dir, out, tmp_path / "cache", "--strategy", "random", "--num-negatives", "300")
    args[args.index("squad-mini")] = str(copy_of_squad_mini)
    assert main(args + ["--include-title"]) == 0
    by_qid = {r["qid"]: r for r in read_jsonl(out)}
    assert "echo" not in by_qid[queries[0]["_id"]]["pids"]
    assert any("echo" in r["pids"] for r in by_qid.values())  # other queries may draw it


def test_shards_concatenate_to_the_whole_job(tiny_bert_dir, tmp_path):
    cache = tmp_path / "cache"
    whole = tmp_path / "whole.jsonl"
    assert main(mine_args(tiny_bert_dir, whole, cache, "--strategy", "simans", "--chunk-size", "7")) == 0
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.jsonl"
        assert main(mine_args(tiny_bert_dir, part, cache, "--strategy", "simans", "--shard", f"{i}/3")) == 0
        parts.append(part.read_bytes())
    assert b"".join(parts) == whole.read_bytes()


def _mine_process(model: Path, output: Path, cache: Path) -> subprocess.Popen:
    args = mine_args(model, output, cache, "--strategy", "hybrid", "--chunk-size", "1", "--num-negatives", "9")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_bytes(tiny_bert_dir, tmp_path):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference.jsonl"
    process = _mine_process(tiny_bert_dir, reference, cache)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    killed = tmp_path / "killed.jsonl"
    kill_9_twice_then_finish(lambda: _mine_process(tiny_bert_dir, killed, cache), killed, max_pause=0.05)
    assert killed.read_bytes() == reference.read_bytes()


def test_exports_for_flagembedding_and_sentence_transformers(tiny_bert_dir, tmp_path):
    from datasets import load_from_disk

    cache, out = tmp_path / "cache", tmp_path / "cand.jsonl"
    assert main(mine_args(tiny_bert_dir, out, cache, "--num-negatives", "4", "--export", "flagembedding",
                          "--export-output", str(tmp_path / "flag.jsonl"))) == 0
    assert main(mine_args(tiny_bert_dir, out, cache, "--num-negatives", "4", "--export", "n-tuple-scores",
                          "--export-output", str(tmp_path / "st"))) == 0  # the mining itself is skipped: complete
    rset = load_retrieval_set("squad-mini", "train")
    text_of = dict(zip(rset.corpus.ids.to_pylist(), rset.corpus.passages_at(np.arange(len(rset.corpus)))))
    records = read_jsonl(out)
    flag = read_jsonl(tmp_path / "flag.jsonl")
    assert len(flag) == len(records)
    for line, record in zip(flag, records):
        assert line["pos"] == [text_of[p] for p in record["positives"]]
        assert line["neg"] == [text_of[p] for p in record["pids"]]
        assert line["neg_scores"] == record["scores"] and line["pos_scores"] == record["positive_scores"]
    st = load_from_disk(str(tmp_path / "st"))
    assert st.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4", "scores"]
    assert len(st) == sum(len(r["positives"]) for r in records)
    row, record = st[0], records[0]
    assert row["negative_3"] == text_of[record["pids"][2]]
    np.testing.assert_allclose(row["scores"], record["positive_scores"][:1] + record["scores"], atol=1e-6)


def test_teacher_labels_keep_likely_positives_out(tiny_bert_dir, tmp_path):
    cache = tmp_path / "cache"
    plain = tmp_path / "plain.jsonl"
    assert main(mine_args(tiny_bert_dir, plain, cache, "--num-negatives", "5")) == 0
    records = read_jsonl(plain)
    labels = tmp_path / "labels.jsonl"  # the teacher rates each query's first dense negative above its positive
    write_jsonl(labels, [{"qid": r["qid"], "pids": r["positives"] + r["pids"][:2],
                          "rewards": [-1.0] * len(r["positives"]) + [-0.5, -3.0],
                          "n_positives": len(r["positives"])} for r in records])
    filtered = tmp_path / "filtered.jsonl"
    assert main(mine_args(tiny_bert_dir, filtered, cache, "--num-negatives", "5", "--labels", str(labels))) == 0
    for before, after in zip(records, read_jsonl(filtered)):
        assert before["pids"][0] not in after["pids"]
        assert after["pids"][:4] == before["pids"][1:]


def test_bad_input_is_one_line_exit_2(tiny_bert_dir, tmp_path, capsys):
    assert main(mine_args(None, tmp_path / "c.jsonl", tmp_path / "cache", "--strategy", "dense")) == 2
    assert "needs a dense --model" in capsys.readouterr().err
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"qid": "q", "pids": ["a"], "rewards": [1.0], "n_positives": 1}\n{"qid": "q", "pids": 3}\n')
    assert main(mine_args(None, tmp_path / "c.jsonl", tmp_path / "cache", "--strategy", "random",
                          "--labels", str(labels))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{labels}:2: field "pids"' in err[0]


@pytest.mark.slow
def test_same_negatives_as_sentence_transformers(minilm_dir, tmp_path):
    """Same model, data and settings (top, rank window, margin): >= 99% of ST's chosen ids chosen here."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    out = tmp_path / "cand.jsonl"
    settings = ["--range-min", "2", "--range-max", "30", "--relative-margin", "0.05", "--num-negatives", "5"]
    assert main(mine_args(minilm_dir, out, tmp_path / "cache", *settings)) == 0
    ours = {r["qid"]: r["pids"] for r in read_jsonl(out)}

    rset = load_retrieval_set("squad-mini", "train")
    passages = rset.corpus.passages_at(np.arange(len(rset.corpus)))
    pid_of = dict(zip(passages, rset.corpus.ids.to_pylist()))
    qid_of = dict(zip(rset.queries.texts, rset.queries.ids))
    text_of = dict(zip(rset.corpus.ids.to_pylist(), passages))
    pairs = [(text, text_of[p]) for qid, text in zip(rset.queries.ids, rset.queries.texts)
             for p, g in rset.qrels[qid].items() if g > 0]
    mined = mine_hard_negatives(Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]}),
                                SentenceTransformer(str(minilm_dir), device="cpu"), corpus=passages, range_min=2,
                                range_max=30, relative_margin=0.05, num_negatives=5, sampling_strategy="top",
                                output_format="labeled-list", use_faiss=True, verbose=False)
    theirs = {}
    for row in mined:
        negatives = [pid_of[t] for t, label in zip(row["positive"], row["labels"]) if label == 0]
        theirs[qid_of[row["anchor"]]] = negatives
    total = sum(len(v) for v in theirs.values())
    shared = sum(len(set(v) & set(ours[q])) for q, v in theirs.items())
    assert total > 0.9 * 5 * len(theirs)
    assert shared / total >= 0.99, f"{shared}/{total}"


def test_label_scores_the_mined_candidates(tiny_bert_dir, tiny_llama_dir, tmp_path):
    candidates = tmp_path / "cand.jsonl"
    assert main(mine_args(tiny_bert_dir, candidates, tmp_path / "cache", "--num-negatives", "3")) == 0
    labels = tmp_path / "labels.jsonl"
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", "squad-mini", "--split", "train", "--candidates",
                 str(candidates), "--output", str(labels), "--shard", "0/24", "--dtype", "float32",
                 "--no-show-progress"]) == 0
    mined = {r["qid"]: r for r in read_jsonl(candidates)}
    for record in read_jsonl(labels):
        m = mined[record["qid"]]
        assert record["pids"] == m["positives"] + m["pids"] and len(record["rewards"]) == len(record["pids"])
