"""`distill run --dry-run` refuses every invalid setting of every stage section, before any stage runs (issue 44):
a probe found each of these passing the dry run and failing only after earlier stages had run, minutes to hours
on real data. The run folder is not even created."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import read_jsonl, write_jsonl
from distill.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _queries_only(folder: Path) -> Path:
    """squad-qa's corpus and 20 of its train questions, without their answers: a query log."""
    qa = ROOT / "distill" / "resources" / "squad_qa"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text((qa / "corpus.jsonl").read_text())
    write_jsonl(folder / "queries.jsonl", [{"_id": q["_id"], "text": q["text"]}
                                           for q in read_jsonl(qa / "queries.jsonl")[:20]])
    return folder


CASES = {  # name: (top-level settings, sections, what the one error line says)
    "mine num_negatives 0": ({"data": "squad-mini"}, {"mine": {"num_negatives": 0}}, "--num-negatives must be >= 1"),
    "mine pool_size on qrels": ({"data": "squad-mini"}, {"mine": {"pool_size": 4}},
                                "--pool-size is for queries without qrels"),
    "mine pool_size 0": ({"data": "squad-qa", "supervision": "answers"}, {"mine": {"pool_size": 0}}, "--pool-size must be >= 1"),
    "mine simans without qrels": ({"data": "squad-qa", "supervision": "answers"}, {"mine": {"strategy": "simans"}},
                                  "has no qrels, so no positive to measure from"),
    "workers 0": ({"data": "squad-mini", "workers": 0}, {}, "--workers and --cpus-per-worker must be >= 1"),
    "label generate without qrels": ({"data": "squad-qa", "supervision": "answers"}, {"label": {"missing_answers": "generate"}},
                                     "--missing-answers generate writes an answer from the query's positive"),
    "label num_random -1": ({"data": "squad-mini"}, {"label": {"num_random": -1}}, "--num-random must be >= 0"),
    "queries with answer-match": ({"data": "squad-qa", "supervision": "queries"},
                                  {"train": {"positives": "answer-match"}},
                                  "--positives answer-match matches reference answers"),
    "queries log with answer target": ({"data": "QUERIES"}, {"label": {"target": "answer"}},
                                       "--target answer scores reference answers"),
    "generate questions 0": ({"data": "squad-mini", "generate": True}, {"generate": {"questions_per_passage": 0}},
                             "--questions-per-passage must be >= 1"),
    "train learning rate 0": ({"data": "squad-mini"}, {"train": {"learning_rate": 0}}, "--learning-rate must be > 0"),
    "pretrain mlm 1.5": ({"data": "squad-mini", "pretrain": True}, {"pretrain": {"mlm_probability": 1.5}},
                         "--mlm-probability must be in (0, 1)"),
    "eval top_k 0": ({"data": "squad-mini"}, {"eval": {"top_k": 0}}, "--top-k must be >= 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_invalid_stage_setting_stops_the_dry_run_before_any_stage(tmp_path, capsys, case):
    top, sections, message = CASES[case]
    if top["data"] == "QUERIES":
        top = {**top, "data": str(_queries_only(tmp_path / "log"))}
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "model": "m", "llm": "l", **top, **sections}))
    assert main(["run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_the_demo_with_the_ray_executor_is_refused_at_the_dry_run(capsys):
    # its label section cuts the job with --shard, which the Ray executor does too
    assert main(["run", str(ROOT / "examples" / "demo.yaml"), "--dry-run", "--executor", "ray"]) == 2
    assert "--shard and --executor ray both split the job" in capsys.readouterr().err


def test_valid_settings_still_pass_the_dry_run(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "model": "m", "llm": "l",
                                      "data": "squad-qa", "supervision": "answers", "mine": {"pool_size": 4}}))
    assert main(["run", str(config), "--dry-run"]) == 0
    assert "pool_size: 4  # yaml" in capsys.readouterr().out
