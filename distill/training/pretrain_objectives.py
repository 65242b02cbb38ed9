"""Continued pretraining objectives for the student's transformer, one class each, one interface:
`module(texts) -> loss`, with the student's own backbone trained in place (so the pooling and normalisation
it is saved with are the student's).

- `mlm`: masked language modelling (Devlin et al. 2019) with transformers' masked-LM head and collator: 15% of
  the tokens are chosen and the loss is the cross-entropy of predicting them. With a fast tokenizer whole words
  are chosen (every token of a word or none; each becomes [MASK], transformers' whole-word masking does no
  random replacement); otherwise single tokens, 80% [MASK], 10% a random token, 10% unchanged.
- `tsdae`: the denoising auto-encoder of Wang, Reimers and Gurevych (2021, "TSDAE: Using Transformer-based
  Sequential Denoising Auto-Encoder for Unsupervised Sentence Embedding Learning"). Each passage loses 60% of
  its words; the encoder pools what is left into one vector s, and a decoder that attends to s alone must
  write the whole passage back:

      ℓ = -Σ_t log p(x_t | x_<t, s)

  The decoder is the backbone's causal-LM twin with cross-attention, its weights shared with the encoder's
  except the new cross-attention (the paper's tied setting); GPL pairs it with domain adaptation.

Every random draw (masks, deleted words, dropout) comes from torch's global generator, which the training
checkpoint saves: a resumed run draws exactly what the uninterrupted one did.
"""
from __future__ import annotations

import copy

import torch

from labelers.errors import UsageError

from ..model import POOLINGS, BiEncoder


def _tokenized(encoder: BiEncoder, texts: list[str], max_length: int, **extra) -> dict:
    return encoder.tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                             return_attention_mask=False, return_token_type_ids=False, **extra)


class MaskedLM(torch.nn.Module):
    """The backbone under transformers' masked-LM head for its architecture (`AutoModelForMaskedLM`)."""

    def __init__(self, encoder: BiEncoder, max_length: int, settings) -> None:
        from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

        super().__init__()
        self.encoder, self.max_length = encoder, max_length
        self.model = AutoModelForMaskedLM.from_config(encoder.backbone.config)
        # the student's backbone in place of the fresh one (its pooler, if any, goes unused); the head's output
        # matrix is tied to the student's word embeddings again
        setattr(self.model, self.model.base_model_prefix, encoder.backbone)
        if getattr(encoder.backbone.config, "tie_word_embeddings", True):
            self.model.get_output_embeddings().weight = encoder.backbone.get_input_embeddings().weight
        self.whole_words = bool(getattr(encoder.tokenizer, "is_fast", False))
        # transformers' whole-word masking replaces every chosen token by [MASK] (no random or kept tokens)
        replace = dict(mask_replace_prob=1.0, random_replace_prob=0.0) if self.whole_words else {}
        self.collator = DataCollatorForLanguageModeling(encoder.tokenizer, mlm_probability=settings.mlm_probability,
                                                        whole_word_mask=self.whole_words, **replace)

    def forward(self, texts: list[str]) -> torch.Tensor:
        # padded here, so the collator's rows are of one length (it cannot pad the word offsets it masks by)
        tokens = self.encoder.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                        return_special_tokens_mask=True, return_offsets_mapping=self.whole_words,
                                        return_attention_mask=True, return_token_type_ids=False)
        rows = [{key: tokens[key][i] for key in tokens} for i in range(len(texts))]
        batch = {k: v.to(self.encoder.device) for k, v in self.collator(rows).items()}
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss


def _share_weights(decoder: torch.nn.Module, encoder: torch.nn.Module, keep: str = "crossattention") -> int:
    """Make every parameter of `decoder` whose name the encoder also has (and that is not `keep`) the encoder's
    own tensor; returns how many were shared."""
    own = dict(encoder.named_parameters())
    shared = 0
    for name, parameter in list(decoder.named_parameters()):
        if keep in name or name not in own or own[name].shape != parameter.shape:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(decoder.get_submodule(parent) if parent else decoder, leaf, own[name])
        shared += 1
    return shared


class DenoisingAutoEncoder(torch.nn.Module):
    """TSDAE: delete words, pool the rest into s, decode the whole passage from s alone."""

    def __init__(self, encoder: BiEncoder, max_length: int, settings) -> None:
        from transformers import AutoModelForCausalLM

        super().__init__()
        self.encoder, self.max_length, self.deletion_ratio = encoder, max_length, settings.deletion_ratio
        config = copy.deepcopy(encoder.backbone.config)
        config.is_decoder, config.add_cross_attention = True, True
        try:
            self.decoder = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise UsageError(f"--objective tsdae needs a decoder twin of the student's {config.model_type} "
                             f"(transformers has none: {str(exc).splitlines()[0]}); use --objective mlm") from None
        if _share_weights(self.decoder.base_model, encoder.backbone) == 0:
            raise UsageError(f"--objective tsdae: the {config.model_type} decoder shares no weights with the student")
        self.decoder.get_output_embeddings().weight = self.decoder.get_input_embeddings().weight
        if not getattr(encoder.tokenizer, "is_fast", False):
            raise UsageError("--objective tsdae deletes whole words, which needs a fast tokenizer (word ids)")

    def noisy(self, tokens, rows: int) -> list[list[int]]:
        """Each passage's token ids without ~`deletion_ratio` of its words (at least one word stays)."""
        special = set(self.encoder.tokenizer.all_special_ids)
        kept_ids = []
        for i in range(rows):
            ids, words = tokens["input_ids"][i], tokens.word_ids(i)
            n_words = max((w for w in words if w is not None), default=-1) + 1
            keep = torch.rand(max(n_words, 1)) >= self.deletion_ratio
            if n_words and not keep[:n_words].any():
                keep[int(torch.randint(n_words, (1,)))] = True
            kept_ids.append([t for t, w in zip(ids, words) if (w is None and t in special) or
                             (w is not None and bool(keep[w]))])
        return kept_ids

    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = _tokenized(self.encoder, texts, self.max_length)
        source = self.encoder.padded(self.noisy(tokens, len(texts)))
        target_ids, target_mask = self.encoder.padded(tokens["input_ids"])
        hidden = self.encoder.backbone(input_ids=source[0], attention_mask=source[1]).last_hidden_state
        sentence = POOLINGS[self.encoder.config.pooling](hidden, source[1])  # s, before any normalisation
        labels = target_ids.masked_fill(target_mask == 0, -100)
        return self.decoder(input_ids=target_ids, attention_mask=target_mask,
                            encoder_hidden_states=sentence[:, None, :],
                            encoder_attention_mask=torch.ones_like(target_mask[:, :1]), labels=labels).loss


# name -> class(encoder, max_length, settings with mlm_probability / deletion_ratio)
OBJECTIVES = {"mlm": MaskedLM, "tsdae": DenoisingAutoEncoder}

