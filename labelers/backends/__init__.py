"""LLM backends behind one interface (`base.Backend`), chosen by name."""
from __future__ import annotations

from .base import Backend, Score
from .hf import HFBackend, HFBackendConfig

# name -> (config class, backend class); vllm and openai join here.
BACKENDS = {"hf": (HFBackendConfig, HFBackend)}

__all__ = ["BACKENDS", "Backend", "Score", "HFBackend", "HFBackendConfig"]
