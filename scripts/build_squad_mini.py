"""Build the embedded default data set `squad-mini` from the SQuAD v1.1 dev set.

Six articles give the training queries and six others the test queries, as in
the article-level split of the full set; the corpus holds every passage of the
twelve articles. Run from the repository root with the BEIR-form SQuAD dev
folder as argument:

    python scripts/build_squad_mini.py ../shared/data/squad_dev
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TRAIN_ARTICLES = ["Construction", "Jacksonville,_Florida", "Black_Death", "1973_oil_crisis",
                  "Intergovernmental_Panel_on_Climate_Change", "Victoria_(Australia)"]
TEST_ARTICLES = ["Amazon_rainforest", "Sky_(United_Kingdom)", "Packet_switching", "Geology",
                 "Ctenophora", "Prime_number"]
QUERIES_PER_SPLIT = {"train": 240, "test": 200}
OUT = Path(__file__).resolve().parents[1] / "distill" / "resources" / "squad_mini"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(source: Path) -> None:
    corpus = [p for p in read_jsonl(source / "corpus.jsonl")
              if p["doc_id"] in TRAIN_ARTICLES + TEST_ARTICLES]
    article_of = {p["_id"]: p["doc_id"] for p in corpus}
    queries = {q["_id"]: q for q in read_jsonl(source / "queries.jsonl")}
    rng = random.Random(13)
    kept_queries: list[dict] = []
    (OUT / "qrels").mkdir(parents=True, exist_ok=True)
    for split, articles in (("train", TRAIN_ARTICLES), ("test", TEST_ARTICLES)):
        lines = (source / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        pairs = [line.split("\t") for line in lines]
        pairs = [(qid, pid) for qid, pid, _ in pairs if article_of.get(pid) in articles]
        pairs = sorted(rng.sample(pairs, QUERIES_PER_SPLIT[split]))
        with (OUT / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{qid}\t{pid}\t1\n" for qid, pid in pairs)
        kept_queries += [queries[qid] for qid, _ in pairs]
    with (OUT / "corpus.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in corpus)
    with (OUT / "queries.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in kept_queries)
    print(f"{len(corpus)} passages, {len(kept_queries)} queries -> {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
