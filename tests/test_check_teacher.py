"""`distill check-teacher` (issue 46): the share of known positives the teacher and the retriever put first, equal
to a hand count; a teacher that does not beat the retriever stops with exit 3 and one clear line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from conftest import SQUAD_MINI, read_jsonl, write_jsonl
from distill.cli import main
from distill.stages.check_teacher import Share, check_figures, first_is_known


def test_the_figures_equal_a_hand_count():
    # four pools; the known positive is marked; teacher and retriever scores per passage
    known = [np.array([1, 0, 0], bool), np.array([0, 1, 0], bool), np.array([0, 0, 1], bool), np.array([1, 1, 0], bool)]
    teacher = [np.array([-1.0, -2.0, -3.0]),  # right
               np.array([-1.0, -2.0, -3.0]),  # wrong
               np.array([-3.0, -2.0, -1.0]),  # right
               np.array([-2.0, -2.0, -2.0])]  # a tie is no win
    retriever = [np.array([0.2, 0.5, 0.1]), np.array([0.1, 0.9, 0.2]), np.array([0.3, 0.2, 0.1]),
                 np.array([0.9, 0.1, 0.2])]  # wrong, right, wrong, right
    figures = check_figures(teacher, retriever, known)
    assert (figures.teacher.hits, figures.teacher.total) == (2, 4)
    assert (figures.retriever.hits, figures.retriever.total) == (2, 4)
    assert (figures.teacher_only, figures.retriever_only) == (2, 2) and figures.mcnemar_p == 1.0
    assert not figures.teacher_beats_retriever  # equal is not better
    assert first_is_known(np.array([5.0, 1.0]), np.array([True, False]))
    low, high = Share(41, 50).interval()  # Wilson: 0.82 with n = 50 -> about [0.69, 0.90]
    assert round(low, 2) == 0.69 and round(high, 2) == 0.90


def _slice(folder: Path, n: int) -> Path:
    header, *rows = (SQUAD_MINI / "qrels" / "train.tsv").read_text().splitlines()
    qids = list(dict.fromkeys(r.split("\t")[0] for r in rows))[:n]
    (folder / "qrels").mkdir(parents=True)
    shutil.copy(SQUAD_MINI / "corpus.jsonl", folder / "corpus.jsonl")
    write_jsonl(folder / "queries.jsonl", [q for q in read_jsonl(SQUAD_MINI / "queries.jsonl") if q["_id"] in qids])
    (folder / "qrels" / "train.tsv").write_text("\n".join([header, *(r for r in rows if r.split("\t")[0] in qids)]))
    return folder


def _mined(tmp_path: Path, minilm_dir: Path, n: int) -> tuple[Path, Path]:
    """(a slice of n squad-mini train questions with qrels, MiniLM's pools of 3 mined negatives for it)."""
    data = _slice(tmp_path / "data", n)
    pool = tmp_path / "pool.jsonl"
    assert main(["mine", "--model", str(minilm_dir), "--data", str(data), "--output", str(pool), "--num-negatives",
                 "3", "--no-cache", "--no-show-progress"]) == 0
    return data, pool


def test_check_teacher_counts_what_its_labels_say_and_stops_a_weak_teacher(tiny_llama_dir, minilm_dir, tmp_path,
                                                                             capsys):
    data, pool = _mined(tmp_path, minilm_dir, 30)
    out = tmp_path / "check.jsonl"
    args = ["check-teacher", "--llm", str(tiny_llama_dir), "--data", str(data), "--candidates", str(pool),
            "--output", str(out), "--num-queries", "12", "--device", "cpu", "--dtype", "float32",
            "--no-show-progress"]
    capsys.readouterr()
    # a random 2-layer Llama against the real MiniLM: it cannot beat it
    assert main(args) == 3
    captured = capsys.readouterr()
    assert "does not beat the retriever" in captured.err and "--allow-weak-teacher" in captured.err
    assert captured.err.count("\n") == 1
    # the counts are the labels' own: recount them by hand from the files
    labels, mined = read_jsonl(out), {r["qid"]: r for r in read_jsonl(pool)}
    n = len(labels)
    assert n in (16, 30)  # whole chunks of the label job (16 queries), drawn until they hold 12 known positives
    teacher = retriever = 0
    for line in labels:
        positives = set(line["pids"][:line["n_positives"]])
        rewards = dict(zip(line["pids"], line["rewards"]))
        teacher += max(rewards[p] for p in positives) > max(r for p, r in rewards.items() if p not in positives)
        scores = dict(zip(mined[line["qid"]]["pids"], mined[line["qid"]]["scores"]))
        scores.update(zip(mined[line["qid"]]["positives"], mined[line["qid"]]["positive_scores"]))
        retriever += max(scores[p] for p in positives) > max(s for p, s in scores.items() if p not in positives)
    summary = json.loads(Path(str(out) + ".check.json").read_text())
    assert summary["teacher_first"].startswith(f"{teacher} of {n}") and summary["retriever_first"].startswith(
        f"{retriever} of {n}") and teacher < retriever
    assert f"teacher puts it first:   {teacher} of {n}" in captured.out
    # allowed: exit 0, and the scored labels are reused as they are (nothing scored again)
    assert main([*args, "--allow-weak-teacher"]) == 0
    assert read_jsonl(out) == labels and "already complete" in capsys.readouterr().out


def test_the_label_stage_reuses_the_checks_scores_and_scores_only_the_rest(tiny_llama_dir, minilm_dir, tmp_path,
                                                                            monkeypatch):
    from labelers.backends.hf import HFBackend

    data, pool = _mined(tmp_path, minilm_dir, 10)
    common = ["--llm", str(tiny_llama_dir), "--data", str(data), "--candidates", str(pool), "--device", "cpu",
              "--dtype", "float32", "--no-show-progress", "--chunk-size", "2"]
    pairs = []
    real_score = HFBackend.score

    def counted(self, prompts, continuations):  # counts what the backend is asked, then scores it for real
        pairs.append(len(prompts))
        return real_score(self, prompts, continuations)

    monkeypatch.setattr(HFBackend, "score", counted)
    check = tmp_path / "check.jsonl"
    assert main(["check-teacher", *common, "--output", str(check), "--num-queries", "4",
                 "--allow-weak-teacher"]) == 0
    checked = {r["qid"]: r for r in read_jsonl(check)}
    assert len(checked) == 4
    pairs.clear()
    labels = tmp_path / "labels.jsonl"
    assert main(["label", *common, "--output", str(labels), "--reuse", str(check)]) == 0
    with_reuse = sum(pairs)
    pairs.clear()
    assert main(["label", *common, "--output", str(tmp_path / "plain.jsonl")]) == 0
    # a query asks one pair per passage and reference answer; the 4 checked are not asked again
    answers = {q["_id"]: len(q["answers"]) for q in read_jsonl(data / "queries.jsonl")}
    plain = read_jsonl(tmp_path / "plain.jsonl")
    asked = {r["qid"]: len(r["pids"]) * answers[r["qid"]] for r in plain}
    assert sum(pairs) == sum(asked.values())
    assert with_reuse == sum(n for qid, n in asked.items() if qid not in checked) < sum(asked.values())
    lines = read_jsonl(labels)
    assert [r["qid"] for r in lines] == [r["qid"] for r in read_jsonl(tmp_path / "plain.jsonl")]
    assert all(r == checked[r["qid"]] for r in lines if r["qid"] in checked)
    # the check scored whole chunks of the label job: the output is the very bytes of a run without it
    assert labels.read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    # a check made with other settings cannot stand in for this job
    assert main(["label", *common, "--output", str(tmp_path / "other.jsonl"), "--reuse", str(check),
                 "--normalization", "sum"]) == 2


def test_a_weak_teacher_stops_distill_run_before_the_label_stage_with_exit_3(tiny_llama_dir, minilm_dir, tmp_path,
                                                                              capsys):
    import yaml

    data = _slice(tmp_path / "data", 20)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out), "data": str(data), "eval_data": "squad-mini", "model": str(minilm_dir),
        "llm": str(tiny_llama_dir), "show_progress": False, "check_queries": 12, "control": "none",
        "mine": {"cache": False, "num_negatives": 3}, "eval": {"cache": False},
        "label": {"dtype": "float32", "device": "cpu"}}))
    assert main(["run", str(config)]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading bars
    assert last.startswith("error: check-teacher: ") and "does not beat the retriever" in last
    assert "--allow-weak-teacher" in last
    assert (out / "check_teacher.jsonl").is_file() and not (out / "labels.jsonl").exists()
    ledger = json.loads((out / "stages" / "check_teacher.json").read_text())
    assert ledger["status"] == "started" and ledger["settings"]["num_queries"] == 12
