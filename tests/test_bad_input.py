"""The smaller cases of issue 20: each bad input stops with exit 2 and one line that names the file (and line,
field or column), before any work, and loses nothing; the embedding cache can be listed and cleared."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import read_jsonl, write_jsonl
from distill.cli import main
from distill.data import DataError, load_retrieval_set


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def eval_args(model: Path, data: Path | str, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--no-cache", "--no-show-progress", *extra]


# 10
def test_an_empty_split_or_corpus_is_an_error_naming_the_file(tiny_bert_dir, copy_of_squad_mini, tmp_path, capsys):
    qrels = copy_of_squad_mini / "qrels" / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n")
    assert main(eval_args(tiny_bert_dir, copy_of_squad_mini)) == 2
    assert f"{qrels}: split 'test' is empty" in one_error_line(capsys)
    out = tmp_path / "cand.jsonl"  # mine (and label, which reads the split the same way) writes nothing
    assert main(["mine", "--data", str(copy_of_squad_mini), "--split", "test", "--strategy", "random", "--output",
                 str(out), "--no-show-progress"]) == 2
    assert "is empty" in one_error_line(capsys) and not out.exists()
    (copy_of_squad_mini / "corpus.jsonl").write_text("")
    assert main(eval_args(tiny_bert_dir, copy_of_squad_mini)) == 2
    assert "corpus.jsonl: the corpus has no passages" in one_error_line(capsys)


# 11
def test_an_unfinished_labels_file_is_refused_unless_allowed(tiny_bert_dir, squad_mini_train_labels, tmp_path, capsys):
    labels = tmp_path / "labels.jsonl"
    shutil.copy(squad_mini_train_labels, labels)
    progress = json.loads(Path(str(squad_mini_train_labels) + ".progress.json").read_text())
    lines = labels.read_bytes().splitlines(keepends=True)[:100]
    labels.write_bytes(b"".join(lines))
    import hashlib

    start = len(b"".join(lines[:-4]))
    Path(str(labels) + ".progress.json").write_text(json.dumps({
        **progress, "units_done": 100, "bytes": labels.stat().st_size, "complete": False,
        "last_chunk": {"start": start, "sha256": hashlib.sha256(labels.read_bytes()[start:]).hexdigest()}}))
    args = ["train", "--model", str(tiny_bert_dir), "--data", "squad-mini", "--labels", str(labels), "--device", "cpu",
            "--no-show-progress", "--no-cache", "--train-batch-size", "8", "--num-negatives", "3", "--max-steps", "1"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 2
    line = one_error_line(capsys)
    assert f"{labels}: unfinished" in line and "100 of 240" in line and "--allow-partial" in line
    assert main(args + ["--output", str(tmp_path / "b"), "--allow-partial"]) == 0
    assert "WARNING" in capsys.readouterr().out


# 12
def test_label_says_how_many_queries_have_no_candidates(tiny_llama_dir, small_beir, tmp_path, capsys):
    rset = load_retrieval_set(small_beir, "test")
    half = rset.queries.ids[: len(rset.queries) // 2]
    candidates = tmp_path / "cand.jsonl"
    write_jsonl(candidates, [{"qid": q, "pids": [rset.corpus.ids_at([0])[0]]} for q in half])
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(small_beir), "--split", "test", "--candidates",
                 str(candidates), "--output", str(out), "--device", "cpu", "--dtype", "float32",
                 "--no-show-progress"]) == 0
    said = capsys.readouterr().out
    missing = len(rset.queries) - len(half)
    assert f"{missing} of {len(rset.queries)} test queries have no line in {candidates}: they are not labelled" in said
    assert len(read_jsonl(out)) == len(half)


# 13
def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: runs/x\ndata: squad-mini\ntrain:\n  epochs: [1\n  loss: kl\n")
    assert main(["run", str(config), "--dry-run"]) == 2
    line = one_error_line(capsys)
    assert f"{config}:5:" in line and "not valid YAML" in line
    settings = tmp_path / "settings.yaml"
    settings.write_text("epochs: : 2\n")
    assert main(["--config", str(settings), "eval", "--model", "m", "--data", "squad-mini"]) == 2
    assert f"{settings}:1:" in one_error_line(capsys)


# 14
def test_a_byte_order_mark_before_a_header_or_a_json_line_is_dropped(copy_of_squad_mini):
    for name in ("qrels/test.tsv", "queries.jsonl"):
        path = copy_of_squad_mini / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    rset = load_retrieval_set(copy_of_squad_mini, "test")
    assert rset.qrels == load_retrieval_set("squad-mini", "test").qrels


# 15, 16
def test_a_folder_that_is_not_a_model_or_has_damaged_weights_is_named(tiny_bert_dir, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    assert main(eval_args(notes, "squad-mini")) == 2
    assert f"{notes}: not a model folder: no config.json (it holds a.txt)" in one_error_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for args in (eval_args(broken, "squad-mini"), ["label", "--llm", str(broken), "--data", "squad-mini",
                                                   "--output", str(tmp_path / "l.jsonl")]):
        assert main(args) == 2
        assert f"{weights}: damaged model weights" in one_error_line(capsys)


# 17
def test_a_bad_template_setting_names_the_template_file(tiny_llama_dir, tmp_path, capsys):
    template = tmp_path / "mine.txt"
    template.write_text("## separator: ' '\nPassage: {passage}\nQuestion: {question}\nAnswer:")
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", "squad-mini", "--prompt", str(template),
                 "--output", str(tmp_path / "l.jsonl"), "--device", "cpu", "--no-show-progress"]) == 2
    line = one_error_line(capsys)
    assert f"{template}: setting 'separator'" in line and "not a JSON string" in line


# 18
def test_run_checks_every_model_before_the_first_stage(tiny_bert_dir, tmp_path, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    out = tmp_path / "run"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "data": "squad-mini", "model": str(tiny_bert_dir),
                                      "llm": str(tmp_path / "no-such-llm")}))
    assert main(["run", str(config)]) == 2
    assert "no-such-llm" in one_error_line(capsys)
    assert not out.exists()  # eval_before and mine did not run
    config.write_text(yaml.safe_dump({"output_dir": str(out), "data": "squad-mini", "model": str(tiny_bert_dir),
                                      "llm": str(tiny_bert_dir)}))
    assert main(["run", str(config)]) == 2
    assert "not a causal language model" in one_error_line(capsys) and not out.exists()


# 19
def test_an_id_with_a_tab_or_line_break_is_refused_on_load(copy_of_squad_mini, capsys):
    corpus = read_jsonl(copy_of_squad_mini / "corpus.jsonl")
    corpus[6]["_id"] = "p\tseven"
    write_jsonl(copy_of_squad_mini / "corpus.jsonl", corpus)
    with pytest.raises(DataError, match=r'corpus.jsonl:7: field "_id": .*tab or line break'):
        load_retrieval_set(copy_of_squad_mini, "test")


# 20
def test_eval_checks_its_outputs_before_evaluating(tiny_bert_dir, copy_of_squad_mini, tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    for flag in ("--output", "--run-file"):
        assert main(eval_args(tiny_bert_dir, "squad-mini", flag, str(folder))) == 2
        captured = capsys.readouterr()
        assert f"{flag} {folder}: is a folder" in captured.err and "queries" not in captured.out
    corpus = read_jsonl(copy_of_squad_mini / "corpus.jsonl")
    corpus.append({"_id": "p one", "title": "", "text": "an extra passage"})  # a TREC run cannot hold its id
    write_jsonl(copy_of_squad_mini / "corpus.jsonl", corpus)
    assert main(eval_args(tiny_bert_dir, copy_of_squad_mini, "--run-file", str(tmp_path / "run.trec"))) == 2
    captured = capsys.readouterr()
    assert "'p one' holds whitespace" in captured.err and "queries" not in captured.out


# 21
def test_the_embedding_cache_is_listed_and_cleared(tiny_bert_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", "squad-mini", "--cache-dir", str(cache),
                 "--no-show-progress"]) == 0
    capsys.readouterr()
    assert main(["cache", "--cache-dir", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert f"{cache}: 2 entries" in listed and "passage       292 x 32" in listed and "query         200 x 32" in listed
    assert main(["cache", "--cache-dir", str(cache), "--clear", "--older-than", "1"]) == 0
    assert "removed 0 of 2 entries" in capsys.readouterr().out
    assert main(["cache", "--cache-dir", str(cache), "--clear"]) == 0
    assert "removed 2 of 2 entries" in capsys.readouterr().out and not any(cache.iterdir())


def test_run_never_turns_a_data_error_into_query_generation(copy_of_squad_mini, tmp_path, capsys):
    """A malformed queries file or a mistyped split stops `distill run` (exit 2); only a folder without queries
    is raw text."""
    import yaml

    config = tmp_path / "run.yaml"
    settings = {"output_dir": str(tmp_path / "run"), "data": str(copy_of_squad_mini), "model": "m", "llm": "l"}
    config.write_text(yaml.safe_dump({**settings, "split": "trian"}))
    assert main(["run", str(config), "--dry-run"]) == 2
    line = one_error_line(capsys)
    assert "no qrels/trian.tsv (splits here: test, train)" in line and "supervision: raw_text" in line
    (copy_of_squad_mini / "queries.jsonl").write_text('{"_id": "q1", "text": \n')
    config.write_text(yaml.safe_dump(settings))
    assert main(["run", str(config), "--dry-run"]) == 2
    assert "queries.jsonl:1: malformed JSON" in one_error_line(capsys)
    (copy_of_squad_mini / "queries.jsonl").unlink()  # passages only: that is raw text
    assert main(["run", str(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "supervision: raw_text" in printed and "generate:" in printed
