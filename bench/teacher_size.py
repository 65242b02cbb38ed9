"""Teacher size against what it buys: the same pools scored by each teacher, how often each signal (and their
fusion) chooses the true positive, what `distill check-teacher` predicts from 50 of those queries, and what the
student gains over self-training on the same pools (issues 45 and 46).

Sets (as in bench/label_free.py, whose folders this reuses): squad_dev answers-only (N train questions with
their answers, qrels withheld) and scifact queries-only (N train claims, no answers: query likelihood). Pools:
the student's dense top `--pool-size` (8), mined once and shared by every teacher. Per teacher:

- label the pools once (`distill label`, resumable: an interrupted teacher resumes where it stopped; a teacher
  whose labels are complete is not run again), with `--signals` when the label stage has them;
- the check's figures on the same 50 queries `distill check-teacher --calibration-qrels` would draw (the
  withheld qrels as known positives): teacher first against retriever first;
- the choice accuracy over all N of `teacher`, `teacher+retriever` (the equal z-sum) and the fusion fitted on the
  pools' known positives (`positives.fit_fusion`; on squad the silver answer matches, on scifact the 50
  calibration queries), against the withheld qrels;
- one student trained on the teacher's positives (the set's default mode), evaluated on the real eval split,
  with its paired gain over the self-training control (`retriever-top1`, InfoNCE, the same plan, trained once
  per set) and over the base.

Every step is a `distill` command writing into --out, so a rerun skips what is done and resumes what is not.

python bench/teacher_size.py squad --data ../shared/data/squad_dev --model <MiniLM> --out runs/teacher_size/squad \\
       --teacher smollm2=models/smollm2 --teacher gemma=models/gemma3-270m --teacher qwen05=models/qwen-coder-0.5b
python bench/teacher_size.py scifact --data ../shared/data/scifact --model <MiniLM> --eval-split dev \\
       --out runs/teacher_size/scifact --teacher smollm2=models/smollm2 ...
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_free import choice_stats, distill, evaluate, folders  # noqa: E402

import numpy as np  # noqa: E402

from distill.data import load_retrieval_set  # noqa: E402
from distill.data.records import read_labels, read_trec_run  # noqa: E402
from distill.evaluate import compare_to_run  # noqa: E402
from distill.stages.check_teacher import check_figures, check_units  # noqa: E402
from distill.training.positives import contains_answer, fit_fusion, hits_known_first  # noqa: E402

LABEL_CHUNK = 16  # distill label's default --chunk-size, which the check's chunks follow
DEFAULT_MODE = {"squad": "answer-match+teacher", "scifact": "teacher+retriever"}
TRAIN = ["--loss", "rank_filter:1.0,infonce:0.2", "--num-negatives", "3", "--train-batch-size", "16",
         "--learning-rate", "3e-5", "--epochs", "2", "--max-passage-length", "192", "--batch-dedup", "none"]
CONTROL = ["--loss", "infonce", "--num-negatives", "3", "--train-batch-size", "16", "--learning-rate", "3e-5",
           "--epochs", "2", "--max-passage-length", "192", "--batch-dedup", "none"]


def signal_pools(labels: Path, free: Path, gold: Path, use_answers: bool):
    """Per query: ({signal: scores over the pool}, mask of the withheld qrels positives, mask of the pool's answer
    matches or None)."""
    rset = load_retrieval_set(free, "train", unlabelled=True)
    truth = load_retrieval_set(gold, "train")
    answers = dict(zip(rset.queries.ids, rset.queries.table["answers"].to_pylist()))
    out = []
    for record in read_labels(labels):
        signals = {"teacher": np.asarray(record.rewards), "retriever": np.asarray(record.retriever_scores)}
        for name, values in (getattr(record, "signals", None) or {}).items():
            signals[name] = np.asarray(values)
        gold_mask = np.array([p in set(truth.positives(record.qid)) for p in record.pids])
        matches = None
        if use_answers and answers.get(record.qid):
            texts = rset.corpus.passages_at(rset.corpus.rows_of(list(record.pids)))
            matches = np.array([contains_answer(t, answers[record.qid]) for t in texts])
        out.append((record.qid, signals, gold_mask, matches))
    return out


def gain(run: Path, baseline: Path, gold_data: Path, split: str) -> str:
    rset = load_retrieval_set(gold_data, split)
    comparison = compare_to_run(read_trec_run(run).rankings(), read_trec_run(baseline).rankings(), rset.qrels)
    return comparison.describe(unit="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", choices=sorted(DEFAULT_MODE))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--teacher", action="append", required=True, help="name=path, one per teacher")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--check-queries", type=int, default=50)
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--signals", nargs="*", default=[], help="extra teacher signals (distill label --signals)")
    parser.add_argument("--no-train", action="store_true", help="choice accuracy and check figures only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    use_answers = args.set == "squad"
    free, gold = folders(args.data, out, args.queries, args.seed, keep_answers=use_answers)
    pool = out / "pool.jsonl"
    distill("mine", "--model", args.model, "--data", str(free), "--pool-size", str(args.pool_size), "--output",
            str(pool))
    base = evaluate(args.model, args.data, args.eval_split, out / "eval" / "base")
    control = out / "control"
    if not args.no_train:
        distill("train", "--model", args.model, "--data", str(free), "--candidates", str(pool), "--positives",
                "retriever-top1", "--output", str(control), *CONTROL)
        evaluate(str(control), args.data, args.eval_split, out / "eval" / "control", out / "eval" / "base.trec")
    rows = []
    for spec in args.teacher:
        name, _, path = spec.partition("=")
        labels = out / f"labels-{name}.jsonl"
        started = time.perf_counter()
        distill("label", "--llm", path, "--data", str(free), "--candidates", str(pool), "--output", str(labels),
                *(["--signals", *args.signals] if args.signals else []))
        label_s = time.perf_counter() - started
        pools = signal_pools(labels, free, gold, use_answers)
        # the very queries `distill check-teacher --calibration-qrels <gold> --num-queries n` scores: whole chunks of
        # the label job (16 queries) drawn until they hold n known positives; all of them are measured
        units = [(q, None, None) for q, *_ in pools]
        sample = {u[0] for u in check_units(units, {q for q, *_ in pools}, args.check_queries,
                                            LABEL_CHUNK, args.seed)}
        chosen = [p for p in pools if p[0] in sample]  # as the check counts them: a pool without it is a miss
        check = check_figures([s["teacher"] for _, s, _, _ in chosen], [s["retriever"] for _, s, _, _ in chosen],
                              [g for _, _, g, _ in chosen])
        accuracy = {}
        for signal in pools[0][1]:
            accuracy[signal] = np.mean([hits_known_first(s[signal], g) for _, s, g, _ in pools])
        if use_answers:  # the silver evidence: pools with exactly one answer match
            silver = [(s, m) for _, s, _, m in pools if m is not None and m.sum() == 1]
            rule = fit_fusion([s for s, _ in silver], [m for _, m in silver], f"{len(silver)} answer-matched queries")
        else:
            rule = fit_fusion([s for _, s, _, _ in chosen], [g for _, _, g, _ in chosen],
                              f"{len(chosen)} calibration queries")
        accuracy["fitted"] = np.mean([hits_known_first(rule.score(s), g) for _, s, g, _ in pools])
        kept, mode_accuracy = choice_stats(labels, free, gold, DEFAULT_MODE[args.set])
        row = {"teacher": name, "label_s": round(label_s), "check_teacher": check.teacher.describe(),
               "check_retriever": check.retriever.describe() if check.retriever else None,
               "accuracy": {k: round(float(v), 3) for k, v in accuracy.items()}, "fitted": rule.describe(),
               "default_mode": f"{DEFAULT_MODE[args.set]}: {mode_accuracy:.1%} of {kept}"}
        if not args.no_train:
            model = out / f"student-{name}"
            distill("train", "--model", args.model, "--data", str(free), "--labels", str(labels), "--positives",
                    DEFAULT_MODE[args.set], "--output", str(model), *TRAIN)
            metrics = evaluate(str(model), args.data, args.eval_split, out / "eval" / f"student-{name}",
                               out / "eval" / "base.trec")
            row["ndcg@10"] = round(100 * metrics["ndcg@10"], 2)
            row["vs_control"] = gain(out / "eval" / f"student-{name}.trec", out / "eval" / "control.trec",
                                     args.data, args.eval_split)
            row["vs_base"] = gain(out / "eval" / f"student-{name}.trec", out / "eval" / "base.trec", args.data,
                                  args.eval_split)
        rows.append(row)
        print(row, flush=True)
    print(f"\n{args.set}: {args.queries} queries, pools of {args.pool_size}; base nDCG@10 {100 * base['ndcg@10']:.2f}")
    names = sorted({k for r in rows for k in r["accuracy"]})
    print("| teacher | check: teacher first | check: retriever first | " + " | ".join(f"{n} chooses gold" for n in
          names) + " | default mode | student nDCG@10 | vs self-training | vs base | label s |")
    print("|---" * (len(names) + 8) + "|")
    for r in rows:
        print(f"| {r['teacher']} | {r['check_teacher']} | {r['check_retriever']} | "
              + " | ".join(f"{100 * r['accuracy'].get(n, float('nan')):.1f}%" for n in names)
              + f" | {r['default_mode']} | {r.get('ndcg@10', '-')} | {r.get('vs_control', '-')} | "
                f"{r.get('vs_base', '-')} | {r['label_s']} |")
    for r in rows:
        print(f"fitted fusion ({r['teacher']}): {r['fitted']}")


if __name__ == "__main__":
    main()
