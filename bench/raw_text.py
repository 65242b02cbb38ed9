"""Raw text only: does `distill run` improve the student from a data set's passages alone?

The data set's questions are withheld: a passages-only folder (its corpus.jsonl)
is the run's `data`, the teacher writes synthetic (question, answer) pairs for
`--max-passages` of them, and the student trained on those is evaluated on the
real questions of `--eval-split`. Prints one row per data set: base and trained
nDCG@10, Recall@1/10, MRR@10 and the synthetic-data funnel.

    python bench/raw_text.py --data ../shared/data/squad_dev --eval-split test \\
        --llm models/smollm2 --model <all-MiniLM-L6-v2 folder> --out runs/raw/squad
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.pipeline import run_pipeline  # noqa: E402

METRICS = ("ndcg@10", "recall@1", "recall@10", "mrr@10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="BEIR folder; only its corpus is used for training")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--llm", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "raw_text.yaml",
                        help="example config whose stage settings the run takes (data and models are replaced)")
    parser.add_argument("--max-passages", type=int, default=None, help="default: the config's generate.max_passages")
    parser.add_argument("--set", nargs="*", default=[], help="more settings: section.key=value")
    args = parser.parse_args()

    passages = args.out / "passages"
    passages.mkdir(parents=True, exist_ok=True)
    if not (passages / "corpus.jsonl").exists():
        shutil.copyfile(Path(args.data) / "corpus.jsonl", passages / "corpus.jsonl")
    config = yaml.safe_load(args.config.read_text())
    config.update(output_dir=str(args.out), data=str(passages), eval_data=args.data, eval_split=args.eval_split,
                  llm=args.llm, model=args.model)
    if args.max_passages is not None:
        config["generate"]["max_passages"] = args.max_passages
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    path = args.out / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_pipeline(path, overrides)
    summary = json.loads((args.out / "generated" / "generate_summary.json").read_text())
    before, after = result["before"], result["after"]
    print(f"\n| data | student | {' | '.join(METRICS)} |\n|---|---|" + "---|" * len(METRICS))
    for name, row in (("base", before), ("distilled from synthetic", after)):
        print(f"| {Path(args.data).name} | {name} | " + " | ".join(f"{100 * row[m]:.2f}" for m in METRICS) + " |")
    print(f"Δ nDCG@10 {result['gain']}; {summary['passages']} passages, "
          f"{summary['generated']} samples, removed {summary['removed']}, kept {summary['kept']}")


if __name__ == "__main__":
    main()
