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

from conftest import read_jsonl, write_jsonl
from distill.cli import main
from distill.data import load_retrieval_set
from distill.training.batches import plan_epoch
from distill.training.examples import examples_from_labels
from distill.stages.mine import read_labels
from distill.training.remine import ScoreTracker

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


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
    result = subprocess.run([*launcher, str(out), *flags, "--output", str(tmp_path / name)], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("loss", ["rank_filter:1.0,infonce:0.2", "kl"])
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
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
