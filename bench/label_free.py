"""Training without relevance labels: which positive each mode chooses, and what the student gains.

squad (answers only): N random train questions of squad_dev with their answers, their qrels withheld; the
retriever's top 16 per question (`distill mine --pool-size 16`), scored by the teacher (`distill label`), then one
student per `--positives` mode, all with the same plan, evaluated on the real test split. Rows: base, every mode,
`teacher+retriever` with a second teacher (`--llm2`), the default with the unchosen passages that hold an answer
left out of the negatives (`answer-match+teacher:drop`, `--answer-negatives drop`: RocketQA's denoising), and the
gold qrels with InfoNCE (the ceiling).

scifact (queries only): the train claims without qrels (no answers: the teacher scores query likelihood, UPR);
rows base, retriever-top1, teacher, teacher+retriever, evaluated on dev.

Each row prints how often the chosen positive is a qrels positive (the withheld ones), how many queries it kept,
nDCG@10 and the paired gain over the base and over retriever-top1 (BCa 95% interval, randomization p). With
`--heldout`, every row is evaluated a second time on a larger set: the eval split's queries and the train
queries that were not drawn (never trained on, never seen by any stage), for tighter intervals where the eval
split is small (scifact's dev has 200 claims). Every step is a `distill` command writing into --out, so a
rerun skips what is done.

python bench/label_free.py squad --data ../shared/data/squad_dev --model <MiniLM> --llm <SmolLM2> \\
       --llm2 <Gemma 3 270M> --out runs/label_free/squad
python bench/label_free.py scifact --data ../shared/data/scifact --model <MiniLM> --llm <SmolLM2> \\
       --out runs/label_free/scifact --eval-split dev --heldout
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data import load_retrieval_set  # noqa: E402
from distill.data.records import read_labels, read_trec_run  # noqa: E402
from distill.evaluate import compare_to_run  # noqa: E402
from distill.training.examples import PositiveChoice, examples_from_labels  # noqa: E402

MODES = {"squad": ["retriever-top1", "teacher", "teacher+retriever", "answer-match", "answer-match+teacher",
                   "answer-match+teacher:drop"],
         "scifact": ["retriever-top1", "teacher", "teacher+retriever"], "false-negatives": []}
VARIANTS = {"drop": ["--answer-negatives", "drop"]}  # mode:variant rows: the mode with these train flags
TRAIN = ["--loss", "rank_filter:1.0,infonce:0.2", "--num-negatives", "3", "--train-batch-size", "16",
         "--learning-rate", "3e-5", "--epochs", "2", "--max-passage-length", "192", "--batch-dedup", "none"]


def distill(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "distill", *args, "--no-show-progress"], env=env, text=True,
                            capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"distill {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    tail = [line for line in result.stdout.splitlines() if line.strip()][-2:]
    print("   ", " | ".join(tail)[:300], flush=True)


def folders(data: Path, out: Path, n: int, seed: int, keep_answers: bool) -> tuple[Path, Path]:
    """(the label-free folder: corpus + N train queries without positives, the same queries with their qrels)."""
    free, gold = out / "no_qrels", out / "gold"
    if (free / "queries.jsonl").is_file() and (gold / "qrels" / "train.tsv").is_file():
        return free, gold
    train = load_retrieval_set(data, "train")
    qids = sorted(train.qrels)
    random.Random(seed).shuffle(qids)
    chosen = set(qids[:n])
    for folder in (free, gold / "qrels"):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (free, gold):
        shutil.copy(data / "corpus.jsonl", folder / "corpus.jsonl")
    queries = [json.loads(line) for line in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = []
    for q in queries:
        if (q.get("_id") or q.get("id")) in chosen:
            q = {k: v for k, v in q.items() if k != "positives" and (keep_answers or k != "answers")}
            kept.append(json.dumps(q, ensure_ascii=False) + "\n")
    for folder in (free, gold):
        (folder / "queries.jsonl").write_text("".join(kept), encoding="utf-8")
    (gold / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{p}\t1\n" for q in sorted(chosen) for p in train.positives(q)), encoding="utf-8")
    return free, gold


def heldout_folder(data: Path, out: Path, split: str, drawn: Path) -> Path:
    """A BEIR folder whose split `heldout` holds the eval split's queries and the train queries not drawn."""
    folder = out / "heldout"
    if (folder / "qrels" / "heldout.tsv").is_file():
        return folder
    used = {q for q in load_retrieval_set(drawn, "train", unlabelled=True).queries.ids}
    judged = {}
    for name in (split, "train"):
        for qid, rel in load_retrieval_set(data, name).qrels.items():
            if qid in used:
                continue
            if qid in judged:
                raise SystemExit(f"{data}: query {qid} is in both the {split} and the train split")
            judged[qid] = rel
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "corpus.jsonl", folder / "corpus.jsonl")
    lines = (data / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    (folder / "queries.jsonl").write_text("".join(
        line + "\n" for line in lines if line.strip() and (lambda q: q.get("_id") or q.get("id"))(json.loads(line))
        in judged), encoding="utf-8")
    (folder / "qrels" / "heldout.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{p}\t{score}\n" for q in sorted(judged) for p, score in sorted(judged[q].items())), encoding="utf-8")
    return folder


def choice_stats(labels: Path, free: Path, gold: Path, mode: str) -> tuple[int, float]:
    """(queries kept, share whose chosen positive is a withheld qrels positive)."""
    rset = load_retrieval_set(free, "train", unlabelled=True)
    truth = load_retrieval_set(gold, "train")
    found = examples_from_labels(read_labels(labels), rset, labels, choice=PositiveChoice(mode))
    ids = rset.corpus.ids_at([e.positive for e in found.examples])
    hits = sum(pid in truth.positives(e.qid) for pid, e in zip(ids, found.examples))
    return len(found.examples), hits / max(len(found.examples), 1)


def evaluate(model: str, data: Path, split: str, out: Path, baseline: Path | None = None) -> dict:
    metrics, run = out.with_suffix(".json"), out.with_suffix(".trec")
    if not metrics.is_file():
        distill("eval", "--model", model, "--data", str(data), "--split", split, "--output", str(metrics),
                "--run-file", str(run), *(["--baseline-run", str(baseline)] if baseline else []))
    return json.loads(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(MODES))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--llm", required=True)
    parser.add_argument("--llm2", help="a second teacher for the teacher+retriever row (squad)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", action="store_true", help="also evaluate every row on the eval split plus "
                        "the train queries not drawn (see above)")
    parser.add_argument("--modes", nargs="+", help="only these rows: --positives modes, and `gold` for the "
                        "gold-qrels row (squad; default: every mode and gold); the rows are compared with "
                        "retriever-top1 where it is among them")
    args = parser.parse_args()
    unknown = sorted(set(args.modes or []) - set(MODES[args.task]) - ({"gold"} if args.task == "squad" else set()))
    if unknown:
        parser.error(f"--modes {' '.join(unknown)}: not a row of {args.task} (rows: {' '.join(MODES[args.task])}"
                     f"{' gold' if args.task == 'squad' else ''})")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "false-negatives":
        return false_negatives(args, out)
    free, gold = folders(args.data, out, args.queries, args.seed, keep_answers=args.task == "squad")
    print(f"[1] pools: the retriever's top 16 for {len(load_retrieval_set(free, 'train', unlabelled=True).queries)} "
          "queries", flush=True)
    pool = out / "pool.jsonl"
    distill("mine", "--model", args.model, "--data", str(free), "--pool-size", "16", "--output", str(pool))
    modes = [m for m in MODES[args.task] if not args.modes or m in args.modes]
    with_gold = args.task == "squad" and (not args.modes or "gold" in args.modes)
    teachers = {"": args.llm, **({"2": args.llm2} if args.llm2 else {})} if modes else {}
    for tag, llm in teachers.items():
        print(f"[2] labels by {llm}", flush=True)
        distill("label", "--llm", llm, "--data", str(free), "--candidates", str(pool), "--output",
                str(out / f"labels{tag}.jsonl"), "--max-passage-tokens", "256")
    print("[3] base", flush=True)
    heldout = heldout_folder(args.data, out, args.eval_split, free) if args.heldout else None
    evals = {"": (args.data, args.eval_split)} | ({"-heldout": (heldout, "heldout")} if heldout else {})

    def evaluated(name: str, model: str) -> dict:
        """{eval tag: metrics} of one row's student, each paired with the base on the same queries."""
        return {tag: evaluate(model, data, split, out / "eval" / f"{name}{tag}",
                              None if name == "base" else out / "eval" / f"base{tag}.trec")
                for tag, (data, split) in evals.items()}

    rows = {"base": (None, None, evaluated("base", args.model))}
    files = {"base": "base"}
    runs = [(mode, "") for mode in modes] + ([("teacher+retriever", "2")] if args.llm2 and modes else [])
    for mode, tag in runs:
        name = f"{mode}{' (' + Path(teachers[tag]).name + ')' if tag else ''}"
        print(f"[4] {name}", flush=True)
        labels = out / f"labels{tag}.jsonl"
        positives, _, variant = mode.partition(":")
        kept, accuracy = choice_stats(labels, free, gold, positives)
        model = out / "models" / f"{mode}{tag}"
        distill("train", "--model", args.model, "--data", str(free), "--labels", str(labels), "--positives",
                positives, "--output", str(model), *TRAIN, *VARIANTS.get(variant, []))
        rows[name] = (kept, accuracy, evaluated(f"{mode}{tag}", str(model)))
        files[name] = f"{mode}{tag}"
    if with_gold:
        print("[5] gold qrels, InfoNCE", flush=True)
        gold_pool = out / "gold_candidates.jsonl"
        distill("mine", "--model", args.model, "--data", str(gold), "--num-negatives", "15", "--output",
                str(gold_pool))
        model = out / "models" / "gold"
        distill("train", "--model", args.model, "--data", str(gold), "--candidates", str(gold_pool), "--output",
                str(model), *[a if a != "rank_filter:1.0,infonce:0.2" else "infonce" for a in TRAIN])
        rows["gold qrels (InfoNCE)"] = (None, 1.0, evaluated("gold", str(model)))
        files["gold qrels (InfoNCE)"] = "gold"
    for tag, (data, split) in evals.items():
        title = f"{args.eval_split} split" if not tag else f"{args.eval_split} split + the train queries not drawn"
        print(f"\n{args.task}: {title}, students all-MiniLM-L6-v2, plan {' '.join(TRAIN)}")
        print_table({name: (kept, accuracy, metrics[tag]) for name, (kept, accuracy, metrics) in rows.items()},
                    {name: out / "eval" / f"{stem}{tag}.trec" for name, stem in files.items()},
                    load_retrieval_set(data, split).qrels, args.seed)


def print_table(rows: dict, trec: dict[str, Path], qrels, seed: int) -> None:
    """One markdown row per student: choice accuracy, nDCG@10, paired gains over the base and retriever-top1."""
    gold = rows.get("gold qrels (InfoNCE)")
    gold_gain = gold[2]["ndcg@10_vs_baseline"]["mean_difference"] if gold else None
    print(f"{len(qrels)} queries")
    print("| row | queries kept | chosen = qrels positive | nDCG@10 | vs base [95% CI], p | share of gold's gain "
          "| vs retriever-top1 |")
    print("|---|---|---|---|---|---|---|")
    for name, (kept, accuracy, metrics) in rows.items():
        vs_base = metrics.get("ndcg@10_vs_baseline")
        gain = (f"{100 * vs_base['mean_difference']:+.2f} [{100 * vs_base['low']:+.2f}, {100 * vs_base['high']:+.2f}], "
                f"{vs_base['p_value']:.2g}") if vs_base else "-"
        share = f"{100 * vs_base['mean_difference'] / gold_gain:.0f}%" if vs_base and gold_gain else "-"
        vs_top1 = "-"
        if name not in ("base", "retriever-top1") and "retriever-top1" in trec:
            c = compare_to_run(read_trec_run(trec[name]).rankings(), read_trec_run(trec["retriever-top1"]).rankings(),
                               qrels, seed=seed)
            vs_top1 = f"{100 * c.mean_difference:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}], {c.p_value:.2g}"
        print(f"| {name} | {kept if kept is not None else '-'} | "
              f"{'-' if accuracy is None else f'{100 * accuracy:.1f}%'} | {100 * metrics['ndcg@10']:.2f} | {gain} | "
              f"{share} | {vs_top1} |")


def false_negatives(args, out: Path) -> None:
    """squad_dev with its qrels: the same mined negatives and labels, trained with --false-negatives keep and
    positive (mined negatives the teacher rewards above the labelled positive become extra positives)."""
    _, gold = folders(args.data, out, args.queries, args.seed, keep_answers=True)
    candidates, labels = out / "gold_negatives.jsonl", out / "gold_labels.jsonl"
    print("[1] negatives and labels with qrels", flush=True)
    distill("mine", "--model", args.model, "--data", str(gold), "--num-negatives", "7", "--output", str(candidates))
    distill("label", "--llm", args.llm, "--data", str(gold), "--candidates", str(candidates), "--output", str(labels),
            "--max-passage-tokens", "256")
    base = evaluate(args.model, args.data, args.eval_split, out / "eval" / "base")
    rows = {}
    for mode in ("keep", "positive"):
        print(f"[2] --false-negatives {mode}", flush=True)
        model = out / "models" / f"fn-{mode}"
        distill("train", "--model", args.model, "--data", str(gold), "--labels", str(labels), "--false-negatives",
                mode, "--output", str(model), *TRAIN)
        summary = json.loads((model / "training_summary.json").read_text())
        rows[mode] = (summary, evaluate(str(model), args.data, args.eval_split, out / "eval" / f"fn-{mode}",
                                        baseline=out / "eval" / "base.trec"))
    qrels = load_retrieval_set(args.data, args.eval_split).qrels
    c = compare_to_run(read_trec_run(out / "eval" / "fn-positive.trec").rankings(),
                       read_trec_run(out / "eval" / "fn-keep.trec").rankings(), qrels, seed=args.seed)
    print(f"\nfalse negatives, squad_dev {args.eval_split}: base nDCG@10 {100 * base['ndcg@10']:.2f}")
    print("| --false-negatives | examples | made positives | nDCG@10 | vs base [95% CI] |")
    print("|---|---|---|---|---|")
    for mode, (summary, metrics) in rows.items():
        vs = metrics["ndcg@10_vs_baseline"]
        print(f"| {mode} | {summary['examples']} | {summary['skipped'].get('false negatives made positives', 0)} | "
              f"{100 * metrics['ndcg@10']:.2f} | {100 * vs['mean_difference']:+.2f} [{100 * vs['low']:+.2f}, "
              f"{100 * vs['high']:+.2f}] |")
    print(f"positive vs keep: {c.describe()}")


if __name__ == "__main__":
    main()
