"""The cases of issue 43, end to end with the real CLI and real files where a user meets them: the surfaces added
since issue 20's probe (label-free training, `distill run`'s supervision, pretrain, the cache, eval's baselines)
tried as a careful user and an attacker would. Nothing we did not write is deleted, nothing is silently wrong,
and bad input is refused before hours of work, naming file, line and field."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SQUAD_MINI, read_jsonl, write_jsonl
from distill.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ----- 1: `distill cache --clear` removes only what the cache wrote ---------------------------------------------

def test_cache_clear_leaves_folders_that_are_not_cache_entries(tiny_bert_dir, tmp_path, capsys):
    userdir = tmp_path / "userdir"
    project = userdir / "myproj"  # the probe's repro: a user's folder that happens to hold an embeddings.npy
    project.mkdir(parents=True)
    np.save(project / "embeddings.npy", np.ones((3, 4), dtype=np.float32))
    (project / "notes.txt").write_text("mine")
    # a real entry beside it, into which the user dropped a file of their own
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", "squad-mini", "--split", "test",
                 "--cache-dir", str(userdir), "--no-show-progress"]) == 0
    entries = [p for p in userdir.iterdir() if p != project]
    assert len(entries) == 2
    (entries[0] / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["cache", "--cache-dir", str(userdir)]) == 0
    listed = capsys.readouterr().out
    assert f"{userdir}: 2 entries" in listed and "1 other folder there are not cache entries" in listed
    assert "myproj" in listed and "? " not in listed
    assert main(["cache", "--cache-dir", str(userdir), "--clear"]) == 0
    cleared = capsys.readouterr().out
    assert "removed 2 of 2 entries" in cleared and f"{entries[0].name}: kept mine.txt" in cleared
    assert sorted(p.name for p in project.iterdir()) == ["embeddings.npy", "notes.txt"]
    assert (project / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in entries[0].iterdir()) == ["mine.txt"] and not entries[1].exists()


# ----- 2: a baseline run that misses queries does not inflate the paired gain -----------------------------------

def test_a_baseline_run_that_misses_queries_is_compared_on_the_queries_it_ranks(tiny_bert_dir, small_beir, tmp_path,
                                                                                 capsys):
    own = tmp_path / "own.trec"
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--run-file", str(own),
                 "--no-cache", "--no-show-progress"]) == 0
    lines = own.read_text().splitlines()
    qids = list(dict.fromkeys(line.split()[0] for line in lines))
    half = set(qids[: len(qids) // 2])
    partial = tmp_path / "partial.trec"  # the same model's rankings, for half of the queries
    partial.write_text("".join(line + "\n" for line in lines if line.split()[0] in half))
    out = tmp_path / "m.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--baseline-run", str(partial),
                 "--output", str(out), "--no-cache", "--no-show-progress"]) == 0
    versus = json.loads(out.read_text())["ndcg@10_vs_baseline"]
    # against itself the gain is exactly 0, over the queries the baseline ranks; before, the others counted as
    # the baseline's zeros and read as a gain
    assert versus["mean_difference"] == 0.0 and versus["queries"] == len(half)
    assert f"ranks {len(half)} of the {len(qids)} test queries" in capsys.readouterr().out


# ----- 3: labels made from data without qrels never train a qrels positive as a negative ------------------------

def _squad_slice(folder: Path, n_queries: int, with_qrels: bool) -> Path:
    """squad-mini's corpus and its first `n_queries` train questions (with answers); their qrels or none."""
    header, *rows = (SQUAD_MINI / "qrels" / "train.tsv").read_text().splitlines()
    qids = list(dict.fromkeys(r.split("\t")[0] for r in rows))[:n_queries]
    folder.mkdir(parents=True)
    shutil.copy(SQUAD_MINI / "corpus.jsonl", folder / "corpus.jsonl")
    write_jsonl(folder / "queries.jsonl", [q for q in read_jsonl(SQUAD_MINI / "queries.jsonl") if q["_id"] in qids])
    if with_qrels:
        (folder / "qrels").mkdir()
        (folder / "qrels" / "train.tsv").write_text(
            "\n".join([header, *(r for r in rows if r.split("\t")[0] in qids)]) + "\n")
    return folder


@pytest.fixture(scope="module")
def label_free(tiny_bert_dir, tiny_llama_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{"answers" | "queries": (data folder, labels)}: 6 squad-mini train questions without qrels, with and
    without their reference answers, pools of 4 mined by the tiny BERT and labelled by the tiny Llama."""
    made = {}
    for kind in ("answers", "queries"):
        root = tmp_path_factory.mktemp(f"free-{kind}")
        data = _squad_slice(root / "data", 6, False)
        if kind == "queries":
            write_jsonl(data / "queries.jsonl", [{k: v for k, v in q.items() if k != "answers"}
                                                 for q in read_jsonl(data / "queries.jsonl")])
        pool, labels = root / "pool.jsonl", root / "labels.jsonl"
        assert main(["mine", "--model", str(tiny_bert_dir), "--data", str(data), "--pool-size", "4", "--output",
                     str(pool), "--no-cache", "--no-show-progress"]) == 0
        assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(data), "--candidates", str(pool),
                     "--output", str(labels), "--device", "cpu", "--dtype", "float32", "--no-show-progress"]) == 0
        made[kind] = (data, labels)
    return made


def test_labels_from_data_without_qrels_never_make_a_qrels_positive_a_negative(tiny_bert_dir, label_free, tmp_path,
                                                                               capsys):
    from distill.config import config_from_mapping
    from distill.data import load_retrieval_set
    from distill.training.config import TrainConfig
    from distill.training.inputs import load_training_examples

    gold = _squad_slice(tmp_path / "gold", 6, True)
    labels = label_free["answers"][1]
    train = ["train", "--model", str(tiny_bert_dir), "--data", str(gold), "--output", str(tmp_path / "m"),
             "--device", "cpu", "--no-cache", "--no-show-progress", "--train-batch-size", "2", "--max-steps", "1"]
    capsys.readouterr()
    # the labels' progress file records the data they were made from: not this one
    assert main([*train, "--labels", str(labels), "--positives", "teacher"]) == 2
    assert f"{labels}: was made from other data than --data {gold}" in capsys.readouterr().err

    # without a progress file to tell: lines whose pools hold the qrels positive, as a user's own file might
    rset = load_retrieval_set(str(gold), "train")
    rows = read_jsonl(labels)
    for row in rows:
        positive = rset.positives(row["qid"])[0]
        if positive not in row["pids"]:
            row["pids"][-1] = positive
    bare = tmp_path / "bare.jsonl"
    write_jsonl(bare, rows)
    assert main([*train, "--labels", str(bare)]) == 2  # auto: the data has qrels that the lines lack
    err = capsys.readouterr().err
    assert f"{bare}:1: field \"n_positives\"" in err and "has qrels" in err
    cfg = config_from_mapping(TrainConfig, {"model": str(tiny_bert_dir), "data": [str(gold)], "labels": [str(bare)],
                                            "positives": "teacher", "output": str(tmp_path / "m2")}, "test")
    rsets, examples, _ = load_training_examples(cfg)
    assert examples
    for example in examples:
        qrels_rows = set(rsets[0].corpus.rows_of(rset.positives(example.qid)).tolist())
        assert not qrels_rows & set(example.pool.tolist())  # never a negative
        assert qrels_rows <= set(example.positives.tolist())  # and masked in-batch


# ----- 4: a student or teacher folder changed in place reruns the stages that load it --------------------------

def test_a_model_folder_changed_in_place_reruns_the_stages_that_load_it(tmp_path, tiny_bert_dir, tiny_llama_dir,
                                                                          tiny_bert_no_dropout):
    import yaml

    from distill.run_plan import plan
    from distill.run_ledger import DataHashes, stage_record, why_changed

    student, teacher = tmp_path / "student", tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, student)
    shutil.copytree(tiny_llama_dir, teacher)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "data": "squad-mini", "model": str(student),
                                      "llm": str(teacher), "show_progress": False}))

    def records():
        _, planned, _ = plan(config)
        fingerprints, found = {}, {}
        for stage, cfg in planned:
            found[stage.name] = stage_record(stage, cfg, DataHashes(tmp_path / "hashes.json"), fingerprints, out)
            fingerprints[stage.name] = found[stage.name]["fingerprint"]
        return found

    def redone(old, new):
        return {name for name in new if old[name]["fingerprint"] != new[name]["fingerprint"]}

    base = records()
    assert redone(base, records()) == set()
    # another student copied over the folder (same names, other weights): what it loads or what follows is redone
    shutil.copy(tiny_bert_no_dropout / "config.json", student / "config.json")
    moved = records()
    assert redone(base, moved) == {"eval_before", "mine", "check_teacher", "label", "train", "eval_after", "control",
                                   "eval_control"}
    assert why_changed(base["mine"], moved["mine"]) == "model changed: model"
    assert why_changed(base["label"], moved["label"]) == "earlier stage redone: check_teacher, mine"
    # the teacher's weights rewritten in place: labelling and what reads its labels
    weights = next(teacher.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    relabelled = records()
    # the check and the label stage load it; not the control, which has no teacher
    assert redone(moved, relabelled) == {"check_teacher", "label", "train", "eval_after"}
    assert why_changed(moved["label"], relabelled["label"]) == "model changed: llm; earlier stage redone: check_teacher"
    # the trained student lives in the run's own folder: its stage's fingerprint covers it, not its bytes
    assert "model" not in relabelled["eval_after"]["models"]


# ----- 7, 17: empty answers and invisible texts are refused on load, naming file, line and field ----------------

@pytest.mark.parametrize("answers", [[""], ["", "Paris"], ["   "], ["\u200b"]])
def test_an_empty_reference_answer_is_refused_before_any_labelling(tiny_llama_dir, tmp_path, capsys, answers):
    data = _squad_slice(tmp_path / "data", 4, True)
    queries = read_jsonl(data / "queries.jsonl")
    queries[2]["answers"] = answers
    write_jsonl(data / "queries.jsonl", queries)
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(data), "--output", str(out), "--device", "cpu",
                 "--no-show-progress"]) == 2
    err = capsys.readouterr().err
    first_empty = next(i for i, a in enumerate(answers) if not a.replace("\u200b", "").strip())
    assert f'{data / "queries.jsonl"}:3: field "answers": answer {first_empty}' in err
    assert not out.exists()
    # --skip-invalid drops that query and says so; the others are labelled
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(data), "--output", str(out), "--device", "cpu",
                 "--no-show-progress", "--skip-invalid"]) == 0
    assert "(empty answer: 1)" in capsys.readouterr().out and len(read_jsonl(out)) == 3


def test_a_passage_of_zero_width_spaces_is_empty(tmp_path, capsys):
    data = _squad_slice(tmp_path / "data", 4, True)
    corpus = read_jsonl(data / "corpus.jsonl")
    corpus[5]["text"] = "\u200b\u200b \ufeff"
    write_jsonl(data / "corpus.jsonl", corpus)
    assert main(["eval", "--model", "unused-never-loaded", "--data", str(data), "--split", "train"]) == 2
    assert f'{data / "corpus.jsonl"}:6: field "text": holds only invisible characters' in capsys.readouterr().err


# ----- 11, 12, 13: settings that would do nothing, or nothing sane, are refused; an empty result says why --------

def _train(model: Path, data: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--labels", str(labels), "--output", str(out),
            "--device", "cpu", "--no-cache", "--no-show-progress", "--train-batch-size", "2", "--max-steps", "1",
            *extra]


@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "-5", "--weight-decay must be in [0, 1), got -5.0"),
    ("--warmup-ratio", "7", "--warmup-ratio is a share of the steps, in [0, 1], got 7.0"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0 (0 turns clipping off), got -1.0")])
def test_optimizer_settings_out_of_range_are_refused(tiny_bert_dir, label_free, tmp_path, capsys, flag, value, message):
    data, labels = label_free["answers"]
    assert main(_train(tiny_bert_dir, data, labels, tmp_path / "m", flag, value)) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_modes_the_data_makes_a_no_op_are_refused_and_an_empty_result_says_why(tiny_bert_dir, label_free, tmp_path,
                                                                                capsys):
    data, labels = label_free["answers"]
    assert main(_train(tiny_bert_dir, data, labels, tmp_path / "a", "--false-negatives", "drop")) == 2
    assert "--false-negatives drop compares the mined negatives with the qrels positive" in capsys.readouterr().err
    bare_data, bare_labels = label_free["queries"]
    assert main(_train(tiny_bert_dir, bare_data, bare_labels, tmp_path / "b", "--answer-negatives", "drop")) == 2
    err = capsys.readouterr().err
    assert "--answer-negatives drop takes answer-holding passages" in err and "has no reference answers" in err
    assert main(_train(tiny_bert_dir, bare_data, bare_labels, tmp_path / "c", "--min-positive-margin", "100")) == 2
    err = capsys.readouterr().err
    assert "every query was left out (6 positive not confident)" in err and "lower it" in err


# ----- 8: empty pools are refused where they are read; an empty chunk is no crash -------------------------------

def test_an_empty_pool_is_refused_by_file_line_and_field_and_an_empty_call_scores_nothing(tiny_llama_dir, label_free,
                                                                                          tmp_path, capsys):
    from labelers.backends import create_backend

    data, _ = label_free["answers"]
    pool = tmp_path / "pool.jsonl"
    qids = [q["_id"] for q in read_jsonl(data / "queries.jsonl")]
    write_jsonl(pool, [{"qid": qids[0], "pids": ["p-nope"][:0]}])
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(data), "--candidates", str(pool), "--output",
                 str(tmp_path / "labels.jsonl"), "--device", "cpu", "--no-show-progress"]) == 2
    assert f'{pool}:1: field "pids": is empty, and the query has no qrels positive' in capsys.readouterr().err
    backend = create_backend("hf", model=str(tiny_llama_dir), device="cpu", dtype="float32")
    assert backend.score([], []) == [] and backend.generate([], 4) == []


# ----- 10: `supervision: queries` reaches the label stage: answers the data holds are not scored -----------------

def test_supervision_queries_labels_query_likelihood_even_where_the_data_has_answers(tiny_llama_dir, label_free,
                                                                                       tmp_path):
    import yaml

    from distill.run_plan import plan

    data, _ = label_free["answers"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "data": str(data), "model": "m",
                                      "llm": "l", "supervision": "queries"}))
    _, planned, supervision = plan(config)
    assert supervision.kind == "queries"
    assert {stage.name: cfg for stage, cfg in planned}["label"].target == "query"
    # what that setting does: the very rewards of the same queries without their answers
    pool = tmp_path / "pool.jsonl"
    shutil.copy(label_free["answers"][1].parent / "pool.jsonl", pool)
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(data), "--candidates", str(pool), "--output",
                 str(out), "--device", "cpu", "--dtype", "float32", "--no-show-progress", "--target", "query"]) == 0
    with_answers, without = read_jsonl(out), read_jsonl(label_free["queries"][1])
    assert {r["target"] for r in with_answers} == {"query"}
    assert [r["rewards"] for r in with_answers] == [r["rewards"] for r in without]


# ----- 15: a bad few-shot file is refused by file and line, before any passage is read --------------------------

@pytest.mark.parametrize("content, message", [
    ('["a list", "not an object"]\n'.encode(), ":1: a line must be a JSON object"),
    ('{"passage": "Caf\u00e9 de Flore", "question": "Where?", "answer": "Paris"}\n'.encode("latin-1"), ":1: not UTF-8"),
    (b"\n\n", ": holds no few-shot example"),
    (b'{"passage": "p", "question": "q"}\n', ':1: field "answer": missing or empty')])
def test_a_bad_few_shot_file_is_refused_naming_file_and_line(tiny_llama_dir, tmp_path, capsys, content, message):
    few_shot = tmp_path / "examples.jsonl"
    few_shot.write_bytes(content)
    out = tmp_path / "generated"
    assert main(["generate", "--llm", str(tiny_llama_dir), "--data", "squad-mini", "--output", str(out),
                 "--few-shot", str(few_shot), "--device", "cpu", "--no-show-progress", "--max-passages", "2"]) == 2
    assert f"{few_shot}{message}" in capsys.readouterr().err and not out.exists()


# ----- issue 44: a bug keeps its traceback; only our own checks read as bad input --------------------------------

def test_a_bug_shows_its_traceback_and_exit_1_not_bad_input(tiny_bert_dir, tmp_path):
    """A numpy call that raises ValueError deep in evaluation (as a real bug would) must not read as a user error."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, numpy\n"
        "import distill.metrics\n"
        "def broken(*a, **k):\n"
        "    raise ValueError('operands could not be broadcast together')\n"
        "distill.metrics.np = type('np', (), {**{k: getattr(numpy, k) for k in dir(numpy) if not k.startswith('__')},"
        " 'mean': staticmethod(broken)})\n"
        "from distill.cli import run_and_exit\n"
        "run_and_exit(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, "eval", "--model", str(tiny_bert_dir), "--data",
                           "squad-mini", "--no-cache", "--no-show-progress"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "in broken" in done.stderr
    assert "operands could not be broadcast together" in done.stderr
    assert not done.stderr.startswith("error:")


# ----- 5 (local): one writer per output also without Ray ---------------------------------------------------------

def test_a_second_local_job_on_the_same_output_is_refused_naming_the_first(tiny_bert_dir, tmp_path, capsys):
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "labels.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the first job: a real `distill mine` over the whole squad-mini train split, in chunks of 1 query
    first = subprocess.Popen([sys.executable, "-m", "distill", "mine", "--model", str(tiny_bert_dir), "--data",
                              "squad-mini", "--output", str(out), "--chunk-size", "1", "--no-cache",
                              "--no-show-progress"], env=env, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "labels.jsonl.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert main(["mine", "--model", str(tiny_bert_dir), "--data", "squad-mini", "--output", str(out),
                     "--chunk-size", "1", "--no-cache", "--no-show-progress"]) == 2
        assert f"is being written by another distill job (pid {first.pid}" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    # killed: the kernel freed its lock, and the rerun finishes what it started
    assert main(["mine", "--model", str(tiny_bert_dir), "--data", "squad-mini", "--output", str(out),
                 "--chunk-size", "1", "--no-cache", "--no-show-progress"]) == 0
    assert len(read_jsonl(out)) == 240 and not lock.exists()
