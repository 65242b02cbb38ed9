"""Hugging Face transformers backend: batched teacher forcing.

Pairs are sorted by total length and packed into batches under a token budget
(rows x longest row), right-padded, and run under `torch.inference_mode`
(without a padding mask: a real token attends only to earlier, real tokens).
Only the hidden states at continuation positions go through the LM head, so
the vocabulary-sized logits exist for the scored tokens alone. With right
padding every real token keeps its position and its attention span, so a
batched score equals the one-at-a-time score up to float noise. The prompts'
common first tokens (chat template and instruction) are run once per call and
their key/value cache starts every batch.
"""
from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models import check_causal_lm, load_error
from ..batching import length_buckets
from .base import GREEDY, Sampling, Score, check_pairs, cut_at_stop
from .hf_cache import PrefixCache, PromptCache
from .hf_decode import decode, prefill
from ..errors import UsageError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: str) -> str:
    """bf16 where the device computes it natively (recent GPUs; CPUs with AVX512-BF16/AMX), fp16 on older GPUs,
    else fp32 (emulated bf16 and CPU fp16 are slow). bf16 moves a reward by ~0.03 nats/token on average."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu":
        try:
            return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
        except (AttributeError, RuntimeError):
            return "float32"
    return "float32"


def default_token_budget(device: str, job: str) -> int:
    """Padded tokens per forward pass when none is set. Scoring on a CPU: 2048, so a batch's activations stay
    in cache (~1.2x the tokens/s of 8192 in bench/label.py, and 1024 is no faster); scoring on a GPU: 8192.
    Generation: 32768 (rows x (prompt + new tokens)): a decoding step costs a fixed ~40 ms on a CPU for
    SmolLM2-135M plus ~1.8 ms a row (bench/generate.py), so one batch of 32 rows decodes 1.4x faster than two
    of 16, which outweighs the prompts' padding in one prefill."""
    if job == "generate":
        return 32768
    return 2048 if str(device) == "cpu" else 8192


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows share, leaving each row at least one token of its own
    (generation needs an uncached last token to start from)."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


MIN_TRUNK_TOKENS = 32  # prompts share a row when they share this many tokens past the call's common start


def prompt_trunks(prompts: Sequence[Sequence[int]], common: int) -> list[tuple[int, list[int]]]:
    """Pair indices grouped into rows that share a trunk: (trunk length, indices), in first-seen order.

    Identical prompts always share one (a question's several answers after one passage); so do prompts whose
    common first tokens reach `MIN_TRUNK_TOKENS` past `common`, the start all prompts share (a passage with
    two of its generated questions after it). Groups are runs of the prompts in token order."""
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups:
            trunk, members = groups[-1]
            head = prompts[members[0]]
            n = 0
            limit = min(trunk, len(prompts[i]))
            while n < limit and head[n] == prompts[i][n]:
                n += 1
            same = n == trunk == len(prompts[i])
            if same or n >= common + MIN_TRUNK_TOKENS:
                groups[-1] = (n, members + [i])
                continue
        groups.append((len(prompts[i]), [i]))
    groups.sort(key=lambda g: min(g[1]))
    return groups


class RowLayout:
    """Attention mask and positions for rows that hold one prompt followed by several continuations.

    Row r's columns (after the `shared` tokens in the cache) are the prompt, then continuation 1, 2, ...;
    a prompt token attends causally to the prompt, a continuation token to the prompt and causally to its
    own continuation, never to another one, and its position continues the prompt's. So each continuation's
    log-probs are those of prompt + that continuation alone (tree attention, as in speculative decoding)."""

    def __init__(self, rows: int, width: int, shared: int):
        self.shared = shared
        self.allowed = torch.zeros(rows, 1, width, shared + width, dtype=torch.bool)
        self.allowed[:, :, :, :shared] = True
        self.positions = torch.zeros(rows, width, dtype=torch.long)

    def prompt(self, r: int, n: int) -> None:
        s = self.shared
        self.allowed[r, 0, :n, s:s + n] = torch.ones(n, n, dtype=torch.bool).tril()
        self.positions[r, :n] = torch.arange(s, s + n)

    def continuation(self, r: int, start: int, n: int, prompt_end: int) -> None:
        s = self.shared
        self.allowed[r, 0, start:start + n, s:s + prompt_end] = True
        self.allowed[r, 0, start:start + n, s + start:s + start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        self.positions[r, start:start + n] = torch.arange(s + prompt_end, s + prompt_end + n)

    def padding(self, r: int, used: int) -> None:
        # padding columns are never read; they attend to themselves so that no softmax row is empty
        width = self.positions.shape[1]
        pad = torch.arange(used, width)
        self.allowed[r, 0, pad, self.shared + pad] = True

    def model_inputs(self, device, attn_implementation: str, dtype: torch.dtype) -> dict:
        mask = self.allowed.to(device)
        if attn_implementation != "sdpa":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return {"attention_mask": mask, "position_ids": self.positions.to(device)}


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword that hands a key/value cache to `model`'s forward and generate (and its decoder's, which
    follow the same transformers version): `cache` from transformers 5.2x on (where `past_key_values` is
    deprecated, to be removed in 6.0), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_causal_lm(name: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM with every weight it needs from the checkpoint: an encoder, or a checkpoint without its LM head
    (`cls.predictions.*`, `lm_head.*` MISSING, which transformers would initialise at random), is refused."""
    from transformers import AutoModelForCausalLM

    source = check_causal_lm(name, trust_remote_code)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise load_error(source, "weights", exc) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UsageError(f"{source}: {len(missing)} weights of the causal LM are missing from the checkpoint "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they would be random: "
                         "the teacher (--llm) must be a complete causal LM")
    return model


@dataclass
class HFBackendConfig:
    model: str
    device: str | None = None          # default: cuda if available, else cpu
    dtype: str | None = None           # float32 | bfloat16 | float16; default by device
    token_budget: int | None = None    # padded tokens per forward pass; default_token_budget() when None
    max_batch_rows: int = 64
    trust_remote_code: bool = False
    share_prefix: bool = True          # run the prompts' common first tokens once (score: per call; generate: per job)
    prefill_tokens: int | None = None  # generate: padded tokens per prefill pass; default that of scoring
    pack_continuations: bool = True    # score: prompts sharing a trunk (a passage) share a row (RowLayout)
    prompt_cache_bytes: int = 2 ** 30  # generate: keep the last call's prompt caches up to this size (0: off)


class HFBackend:
    name = "hf"

    def __init__(self, cfg: HFBackendConfig, model=None):
        self.cfg = cfg
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = cfg.dtype or default_dtype(self.device)
        if dtype not in DTYPES:
            raise UsageError(f"dtype {dtype!r} is not known; choose one of {sorted(DTYPES)}")
        self.model = model if model is not None else load_causal_lm(cfg.model, DTYPES[dtype], cfg.trust_remote_code)
        self.model.to(self.device).eval()
        self.pad_id = 0
        self.tokenizer = None  # loaded when first needed, to decode generations
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.cache_kwarg = cache_keyword(self.model)
        self.prefix = PrefixCache(self.model, self.cache_kwarg)  # generate's shared prompt start, kept across calls
        self.prompts = PromptCache(cfg.prompt_cache_bytes)  # generate's last prompts, for calls that extend them
        # custom 4D masks reach the attention as they are with SDPA and eager attention (not flash kernels)
        self._custom_masks = self.model.config._attn_implementation in ("sdpa", "eager")
        self.sliding_window = getattr(self.model.config, "sliding_window", None)
        self.tokens_run = 0  # padded tokens through the model by score(), for benchmarks and tests

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Score]:
        """Log-probs of each continuation after its prompt. The tokens all prompts share at their start
        (chat template, system prompt and instruction: ~50 of ~240 tokens of a reward prompt) are run
        once per call; every batch starts from a copy of their key/value cache (as vLLM's prefix caching).
        Pairs whose prompts share a trunk share one row (`prompt_trunks`): identical prompts (a question's
        several reference answers after the same passage), or prompts that go on alike for `MIN_TRUNK_TOKENS`
        past the common start (a passage followed by each of its generated questions, as the support filter
        of `distill generate` scores them). The trunk runs once, then each pair's branch (the rest of its
        prompt, then its continuation) attends to the trunk and to itself alone."""
        check_pairs(prompts, continuations)
        if not prompts:  # an empty chunk: nothing to score (not an index error deep in a batch)
            return []
        groups = (prompt_trunks(prompts, shared_prefix_length(prompts)) if self.cfg.pack_continuations
                  and self._custom_masks and len(prompts) > 1 else [])
        rows, trunks = [g for _, g in groups], [t for t, _ in groups]
        lengths = [t + sum(len(prompts[i]) - t + len(continuations[i]) for i in row) for t, row in groups]
        # a custom mask replaces a sliding-window layer's own (Gemma 3): pack only rows that fit the window
        masked = 0 < len(rows) < len(prompts) and max(lengths) <= (self.sliding_window or max(lengths))
        if not masked:  # no prompts share a row: the plain causal pass (a faster kernel than an explicit mask)
            rows, trunks = [[i] for i in range(len(prompts))], [len(p) for p in prompts]
            lengths = [len(p) + len(c) for p, c in zip(prompts, continuations)]
        heads = [prompts[row[0]][:trunk] for row, trunk in zip(rows, trunks)]
        results: list[Score | None] = [None] * len(prompts)
        body, head = self.model.get_decoder(), self.model.get_output_embeddings()
        shared = shared_prefix_length(heads) if self.cfg.share_prefix and len(heads) > 1 else 0
        if shared and not masked and shared * 8 < np.mean(lengths):
            # attending over a cache needs an explicit mask, and so a slower kernel than a plain causal pass
            # (SDPA): worth it when the shared part is long (squad reward prompts: 51 of 242 tokens, 1.15x
            # faster), not when it is short (cmrc with 1024-token passages: 59 of 959, 0.92x)
            shared = 0
        prefix = self._prefix_cache(list(heads[0][:shared]), rows=1)
        budget = self.cfg.token_budget or default_token_budget(self.device, "score")
        for batch in length_buckets([n - shared for n in lengths], budget, self.cfg.max_batch_rows):
            width = max(lengths[b] for b in batch) - shared
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            layout = RowLayout(len(batch), width, shared) if masked else None
            picked_rows, cols, targets, owners = [], [], [], []
            for r, b in enumerate(batch):
                own, prompt_end = list(heads[b][shared:]), len(heads[b]) - shared
                if layout is not None:
                    layout.prompt(r, prompt_end)
                for i in rows[b]:
                    # a branch: the rest of the prompt after the row's trunk, then the continuation
                    rest, continuation = list(prompts[i][trunks[b]:]), list(continuations[i])
                    start = len(own) + len(rest)
                    if layout is not None:
                        layout.continuation(r, len(own), len(rest) + len(continuation), prompt_end)
                    own += rest + continuation
                    # token u of the continuation is predicted from the hidden state before it: the prompt's
                    # last column (the trunk's, or the branch's own rest) for u = 0, else the previous token
                    cols += [start - 1 if rest else prompt_end - 1]
                    cols += [start + u - 1 for u in range(1, len(continuation))]
                    picked_rows += [r] * len(continuation)
                    targets += continuation
                    owners.append((i, len(continuation)))
                ids[r, :len(own)] = torch.tensor(own)
                if layout is not None:
                    layout.padding(r, len(own))
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(batch))
            # plain rows need no mask: with right padding a real token attends only to earlier tokens, all real
            extra = {} if layout is None else layout.model_inputs(self.device, self.model.config._attn_implementation,
                                                                 self.model.dtype)
            hidden = body(input_ids=ids.to(self.device), **extra, **{self.cache_kwarg: cache},
                          use_cache=cache is not None).last_hidden_state
            self.tokens_run += int(ids.numel())
            picked = hidden[torch.tensor(picked_rows, device=self.device), torch.tensor(cols, device=self.device)]
            logits = head(picked).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            token_logprobs = torch.log_softmax(logits, dim=-1).gather(
                1, torch.tensor(targets, device=self.device).unsqueeze(1)).squeeze(1).cpu().numpy()
            start = 0
            for i, n in owners:
                results[i] = Score(float(token_logprobs[start:start + n].astype(np.float64).sum()), n)
                start += n
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY) -> list[list[str]]:
        """`sampling.n` completions per prompt (`hf_decode`: each prompt's tokens run once, the prompts' shared
        first tokens once per job, finished rows leave the batch, and sample j of prompt i draws from its own
        generator seeded `sampling.prompt_seed(i) + j`, so it is the same in any batch).

        Prompts of similar length decode together (rows x (own part + new tokens) <= the token budget); their
        own parts are prefilled in length-sorted passes (`hf_decode.prefill`), each row laid out as the shared
        prefix (in the cache), then padding, then its own tokens, with a mask and positions that skip the padding.
        Each prompt's keys and values are kept until the next call (`hf_cache.PromptCache`, up to
        `prompt_cache_bytes`): a call whose prompts extend them (the answer pass after sampling) runs only
        the new tokens."""
        if not prompts:
            return []
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model, trust_remote_code=self.cfg.trust_remote_code)
        texts: list[list[str]] = [[] for _ in prompts]
        if not prompts:
            return texts
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        n, stops = sampling.n, tuple(sampling.stop)
        shared = shared_prefix_length(prompts) if self.cfg.share_prefix and len(prompts) * n > 1 else 0
        if self.cfg.share_prefix and self.prompts.covers(prompts):  # they extend the last call's prompts
            shared = len(self.prompts.prefix)
        prefix = list(prompts[0][:shared])
        stored = self.prompts if self.cfg.prompt_cache_bytes > 0 else None
        budget = self.cfg.token_budget or default_token_budget(self.device, "generate")
        for batch in length_buckets([len(p) - shared + max_new_tokens for p in prompts], budget,
                                    max(1, self.cfg.max_batch_rows // n)):
            own = [list(prompts[i][shared:]) for i in batch]
            logits, cache, mask, positions = prefill(self.model, self.cache_kwarg, self.prefix, prefix, own,
                                                     self.pad_id, self.cfg.prefill_tokens
                                                     or default_token_budget(self.device, "score"), stored)
            if n > 1:  # each prompt's cache, once per sample
                cache.batch_repeat_interleave(n)
                logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            generators = [torch.Generator().manual_seed(sampling.prompt_seed(int(i)) + j) for i in batch
                          for j in range(n)]
            written = decode(self.model, self.cache_kwarg, logits, cache, mask, positions.repeat_interleave(n),
                             max_new_tokens, sampling, generators, eos,
                             finished=lambda row, new: bool(stops) and any(
                                 s in self.tokenizer.decode(new, skip_special_tokens=True) for s in stops))
            for row, new in enumerate(written):  # n rows per prompt, in prompt order
                text = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), sampling.stop)
                # a character cut by max_new_tokens decodes to U+FFFD; vLLM holds such bytes back: drop it too
                texts[batch[row // n]].append(text.rstrip("\ufffd").strip())
        if stored is not None:
            stored.commit(prefix)
        return texts

    def _prefix_cache(self, prefix: list[int], rows: int):
        """The key/value cache of `prefix` (run once), repeated for `rows` rows; None for no prefix."""
        if not prefix:
            return None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.tensor([prefix], device=self.device), **{self.cache_kwarg: cache}, use_cache=True)
        cache.batch_repeat_interleave(rows)
        return cache

    def close(self) -> None:
        """Drop the model so its memory is freed before the next stage loads one."""
        self.model, self.prefix, self.prompts = None, None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
