"""The teacher side: prompt templates, token boundaries, and the hf backend's
batched scores against a plain one-sequence-at-a-time forward pass."""
from __future__ import annotations

import math

import pytest
import torch

from labelers.backends.hf import HFBackend, HFBackendConfig, length_buckets, shared_prefix_length
from labelers.prompts import load_template, packaged_templates, parse_template
from labelers.reward import RewardGroup, RewardInputs, score_groups


def reference_logprob_sum(model, prompt: list[int], continuation: list[int]) -> float:
    """Σ log p(c_i | prompt, c_<i) from one unpadded forward pass over the full vocabulary."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(prompt) + i - 1, tok]) for i, tok in enumerate(continuation))


def test_batched_scores_equal_one_at_a_time(tiny_llama_dir):
    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32", token_budget=200))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 1000, (int(n),), generator=generator).tolist() for n in torch.randint(3, 60, (23,), generator=generator)]
    continuations = [torch.randint(5, 1000, (int(n),), generator=generator).tolist() for n in torch.randint(1, 9, (23,), generator=generator)]
    scores = backend.score(prompts, continuations)
    for s, p, c in zip(scores, prompts, continuations):
        assert s.n_tokens == len(c)
        assert s.logprob_sum == pytest.approx(reference_logprob_sum(backend.model, p, c), abs=1e-3)


def test_scores_over_a_shared_prefix_equal_one_at_a_time(tiny_llama_dir):
    """Reward prompts share their instruction: it is run once per call and every batch (several here, under
    a small budget) starts from a copy of its cache; scores must match a plain unpadded forward pass."""
    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32", token_budget=120))
    plain = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", token_budget=120, share_prefix=False),
                      model=backend.model)
    generator = torch.Generator().manual_seed(2)
    head = torch.randint(5, 1000, (17,), generator=generator).tolist()
    prompts = [head + torch.randint(5, 1000, (int(n),), generator=generator).tolist()
               for n in torch.randint(1, 40, (19,), generator=generator)]
    continuations = [torch.randint(5, 1000, (int(n),), generator=generator).tolist()
                     for n in torch.randint(1, 9, (19,), generator=generator)]
    assert shared_prefix_length(prompts) >= len(head)
    scores = backend.score(prompts, continuations)
    for s, t, p, c in zip(scores, plain.score(prompts, continuations), prompts, continuations):
        assert s.n_tokens == t.n_tokens == len(c)
        assert s.logprob_sum == pytest.approx(t.logprob_sum, abs=1e-4)
        assert s.logprob_sum == pytest.approx(reference_logprob_sum(backend.model, p, c), abs=1e-3)


@pytest.mark.parametrize("head_length", [0, 30])  # without and with a prefix shared by every prompt (its cache)
def test_several_continuations_of_one_prompt_share_its_row_and_score_as_alone(tiny_llama_dir, head_length):
    """A question's reference answers after the same passage: the prompt runs once and each answer attends
    to it and to itself only; every score must equal a plain forward pass over prompt + that answer."""
    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32", token_budget=300))
    plain = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", token_budget=300,
                                      pack_continuations=False), model=backend.model)
    generator = torch.Generator().manual_seed(3)
    head = torch.randint(5, 1000, (head_length,), generator=generator).tolist()
    prompts, continuations = [], []
    for n_answers in [3, 1, 2, 4, 1, 3]:
        prompt = head + torch.randint(5, 1000, (int(torch.randint(2, 40, (1,), generator=generator)),),
                                      generator=generator).tolist()
        for _ in range(n_answers):
            prompts.append(prompt)
            continuations.append(torch.randint(5, 1000, (int(torch.randint(1, 7, (1,), generator=generator)),),
                                               generator=generator).tolist())
    order = torch.randperm(len(prompts), generator=generator).tolist()  # answers of a prompt need not be adjacent
    prompts, continuations = [prompts[i] for i in order], [continuations[i] for i in order]
    scores, alone = backend.score(prompts, continuations), plain.score(prompts, continuations)
    for s, t, p, c in zip(scores, alone, prompts, continuations):
        assert s.n_tokens == len(c)
        assert s.logprob_sum == pytest.approx(t.logprob_sum, abs=1e-4)
        assert s.logprob_sum == pytest.approx(reference_logprob_sum(backend.model, p, c), abs=1e-3)
    assert backend.tokens_run < plain.tokens_run  # the prompts really ran once per prompt, not once per answer
    windowed = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", token_budget=300), model=backend.model)
    windowed.sliding_window = 8  # as a Gemma 3 or Mistral config says: a custom mask would drop the window
    for s, t in zip(windowed.score(prompts, continuations), alone):
        assert s.logprob_sum == pytest.approx(t.logprob_sum, abs=1e-4)
    assert windowed.tokens_run == plain.tokens_run  # rows longer than the window are not packed


def test_prompts_that_share_a_passage_share_a_row_and_score_as_alone(tiny_llama_dir):
    """The support filter's prompts: one passage, then each of its generated questions, then the answer. A row
    holds the passage once and each question with its answer as a branch; scores must equal plain passes."""
    from labelers.backends.hf import MIN_TRUNK_TOKENS, prompt_trunks

    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32", token_budget=400))
    plain = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", token_budget=400,
                                      pack_continuations=False), model=backend.model)
    generator = torch.Generator().manual_seed(4)

    def tokens(low, high):
        return torch.randint(5, 1000, (int(torch.randint(low, high, (1,), generator=generator)),),
                             generator=generator).tolist()

    head = tokens(10, 11)
    prompts, continuations = [], []
    for n_questions in [2, 1, 3, 2]:
        passage = head + tokens(MIN_TRUNK_TOKENS, 60)
        for _ in range(n_questions):
            prompts.append(passage + tokens(3, 9))
            continuations.append(tokens(1, 6))
    prompts.append(prompts[0])  # a second answer to the first question: the same prompt
    continuations.append(tokens(1, 6))
    prompts.append(head + prompts[1][len(head):len(head) + 5] + tokens(20, 30))  # shares too little: a row alone
    continuations.append(tokens(1, 6))
    groups = prompt_trunks(prompts, len(head))
    assert sorted(len(g) for _, g in groups) == [1, 1, 2, 3, 3]  # passages of 1, 2, 3 and 2 + 1 questions; the loner
    scores, alone = backend.score(prompts, continuations), plain.score(prompts, continuations)
    for s, t, p, c in zip(scores, alone, prompts, continuations):
        assert s.n_tokens == len(c)
        assert s.logprob_sum == pytest.approx(t.logprob_sum, abs=1e-4)
        assert s.logprob_sum == pytest.approx(reference_logprob_sum(backend.model, p, c), abs=1e-3)
    assert backend.tokens_run < plain.tokens_run


def test_batched_generation_over_a_shared_prefix_equals_one_unpadded_prompt_at_a_time(tiny_llama_dir):
    """The prefix all prompts share is run once and its cache copied to every row; greedy text must be
    what plain `generate` writes for each prompt alone (no padding, no shared cache)."""
    from transformers import AutoTokenizer

    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32"))
    plain = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", share_prefix=False), model=backend.model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    head = tokenizer("Write a question about the passage. Passage: the old mill by the river")["input_ids"]
    tails = ["", " ground wheat", " ground wheat and barley for the village until 1911", " burnt down twice"]
    prompts = [head + tokenizer(t, add_special_tokens=False)["input_ids"] for t in tails]
    assert shared_prefix_length(prompts) == len(head) - 1  # the shortest prompt keeps one token of its own
    caches, make_cache = [], backend.prefix.rows

    def recorded_cache(prefix, rows):
        caches.append(make_cache(prefix, rows))
        return caches[-1]

    backend.prefix.rows = recorded_cache
    batched = backend.generate(prompts, 12)
    # generate took the prefix's cache (under whichever keyword this transformers version reads) and wrote on
    assert caches and all(c.get_seq_length() > len(head) - 1 for c in caches)
    computed = backend.prefix.cache
    assert backend.generate(prompts, 12) == batched and backend.prefix.cache is computed  # run once per job
    assert plain.generate(prompts, 12) == batched  # the left-padded layout, prefix run per row
    for prompt, (text,) in zip(prompts, batched):
        ids = torch.tensor([prompt])
        alone = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                       pad_token_id=backend.pad_id)[0, len(prompt):]
        assert text == tokenizer.decode(alone, skip_special_tokens=True).rstrip("\ufffd").strip()
    # sampled: n rows per prompt share the prompt's cache; repeatable, and the samples differ
    from labelers.backends import Sampling

    sampling = Sampling(temperature=1.0, top_p=0.95, n=3, seed=7)
    sampled = backend.generate(prompts, 12, sampling)
    assert sampled == backend.generate(prompts, 12, sampling) and all(len(set(s)) == 3 for s in sampled)
    # each (prompt, sample) draws from its own seed: the same prompts in another batch (without the first, which
    # changes the shared prefix, the padding and the batch's shape) with the seeds they had sample the same
    from dataclasses import replace

    assert backend.generate(prompts[1:], 12, replace(sampling, seed=7 + 3)) == sampled[1:]
    # prefilled in several length-sorted passes whose caches are padded and joined: the same texts
    cut = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", prefill_tokens=12), model=backend.model)
    assert cut.generate(prompts, 12) == batched and cut.generate(prompts, 12, sampling) == sampled
    from labelers.backends.hf_decode import prefill

    shared = shared_prefix_length(prompts)
    own = [p[shared:] for p in prompts]
    with torch.inference_mode():
        whole = prefill(backend.model, backend.cache_kwarg, backend.prefix, prompts[0][:shared], own, 0, 4096)
        parts = prefill(backend.model, backend.cache_kwarg, backend.prefix, prompts[0][:shared], own, 0, 12)
    alone = [backend.model(input_ids=torch.tensor([p])).logits[0, -1].detach() for p in prompts]
    for row, logits in enumerate(alone):  # each row's next-token logits, in the order given
        torch.testing.assert_close(whole[0][row], logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts[0][row], logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(parts[2], whole[2]) and torch.equal(parts[3], whole[3])  # masks, next positions
    for a, b in zip(parts[1].layers, whole[1].layers):
        torch.testing.assert_close(a.keys * parts[2][:, None, :, None], b.keys * whole[2][:, None, :, None])
    assert [backend.generate([p], 12, replace(sampling, seed=7 + 3 * i))[0] for i, p in enumerate(prompts)] == sampled


def test_a_call_that_extends_the_last_calls_prompts_runs_only_the_new_tokens(tiny_llama_dir):
    """The answer pass after sampling (prompt + " <question>\nAnswer:"): the prompts' keys and values come from
    the last call and only the appended tokens run; logits and greedy text must be those of a fresh backend."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from labelers.backends import Sampling
    from labelers.backends.hf_cache import PrefixCache, PromptCache
    from labelers.backends.hf_decode import prefill

    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32", prefill_tokens=40))
    fresh = HFBackend(replace(backend.cfg, prompt_cache_bytes=0), model=backend.model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    head = tokenizer("Write a question about the passage, then its answer. Passage:")["input_ids"]
    tails = [" the old mill by the river ground wheat", " the mill burnt down twice, in 1850 and in 1911",
             " barley", " the miller's house still stands beside the weir and the road to the village"]
    prompts = [head + tokenizer(t, add_special_tokens=False)["input_ids"] for t in tails]
    ran = []
    backend.model.register_forward_pre_hook(lambda m, a, k: ran.append(int(k["input_ids"].numel())), with_kwargs=True)
    backend.generate(prompts, 8, Sampling(temperature=1.0, n=2, seed=3))
    asked = [" Who ground wheat?\nAnswer:", " When did it burn?\nAnswer:", " What grew?\nAnswer:", ""]
    cues = [p + tokenizer(a, add_special_tokens=False)["input_ids"] for p, a in zip(prompts, asked)]
    ran.clear()
    answers = backend.generate(cues, 8)
    reused = sum(ran)
    ran.clear()
    assert answers == fresh.generate(cues, 8)
    # the second pass ran the questions (padded to the longest; the unchanged prompt runs its last token) and 8
    # steps at most a row, not the prompts again
    longest_new = max(max(len(c) - len(p) for c, p in zip(cues, prompts)), 1)
    assert reused < sum(ran) and reused <= len(cues) * (longest_new + 8)
    # the logits each row starts decoding from equal one plain forward pass over the whole cue
    stored, prefixes = PromptCache(2 ** 20), PrefixCache(backend.model, backend.cache_kwarg)
    shared = shared_prefix_length(prompts)
    with torch.inference_mode():
        prefill(backend.model, backend.cache_kwarg, prefixes, head[:shared], [p[shared:] for p in prompts], 0, 40,
                stored)
        stored.commit(head[:shared])
        assert stored.lookup(head[:shared], cues[0][shared:])[0] == len(prompts[0]) - shared
        logits, _, mask, positions = prefill(backend.model, backend.cache_kwarg, prefixes, head[:shared],
                                             [c[shared:] for c in cues], 0, 40, stored)
    for row, cue in enumerate(cues):
        torch.testing.assert_close(logits[row], backend.model(input_ids=torch.tensor([cue])).logits[0, -1].detach(),
                                   rtol=1e-4, atol=1e-5)
        assert int(mask[row].sum()) == len(cue) and int(positions[row]) == len(cue)
    # nothing is kept past its budget
    small = PromptCache(1)
    with torch.inference_mode():
        prefill(backend.model, backend.cache_kwarg, prefixes, head[:shared], [p[shared:] for p in prompts], 0, 40,
                small)
    small.commit(head[:shared])
    assert small.entries == {} and not small.covers(cues)


def test_length_buckets_respect_the_budget_and_cover_everything():
    lengths = [5, 100, 7, 300, 40, 41, 2, 99]
    batches = length_buckets(lengths, token_budget=200, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 200


def test_packaged_templates_parse_and_unknown_name_lists_them():
    names = packaged_templates()
    for required in ("reward_en", "reward_en_chat", "reward_zh", "reward_zh_chat", "query_likelihood_en"):
        assert required in names
        load_template(required)
    with pytest.raises(ValueError, match="reward_en_chat"):
        load_template("no_such_template")
    with pytest.raises(ValueError, match="must contain"):
        parse_template("## continuation: answer\nno fields here", "bad")


def test_answer_tokens_follow_the_prompt_tokens(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    inputs = RewardInputs(tokenizer, load_template("reward_en"), max_passage_tokens=16)
    passage = " ".join(["the steam engine was improved by james watt"] * 10)
    prompt, answer = inputs.build("who improved the steam engine?", passage, "James Watt")
    full = tokenizer(inputs.prompt_text("who improved the steam engine?", passage) + " James Watt")["input_ids"]
    assert prompt + answer == full
    assert tokenizer.decode(answer) == " James Watt"
    # the passage was cut to 16 tokens; the question survived whole
    assert "who improved the steam engine?" in tokenizer.decode(prompt)
    assert len(tokenizer(inputs.truncate_passage(passage), add_special_tokens=False)["input_ids"]) == 16
    assert tokenizer.decode(prompt).count("<s>") == 1  # BOS once


def test_chat_template_prompt_has_one_bos_and_ends_at_the_assistant_turn(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    inputs = RewardInputs(tokenizer, load_template("reward_en_chat"))
    prompt, answer = inputs.build("who improved the steam engine?", "James Watt improved it.", "James Watt")
    text = tokenizer.decode(prompt)
    assert text.count("<s>") == 1 and text.endswith("<|assistant|>\n")
    assert tokenizer.decode(answer) == "James Watt"


def test_best_of_several_answers_is_kept(tiny_llama_dir):
    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32"))
    from transformers import AutoTokenizer

    inputs = RewardInputs(AutoTokenizer.from_pretrained(tiny_llama_dir), load_template("reward_en"))
    answers = ["james watt", "watt", "the scottish inventor james watt"]
    best = score_groups(backend, inputs, [RewardGroup("who?", answers, ["a passage about steam", "another one"])])[0]
    for reward, passage in zip(best, ["a passage about steam", "another one"]):
        score, which = reward.score, reward.answer_index
        each = []
        for a in answers:
            prompt, continuation = inputs.build("who?", passage, a)
            each.append(backend.score([prompt], [continuation])[0])
        assert which == max(range(3), key=lambda k: each[k].logprob_mean)
        assert math.isclose(score.logprob_sum, each[which].logprob_sum, abs_tol=1e-4)


@pytest.mark.parametrize("spread", [1.0, 8.0])  # peaked rows (nucleus in the top 256) and flat ones (it is not)
def test_nucleus_keeps_the_tokens_transformers_top_p_keeps(spread):
    from transformers import TopPLogitsWarper

    from labelers.backends.hf_decode import nucleus

    torch.manual_seed(0)
    logits = torch.randn(6, 5000) * (4.0 / spread)
    probs = torch.softmax(logits, dim=-1)
    ids, kept = nucleus(probs, 0.9)
    theirs = torch.softmax(TopPLogitsWarper(0.9)(None, logits), dim=-1)
    ours = torch.zeros_like(probs).scatter(1, ids, kept)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert (kept > 0).sum(dim=-1).max() > (256 if spread > 1 else 1)


@pytest.mark.parametrize("name", ["relevance_en", "relevance_en_chat"])
def test_relevance_reward_is_log_p_yes_minus_log_p_no_from_the_logits(tiny_llama_dir, name):
    """Gecko's relevance signal, on a query without answers: log p(Yes) - log p(No) at the position after the
    prompt, by hand from one unpadded forward pass each; the Yes and No pairs share the prompt's run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    backend = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32"))
    plain = HFBackend(HFBackendConfig(str(tiny_llama_dir), device="cpu", dtype="float32", pack_continuations=False,
                                      share_prefix=False), model=backend.model)
    inputs = RewardInputs(tokenizer, load_template(name))
    question = "who improved the steam engine?"
    passages = ["James Watt improved the steam engine in 1776.", "Paris is the capital of France.", "the engine"]
    rewards = score_groups(backend, inputs, [RewardGroup(question, [], passages)])[0]
    plain_rewards = score_groups(plain, inputs, [RewardGroup(question, [], passages)])[0]
    separator, special = inputs.template.separator, not inputs.template.chat
    for reward, alone, passage in zip(rewards, plain_rewards, passages):
        text = inputs.prompt_text(question, passage)
        prompt = tokenizer(text, add_special_tokens=special)["input_ids"]
        logp = {}
        for word in ("Yes", "No"):
            full = tokenizer(text + separator + word, add_special_tokens=special)["input_ids"]
            assert full[:len(prompt)] == prompt and len(full) > len(prompt)
            with torch.no_grad():
                logprobs = torch.log_softmax(backend.model(torch.tensor([full])).logits[0].double(), dim=-1)
            # the word's tokens after the prompt: the first is read at the position after the prompt
            logp[word] = sum(float(logprobs[k - 1, full[k]]) for k in range(len(prompt), len(full)))
            n_word_tokens = len(full) - len(prompt)
            if word == "Yes":
                assert reward.score.n_tokens == n_word_tokens
            else:
                assert reward.no_score.n_tokens == n_word_tokens
        assert reward.value == pytest.approx(logp["Yes"] - logp["No"], abs=1e-4)
        assert reward.value == pytest.approx(reward.score.logprob_sum - reward.no_score.logprob_sum, abs=1e-9)
        assert reward.value == pytest.approx(alone.value, abs=1e-4) and reward.answer_index is None
    assert inputs.boundary_merges == 0
    assert backend.tokens_run < plain.tokens_run  # each prompt ran once for its two continuations


def test_relevance_templates_parse_and_need_two_labels():
    for name in ("relevance_en", "relevance_en_chat", "relevance_zh", "relevance_zh_chat"):
        template = load_template(name)
        assert template.continuation == "relevance" and "{question}" in template.body
    assert (load_template("relevance_zh").yes_label, load_template("relevance_zh").no_label) == ("是", "否")
    with pytest.raises(ValueError, match="two different"):
        parse_template('## continuation: relevance\n## yes_label: "Yes"\n## no_label: "Yes"\n{passage} {question}',
                       "same")
    with pytest.raises(ValueError, match="must contain"):
        parse_template("## continuation: relevance\n{passage} only", "no_question")
