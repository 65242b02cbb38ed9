"""Continued pretraining objectives for the student's transformer, one class each, one interface, with the
student's own backbone trained in place (so the pooling and normalisation it is saved with are the student's):

    batch = objective.draw(texts)           the step's random draws (masks, deleted words) for the global batch,
                                            as tensors of one row per passage
    n = objective.predicted(batch)          how many tokens the loss predicts (0: nothing to learn from)
    loss = objective(rows_of(batch), n)     Σ over those rows' predicted tokens of -log p, divided by n

Every rank draws the whole global batch (the same draws: they share the generator's state and consume it
alike, the rows keeping the global batch's padded width) and computes the loss of its own rows over the global
count, so the ranks' losses sum to the global batch's mean and their summed gradients are its gradient.

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
import torch.nn.functional as F

from labelers.errors import UsageError

from ..model import POOLINGS, BiEncoder


IGNORED = -100  # a label the loss skips (transformers' convention)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, n_predicted: int) -> torch.Tensor:
    """ℓ = -(1/N) Σ_{(i,t): y_it ≠ -100} log softmax(z_it)[y_it], with N = `n_predicted`: the mean over a batch's
    predicted tokens when N counts this batch's, a rank's share of the global mean when it counts the global
    batch's. Logits [rows, length, vocab] (in float32 whatever the autocast), labels [rows, length]."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORED,
                           reduction="sum") / n_predicted


def _tokenized(encoder: BiEncoder, texts: list[str], max_length: int, **extra) -> dict:
    return encoder.tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                             return_attention_mask=False, return_token_type_ids=False, **extra)


class MaskedLM(torch.nn.Module):
    """The backbone under transformers' masked-LM head for its architecture (`AutoModelForMaskedLM`). On short
    passages a draw can mask nothing: `predicted` is then 0 and the pretraining loop skips the batch."""

    skip_reason = "batches with no masked token"

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

    def draw(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The texts tokenized and masked: input_ids (with [MASK]s), attention_mask, labels (-100 where unmasked)."""
        # padded here, so the collator's rows are of one length (it cannot pad the word offsets it masks by)
        tokens = self.encoder.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                        return_special_tokens_mask=True, return_offsets_mapping=self.whole_words,
                                        return_attention_mask=True, return_token_type_ids=False)
        rows = [{key: tokens[key][i] for key in tokens} for i in range(len(texts))]
        batch = self.collator(rows)
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}

    @staticmethod
    def predicted(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORED).sum())

    def forward(self, batch: dict[str, torch.Tensor], n_predicted: int) -> torch.Tensor:
        batch = {k: v.to(self.encoder.device) for k, v in batch.items()}
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_cross_entropy(logits, batch["labels"], n_predicted)


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

    skip_reason = "batches with no token to decode"  # never: every passage keeps a word and its [SEP]

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

    def draw(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The noisy passages (source) and the whole ones (target), padded; labels: the target, -100 on padding."""
        tokens = _tokenized(self.encoder, texts, self.max_length)
        source_ids, source_mask = self.encoder.padded(self.noisy(tokens, len(texts)))
        target_ids, target_mask = self.encoder.padded(tokens["input_ids"])
        return {"source_ids": source_ids, "source_mask": source_mask, "target_ids": target_ids,
                "target_mask": target_mask, "labels": target_ids.masked_fill(target_mask == 0, IGNORED)}

    @staticmethod
    def predicted(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORED).sum())  # each token after the first is predicted

    def forward(self, batch: dict[str, torch.Tensor], n_predicted: int) -> torch.Tensor:
        hidden = self.encoder.backbone(input_ids=batch["source_ids"], attention_mask=batch["source_mask"])
        sentence = POOLINGS[self.encoder.config.pooling](hidden.last_hidden_state, batch["source_mask"])  # s
        target_mask = batch["target_mask"]
        logits = self.decoder(input_ids=batch["target_ids"], attention_mask=target_mask,
                              encoder_hidden_states=sentence[:, None, :],
                              encoder_attention_mask=torch.ones_like(target_mask[:, :1])).logits
        # position t predicts token t + 1 (the last predicts nothing), as transformers' causal-LM loss shifts
        following = F.pad(batch["labels"], (0, 1), value=IGNORED)[:, 1:]
        return token_cross_entropy(logits, following, n_predicted)


# name -> class(encoder, max_length, settings with mlm_probability / deletion_ratio)
OBJECTIVES = {"mlm": MaskedLM, "tsdae": DenoisingAutoEncoder}

