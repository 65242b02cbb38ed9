"""The teacher-LLM settings that `label` and `generate` share, and the backend they build.

A stage's config inherits `TeacherSettings`, so both stages have the same
backend flags with the same defaults, written once here. A setting that only
one backend takes (`metadata["backends"]`) set for another is an error, never
silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_backend_settings

from labelers.backends import BACKENDS, Backend, create_backend
from labelers.models import check_causal_lm, checked_model_source, load_error


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
        "help": "hf/vllm backends: float32|bfloat16|float16 (default: bf16 on GPUs that have it, fp32 on CPU)",
        "backends": ("hf", "vllm")})
    token_budget: int | None = field(default=None, metadata={
        "help": "hf backend: padded tokens per forward pass (default: 2048 to score on a CPU, else 8192)",
        "backends": ("hf",), "volatile": True})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vllm backend: context length", "backends": ("vllm",), "volatile": True})
    enforce_eager: bool = field(default=False, metadata={
        "help": "vllm backend: no graph compilation (starts in seconds; use where compilation fails)",
        "backends": ("vllm",), "volatile": True})
    concurrency: int = field(default=4, metadata={
        "help": "openai backend: requests in flight", "backends": ("openai",), "volatile": True})
    max_retry_seconds: float = field(default=600.0, metadata={
        "help": "openai backend: retry a failing request this long before giving up", "backends": ("openai",),
        "volatile": True})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code to run",
                                                              "volatile": True})

    def __post_init__(self) -> None:
        check_backend_settings(self, self.backend)

    def create_backend(self, seed: int = 0) -> Backend:
        return create_backend(
            self.backend, model=(self.served_model or self.llm) if self.backend == "openai" else self.llm,
            device=self.device, dtype=self.dtype, token_budget=self.token_budget,
            trust_remote_code=self.trust_remote_code, max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager, base_url=self.base_url, api_key_env=self.api_key_env,
            concurrency=self.concurrency, max_retry_seconds=self.max_retry_seconds, seed=seed)

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


def default_template(language: str, kind: str, chat: bool) -> str:
    """The packaged template `<kind>_<language>[_chat]`: the chat variant when the tokenizer has a chat template."""
    from labelers.prompts import packaged_templates

    name = f"{kind}_{language}"
    return f"{name}_chat" if chat and f"{name}_chat" in packaged_templates() else name
