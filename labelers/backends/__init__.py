"""LLM backends behind one interface (`base.Backend`), chosen by name.

`hf` is imported eagerly (the reference, and what tests run on); `vllm` and
`openai` are built by name through `create_backend`, and vLLM itself is only
imported when its backend is built.
"""
from __future__ import annotations

import dataclasses
import importlib

from .base import GREEDY, Backend, BackendError, Sampling, Score
from ..errors import UsageError

# name -> (module, config class, backend class)
BACKENDS = {
    "hf": ("hf", "HFBackendConfig", "HFBackend"),
    "vllm": ("vllm", "VLLMBackendConfig", "VLLMBackend"),
    "openai": ("openai", "OpenAIBackendConfig", "OpenAIBackend"),
}


def create_backend(name: str, **options) -> Backend:
    """Build backend `name` from `options`; None values keep its config's defaults. An option its config does not
    take, set to a value, is an error (never dropped without a word)."""
    if name not in BACKENDS:
        raise UsageError(f"backend {name!r} is not known; choose one of {sorted(BACKENDS)}")
    module_name, config_name, backend_name = BACKENDS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    config_cls = getattr(module, config_name)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(k for k, v in options.items() if k not in known and v is not None)
    if unknown:
        raise UsageError(f"the {name} backend takes no setting {', '.join(unknown)}")
    config = config_cls(**{k: v for k, v in options.items() if k in known and v is not None})
    return getattr(module, backend_name)(config)


__all__ = ["BACKENDS", "GREEDY", "Backend", "BackendError", "Sampling", "Score", "create_backend"]
