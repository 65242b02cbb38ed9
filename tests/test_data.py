"""The data layer: every supported form reads to the same tables; every kind of
bad input stops `distill eval` with status 2 and one line naming file, line and
field; --skip-invalid skips and counts."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import SQUAD_MINI, read_jsonl, write_jsonl
from distill.data import DataError, load_retrieval_set
from distill.data.tables import CHUNK_ROWS


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_embedded_set_matches_its_files():
    rset = load_retrieval_set("squad-mini", "test")
    corpus_lines = (SQUAD_MINI / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    qrels_lines = (SQUAD_MINI / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rset.corpus) == len(corpus_lines)
    assert set(rset.qrels) == {line.split("\t")[0] for line in qrels_lines}
    assert set(rset.queries.ids) == set(rset.qrels)
    first = json.loads(corpus_lines[0])
    row = rset.corpus.table.slice(0, 1).to_pylist()[0]
    assert (row["id"], row["text"], row["title"], row["doc_id"]) == (first["_id"], first["text"], first["title"], first["doc_id"])


def _as_parquet(folder: Path) -> None:
    import pyarrow.parquet as pq

    for name in ("corpus", "queries"):
        pq.write_table(pa.Table.from_pylist(read_jsonl(folder / f"{name}.jsonl")), folder / f"{name}.parquet")
        (folder / f"{name}.jsonl").unlink()


def _as_hf_dataset(folder: Path) -> None:
    import datasets

    for name in ("corpus", "queries"):
        datasets.Dataset.from_list(read_jsonl(folder / f"{name}.jsonl")).save_to_disk(str(folder / name))
        (folder / f"{name}.jsonl").unlink()


@pytest.mark.parametrize("convert", [_as_parquet, _as_hf_dataset])
def test_parquet_and_datasets_read_like_jsonl(small_beir, convert):
    reference = load_retrieval_set(small_beir, "test")
    convert(small_beir)
    converted = load_retrieval_set(small_beir, "test")
    columns = ["id", "text", "title", "doc_id"]
    assert converted.corpus.table.select(columns).to_pylist() == reference.corpus.table.select(columns).to_pylist()
    assert converted.queries.table.select(["id", "text", "answers"]).to_pylist() == \
        reference.queries.table.select(["id", "text", "answers"]).to_pylist()
    assert converted.qrels == reference.qrels
    assert converted.corpus.fingerprint() == reference.corpus.fingerprint()


def test_queries_positives_stand_in_for_missing_qrels(small_beir):
    reference = load_retrieval_set(small_beir, "test")
    queries = read_jsonl(small_beir / "queries.jsonl")
    for q in queries:
        q["positives"] = sorted(reference.qrels[q["_id"]])
    write_jsonl(small_beir / "queries.jsonl", queries)
    (small_beir / "qrels" / "test.tsv").unlink()
    assert load_retrieval_set(small_beir, "test").qrels == reference.qrels


def test_trec_qrels_without_header(small_beir):
    reference = load_retrieval_set(small_beir, "test")
    lines = (small_beir / "qrels" / "test.tsv").read_text().splitlines()[1:]
    (small_beir / "qrels" / "test.tsv").write_text("".join(f"{q} 0 {p} {s}\n" for q, p, s in (l.split("\t") for l in lines)))
    assert load_retrieval_set(small_beir, "test").qrels == reference.qrels


def test_fingerprint_ignores_chunking_and_sees_one_changed_character(small_beir):
    rset = load_retrieval_set(small_beir, "test")
    table = rset.corpus.table
    rechunked = pa.Table.from_batches(table.to_batches(max_chunksize=7))
    assert type(rset.corpus)(rechunked, rset.corpus.path).fingerprint() == rset.corpus.fingerprint()
    corpus = read_jsonl(small_beir / "corpus.jsonl")
    corpus[5]["text"] = corpus[5]["text"][:-1] + "?"
    write_jsonl(small_beir / "corpus.jsonl", corpus)
    assert load_retrieval_set(small_beir, "test").corpus.fingerprint() != rset.corpus.fingerprint()


def test_large_corpus_is_built_in_bounded_chunks(tmp_path):
    n = CHUNK_ROWS * 2 + 5
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(f'{{"_id": "p{i}", "text": "passage {i}"}}\n')
    from distill.data import load_corpus

    corpus = load_corpus(path)
    assert len(corpus) == n
    assert max(len(chunk) for chunk in corpus.table["id"].chunks) <= CHUNK_ROWS
    assert corpus.ids_at([n - 1])[0] == f"p{n - 1}"


# Each case: (file to break, how, expected "file:line", expected field or None).
def _malformed(lines): lines[2] = lines[2][:-5]
def _missing_text(lines): rec = json.loads(lines[2]); del rec["text"]; lines[2] = json.dumps(rec)
def _empty_text(lines): rec = json.loads(lines[2]); rec["text"] = "  "; lines[2] = json.dumps(rec)
def _empty_id(lines): rec = json.loads(lines[2]); rec["_id"] = ""; lines[2] = json.dumps(rec)
def _duplicate_id(lines): rec = json.loads(lines[2]); rec["_id"] = json.loads(lines[0])["_id"]; lines[2] = json.dumps(rec)
def _unknown_passage(lines): lines[3] = "\t".join(lines[3].split("\t")[:1] + ["no-such-passage", "1"])
def _unknown_query(lines): lines[3] = "\t".join(["no-such-query"] + lines[3].split("\t")[1:])


BAD_CASES = {
    "malformed JSON": ("corpus.jsonl", _malformed, "corpus.jsonl:3", None),
    "missing field": ("corpus.jsonl", _missing_text, "corpus.jsonl:3", '"text"'),
    "empty text": ("queries.jsonl", _empty_text, "queries.jsonl:3", '"text"'),
    "empty id": ("corpus.jsonl", _empty_id, "corpus.jsonl:3", '"_id"'),
    "duplicate id": ("corpus.jsonl", _duplicate_id, "corpus.jsonl:3", '"_id"'),
    "unknown passage in qrels": ("qrels/test.tsv", _unknown_passage, "test.tsv:4", '"corpus-id"'),
    "unknown query in qrels": ("qrels/test.tsv", _unknown_query, "test.tsv:4", '"query-id"'),
}


def _break(folder: Path, name: str, how) -> None:
    path = folder / name
    lines = path.read_text(encoding="utf-8").splitlines()
    how(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line_naming_file_line_and_field(small_beir, case, capsys):
    from distill.cli import main

    name, how, where, field = BAD_CASES[case]
    _break(small_beir, name, how)
    with pytest.raises(DataError) as raised:
        load_retrieval_set(small_beir, "test")
    assert where in str(raised.value)
    # the same through the CLI: exit status 2, one line on stderr
    assert main(["eval", "--model", "unused", "--data", str(small_beir), "--no-cache"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0]
    if field:
        assert f"field {field}" in lines[0]


def test_non_utf8_names_file_and_line(small_beir):
    path = small_beir / "corpus.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b"the", b"th\xe9", 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"corpus\.jsonl:5: not valid UTF-8 \(byte 0xe9"):
        load_retrieval_set(small_beir, "test")


@pytest.mark.slow
def test_cli_exits_2_with_one_line_and_no_traceback(small_beir, tiny_bert_dir):
    _break(small_beir, "corpus.jsonl", _empty_text)
    result = run_cli("eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--no-cache")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines == [f"error: {small_beir / 'corpus.jsonl'}:3: field \"text\": is empty"]


@pytest.mark.slow
def test_skip_invalid_counts_and_still_runs(small_beir, tiny_bert_dir, tmp_path):
    corpus = small_beir / "corpus.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()
    # Three bad corpus records that no qrel points to: malformed, empty text, duplicate id.
    lines += ['{"_id": "bad1", "text": ', '{"_id": "bad2", "text": ""}', lines[0]]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "m.json"
    strict = run_cli("eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--no-cache")
    assert strict.returncode == 2
    result = run_cli("eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--no-cache",
                     "--skip-invalid", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "skipped 3 invalid records" in result.stdout
    report = json.loads(out.read_text())
    assert report["skipped_records"] == 3
    assert report["num_passages"] == len(lines) - 3


def _labels_line(**extra) -> dict:
    return {"qid": "q1", "pids": ["p1", "p2", "p3"], "rewards": [-1.5, -2.0, -3.25], "n_tokens": [2, 2, 2],
            "n_positives": 1, "target": "relevance", "model": "m", "prompt": "relevance_en", "normalization": "mean",
            **extra}


def test_a_label_record_with_several_signals_round_trips(tmp_path):
    from distill.data.records import LabelRecord, read_labels

    with_signals = LabelRecord("q1", ("p1", "p2", "p3"), (0.5, -1.0, 2.0), 1, n_tokens=(1, 1, 1), target="relevance",
                               model="m", prompt="relevance_en", normalization="mean",
                               signals={"relevance": (0.5, -1.0, 2.0), "query": (-3.0, -4.5, -2.25)})
    without = LabelRecord("q2", ("p2",), (-1.0,), 0, n_tokens=(3,), target="query", model="m",
                          prompt="query_likelihood_en", normalization="mean")
    path = tmp_path / "labels.jsonl"
    write_jsonl(path, [with_signals.to_json(), without.to_json()])
    back = read_labels(path)
    assert back == [dataclasses.replace(with_signals, line=1), dataclasses.replace(without, line=2)]
    assert "signals" not in without.to_json()  # labels files without signals keep their bytes
    assert list(with_signals.to_json()["signals"]) == ["relevance", "query"]


@pytest.mark.parametrize("signals, field, message", [
    ({"relevance": [0.5, float("nan"), 1.0]}, "signals.relevance", "finite numbers"),
    ({"query": [0.5, 1.0]}, "signals.query", "list of 3 finite numbers (one per pid)"),
    ({"query": [0.5, True, 1.0]}, "signals.query", "finite numbers"),
    ([0.5, 1.0, 2.0], "signals", "object of named signals"),
    ({}, "signals", "object of named signals"),
])
def test_a_bad_signals_value_is_refused_with_file_line_and_field(tmp_path, signals, field, message):
    from distill.data.records import read_labels

    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(_labels_line(qid="q0")) + "\n" + json.dumps(_labels_line(signals=signals)) + "\n")
    with pytest.raises(DataError) as caught:
        read_labels(path)
    assert str(caught.value).startswith(f'{path}:2: field "{field}": ') and message in str(caught.value)
