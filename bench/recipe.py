"""The raw-text recipe, step by step: does each step before the generated pairs help the student?

A data set's questions are withheld; every row trains on its passages alone and is evaluated on the real
questions of `--eval-split`, with the paired 95% interval of its nDCG@10 against the base:

    base | + pretrain (mlm) | + pretrain (tsdae) | + SimCSE | generated pairs only | the full recipe

The first four need no teacher (`distill pretrain`, `distill train --loss simcse`, `--steps` each); the
last two are `distill run` on `--config` (examples/raw_text.yaml) without and with its `simcse:` section
(`--llm` needed; on a CPU the generation takes about an hour per 1,200 passages). The full row adds continued
pretraining only with `--full-pretrain mlm|tsdae`: on an already-trained embedder it hurts (see its own rows), so
the recipe as shipped leaves it off. The full row samples nothing again: the questions are the generated row's
(same teacher, prompts and seeds); only the round-trip filter, which asks the adapted student, and the later
stages run anew.

    python bench/recipe.py --data ../shared/data/squad_dev --model <all-MiniLM-L6-v2> --out runs/recipe/squad \\
        --rows base mlm tsdae simcse
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data import load_retrieval_set  # noqa: E402
from distill.data.records import read_trec_run  # noqa: E402
from distill.evaluate import compare_to_run  # noqa: E402

ROWS = ("base", "mlm", "tsdae", "simcse", "generated", "full")
NAMES = {"base": "base", "mlm": "+ pretrain (mlm)", "tsdae": "+ pretrain (tsdae)", "simcse": "+ SimCSE",
         "generated": "generated pairs only", "full": "full recipe (SimCSE, then generated pairs)"}


def distill(*args: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "distill", *args], env=env, text=True, capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"distill {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def evaluate(model: str, data: str, split: str, out: Path, baseline: Path | None) -> dict:
    metrics, run = out.with_suffix(".json"), out.with_suffix(".trec")
    if not metrics.is_file():
        distill("eval", "--model", model, "--data", data, "--split", split, "--output", str(metrics), "--run-file",
                str(run), "--no-cache", "--no-show-progress", *(["--baseline-run", str(baseline)] if baseline else []))
    return json.loads(metrics.read_text())


def adapted(row: str, args, passages: Path) -> tuple[str, float]:
    """(the row's student, seconds it took to make)."""
    out = args.out / row
    if row == "base":
        return args.model, 0.0
    common = ["--model", args.model, "--data", str(passages), "--output", str(out), "--max-steps", str(args.steps),
              "--no-show-progress", "--seed", str(args.seed)]
    if row in ("mlm", "tsdae"):
        return str(out), 0.0 if (out / "pretrain_summary.json").is_file() else distill(
            "pretrain", *common, "--objective", row, "--resume")
    if row == "simcse":
        return str(out), 0.0 if (out / "training_summary.json").is_file() else distill(
            "train", *common, "--loss", "simcse", "--resume", "--no-cache")
    config = yaml.safe_load(args.config.read_text())
    config.update(output_dir=str(out), data=str(passages), eval_data=args.data, eval_split=args.eval_split,
                  llm=args.llm, model=args.model)
    for adaptation in ("pretrain", "simcse"):  # the shipped example turns SimCSE on: the rows set both themselves
        config.pop(adaptation, None)
    if row == "full":
        config.update(simcse={"max_steps": args.steps})
        if args.full_pretrain:
            config.update(pretrain={"objective": args.full_pretrain, "max_steps": args.steps})
        reuse_samples(args.out / "generated" / "generated", out / "generated")
    path = args.out / f"{row}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(out / "model"), distill("run", str(path))


def reuse_samples(source: Path, target: Path) -> None:
    """Seed `target`'s generate folder with the complete samples of `source` (the generated row's): the generate
    stage keeps samples whose sampling settings match and reruns only the corpus-wide filters."""
    names = ("generations.jsonl", "generations.jsonl.progress.json")
    if (target / names[0]).exists() or not all((source / n).is_file() for n in names):
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, target / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="BEIR folder: its corpus trains, its questions evaluate")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--model", required=True)
    parser.add_argument("--llm", default=None, help="teacher for the generated rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--steps", type=int, default=200, help="steps of pretraining and of SimCSE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "raw_text.yaml")
    parser.add_argument("--full-pretrain", choices=("mlm", "tsdae"), help="continued pretraining in the full row too")
    args = parser.parse_args()
    if {"generated", "full"} & set(args.rows) and not args.llm:
        parser.error("the generated and full rows need --llm")

    passages = args.out / "passages"
    passages.mkdir(parents=True, exist_ok=True)
    if not (passages / "corpus.jsonl").exists():
        shutil.copyfile(Path(args.data) / "corpus.jsonl", passages / "corpus.jsonl")
    rows = ["base", *[r for r in ROWS if r != "base" and r in args.rows]]  # generated before full: it reuses its samples
    print("| student | nDCG@10 | Recall@1 | Recall@10 | MRR@10 | Δ nDCG@10 vs base [95% CI] | seconds |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    base_run = args.out / "eval" / "base.trec"
    (args.out / "eval").mkdir(exist_ok=True)
    for row in rows:
        model, seconds = adapted(row, args, passages)
        m = evaluate(model, args.data, args.eval_split, args.out / "eval" / row, None if row == "base" else base_run)
        c = m.get("ndcg@10_vs_baseline")
        versus = f"{100 * c['mean_difference']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]" if c else ""
        print(f"| {NAMES[row]} | {100 * m['ndcg@10']:.2f} | {100 * m['recall@1']:.2f} | {100 * m['recall@10']:.2f} | "
              f"{100 * m['mrr@10']:.2f} | {versus} | {seconds:.0f} |", flush=True)
    runs = {row: args.out / "eval" / f"{row}.trec" for row in ("generated", "full")}
    if all(run.is_file() for run in runs.values()):  # the goal: the full recipe against generated pairs only
        qrels = load_retrieval_set(args.data, args.eval_split).qrels
        c = compare_to_run(read_trec_run(runs["full"]).rankings(), read_trec_run(runs["generated"]).rankings(), qrels,
                           seed=args.seed)
        print(f"\nfull recipe against generated pairs only: nDCG@10 {100 * c.mean_difference:+.2f} points (95% CI "
              f"{100 * c.low:+.2f} to {100 * c.high:+.2f}, paired randomization p = {c.p_value:.2g}, {len(qrels)} queries)")


if __name__ == "__main__":
    main()
