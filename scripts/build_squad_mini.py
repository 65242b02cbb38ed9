"""Build the embedded data sets `squad-mini` and `squad-qa` from the SQuAD v1.1 dev set.

squad-mini (tests, labelled runs): six articles give 240 training queries and six others 200 test
queries, as in the article-level split of the full set; the corpus holds every passage of the twelve
articles.

squad-qa (the README demo: questions with answers and no relevance labels): the same 240 training
questions with their answers and no qrels (what a user with FAQ pairs has), and the whole test split of
squad_dev (4,905 questions on 24 other articles) with its qrels to measure the result; the corpus holds
every passage of those 30 articles. The withheld training qrels are kept beside it in
`withheld_qrels/train.tsv` (outside `qrels/`, so no command reads them) for checking what the teacher chose.

Run from the repository root with the BEIR-form SQuAD dev folder as argument:

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
RESOURCES = Path(__file__).resolve().parents[1] / "distill" / "resources"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_qrels(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{qid}\t{pid}\t1\n" for qid, pid in pairs)


def split_pairs(source: Path, split: str, article_of: dict[str, str]) -> list[tuple[str, str]]:
    lines = (source / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [(qid, pid) for qid, pid, _ in (line.split("\t") for line in lines) if pid in article_of]


def build_mini(source: Path, corpus: list[dict], queries: dict[str, dict]) -> list[tuple[str, str]]:
    """squad-mini; returns its training pairs (squad-qa's questions)."""
    out = RESOURCES / "squad_mini"
    corpus = [p for p in corpus if p["doc_id"] in TRAIN_ARTICLES + TEST_ARTICLES]
    article_of = {p["_id"]: p["doc_id"] for p in corpus}
    rng = random.Random(13)
    sampled: dict[str, list[tuple[str, str]]] = {}
    for split, articles in (("train", TRAIN_ARTICLES), ("test", TEST_ARTICLES)):
        pairs = [(q, p) for q, p in split_pairs(source, split, article_of) if article_of[p] in articles]
        sampled[split] = sorted(rng.sample(pairs, QUERIES_PER_SPLIT[split]))
        write_qrels(out / "qrels" / f"{split}.tsv", sampled[split])
    kept = [queries[qid] for split in ("train", "test") for qid, _ in sampled[split]]
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "queries.jsonl", kept)
    print(f"squad-mini: {len(corpus)} passages, {len(kept)} queries -> {out}")
    return sampled["train"]


def build_qa(source: Path, corpus: list[dict], queries: dict[str, dict], train_pairs: list[tuple[str, str]]) -> None:
    out = RESOURCES / "squad_qa"
    article_of = {p["_id"]: p["doc_id"] for p in corpus}
    test_pairs = split_pairs(source, "test", article_of)
    articles = set(TRAIN_ARTICLES) | {article_of[p] for _, p in test_pairs}
    corpus = [p for p in corpus if p["doc_id"] in articles]
    test_ids = list(dict.fromkeys(q for q, _ in test_pairs))
    write_qrels(out / "qrels" / "test.tsv", test_pairs)
    write_qrels(out / "withheld_qrels" / "train.tsv", train_pairs)
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "queries.jsonl", [queries[q] for q, _ in train_pairs] + [queries[q] for q in test_ids])
    print(f"squad-qa: {len(corpus)} passages, {len(train_pairs)} train questions without qrels, "
          f"{len(test_ids)} test questions -> {out}")


def main(source: Path) -> None:
    corpus = read_jsonl(source / "corpus.jsonl")
    queries = {q["_id"]: q for q in read_jsonl(source / "queries.jsonl")}
    train_pairs = build_mini(source, corpus, queries)
    build_qa(source, corpus, queries, train_pairs)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
