"""The bi-encoder: what `save()` writes loads in sentence-transformers and gives
the same embeddings; `load()` reads sentence-transformers and plain HF folders;
batched, length-sorted encoding equals one-at-a-time encoding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import SQUAD_MINI, read_jsonl
from distill.model import BiEncoder, EncoderConfig

TEXTS = [r["text"] for r in read_jsonl(SQUAD_MINI / "corpus.jsonl")[:24]] + ["short", "a b c", "Warsaw?"]


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.mark.parametrize("pooling,normalize", [("cls", True), ("mean", False)])
def test_saved_tiny_model_loads_in_sentence_transformers(tiny_bert_dir, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    encoder = BiEncoder.load(tiny_bert_dir, device="cpu", pooling=pooling, normalize=normalize,
                             query_prefix="query: ", passage_prefix="passage: ", max_passage_length=64,
                             max_query_length=64)
    encoder.save(tmp_path / "saved")
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert st.max_seq_length == 64
    ours = encoder.encode(TEXTS, kind="passage")
    theirs = st.encode([f"passage: {t}" for t in TEXTS], convert_to_numpy=True)
    assert _cosine_rows(ours, theirs).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), np.linalg.norm(ours, axis=1), rtol=1e-4)
    # the query prompt is saved too: sentence-transformers applies it by name
    theirs_q = st.encode(TEXTS[:5], prompt_name="query", convert_to_numpy=True)
    assert _cosine_rows(encoder.encode(TEXTS[:5], kind="query"), theirs_q).min() >= 0.9999


@pytest.mark.slow
def test_saved_minilm_gives_sentence_transformers_embeddings(minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = BiEncoder.load(minilm_dir, device="cpu")
    assert encoder.config == EncoderConfig(pooling="mean", normalize=True, max_query_length=256, max_passage_length=256)
    encoder.save(tmp_path / "ours")
    original = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    reloaded = SentenceTransformer(str(tmp_path / "ours"), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert _cosine_rows(encoder.encode(TEXTS), original).min() >= 0.9999
    assert _cosine_rows(reloaded, original).min() >= 0.9999
    assert BiEncoder.load(tmp_path / "ours").config == encoder.config


def test_plain_hf_folder_gets_mean_pooling_and_normalisation(tiny_bert_dir):
    encoder = BiEncoder.load(tiny_bert_dir, device="cpu")
    assert (encoder.config.pooling, encoder.config.normalize) == ("mean", True)
    model, tokenizer = AutoModel.from_pretrained(tiny_bert_dir).eval(), AutoTokenizer.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        batch = tokenizer(TEXTS[0], return_tensors="pt", truncation=True, max_length=128)
        expected = model(**batch).last_hidden_state[0].mean(0)
    expected = (expected / expected.norm()).numpy()
    np.testing.assert_allclose(encoder.encode([TEXTS[0]])[0], expected, atol=1e-5)


def test_batched_sorted_encoding_equals_one_at_a_time(tiny_bert_dir):
    encoder = BiEncoder.load(tiny_bert_dir, device="cpu", max_passage_length=48)
    batched = encoder.encode(TEXTS, batch_size=8)
    single = np.stack([encoder.encode([t], batch_size=1)[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert encoder.encode(TEXTS[:3], output_dtype=np.float16).dtype == np.float16


def test_query_prefix_is_applied_only_to_queries(tiny_bert_dir):
    plain = BiEncoder.load(tiny_bert_dir, device="cpu")
    prefixed = BiEncoder.load(tiny_bert_dir, device="cpu", query_prefix="search query: ")
    np.testing.assert_allclose(prefixed.encode(TEXTS[:4], kind="query"),
                               plain.encode(["search query: " + t for t in TEXTS[:4]], kind="query"), atol=1e-6)
    np.testing.assert_allclose(prefixed.encode(TEXTS[:4], kind="passage"), plain.encode(TEXTS[:4]), atol=1e-6)


def test_unsupported_sentence_transformers_module_is_refused(tiny_bert_dir, tmp_path):
    encoder = BiEncoder.load(tiny_bert_dir, device="cpu")
    encoder.save(tmp_path / "m")
    modules = json.loads((tmp_path / "m" / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "m" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "m" / "distill_encoder.json").unlink()
    with pytest.raises(ValueError, match="Dense is not supported"):
        BiEncoder.load(tmp_path / "m")


def test_unknown_pooling_names_the_choices():
    with pytest.raises(ValueError, match=r"\['cls', 'mean'\]"):
        EncoderConfig(pooling="max")
