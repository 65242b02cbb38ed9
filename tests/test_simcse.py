"""Unsupervised SimCSE: the loss against a loop written from the paper's formula, and `distill train --loss simcse`
on a folder holding only a corpus really feeds each passage twice, so that dropout alone makes the two views."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl
from distill.cli import main
from distill.losses.infonce import info_nce
from distill.losses.simcse import simcse
from distill.training.config import TrainConfig
from distill.training.distributed import Distributed
from distill.training.trainer import Trainer


def test_simcse_equals_the_papers_sum_written_as_a_loop():
    torch.manual_seed(0)
    first = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    second = torch.nn.functional.normalize(first + 0.3 * torch.randn(6, 5), dim=-1)
    tau = 0.05
    terms = []
    for i in range(6):
        own = math.exp(float(first[i] @ second[i]) / tau)
        every = sum(math.exp(float(first[i] @ second[j]) / tau) for j in range(6))
        terms.append(-math.log(own / every))
    assert float(simcse(first, second, tau)) == pytest.approx(sum(terms) / 6, rel=1e-5)
    # identical views: the diagonal is the largest score of each row, so the loss is lower than with noisy views
    assert float(simcse(first, first, tau)) < float(simcse(first, second, tau))


def first_batch_views(model: Path, data: Path, out: Path) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """(the trainer's loss on its first batch, the first and the second views it embedded, the InfoNCE of the
    batch's passages scored against themselves in eval mode)."""
    cfg = TrainConfig(model=str(model), data=[str(data)], output=out, loss="simcse", device="cpu",
                      train_batch_size=8, max_steps=1, cache=False, show_progress=False)
    trainer = Trainer(cfg, Distributed())
    assert cfg.num_negatives == 0 and trainer.query_kind == "passage"
    seen = []
    embed = trainer.embed
    trainer.embed = lambda ids: seen.append((len(ids), out := embed(ids))) or out
    batch = trainer.plan.batches[0]
    trainer.encoder.train()
    torch.manual_seed(1)
    loss = float(trainer.backward(batch).total.detach())
    assert sum(n for n, _ in seen) == 16  # 8 passages, each embedded twice
    texts = [trainer.examples[g.example].query for g in batch]
    assert texts == trainer.texts(batch)[1]  # the keys are the very passages of the queries
    trainer.encoder.eval()
    with torch.no_grad():
        views = trainer.embed(trainer.encoder.token_ids(texts, "passage"))
    identical = float(info_nce(views @ views.T / cfg.temperature, torch.arange(8)))
    # the two views the step saw: run the step again, recording the query and key halves in batch order
    trainer.encoder.train()
    seen.clear()
    trainer.token_budget, trainer.grad_cache_chunk = 0, None  # one forward per kind: the queries, then the keys
    trainer.backward(batch)
    (_, first), (_, second) = seen
    return loss, first.detach(), second.detach(), identical


def test_with_dropout_off_simcse_is_infonce_of_a_passage_against_itself(tiny_bert_no_dropout, corpus_only, tmp_path):
    loss, first, second, identical = first_batch_views(tiny_bert_no_dropout, corpus_only, tmp_path / "off")
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    assert loss == pytest.approx(identical, abs=1e-5)


def test_with_dropout_on_the_two_views_differ_and_so_does_the_loss(tiny_bert_dir, corpus_only, tmp_path):
    loss, first, second, identical = first_batch_views(tiny_bert_dir, corpus_only, tmp_path / "on")
    cosine = (first * second).sum(-1) / (first.norm(dim=-1) * second.norm(dim=-1))
    assert float(cosine.max()) < 0.9999  # every passage's two views differ
    # identical views give the same loss to float32 rounding; how far dropout moves it depends on
    # the masks drawn (CI saw 9.5e-4), so the bound is rounding's, not a guess at dropout's size
    assert abs(loss - identical) > 1e-5, (loss, identical)


def test_distill_train_simcse_on_a_corpus_alone(tiny_bert_dir, corpus_only, tmp_path, capsys):
    out = tmp_path / "model"
    args = ["train", "--model", str(tiny_bert_dir), "--data", str(corpus_only), "--output", str(out), "--loss",
            "simcse", "--train-batch-size", "16", "--max-steps", "3", "--device", "cpu", "--no-cache"]
    assert main(args) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["examples"] == len(read_jsonl(corpus_only / "corpus.jsonl"))
    assert (out / "config.json").exists() or (out / "modules.json").exists()
    capsys.readouterr()
    mixed = ["--output", str(tmp_path / "mixed"), "--loss", "simcse:0.1,rank_filter:1.0"]
    assert main(args[:7] + mixed + args[9:]) == 2
    assert "does not combine with query losses" in capsys.readouterr().err
