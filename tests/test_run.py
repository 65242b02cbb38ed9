"""`distill run`: one YAML drives every stage; a killed run finishes when rerun, redoing no completed stage."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SQUAD_MINI, read_jsonl, write_jsonl
from distill.cli import main
from distill.run_config import load_run, parse_overrides

ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def write_config(path: Path, out: Path, model: Path, llm: Path, **extra_sections) -> Path:
    import yaml

    config = {"output_dir": str(out), "data": "squad-mini", "model": str(model), "llm": str(llm),
              "show_progress": False, "allow_weak_teacher": True,  # tiny random teachers: the check runs, never stops
              "label": {"dtype": "float32", "device": "cpu", "chunk_size": 16},
              "mine": {"num_negatives": 3, "cache": False},
              "eval": {"cache": False},
              "train": {"train_batch_size": 8, "num_negatives": 3, "max_steps": 24, "save_steps": 4,
                        "logging_steps": 5, "batch_dedup": "none", "learning_rate": 1e-4, "cache": False}}
    for section, values in extra_sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_overrides_reach_their_section_and_unknown_settings_are_named(tmp_path, tiny_bert_dir, tiny_llama_dir):
    config = write_config(tmp_path / "run.yaml", tmp_path / "out", tiny_bert_dir, tiny_llama_dir)
    overrides = parse_overrides(["--train.learning-rate", "3e-5", "--output-dir=elsewhere", "--no-show-progress",
                                 "--generate.temperature", "0.5"])
    assert overrides == {"train.learning_rate": "3e-5", "output_dir": "elsewhere", "show_progress": False,
                         "generate.temperature": 0.5}  # YAML reads 3e-5 as a string; the stage's field makes it a float
    run, sections = load_run(config, overrides)
    assert run.output_dir == Path("elsewhere") and run.generate is True  # a generate section turns it on
    assert sections["train"]["learning_rate"] == "3e-5" and sections["train"]["max_steps"] == 24
    from distill.config import config_from_mapping
    from distill.training.config import TrainConfig

    train = config_from_mapping(TrainConfig, {"model": "m", "data": "d", "output": "o", **sections["train"]}, "train")
    assert train.learning_rate == 3e-5 and train.data == ["d"] and train.output == Path("o")
    with pytest.raises(ValueError, match="train: setting 'max_steps': 'many' is not an int"):
        config_from_mapping(TrainConfig, {"model": "m", "data": "d", "output": "o", "max_steps": "many"}, "train")
    with pytest.raises(ValueError, match=r"run.yaml: train: unknown settings \['learning_rat'\]"):
        from distill.pipeline import run_pipeline

        run_pipeline(config, {"train.learning_rat": 1.0})


def _run_process(config: Path, log: Path | None = None) -> subprocess.Popen:
    """`distill run config`, its output piped (or written to `log`, for a process left to run beside others)."""
    return subprocess.Popen([sys.executable, "-m", "distill", "run", str(config)], env=ENV, text=True,
                            stdout=log.open("w") if log else subprocess.PIPE, stderr=subprocess.STDOUT)


def _ledger(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "stages").glob("*.json"))}


@pytest.mark.slow
def test_killed_run_finishes_redoing_no_completed_stage(tiny_bert_dir, tiny_llama_dir, tmp_path):
    # the uninterrupted reference runs as the killed ones do (same threads, same env), beside them
    whole = tmp_path / "whole"
    reference = _run_process(write_config(tmp_path / "whole.yaml", whole, tiny_bert_dir, tiny_llama_dir),
                             log=tmp_path / "whole.log")
    try:
        config = write_config(tmp_path / "killed.yaml", tmp_path / "killed", tiny_bert_dir, tiny_llama_dir)
        out = tmp_path / "killed"
        completed: dict[str, dict] = {}
        kills = 0
        for pause in (random.uniform(2, 6), random.uniform(4, 10), random.uniform(6, 14)):
            process = _run_process(config)
            time.sleep(pause)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
            ledger = _ledger(out) if (out / "stages").exists() else {}
            for name, state in completed.items():  # a completed stage is never run again
                assert ledger[name] == state, name
            completed.update({n: s for n, s in ledger.items() if s["status"] == "complete"})
        assert kills >= 1, "the run finished before it could be killed"
        process = _run_process(config)
        printed = process.communicate(timeout=600)[0]
        assert process.returncode == 0, printed[-3000:]
        assert reference.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    finally:
        reference.kill()
    ledger = _ledger(out)
    for name, state in completed.items():
        assert ledger[name] == state, name
        assert f"{name}: complete, skipped" in printed
    assert set(ledger) == {"eval_before", "mine", "check_teacher", "label", "train", "eval_after", "control",
                           "eval_control"}
    want = json.loads((whole / "eval" / "after.json").read_text())
    got = json.loads((out / "eval" / "after.json").read_text())
    before = json.loads((out / "eval" / "before.json").read_text())
    assert want["ndcg@10"] != before["ndcg@10"]  # training changed the student
    assert abs(got["ndcg@10"] - want["ndcg@10"]) <= 0.001
    assert (out / "labels.jsonl").read_bytes() == (whole / "labels.jsonl").read_bytes()
    assert (out / "report.png").stat().st_size > 10_000
    # a finished run does nothing again
    again = subprocess.run([sys.executable, "-m", "distill", "run", str(config)], env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 8
    assert _ledger(out) == ledger
    # a changed setting reruns that stage and the ones after it, not those before
    changed = subprocess.run([sys.executable, "-m", "distill", "run", str(config), "--train.max-steps", "10"], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stdout[-3000:]
    assert "train: settings changed" in changed.stdout and "label: complete, skipped" in changed.stdout
    assert json.loads((out / "model" / "training_summary.json").read_text())["steps"] == 10


@pytest.mark.slow
def test_raw_text_run_generates_then_trains_and_evaluates_on_real_queries(smollm2_dir, minilm_dir, tmp_path):
    """Passages only (squad-mini's corpus): generate with the real SmolLM2, train on the synthetic folder,
    evaluate on squad-mini's real test questions."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "corpus.jsonl", read_jsonl(SQUAD_MINI / "corpus.jsonl"))
    out = tmp_path / "out"
    config = write_config(tmp_path / "raw.yaml", out, minilm_dir, smollm2_dir,
                          generate={"max_passages": 6, "dtype": "float32", "filters": ["length", "copied", "duplicate"]},
                          train={"max_steps": 1, "train_batch_size": 2}, mine={"num_negatives": 2},
                          pretrain={"max_steps": 1, "train_batch_size": 4, "max_length": 64},
                          simcse={"max_steps": 1, "train_batch_size": 4})  # the recipe's order: adapt first
    text = config.read_text().replace("data: squad-mini", f"data: {raw}\neval_data: squad-mini")
    config.write_text(text)
    assert main(["run", str(config)]) == 0
    ledger = _ledger(out)
    assert ledger["simcse"]["settings"]["loss"] == "simcse"
    assert json.loads((out / "simcse" / "training_summary.json").read_text())["steps"] == 1
    order = sorted(ledger, key=lambda name: ledger[name]["finished_at"])
    assert order == ["pretrain", "simcse", "generate", "eval_before", "mine", "check_teacher", "label", "train",
                     "eval_after"]
    assert ledger["simcse"]["settings"]["model"] == str(out / "pretrain")
    assert ledger["generate"]["settings"]["retriever"] == ledger["mine"]["settings"]["model"] == str(out / "simcse")
    summary = json.loads((out / "generated" / "generate_summary.json").read_text())
    queries = read_jsonl(out / "generated" / "queries.jsonl")
    assert summary["kept"] == len(queries) > 0 and all(q["_id"].startswith("gen-") for q in queries)
    assert [r["qid"] for r in read_jsonl(out / "labels.jsonl")] == [q["_id"] for q in queries]
    after = json.loads((out / "eval" / "after.json").read_text())
    assert after["num_queries"] == 200  # squad-mini's real test questions
    before = json.loads((out / "eval" / "before.json").read_text())
    gain = after["ndcg@10_vs_baseline"]  # the paired comparison of the two evaluations' TREC runs
    assert gain["mean_difference"] == pytest.approx(after["ndcg@10"] - before["ndcg@10"], abs=1e-9)
    assert gain["queries"] == 200 and gain["low"] <= gain["mean_difference"] <= gain["high"]


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_configs_name_only_real_settings(example):
    """Every example builds a valid config for each of its stages (what `distill run --dry-run` prints)."""
    from distill.run_plan import plan

    from distill.supervision import Supervision

    import yaml

    said = yaml.safe_load(example.read_text()).get("supervision", "auto")  # the data may not be here: take its word
    run, stages, _ = plan(example, supervision=Supervision("qrels" if said == "auto" else said, "test"))
    names = [stage.name for stage, _ in stages]
    student = names.index("label")
    assert names[student:student + 3] == ["label", "train", "eval_after"] and ("generate" in names) == bool(
        run.generate)
    assert names[student + 3:] == ([] if run.control == "none" else ["control", "eval_control"])
    train = next(cfg for stage, cfg in stages if stage.name == "train")
    assert train.labels == [run.output_dir / "labels.jsonl"]


def _copy_set(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_data_hash_follows_the_bytes_not_the_file_times(tmp_path):
    """A copied or touched data set is the same data (no stage reruns); one changed byte is not."""
    import os

    from distill.run_ledger import DataHashes

    data = _copy_set(SQUAD_MINI, tmp_path / "a")
    hashes = DataHashes(tmp_path / "hashes.json")
    first = hashes(str(data))
    assert first == DataHashes(tmp_path / "other.json")(str(_copy_set(SQUAD_MINI, tmp_path / "b")))
    for path in data.rglob("*"):
        os.utime(path, ns=(1, 1))
    (data / "notes.txt").write_text("not part of the data set")
    assert hashes(str(data)) == first
    assert json.loads((tmp_path / "hashes.json").read_text())  # remembered, so an unchanged file is read once
    qrels = data / "qrels" / "train.tsv"
    qrels.write_text(qrels.read_text().replace("\t1\n", "\t2\n", 1))
    assert hashes(str(data)) != first


def test_a_changed_input_reruns_only_the_stages_that_read_it(tmp_path, tiny_bert_dir, tiny_llama_dir):
    from distill.run_plan import plan
    from distill.run_ledger import DataHashes, stage_record, why_changed

    train_data, eval_data = _copy_set(SQUAD_MINI, tmp_path / "train"), _copy_set(SQUAD_MINI, tmp_path / "eval")
    config = write_config(tmp_path / "run.yaml", tmp_path / "out", tiny_bert_dir, tiny_llama_dir)
    config.write_text(config.read_text().replace("data: squad-mini", f"data: {train_data}\neval_data: {eval_data}"))

    def records(**overrides):
        run, planned, _ = plan(config, overrides)
        fingerprints, out = {}, {}
        for stage, cfg in planned:
            out[stage.name] = stage_record(stage, cfg, DataHashes(tmp_path / "hashes.json"), fingerprints)
            fingerprints[stage.name] = out[stage.name]["fingerprint"]
        return out

    def redone(old, new):
        return {name for name in new if old.get(name, {}).get("fingerprint") != new[name]["fingerprint"]}

    base = records()
    queries = eval_data / "queries.jsonl"
    queries.write_text(queries.read_text().replace("?", " ?", 1))
    new_eval = records()
    assert redone(base, new_eval) == {"eval_before", "eval_after", "eval_control"}
    assert why_changed(base["eval_before"], new_eval["eval_before"]) == f"data changed: {eval_data}"
    assert redone(new_eval, records(**{"label.max_passage_tokens": 64})) == {"check_teacher", "label", "train",
                                                                             "eval_after"}
    assert why_changed(new_eval["train"], records(**{"label.max_passage_tokens": 64})["train"]) == \
        "earlier stage redone: label"
    assert why_changed(new_eval["mine"], records(**{"mine.num_negatives": 2})["mine"]) == \
        "settings changed: num_negatives 3 -> 2"
    older = json.loads(json.dumps(new_eval["mine"]))
    del older["settings"]["num_negatives"]  # recorded before the setting existed
    assert why_changed(older, new_eval["mine"]) == "settings changed: num_negatives (not recorded) -> 3"
    # SimCSE first: the adapted student is what mine, generate and train start from; the first evaluation keeps
    # the given student, so a SimCSE setting reruns everything but it
    with_simcse = records(**{"simcse.max_steps": 2})
    assert list(with_simcse)[0] == "simcse" and redone(new_eval, with_simcse) == set(with_simcse) - {"eval_before"}
    assert with_simcse["simcse"]["settings"]["num_negatives"] == 0
    assert redone(with_simcse, records(**{"simcse.max_steps": 3})) == set(with_simcse) - {"eval_before"}
    assert redone(with_simcse, records(**{"simcse.max_steps": 2, "train.max_steps": 5})) == {
        "train", "eval_after", "control", "eval_control"}  # the control follows the student's training plan
    run, planned, _ = plan(config, {"simcse.max_steps": 2})
    models = {stage.name: getattr(cfg, "model", None) for stage, cfg in planned}
    assert models["mine"] == models["train"] == str(run.output_dir / "simcse") != models["eval_before"]
    both = records(**{"pretrain.objective": "tsdae", "simcse.max_steps": 2})  # pretrain, then SimCSE from it
    assert list(both)[:2] == ["pretrain", "simcse"] and both["simcse"]["upstream"].keys() == {"pretrain"}
    assert redone(both, records(**{"pretrain.objective": "mlm", "simcse.max_steps": 2})) == set(both) - {
        "eval_before"}
    assert records(pretrain=True).keys() == {"pretrain", *new_eval}  # `pretrain: true` alone turns it on
    with_generate = records(**{"generate.temperature": 0.5})
    assert redone(with_generate, records(**{"generate.temperature": 0.9})) == {
        "generate", "mine", "check_teacher", "label", "train", "eval_after"}  # the evaluation before does not read it
