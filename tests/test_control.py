"""The control student of `distill run` (issue 46.1): a student trained on the same mined pools without the
teacher (self-training on the retriever's own top 1, or hard labels where qrels exist), so every run says what
the teacher added, with a paired interval."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SQUAD_MINI, read_jsonl, write_jsonl
from distill.cli import main
from distill.training.config import TrainConfig
from distill.training.inputs import load_training_examples


@pytest.fixture
def query_log(tmp_path) -> Path:
    """squad-mini's corpus and 24 of its questions without answers, qrels or positives: a query log."""
    folder = tmp_path / "log"
    folder.mkdir()
    shutil.copy(SQUAD_MINI / "corpus.jsonl", folder / "corpus.jsonl")
    write_jsonl(folder / "queries.jsonl", [{"_id": q["_id"], "text": q["text"]}
                                           for q in read_jsonl(SQUAD_MINI / "queries.jsonl")[:24]])
    return folder


def _examples(**settings) -> tuple[list, dict]:
    cfg = TrainConfig(model="m", output=Path("o"), show_progress=False, **settings)
    _, examples, skipped = load_training_examples(cfg)
    return examples, skipped


@pytest.mark.slow
def test_self_training_from_candidates_equals_labels_with_retriever_top1(tiny_bert_dir, tiny_llama_dir, query_log,
                                                                        tmp_path):
    mined, candidates, labels = tmp_path / "mined.jsonl", tmp_path / "cand.jsonl", tmp_path / "labels.jsonl"
    assert main(["mine", "--model", str(tiny_bert_dir), "--data", str(query_log), "--pool-size", "5", "--output",
                 str(mined), "--no-cache", "--no-show-progress"]) == 0
    pools = read_jsonl(mined)
    pools[3]["scores"][1] = pools[3]["scores"][0]  # a tie at the top is no choice, from either file
    write_jsonl(candidates, pools)
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", str(query_log), "--candidates", str(candidates),
                 "--output", str(labels), "--device", "cpu", "--dtype", "float32", "--no-show-progress"]) == 0
    from_candidates, said_c = _examples(data=str(query_log), candidates=str(candidates), positives="retriever-top1")
    from_labels, said_l = _examples(data=str(query_log), labels=str(labels), positives="retriever-top1")

    def seen(examples):
        return [(e.qid, e.query, e.positive, e.pool.tolist(), e.positives.tolist()) for e in examples]

    assert seen(from_candidates) == seen(from_labels)
    assert len(from_candidates) == 23 and said_c["positive not confident"] == said_l["positive not confident"] == 1
    assert said_c["positives chosen by retriever-top1 (kept)"] == 23
    first = {p["qid"]: p for p in pools}
    from distill.data import load_retrieval_set

    corpus = load_retrieval_set(query_log, "train", unlabelled=True).corpus
    for example in from_candidates:  # the pool's best retriever score is the positive, the rest its negatives
        pool = first[example.qid]
        assert corpus.ids_at([example.positive]) == [pool["pids"][int(np.argmax(pool["scores"]))]]
        assert sorted(corpus.ids_at(example.pool)) == sorted(pool["pids"][1:])
        assert example.positive_reward is None and example.pool_rewards is None  # no teacher in them


def test_candidates_positives_must_fit_the_qrels(tmp_path, capsys):
    # without qrels, --candidates needs the retriever's choice; with qrels, the retriever's top 1 of a pool
    # mined without the positives would be a negative
    assert main(["train", "--model", "m", "--data", "squad-mini", "--candidates", str(tmp_path / "c.jsonl"),
                 "--positives", "teacher", "--output", str(tmp_path / "o")]) == 2
    assert "need the teacher's rewards" in capsys.readouterr().err
    from distill.supervision import SuppliedData

    cfg = TrainConfig(model="m", data="d", output=Path("o"), candidates="c.jsonl", positives="retriever-top1")
    with pytest.raises(ValueError, match="is for queries without qrels"):
        cfg.check_against(SuppliedData(True, None))
    with pytest.raises(ValueError, match="--positives retriever-top1, self-training"):
        TrainConfig(model="m", data="d", output=Path("o"), candidates="c.jsonl").check_against(
            SuppliedData(False, None))


def _write_run(tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path, data: Path, **top) -> tuple[Path, Path]:
    from test_run import write_config

    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", out, tiny_bert_dir, tiny_llama_dir, mine={"pool_size": 4},
                          train={"max_steps": 6, "save_steps": 3})
    extra = "".join(f"\n{k}: {v}" for k, v in top.items())
    config.write_text(config.read_text().replace("data: squad-mini", f"data: {data}\neval_data: squad-mini{extra}"))
    return config, out


@pytest.mark.slow
def test_a_run_trains_a_self_training_control_and_says_what_the_teacher_added(tiny_bert_dir, tiny_llama_dir,
                                                                             query_log, tmp_path, capsys):
    config, out = _write_run(tmp_path, tiny_bert_dir, tiny_llama_dir, query_log)
    assert main(["run", str(config)]) == 0
    said = capsys.readouterr().out
    assert "control: self-training (auto for supervision queries)" in said
    lines = said.strip().splitlines()[-3:]
    assert lines[0].startswith("the student against the base: ")
    assert lines[1].startswith("the control (self-training on the same pools) against the base: ")
    assert lines[2].startswith("the teacher added ") and lines[2].endswith(
        ", over self-training on the same pools (200 queries)")
    report = json.loads((out / "report.json").read_text())
    assert report["lines"] == lines and report["control"]["kind"] == "self-training"
    added = report["teacher_added"]
    after, control = (json.loads((out / "eval" / f"{n}.json").read_text()) for n in ("after", "control"))
    assert added["queries"] == 200
    assert added["mean_difference"] == pytest.approx(after["ndcg@10"] - control["ndcg@10"], abs=1e-9)
    assert added["low"] <= added["mean_difference"] <= added["high"]
    assert f"{100 * added['mean_difference']:+.2f} nDCG@10 points [{100 * added['low']:+.2f}, " in lines[2]
    ledger = json.loads((out / "stages" / "control.json").read_text())
    assert ledger["settings"]["loss"] == "infonce" and ledger["settings"]["positives"] == "retriever-top1"
    assert ledger["settings"]["candidates"] == [str(out / "candidates.jsonl")] and ledger["upstream"].keys() == {
        "mine"}
    summary = json.loads((out / "control" / "training_summary.json").read_text())
    assert summary["steps"] == 6
    # the model card holds the figures: a model-index of the student's metrics, and the three gains
    import yaml

    card = (out / "model" / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in index["metrics"]}["cosine_ndcg@10"] == round(after["ndcg@10"], 4)
    assert "what the teacher added (this model against self-training)" in card
    assert f"{100 * added['mean_difference']:+.2f} (95% CI {100 * added['low']:+.2f}" in card
    kind = json.loads((out / "report.json").read_text())["supervision"]
    assert f"| supervision | {kind} |" in card
    assert "## The teacher check" in card
    # a new label setting reruns the label stage and the student, not the control
    assert main(["run", str(config), "--label.max-passage-tokens", "64"]) == 0
    said = capsys.readouterr().out
    assert "label: settings changed: max_passage_tokens" in said and "train: earlier stage redone: label" in said
    assert "control: complete, skipped" in said and "eval_control: complete, skipped" in said
    assert json.loads((out / "stages" / "control.json").read_text()) == ledger


def test_the_control_reruns_when_the_pools_or_the_training_plan_change_never_for_the_teacher(
        tmp_path, tiny_bert_dir, tiny_llama_dir):
    from distill.run_ledger import DataHashes, stage_record
    from distill.run_plan import plan
    from test_run import write_config

    config = write_config(tmp_path / "run.yaml", tmp_path / "out", tiny_bert_dir, tiny_llama_dir)

    def fingerprints(**overrides) -> dict[str, str]:
        _, planned, _ = plan(config, overrides)
        out: dict[str, str] = {}
        for stage, cfg in planned:
            out[stage.name] = stage_record(stage, cfg, DataHashes(tmp_path / "hashes.json"), out)["fingerprint"]
        return out

    def redone(**overrides) -> set[str]:
        new = fingerprints(**overrides)
        return {name for name in new if base.get(name) != new[name]}

    base = fingerprints()
    assert list(base)[-2:] == ["control", "eval_control"]  # squad-mini has qrels: auto is hard-labels
    both = {"control", "eval_control"}
    assert redone(**{"train.learning_rate": 3e-5}) == {"train", "eval_after"} | both  # the same training plan
    assert redone(**{"mine.num_negatives": 2}) == {"mine", "check_teacher", "label", "train", "eval_after"} | both
    # what only the teacher feeds: the label stage, the student's loss and its teacher-only settings
    assert redone(**{"label.max_passage_tokens": 64}) == {"check_teacher", "label", "train", "eval_after"}
    assert redone(**{"train.loss": "kl", "train.teacher_temperature": 0.5, "train.false_negatives": "drop",
                     "train.drop_disputed": True}) == {"train", "eval_after"}
    assert redone(control="none").isdisjoint(both) and "control" not in fingerprints(control="none")
    _, planned, _ = plan(config)
    control = next(cfg for stage, cfg in planned if stage.name == "control")
    assert (control.loss, control.positives, control.labels) == ("infonce", "qrels", None)
    assert control.candidates == [tmp_path / "out" / "candidates.jsonl"] and control.learning_rate == 1e-4


def test_the_dry_run_shows_the_control_and_refuses_an_impossible_one(tmp_path, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "model": "m", "llm": "l", "data": "squad-qa",
                                      "supervision": "answers", "train": {"max_steps": 5}}))
    assert main(["run", str(config), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "# control: self-training (auto for supervision answers)" in said
    assert f"  control (train): squad-qa, <mine> -> {out / 'control'}" in said
    assert f"  eval_control (eval): squad-qa, <control>, <eval_before> -> {out / 'eval' / 'control.json'}" in said
    control = said[said.index("\ncontrol:\n"):said.index("\neval_control:\n")]
    assert "  positives: retriever-top1  # control" in control and "  loss: infonce  # control" in control
    assert "  max_steps: 5  # yaml" in control  # the student's training plan
    for data, asked, message in (("squad-qa", "hard-labels", "control: hard-labels trains on the qrels positives"),
                                 ("squad-mini", "self-training", "control: self-training takes each pool's "
                                                                 "retriever top 1"),
                                 ("squad-mini", "teacher", "setting 'control': 'teacher' is not one of")):
        overrides = ["--data", data] + (["--supervision", "auto"] if data == "squad-mini" else [])
        assert main(["run", str(config), "--dry-run", "--control", asked, *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["run", str(config), "--dry-run", "--control", "none"]) == 0
    said = capsys.readouterr().out
    assert "control (train)" not in said and "# control: none (asked for): this run does not say" in said
    assert not out.exists()
