"""`distill train` end to end on CPU: batches, re-mining, DDP (gloo, 2 processes) against one process,
GradCache against plain backprop, kill -9 then --resume, and the saved model, log, plot and card."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kill_9_after_new_checkpoints, read_jsonl, write_jsonl
from distill.cli import main
from distill.data import load_retrieval_set
from distill.training.batches import plan_epoch
from distill.training.examples import examples_from_labels
from distill.data.records import read_labels
from distill.training.remine import ScoreTracker

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
GLOO_EXIT_ABORT = "terminate called without an active exception"


def train_flags(model: Path, labels: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", "squad-mini", "--labels", str(labels), "--device", "cpu",
            "--no-show-progress", "--no-cache", "--train-batch-size", "8", "--num-negatives", "3", *extra]


def squad_mini_examples(labels: Path):
    rset = load_retrieval_set("squad-mini", "train")
    return rset, examples_from_labels(read_labels(labels), rset, labels, "first").examples


def test_batches_never_reuse_a_positive_and_are_deterministic(squad_mini_train_labels):
    rset, examples = squad_mini_examples(squad_mini_train_labels)
    for dedup in ("positives", "strict"):
        plan = plan_epoch(examples, epoch=0, seed=3, batch_size=8, num_negatives=3, dedup=dedup)
        assert plan.batches and len(plan.batches) * 8 + plan.left_out == len(examples)
        seen = [g.example for batch in plan.batches for g in batch]
        assert len(seen) == len(set(seen))
        for batch in plan.batches:
            positives = [examples[g.example].positive for g in batch]
            keys = positives + [r for g in batch for r in g.negatives.tolist()]
            assert len(set(positives)) == len(positives)
            assert all(keys.count(p) == 1 for p in positives)  # never also someone's negative
            assert len({examples[g.example].query for g in batch}) == len(batch)
            if dedup == "strict":
                assert len(set(keys)) == len(keys)
            for g in batch:
                assert len(g.negatives) == 3 and set(g.negatives.tolist()) <= set(examples[g.example].pool.tolist())
                assert g.rewards[0] == examples[g.example].positive_reward
        again = plan_epoch(examples, epoch=0, seed=3, batch_size=8, num_negatives=3, dedup=dedup)
        assert [[g.example for g in b] for b in again.batches] == [[g.example for g in b] for b in plan.batches]
    other = plan_epoch(examples, epoch=1, seed=3, batch_size=8, num_negatives=3)
    assert [g.example for g in other.batches[0]] != [g.example for g in plan.batches[0]]
    # two tasks: every batch holds one task only
    for i, e in enumerate(examples):
        e.task = i % 2
    plan = plan_epoch(examples, epoch=0, seed=3, batch_size=8, num_negatives=3)
    assert {len({examples[g.example].task for g in b}) for b in plan.batches} == {1}
    assert {examples[b[0].example].task for b in plan.batches} == {0, 1}


def test_in_batch_keys_equal_to_a_querys_positive_are_masked(squad_mini_train_labels):
    from distill.training.batches import false_negative_mask

    rset, examples = squad_mini_examples(squad_mini_train_labels)
    plan = plan_epoch(examples, epoch=0, seed=0, batch_size=8, num_negatives=3, dedup="none")
    batch = plan.batches[0]
    batch[1].negatives[0] = examples[batch[0].example].positive  # query 0's positive as query 1's negative
    mask = false_negative_mask(examples, batch)
    key_rows = [r for g in batch for r in [examples[g.example].positive, *g.negatives.tolist()]]
    for b, g in enumerate(batch):
        own = set(examples[g.example].positives.tolist())
        assert mask[b].tolist() == [r in own and k != 4 * b for k, r in enumerate(key_rows)]
    assert mask[0, 4 + 1] and not mask[0, 0]


def test_dynamic_rule_flags_examples_whose_negatives_got_easy():
    tracker = ScoreTracker()
    for example, first, later in [(0, 0.6, 0.5), (1, 0.6, 0.55), (2, 0.9, 0.7), (3, -0.2, -0.3), (4, 0.95, 0.85)]:
        tracker.observe(example, first)
        tracker.observe(example, later)
    # 0.5*1.15 = 0.575 < 0.6 -> stale; 0.55*1.15 = 0.6325 >= 0.6 -> hard still; 0.7*1.15 < 0.9 -> stale;
    # -0.3*1.15 < -0.2 -> stale; 0.85 >= 0.8 -> never (|s| too high)
    assert tracker.stale(1.15, 0.8) == [0, 2, 3]
    tracker.reset([0])
    tracker.observe(0, 0.4)
    assert 0 not in tracker.stale(1.15, 0.8)


def run_step(tmp_path: Path, name: str, processes: int, flags: list[str]) -> dict:
    out = tmp_path / f"{name}.pt"
    launcher = [sys.executable, str(ROOT / "tests" / "train_step.py")] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
         str(ROOT / "tests" / "train_step.py")]
    command = [*launcher, str(out), *flags, "--output", str(tmp_path / name)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and GLOO_EXIT_ABORT in result.stderr:
        # a rare abort in gloo's C++ threads with no Python error, as at interpreter shutdown (pytorch/pytorch
        # PR 179291 describes the mechanism); seen once in many CI runs. One rerun; any other failure fails at once
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("loss", ["rank_filter:1.0,infonce:0.2", "kl"])
@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tiny_bert_no_dropout, squad_mini_train_labels, tmp_path, loss):
    flags = train_flags(tiny_bert_no_dropout, squad_mini_train_labels, "--loss", loss)
    one = run_step(tmp_path, "one", 1, flags)
    two = run_step(tmp_path, "two", 2, flags)
    cached = run_step(tmp_path, "cached", 1, [*flags, "--grad-cache-chunk-size", "5"])
    assert one["queries"] == two["queries"] == cached["queries"]
    assert abs(one["loss"] - two["loss"]) < 1e-5 and abs(one["loss"] - cached["loss"]) < 1e-5
    assert sum(float(g.abs().sum()) for g in one["grads"] if g is not None) > 0
    for a, b, c in zip(one["grads"], two["grads"], cached["grads"]):
        if a is None:  # a parameter outside the embedding path (BERT's pooler)
            assert b is None and c is None
            continue
        # fp32 sums in another order (two ranks' partial gradients, then the all-reduce) at logit scale 1/τ = 20:
        # observed up to 1.7e-5 on gradients up to 0.2 (CI, rank_filter), so 5e-5 plus 1e-4 of the value; a wrong
        # gather or a lost gradient is off by orders of magnitude more (the gradients sum to well over 1)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=5e-5)


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_same_metrics(tiny_bert_dir, squad_mini_train_labels, tmp_path):
    flags = train_flags(tiny_bert_dir, squad_mini_train_labels, "--max-steps", "60", "--save-steps", "5",
                        "--eval-split", "test", "--eval-steps", "20", "--logging-steps", "5", "--seed", "1")
    whole = tmp_path / "whole"
    assert main(["train", *flags, "--output", str(whole)]) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "distill", "train", *flags, "--output", str(killed)]
    kills = kill_9_after_new_checkpoints([command, command + ["--resume"]], killed / "checkpoint" / "state.json",
                                         0.5, ENV)
    assert kills >= 1 and not (killed / "training_summary.json").exists()
    finished = subprocess.run(command + ["--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    want = json.loads((whole / "training_summary.json").read_text())
    got = json.loads((killed / "training_summary.json").read_text())
    assert got["steps"] == want["steps"] == 60
    assert want["after"]["ndcg@10"] != want["before"]["ndcg@10"]  # training changed the model
    assert abs(got["after"]["ndcg@10"] - want["after"]["ndcg@10"]) <= 0.001  # within 0.1 points
    log = read_jsonl(killed / "train_log.jsonl")
    steps = [r["step"] for r in log if r["kind"] == "train"]
    assert steps == list(range(5, 61, 5))  # nothing lost, nothing logged twice
    want_losses = [r["loss"] for r in read_jsonl(whole / "train_log.jsonl") if r["kind"] == "train"]
    np.testing.assert_allclose([r["loss"] for r in log if r["kind"] == "train"], want_losses, atol=1e-4)


@pytest.mark.slow
def test_trained_folder_loads_in_sentence_transformers_with_card_log_and_plot(tiny_bert_dir, squad_mini_train_labels,
                                                                             tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from distill.model import BiEncoder

    out = tmp_path / "model"
    flags = [*train_flags(tiny_bert_dir, squad_mini_train_labels, "--max-steps", "12", "--eval-split", "test",
                          "--eval-steps", "6", "--logging-steps", "3", "--loss", "kl:1.0,infonce:0.2"),
             "--output", str(out)]
    assert main(["train", *flags]) == 0
    texts = ["who wrote the treaty?", "The treaty was signed in 1648."]
    ours = BiEncoder.load(out, device="cpu").encode(texts, kind="passage")
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours, BiEncoder.load(tiny_bert_dir, device="cpu").encode(texts, kind="passage"), atol=1e-4)
    card = (out / "README.md").read_text()
    assert "kl:1,infonce:0.2" in card and "library_name: sentence-transformers" in card and "| trained |" in card
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "best" / "modules.json").exists() and not (out / "checkpoint").exists()
    log = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 6, 12]
    assert all(set(r["terms"]) == {"kl", "infonce"} for r in log if r["kind"] == "train")
    capsys.readouterr()
    assert main(["train", *flags]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["train", *flags[:-1], str(tmp_path / "other"), "--labels", str(tmp_path / "missing.jsonl")]) == 2


def test_remining_follows_the_student(tiny_bert_dir, squad_mini_train_labels, tmp_path):
    from distill.training.config import TrainConfig
    from distill.training.trainer import Trainer
    from distill.training.distributed import Distributed

    cfg = TrainConfig(model=str(tiny_bert_dir), data=["squad-mini"], labels=[squad_mini_train_labels],
                      output=tmp_path / "r", loss="infonce", device="cpu", cache=False, train_batch_size=8,
                      num_negatives=3, remine_pool_size=4, range_min=1, range_max=20, show_progress=False)
    trainer = Trainer(cfg, Distributed())
    before = [e.pool.copy() for e in trainer.examples]
    trainer.remine(list(range(len(trainer.examples))), "refresh")
    rset = trainer.rsets[0]
    passages = trainer.encoder.encode(rset.corpus.passages_at(np.arange(len(rset.corpus))), kind="passage")
    queries = trainer.encoder.encode([e.query for e in trainer.examples], kind="query")
    changed = 0
    for example, q, old in zip(trainer.examples, queries, before):
        scores = passages @ q
        positives = set(rset.corpus.rows_of(rset.positives(example.qid)).tolist())
        ranking = [r for r in np.lexsort((np.arange(len(scores)), -scores)).tolist() if r not in positives]
        # the window [1, 5) of the student's ranking; faiss and numpy sum in different orders, so two passages
        # whose scores differ by float rounding may swap across the window's edge: compare the scores there
        window = ranking[1:5]
        assert not positives & set(example.pool.tolist())
        np.testing.assert_allclose(np.sort(scores[example.pool]), np.sort(scores[window]), atol=1e-5)
        outside = scores[[ranking[0], ranking[5]]]  # the nearest rows just outside the window
        clear = [r for r in window if np.abs(outside - scores[r]).min() > 1e-5]
        assert set(clear) <= set(example.pool.tolist())
        changed += not np.array_equal(np.sort(old), np.sort(example.pool))
    assert changed > len(before) // 2
    # the rest of the epoch is planned with the new pools
    pools = {i: set(e.pool.tolist()) for i, e in enumerate(trainer.examples)}
    assert all(set(g.negatives.tolist()) <= pools[g.example] for b in trainer.plan.batches for g in b)


def test_refreshes_stop_when_less_than_half_an_interval_is_left():
    from distill.training.remine import due

    assert [s for s in range(1, 77) if due(s, 25, 76)] == [25, 50]  # not 75: one step would use its negatives
    assert [s for s in range(1, 101) if due(s, 25, 100)] == [25, 50, 75]
    assert [s for s in range(1, 251) if due(s, 100, 250)] == [100, 200]  # 50 steps left: half an interval
    assert [s for s in range(1, 241) if due(s, 100, 240)] == [100]
    assert not any(due(s, 0, 100) for s in range(1, 101))


def test_bad_labels_line_names_file_line_and_field(tiny_bert_dir, squad_mini_train_labels, tmp_path, capsys):
    records = read_jsonl(squad_mini_train_labels)
    records[3]["pids"][2] = "no-such-passage"
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, records)
    assert main(["train", *train_flags(tiny_bert_dir, bad), "--output", str(tmp_path / "o")]) == 2
    assert f"{bad}:4: field \"pids\"" in capsys.readouterr().err


def test_drop_disputed_leaves_out_queries_the_teacher_does_not_confirm(tiny_bert_dir, squad_mini_train_labels,
                                                                       tmp_path, capsys):
    records = read_jsonl(squad_mini_train_labels)
    for record in records:  # the positive first by a clear margin ...
        record["rewards"] = [0.0] + [-1.0 - j for j in range(len(record["pids"]) - 1)]
    records[1]["rewards"][3] = 0.0   # ... but a negative tied with it
    records[2]["rewards"][5] = 0.5   # ... and one rewarded above it
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, records)
    rset = load_retrieval_set("squad-mini", "train")
    kept = examples_from_labels(read_labels(labels), rset, labels, "first")
    dropped = examples_from_labels(read_labels(labels), rset, labels, "first", drop_disputed=True)
    assert len(kept.examples) == len(records) and kept.skipped["teacher prefers a negative"] == 0
    assert [e.qid for e in dropped.examples] == [r["qid"] for i, r in enumerate(records) if i not in (1, 2)]
    assert dropped.skipped["teacher prefers a negative"] == 2

    out = tmp_path / "model"
    assert main(["train", *train_flags(tiny_bert_dir, labels), "--drop-disputed", "--max-steps", "1",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["examples"] == len(records) - 2 and summary["skipped"]["teacher prefers a negative"] == 2
    assert main(["train", "--model", str(tiny_bert_dir), "--data", "squad-mini", "--candidates", str(labels),
                 "--drop-disputed", "--output", str(tmp_path / "o")]) == 2
    assert ("--drop-disputed, --keep-top-margin, --positives, --false-negatives and --answer-negatives need the "
            "teacher's rewards") in capsys.readouterr().err


def test_keep_top_margin_keeps_the_queries_the_teacher_confirms_most_clearly(tiny_bert_dir, squad_mini_train_labels,
                                                                             tmp_path, capsys):
    records = read_jsonl(squad_mini_train_labels)
    rng = np.random.default_rng(3)
    margins = rng.permutation(len(records)) - 2.5   # distinct; the lowest three are disputed (margin <= 0)
    for record, margin in zip(records, margins):
        record["rewards"] = [0.0] + [-margin - j for j in range(len(record["pids"]) - 1)]
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, records)
    rset = load_retrieval_set("squad-mini", "train")
    by_margin = sorted(range(len(records)), key=lambda i: -margins[i])

    for share in (0.5, 0.25, 1.0):
        n = round(share * len(records))
        kept = examples_from_labels(read_labels(labels), rset, labels, "first", keep_top_margin=share)
        assert [e.qid for e in kept.examples] == [records[i]["qid"] for i in sorted(by_margin[:n])]  # file order
        assert kept.skipped.get("below the teacher-margin cut", 0) == len(records) - n
    both = examples_from_labels(read_labels(labels), rset, labels, "first", drop_disputed=True, keep_top_margin=1.0)
    assert len(both.examples) == len(records) - 3 and both.skipped["teacher prefers a negative"] == 3
    # A cut that reaches below zero margin: drop_disputed then removes the disputed ones among those kept.
    n = len(records) - 1
    both = examples_from_labels(read_labels(labels), rset, labels, "first", drop_disputed=True,
                                keep_top_margin=n / len(records))
    assert [e.qid for e in both.examples] == [records[i]["qid"] for i in sorted(by_margin[:len(records) - 3])]
    assert both.skipped["below the teacher-margin cut"] == 1 and both.skipped["teacher prefers a negative"] == 2

    out = tmp_path / "model"
    assert main(["train", *train_flags(tiny_bert_dir, labels), "--keep-top-margin", "0.5", "--max-steps", "1",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["examples"] == round(0.5 * len(records))
    assert main(["train", *train_flags(tiny_bert_dir, labels), "--keep-top-margin", "0", "--output",
                 str(tmp_path / "o")]) == 2
    assert "--keep-top-margin must be in (0, 1]" in capsys.readouterr().err
