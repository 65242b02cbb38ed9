"""Length-sorted micro-batches: the cut is optimal and covers every text once, and one training step cut that way
moves the weights exactly as the unsorted step does (dropout off), with and without GradCache."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from distill.training.config import TrainConfig
from distill.training.distributed import Distributed
from distill.training.microbatch import PaddingCount, kind_chunks, sorted_chunks
from distill.training.trainer import Trainer


def cost_of(lengths: np.ndarray, chunks: list[np.ndarray], call_cost: int) -> int:
    return sum(call_cost + int(lengths[c].max()) * len(c) for c in chunks)


def every_cut(n: int):
    """Every way to cut n sorted texts into contiguous runs (as run sizes)."""
    for bars in itertools.product([False, True], repeat=n - 1):
        sizes, size = [], 1
        for bar in bars:
            if bar:
                sizes.append(size)
                size = 0
            size += 1
        yield sizes + [size]


@pytest.mark.parametrize("seed", range(6))
def test_sorted_chunks_is_the_cheapest_cut_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 60, size=9)
    budget, call_cost = 120, 16
    chunks = sorted_chunks(lengths, budget, call_cost)
    rows = np.concatenate(chunks)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every text exactly once
    assert all(lengths[c].max() * len(c) <= budget for c in chunks)
    assert all(np.all(np.diff(lengths[rows]) <= 0) for rows in [rows])  # runs of the longest-first order
    # the reference: every contiguous cut of the sorted order that keeps the budget
    ordered = np.sort(lengths)[::-1]
    best = min(sum(call_cost + int(ordered[s:s + k].max()) * k for s, k in zip(np.cumsum([0, *sizes[:-1]]), sizes))
               for sizes in every_cut(len(lengths))
               if all(ordered[s] * k <= budget for s, k in zip(np.cumsum([0, *sizes[:-1]]), sizes)))
    assert cost_of(lengths, chunks, call_cost) == best


def test_a_text_longer_than_the_budget_runs_alone_and_padding_is_counted():
    lengths = np.array([5, 300, 7, 6])
    chunks = sorted_chunks(lengths, 64, call_cost=0)
    assert [c.tolist() for c in chunks][0] == [1]
    count = PaddingCount()
    count.add(lengths, chunks)
    assert count.real == 318 and count.padded == 300 + sum(int(lengths[c].max()) * len(c) for c in chunks[1:])
    unsorted = PaddingCount()
    unsorted.add(lengths, kind_chunks(1, 3, None))  # queries [5], keys [300, 7, 6] padded to 300
    assert unsorted.padded == 5 + 900 and unsorted.padding_fraction > count.padding_fraction


def one_step(model, labels, tmp_path, name: str, **settings) -> tuple[list[torch.Tensor], list[torch.Tensor], Trainer]:
    cfg = TrainConfig(model=str(model), data=["squad-mini"], labels=[labels], output=tmp_path / name, device="cpu",
                      train_batch_size=8, num_negatives=3, learning_rate=1e-3, warmup_ratio=0.0, max_steps=1,
                      cache=False, show_progress=False, **settings)
    trainer = Trainer(cfg, Distributed())
    trainer.encoder.train()
    trainer.backward(trainer.plan.batches[0])
    params = [p for p in trainer.encoder.backbone.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    trainer.optimizer_step()
    return [p.detach().clone() for p in params], grads, trainer


@pytest.mark.parametrize("loss", ["infonce", "rank_filter"])
@pytest.mark.parametrize("grad_cache", [None, 5])
@pytest.mark.slow
def test_sorted_micro_batches_move_the_weights_as_the_unsorted_step(tiny_bert_no_dropout, squad_mini_train_labels,
                                                                    tmp_path, loss, grad_cache):
    from distill.model import BiEncoder

    start = [p.detach().clone() for p in BiEncoder.load(str(tiny_bert_no_dropout), device="cpu").backbone.parameters()
             if p.requires_grad]
    common = dict(loss=loss, grad_cache_chunk_size=grad_cache)
    plain, plain_grads, unsorted = one_step(tiny_bert_no_dropout, squad_mini_train_labels, tmp_path, "plain",
                                            micro_batch_tokens=0, **common)
    cut, cut_grads, sorted_trainer = one_step(tiny_bert_no_dropout, squad_mini_train_labels, tmp_path, "sorted",
                                              micro_batch_tokens=96, **common)
    # the sorted run did cut the batch differently, and padded less
    assert sorted_trainer.tokens.real == unsorted.tokens.real
    assert sorted_trainer.tokens.padded < unsorted.tokens.padded
    moved = max(float((p - s).abs().max()) for p, s in zip(plain, start))
    assert moved > 1e-4  # the step changed the weights by far more than the tolerance below
    for a, b in zip(plain_grads, cut_grads):
        # fp32 sums in another order (other matrix shapes) at logit scale 1/τ = 20: seen up to 3.5e-6 on 6e-3
        torch.testing.assert_close(b, a, rtol=1e-4, atol=5e-5)
    # AdamW's first step is lr·g/(|g| + eps), about lr·sign(g): where |g| is near the noise above, its sign (so a step
    # of ±lr) may flip on another CPU. Where |g| clears the noise tenfold the steps must agree; elsewhere they are ±lr.
    stable = total = 0
    for a, b, g, h in zip(plain, cut, plain_grads, cut_grads):
        sure = g.abs() > torch.clamp(10 * (g - h).abs(), min=1e-5)
        torch.testing.assert_close(b[sure], a[sure], rtol=0, atol=1e-5)
        assert float((b - a).abs().max()) <= 2.01e-3  # two steps of lr at the most
        stable, total = stable + int(sure.sum()), total + sure.numel()
    assert stable > 0.5 * total, (stable, total)
