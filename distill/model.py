"""The student: a bi-encoder over any Hugging Face encoder.

Text -> tokens -> `AutoModel` -> pooling (cls | mean) -> optional L2
normalisation. `encode()` sorts texts by token length so batches carry little
padding. `save()` writes a folder that `sentence_transformers.SentenceTransformer`
loads (modules.json, pooling config, prompts) and that gives the same
embeddings; `load()` reads our folders, sentence-transformers folders and plain
Hugging Face encoders, from disk or the hub.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labelers.models import checked_model_source, load_error
from labelers.errors import UsageError

logger = logging.getLogger(__name__)

CONFIG_FILE = "distill_encoder.json"
DEFAULT_MAX_LENGTH = 512
TOKENIZE_SLICE = 1024  # texts tokenised at once by encode()


def cls_pooling(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """e = h_0, the first token's hidden state (BERT's [CLS]; BGE, E5-style models)."""
    return token_embeddings[:, 0]


def mean_pooling(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9): the mask-weighted mean (Sentence-BERT)."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    return (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": cls_pooling,
    "mean": mean_pooling,
}


@dataclass
class EncoderConfig:
    """How text becomes a vector; saved beside the weights as `distill_encoder.json`."""

    pooling: str = "mean"
    normalize: bool = True
    query_prefix: str = ""
    passage_prefix: str = ""
    max_query_length: int = DEFAULT_MAX_LENGTH
    max_passage_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UsageError(f"pooling {self.pooling!r} is not known; choose one of {sorted(POOLINGS)}")
        if min(self.max_query_length, self.max_passage_length) < 2:
            raise UsageError("max lengths must be at least 2 tokens")


def _read_model_json(name_or_path: str, filename: str) -> dict | list | None:
    """A JSON file of a local folder or a hub repository, or None when absent."""
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(name_or_path, filename)).read_text(encoding="utf-8"))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _config_from_sentence_transformers(name_or_path: str, modules: list[dict]) -> dict:
    """Our config fields from a sentence-transformers folder's module files."""
    found: dict = {}
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Transformer":
            st_config = _read_model_json(name_or_path, "sentence_bert_config.json") or {}
            if st_config.get("max_seq_length"):
                found["max_query_length"] = found["max_passage_length"] = int(st_config["max_seq_length"])
        elif kind == "Pooling":
            pooling = _read_model_json(name_or_path, f"{module['path']}/config.json") or {}
            mode = pooling.get("pooling_mode") or next(
                (m for m in ("cls", "mean") if pooling.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")),
                None)
            if mode not in POOLINGS or not pooling.get("include_prompt", True):
                raise UsageError(f"{name_or_path}: pooling {pooling} is not supported (supported: cls, mean, with the prompt included)")
            found["pooling"] = mode
        elif kind == "Normalize":
            found["normalize"] = True
        else:
            raise UsageError(f"{name_or_path}: sentence-transformers module {module['type']} is not supported "
                             "(supported: Transformer, Pooling, Normalize)")
    found.setdefault("normalize", False)
    prompts = (_read_model_json(name_or_path, "config_sentence_transformers.json") or {}).get("prompts") or {}
    found["query_prefix"] = prompts.get("query", "")
    found["passage_prefix"] = prompts.get("document", prompts.get("passage", ""))
    return found


class BiEncoder(torch.nn.Module):
    """A shared-weight encoder for queries and passages.

    >>> encoder = BiEncoder.load("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> encoder.encode(["what is faiss?"], kind="query").shape              # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, backbone: torch.nn.Module, tokenizer, config: EncoderConfig):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config

    # ----- loading and saving -------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path, *, trust_remote_code: bool = False, device: str | None = None,
             torch_dtype: torch.dtype | None = None, **overrides) -> BiEncoder:
        """Load our folder, a sentence-transformers folder or a plain HF encoder.

        `overrides` are `EncoderConfig` fields that replace what the folder says.
        """
        from transformers import AutoModel, AutoTokenizer

        name = checked_model_source(name_or_path)
        ours = _read_model_json(name, CONFIG_FILE)
        modules = None if ours is not None else _read_model_json(name, "modules.json")
        if ours is not None:
            settings = dict(ours)
            settings.pop("format_version", None)
        elif modules is not None:
            settings = _config_from_sentence_transformers(name, modules)
        else:
            settings = {}  # plain encoder: mean pooling, normalised
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as exc:
            raise load_error(name, "tokenizer", exc) from None
        try:
            backbone = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                 **({"dtype": torch_dtype} if torch_dtype else {}))
        except (OSError, ValueError) as exc:
            raise load_error(name, "weights", exc) from None
        model_max = min(int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH),
                        int(getattr(backbone.config, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH),
                        DEFAULT_MAX_LENGTH)
        settings.setdefault("max_query_length", model_max)
        settings.setdefault("max_passage_length", model_max)
        known = {f.name for f in fields(EncoderConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown encoder settings {sorted(unknown)}; known: {sorted(known)}")
        settings.update({k: v for k, v in overrides.items() if v is not None})
        encoder = cls(backbone, tokenizer, EncoderConfig(**{k: v for k, v in settings.items() if k in known}))
        encoder.eval()
        return encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def save(self, path: str | Path) -> None:
        """Write weights, tokenizer, our config and the sentence-transformers module files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        cfg = self.config

        def write(name: str, obj) -> None:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

        write(CONFIG_FILE, {"format_version": 1, **asdict(cfg)})
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if cfg.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        write("modules.json", modules)
        # sentence-transformers has one max length; passages are the ones it truncates.
        write("sentence_bert_config.json", {"max_seq_length": cfg.max_passage_length, "do_lower_case": False})
        write("1_Pooling/config.json", {
            "word_embedding_dimension": self.dimension,
            "pooling_mode_cls_token": cfg.pooling == "cls",
            "pooling_mode_mean_tokens": cfg.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "include_prompt": True,
        })
        write("config_sentence_transformers.json", {
            "prompts": {"query": cfg.query_prefix, "document": cfg.passage_prefix},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if cfg.normalize else "dot",
        })

    # ----- forward ------------------------------------------------------------------------
    def weights_fingerprint(self) -> str:
        """sha256 over the backbone's parameters and buffers, in name order (cache keys)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]

    @property
    def dimension(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def prefixed(self, texts: Sequence[str], kind: str) -> list[str]:
        prefix = {"query": self.config.query_prefix, "passage": self.config.passage_prefix}[kind]
        return [prefix + t for t in texts] if prefix else list(texts)

    def max_length(self, kind: str) -> int:
        return {"query": self.config.max_query_length, "passage": self.config.max_passage_length}[kind]

    def token_ids(self, texts: Sequence[str], kind: str) -> list[np.ndarray]:
        """Each text's token ids (prefixed, truncated to the kind's max length, special tokens added), unpadded;
        compact int32 arrays, tokenised a slice at a time (the tokenizer's own Encoding objects cost far more)."""
        prefixed = self.prefixed(texts, kind)
        ids: list[np.ndarray] = []
        for start in range(0, len(prefixed), TOKENIZE_SLICE):
            ids.extend(np.asarray(t, dtype=np.int32) for t in self.tokenizer(
                prefixed[start:start + TOKENIZE_SLICE], truncation=True, max_length=self.max_length(kind),
                add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False)["input_ids"])
        return ids

    def padded(self, token_ids: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) on the encoder's device, right-padded to the longest of `token_ids`."""
        width = max(len(t) for t in token_ids)
        ids = np.full((len(token_ids), width), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(token_ids), width), dtype=np.int64)
        for i, t in enumerate(token_ids):
            ids[i, :len(t)] = t
            mask[i, :len(t)] = 1
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """Embeddings [batch, dim] with gradients (when enabled)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        embeddings = POOLINGS[self.config.pooling](hidden, attention_mask)
        return F.normalize(embeddings, p=2, dim=-1) if self.config.normalize else embeddings

    # ----- inference ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, texts: Sequence[str], kind: str = "passage", batch_size: int = 64,
               show_progress: bool = False, output_dtype: type = np.float32) -> np.ndarray:
        """Embed `texts` as queries or passages: [len(texts), dim] numpy.

        Texts are tokenised once, sorted by token count (longest first, so an
        out-of-memory shows at once) and padded per batch to that batch's
        longest text.
        """
        if kind not in ("query", "passage"):
            raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
        out = np.empty((len(texts), self.dimension), dtype=output_dtype)
        if not len(texts):
            return out
        was_training = self.training
        self.eval()
        token_ids = self.token_ids(texts, kind)
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
        order = np.argsort(-lengths, kind="stable")
        with tqdm(total=len(texts), desc="encode queries" if kind == "query" else "encode passages", unit="text", disable=not show_progress,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                embeddings = self(*self.padded([token_ids[row] for row in rows]))
                out[rows] = embeddings.float().cpu().numpy().astype(output_dtype, copy=False)
                bar.update(len(rows))
        self.train(was_training)
        return out
