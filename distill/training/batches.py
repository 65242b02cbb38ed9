"""The order examples are trained in: one plan per epoch, a pure function of (seed, epoch, pools).

Each example's group is its positive plus `num_negatives` rows drawn from its
pool (uniformly without replacement, repeating the pool when it is smaller, as
LLM-Embedder does), seeded by (seed, epoch, query id). Batches are filled
greedily in a seeded shuffled order; an example that collides with the batch
waits for a later one (as sentence-transformers' NoDuplicatesBatchSampler).
Collisions (`dedup`):
- "positives" (default): a query text twice, or a passage that is one query's
  positive and any key of another (it would be a false negative). Hard
  negatives shared by two queries are allowed: they are negatives for both.
- "strict": no passage and no query text twice in a batch at all (feasible
  when hard negatives are spread over a large corpus).
- "none": any order (for topically clustered data, where the rules above
  cannot fill batches).
Whatever the mode, the trainer masks out of a query's denominator every
in-batch key that is one of its own positives (`false_negative_mask`). With several tasks each batch holds one task, and the batches
of all tasks are then shuffled together. The last incomplete batch of each
task is left out (counted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..negatives import query_rng
from .examples import Example


@dataclass
class Group:
    example: int           # index into the example list
    negatives: np.ndarray  # corpus rows, num_negatives of them
    rewards: np.ndarray | None  # [1 + num_negatives]: positive first, None without labels


@dataclass
class EpochPlan:
    batches: list[list[Group]]
    left_out: int           # examples that did not fill a last batch


def draw_group(example: Example, index: int, num_negatives: int, rng: np.random.Generator) -> Group:
    pool = example.pool
    if num_negatives == 0:
        picked = np.empty(0, dtype=np.int64)
    else:
        repeats = -(-num_negatives // len(pool))
        tiled = np.tile(np.arange(len(pool)), repeats)
        picked = tiled[rng.permutation(len(tiled))[:num_negatives]] if repeats > 1 else \
            rng.choice(len(pool), size=num_negatives, replace=False)
    negatives = pool[picked]
    rewards = None
    if example.pool_rewards is not None:
        rewards = np.concatenate([[example.positive_reward], example.pool_rewards[picked]])
    return Group(index, negatives, rewards)


DEDUP_MODES = ("positives", "strict", "none")


def plan_epoch(examples: list[Example], *, epoch: int, seed: int, batch_size: int, num_negatives: int,
               indices: list[int] | None = None, dedup: str = "positives") -> EpochPlan:
    """Batches of `batch_size` groups over `indices` (default: every example)."""
    indices = list(range(len(examples))) if indices is None else list(indices)
    tasks = sorted({examples[i].task for i in indices})
    per_task: list[list[Group]] = []
    left_out = 0
    for task in tasks:
        members = np.array([i for i in indices if examples[i].task == task], dtype=np.int64)
        order = members[query_rng(seed, f"epoch {epoch} task {task}").permutation(len(members))]
        groups = [draw_group(examples[i], int(i), num_negatives, query_rng(seed, f"epoch {epoch} {examples[i].qid}"))
                  for i in order]
        batches, rest = _fill_without_duplicates(groups, examples, batch_size, dedup)
        per_task.extend(batches)
        left_out += rest
    shuffle = query_rng(seed, f"epoch {epoch} batches").permutation(len(per_task))
    return EpochPlan([per_task[i] for i in shuffle], left_out)


def _fill_without_duplicates(groups: list[Group], examples: list[Example], batch_size: int, mode: str):
    batches, remaining = [], groups
    while len(remaining) >= batch_size:
        batch, positives, keys, queries, deferred = [], set(), set(), set(), []
        for position, group in enumerate(remaining):
            example = examples[group.example]
            negatives = set(group.negatives.tolist())
            own_keys = negatives | {example.positive}
            clash = mode != "none" and (example.query in queries or example.positive in keys or positives & negatives
                                        or (mode == "strict" and keys & own_keys))
            if clash:
                deferred.append(group)
                continue
            batch.append(group)
            keys |= own_keys
            positives.add(example.positive)
            queries.add(example.query)
            if len(batch) == batch_size:
                deferred.extend(remaining[position + 1:])
                break
        if len(batch) < batch_size:
            return batches, len(remaining)
        batches.append(batch)
        remaining = deferred
    return batches, len(remaining)


def false_negative_mask(examples: list[Example], batch: list[Group]) -> np.ndarray:
    """[B, B·(1+n)] True where key k is one of query b's positives but not b's own slot 0."""
    key_rows = np.concatenate([np.concatenate([[examples[g.example].positive], g.negatives]) for g in batch])
    size = len(key_rows) // len(batch)
    mask = np.zeros((len(batch), len(key_rows)), dtype=bool)
    for b, group in enumerate(batch):
        positives = examples[group.example].positives
        if positives is not None:
            mask[b] = np.isin(key_rows, positives)
        mask[b, b * size] = False
    return mask
