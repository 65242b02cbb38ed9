"""Each loss against a slow reference written as explicit loops over its formula (float64, loss and gradients)."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import LOSSES, LossInputs, Objective
from distill.losses.cosent import cosent
from distill.losses.simcse import simcse

B, N, EXTRA, DIM, TAU = 4, 5, 3, 8, 0.05


def lse(values):
    """log Σ exp, one term at a time."""
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def softmax_list(values, temperature=1.0):
    norm = lse([v / temperature for v in values])
    return [torch.exp(v / temperature - norm) for v in values]


def ref_info_nce(s, group, rewards, tt, ts):
    return sum(-(s[b, group[b][0]] - lse(list(s[b]))) for b in range(len(s))) / len(s)


def ref_soft_label(s, group, rewards, tt, ts):
    total = 0
    for b in range(len(s)):
        w = softmax_list(list(rewards[b]), tt)
        total = total + sum(-w[n] * (s[b, group[b][n]] - lse(list(s[b]))) for n in range(len(group[b])))
    return total / len(s)


def ref_rank_filter(s, group, rewards, tt, ts):
    total = 0
    for b in range(len(s)):
        w = softmax_list(list(rewards[b]), tt)
        negatives = sorted(range(1, len(group[b])), key=lambda n: -float(rewards[b][n]))  # stable on ties
        order = [0] + negatives
        for i, slot in enumerate(order):
            above = {group[b][order[j]] for j in range(i)}
            denominator = [s[b, k] for k in range(s.shape[1]) if k not in above]
            total = total + -w[slot] * (s[b, group[b][slot]] - lse(denominator))
    return total / len(s)


def ref_kl(s, group, rewards, tt, ts):
    total = 0
    for b in range(len(s)):
        t = softmax_list(list(rewards[b]), tt)
        p = softmax_list([s[b, k] for k in group[b]], ts)
        total = total + sum(t[n] * (torch.log(t[n]) - torch.log(p[n])) for n in range(len(t)))
    return total / len(s)


def ref_margin_mse(s, group, rewards, tt, ts):
    terms = [((s[b, group[b][0]] - s[b, group[b][n]]) - (rewards[b][0] - rewards[b][n])) ** 2
             for b in range(len(s)) for n in range(1, len(group[b]))]
    return sum(terms) / len(terms)


def ref_cosent(s, group, rewards, tt, ts):
    total = 0
    for b in range(len(s)):
        terms = [torch.zeros((), dtype=s.dtype)]
        for i in range(len(group[b])):
            for j in range(len(group[b])):
                if rewards[b][i] > rewards[b][j]:
                    terms.append(s[b, group[b][j]] - s[b, group[b][i]])
        total = total + lse(terms)
    return total / len(s)


REFERENCES = {"infonce": ref_info_nce, "soft_label": ref_soft_label, "rank_filter": ref_rank_filter,
              "kl": ref_kl, "margin_mse": ref_margin_mse, "cosent": ref_cosent}


def random_batch(seed: int, contiguous: bool):
    g = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(B, DIM, generator=g, dtype=torch.float64), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(B * N + EXTRA, DIM, generator=g, dtype=torch.float64), dim=-1)
    columns = torch.arange(B * N) if contiguous else torch.randperm(B * N + EXTRA, generator=g)[:B * N]
    group = columns.view(B, N)
    rewards = -torch.rand(B, N, generator=g, dtype=torch.float64) * 4
    rewards[0, 2] = rewards[0, 3]  # a tie among negatives: kept in slot order
    rewards[1, 4] = rewards[1, 0] + 0.5  # a negative the teacher prefers to the positive
    return queries.requires_grad_(), keys.requires_grad_(), group, rewards


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_and_gradients_match_loop_reference(name, contiguous):
    for seed in range(3):
        queries, keys, group, rewards = random_batch(seed, contiguous)
        tt, ts = 0.7, 1.3
        scores = queries @ keys.T / TAU
        got = LOSSES[name].loss(LossInputs(scores, group, rewards, teacher_temperature=tt, student_temperature=ts))
        got_grads = torch.autograd.grad(got, (queries, keys))
        want = REFERENCES[name](queries @ keys.T / TAU, group.tolist(), rewards, tt, ts)
        want_grads = torch.autograd.grad(want, (queries, keys))
        assert math.isfinite(float(got.detach()))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            assert float(b.abs().max()) > 0
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_rank_filter_equals_soft_label_when_a_single_candidate_is_weighted():
    """With all teacher weight on the positive, both reduce to InfoNCE (the positive keeps the full denominator)."""
    queries, keys, group, rewards = random_batch(0, True)
    rewards = torch.full_like(rewards, -50.0)
    rewards[:, 0] = 0.0
    scores = queries @ keys.T / TAU
    inputs = LossInputs(scores, group, rewards)
    expected = LOSSES["infonce"].loss(inputs)
    torch.testing.assert_close(LOSSES["rank_filter"].loss(inputs), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(LOSSES["soft_label"].loss(inputs), expected, rtol=0, atol=1e-12)


def test_simcse_and_cosent_on_flat_inputs():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    got = simcse(a, b, temperature=0.1)
    s = a @ b.T / 0.1
    want = sum(-(s[i, i] - lse(list(s[i]))) for i in range(6)) / 6
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    for x, y in zip(torch.autograd.grad(got, (a, b)), torch.autograd.grad(want, (a, b))):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-9)
    # an STS batch: one row, grades 0..5
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.4]], dtype=torch.float64) * 20
    grades = torch.tensor([[5.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    pairs = [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]
    want = math.log(1 + sum(math.exp(float(scores[0, j] - scores[0, i])) for i, j in pairs))
    assert float(cosent(scores, grades)) == pytest.approx(want, abs=1e-9)


def test_objective_weighted_sum_and_bad_specs():
    queries, keys, group, rewards = random_batch(1, True)
    inputs = LossInputs(queries @ keys.T / TAU, group, rewards)
    objective = Objective.parse("rank_filter:1.0, infonce:0.2")
    total, parts = objective(inputs)
    assert set(parts) == {"rank_filter", "infonce"} and objective.needs_rewards
    assert float(total.detach()) == pytest.approx(parts["rank_filter"] + 0.2 * parts["infonce"], abs=1e-9)
    assert not Objective.parse("infonce").needs_rewards
    with pytest.raises(ValueError, match="unknown loss 'foo'"):
        Objective.parse("foo:1")
    with pytest.raises(ValueError, match="not a number"):
        Objective.parse("kl:x")
    with pytest.raises(ValueError, match="needs teacher rewards"):
        Objective.parse("kl")(LossInputs(inputs.scores, group, None))
