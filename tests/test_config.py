"""Settings have one source of truth: the dataclass field. Its metadata decides what a fingerprint holds, which
backend a setting belongs to, and `distill run --dry-run` says where each value came from."""
from __future__ import annotations

import json

import yaml

from conftest import read_jsonl
from distill.cli import main


def label_args(llm, data, out, *extra, dtype="float32"):
    return ["label", "--llm", str(llm), "--data", str(data), "--split", "test", "--output", str(out),
            "--device", "cpu", "--dtype", dtype, "--no-show-progress", "--chunk-size", "4", *extra]


def test_a_setting_of_another_backend_is_an_error(tiny_llama_dir, tmp_path, capsys):
    for args, named in ((["--backend", "vllm", "--device", "cuda:1"], "--device applies to the hf backend"),
                        (["--backend", "hf", "--base-url", "http://x:1/v1"], "--base-url applies to the openai"),
                        (["--backend", "openai", "--dtype", "bfloat16"], "--dtype applies to the hf and vllm backends"),
                        (["--tensor-parallel-size", "2"], "--tensor-parallel-size applies to the vllm backend"),
                        (["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization applies to the vllm"),
                        (["--backend", "vllm", "--timeout", "5"], "--timeout applies to the openai backend"),
                        (["--backend", "openai", "--token-budget", "512"], "--token-budget applies to the hf")):
        out = tmp_path / "labels.jsonl"
        assert main(["label", "--llm", str(tiny_llama_dir), "--data", "squad-mini", "--output", str(out),
                     "--no-show-progress", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0] and "not to --backend" in err[0], err
        assert not out.exists()


def test_create_backend_refuses_an_option_its_backend_does_not_take(tiny_llama_dir):
    from labelers.backends import create_backend

    try:
        create_backend("hf", model=str(tiny_llama_dir), tensor_parallel_size=2, max_num_seqs=None)
    except ValueError as exc:
        assert str(exc) == "the hf backend takes no setting tensor_parallel_size"
    else:
        raise AssertionError("an hf backend was built with a vLLM setting")


def test_a_ray_workers_gpus_are_its_tensor_parallel_group(tmp_path, capsys):
    from distill.stages.label import LabelConfig

    ray = dict(llm="m", data="squad-mini", output=tmp_path / "l.jsonl", backend="vllm", executor="ray")
    assert LabelConfig(**ray, gpus_per_worker=4).effective_tensor_parallel_size() == 4
    assert LabelConfig(**ray, gpus_per_worker=1).effective_tensor_parallel_size() is None  # vLLM's 1
    assert main(["label", "--llm", "m", "--data", "squad-mini", "--output", str(tmp_path / "l.jsonl"), "--backend",
                 "vllm", "--executor", "ray", "--gpus-per-worker", "4", "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size 2 differs from --gpus-per-worker 4" in capsys.readouterr().err


def test_volatile_settings_may_change_on_resume_and_the_others_may_not(tiny_llama_dir, small_beir, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    assert main(label_args(tiny_llama_dir, small_beir, out)) == 0
    whole = out.read_bytes()
    progress = json.loads((tmp_path / "labels.jsonl.progress.json").read_text())
    assert "token_budget" not in progress["settings"] and "dtype" in progress["settings"]
    # a finished job with only an operational setting changed is still finished
    capsys.readouterr()
    assert main(label_args(tiny_llama_dir, small_beir, out, "--token-budget", "512", "--no-trust-remote-code")) == 0
    assert "already complete" in capsys.readouterr().out and out.read_bytes() == whole
    # a setting that changes the rewards is refused, and named
    assert main(label_args(tiny_llama_dir, small_beir, out, dtype="bfloat16")) == 2
    err = capsys.readouterr().err
    assert "dtype" in err and "other settings" in err
    assert len(read_jsonl(out)) == len(whole.splitlines())


def test_dry_run_says_where_every_setting_came_from(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "data": "squad-mini", "model": "m",
                                      "llm": "l", "train": {"epochs": 2}}))
    assert main(["run", str(config), "--dry-run", "--train.learning-rate", "3e-5"]) == 0
    printed = capsys.readouterr().out
    plan = yaml.safe_load(printed)
    assert plan["train"]["learning_rate"] == 3e-5 and plan["train"]["epochs"] == 2
    lines = {line.strip().split(":")[0] + "@" + section: line for section, block in
             (("train", printed.split("\ntrain:\n")[1].split("\neval_after:\n")[0]),) for line in block.splitlines()}
    assert lines["learning_rate@train"].endswith("# flag") and lines["epochs@train"].endswith("# yaml")
    assert lines["model@train"].endswith("# run") and lines["weight_decay@train"].endswith("# default")
    assert "  label (label): squad-mini, <mine>, <check_teacher> -> " in printed  # the plan: what each stage reads and writes
    assert "  check_teacher (check_teacher): squad-mini, <mine> -> " in printed
    assert not (tmp_path / "run").exists()


def test_distill_run_gives_its_executor_to_the_record_stages(tmp_path):
    from distill.run_plan import plan
    from distill.supervision import Supervision

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "data": "squad-mini", "model": "m",
                                      "llm": "l", "executor": "ray", "workers": 3, "label": {"workers": 5}}))
    _, stages, _ = plan(config, {"gpus_per_worker": 1.0}, supervision=Supervision("raw_text", "test"))
    by_name = {stage.name: cfg for stage, cfg in stages}
    assert [(by_name[n].executor, by_name[n].workers, by_name[n].gpus_per_worker) for n in
            ("generate", "mine", "label")] == [("ray", 3, 1.0), ("ray", 3, 1.0), ("ray", 5, 1.0)]
    assert not hasattr(by_name["train"], "executor")  # training scales with torchrun, not Ray


def test_every_command_prints_its_help(capsys):
    """`distill <command> --help` formats every flag's help (a bare % in a help text breaks argparse)."""
    import argparse

    import pytest

    from distill.cli import make_parser

    parser = make_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"pretrain", "train", "label", "mine", "generate", "eval", "run"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
        assert "--" in capsys.readouterr().out
