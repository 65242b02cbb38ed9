"""The serious cases of issue 20, end to end with the real CLI and real files: what a careful user, a
damaged disk or an attacker can put in front of `distill`. Nothing is lost and nothing runs that should not.

1 --overwrite never empties a folder that is not a run, and removes only what a run wrote, after the inputs
  were checked; 2 a checkpoint cannot run code; 3 non-finite rewards and losses stop with a clear error;
4 an encoder is not a teacher; 5 damaged progress files are refused; 6 Ctrl-C and giving up on a dead
server; 7 resume refuses changed settings; 8 a step that does not fit in memory turns GradCache on;
9 settings of the wrong type are refused before anything runs."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import read_jsonl, write_jsonl
from distill.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def train_args(model: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", "squad-mini", "--labels", str(labels), "--output", str(out),
            "--device", "cpu", "--no-show-progress", "--no-cache", "--train-batch-size", "8", "--num-negatives", "3",
            *extra]


class RunsCode:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----- 1: --overwrite ------------------------------------------------------------------------------------------

def test_overwrite_never_empties_a_folder_that_is_not_a_run(tiny_bert_dir, squad_mini_train_labels, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    # the probe's repro: a missing labels file, and a folder of someone else's notes
    assert main(train_args(tiny_bert_dir, tmp_path / "missing.jsonl", keep, "--overwrite")) == 2
    assert (keep / "notes.txt").read_text() == "x"
    # valid inputs do not make such a folder fair game either; the error names what is there
    assert main(train_args(tiny_bert_dir, squad_mini_train_labels, keep, "--overwrite", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "is not a distill train run" in err
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_overwrite_checks_inputs_first_and_removes_only_what_the_run_wrote(tiny_bert_dir, squad_mini_train_labels,
                                                                           tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_bert_dir, squad_mini_train_labels, out, "--max-steps", "2", "--eval-split", "test",
                           "--eval-steps", "1")) == 0
    written = sorted(p.name for p in out.iterdir())
    assert {"training_summary.json", "model.safetensors", "best", "distill_run.json"} <= set(written)
    (out / "my_notes.md").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # a failing input: nothing is removed
    assert main(train_args(tiny_bert_dir, tmp_path / "missing.jsonl", out, "--overwrite")) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    capsys.readouterr()
    # valid inputs: the run's entries are replaced, the user's file stays
    assert main(train_args(tiny_bert_dir, squad_mini_train_labels, out, "--overwrite", "--max-steps", "1")) == 0
    assert "removed the previous run's" in capsys.readouterr().out
    assert (out / "my_notes.md").read_text() == "mine"
    assert not (out / "best").exists()  # written by the first run only
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 1
    assert "my_notes.md" not in json.loads((out / "distill_run.json").read_text())["written"]


# ----- 2, 3, 7: checkpoints, non-finite values, resume ---------------------------------------------------------

@pytest.fixture
def stopped_run(tiny_bert_dir, squad_mini_train_labels, tmp_path) -> tuple[list[str], Path]:
    """A run stopped by a diverging loss (learning rate 1e30), its checkpoint kept: (its args, its folder)."""
    out = tmp_path / "stopped"
    args = train_args(tiny_bert_dir, squad_mini_train_labels, out, "--learning-rate", "1e30", "--save-steps", "1",
                      "--max-steps", "10")
    return args, out


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(stopped_run, capsys):
    args, out = stopped_run
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the loss is nan" in err[0] and "training stopped before this step changed" in err[0]
    step = int(err[0].split("step ")[1].split(":")[0])
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["state"]["step"] == step - 1 >= 1 and f"checkpoint of step {step - 1}" in err[0]
    assert not (out / "training_summary.json").exists()


def test_resume_refuses_changed_settings_and_names_them(stopped_run, tmp_path, squad_mini_train_labels, capsys):
    args, out = stopped_run
    assert main(args) == 1
    other = tmp_path / "other.jsonl"
    write_jsonl(other, read_jsonl(squad_mini_train_labels)[:100])
    for flag, value, named in [("--loss", "kl", "loss"), ("--learning-rate", "1e-3", "learning_rate"),
                               ("--labels", str(other), "labels (content)")]:
        capsys.readouterr()
        changed = list(args)
        if flag in changed:
            changed[changed.index(flag) + 1] = value
        else:
            changed += [flag, value]
        assert main(changed + ["--resume"]) == 2, flag
        err = capsys.readouterr().err
        assert "was started with other settings" in err and named in err, err


def test_resume_never_unpickles_a_checkpoint(stopped_run, tmp_path, capsys):
    import torch

    args, out = stopped_run
    assert main(args) == 1
    marker = tmp_path / "pwned"
    # a hostile optimizer file in the new format: torch's weights-only unpickler refuses it
    torch.save({"optimizer": RunsCode(marker)}, out / "checkpoint" / "optimizer.pt")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert not marker.exists()
    assert "refused" in capsys.readouterr().err
    # an older-format pickle checkpoint is not even opened
    (out / "checkpoint.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    assert main(args + ["--resume"]) == 2
    assert not marker.exists()
    assert "checkpoint.pt" in capsys.readouterr().err
    tree = [p for folder in ("distill", "labelers", "tests", "bench", "scripts") for p in (ROOT / folder).rglob("*.py")]
    assert not [p for p in tree if "weights_only=" + "False" in p.read_text(encoding="utf-8")]


def test_non_finite_rewards_are_refused_where_the_labels_are_read(tiny_bert_dir, squad_mini_train_labels, tmp_path,
                                                                  capsys):
    records = read_jsonl(squad_mini_train_labels)
    for bad in (float("nan"), float("inf"), float("-inf")):  # json writes NaN, Infinity, -Infinity
        path = tmp_path / f"{bad}.jsonl"
        edited = [dict(r) for r in records]
        edited[4]["rewards"] = [bad] + edited[4]["rewards"][1:]
        write_jsonl(path, edited)
        assert main(train_args(tiny_bert_dir, path, tmp_path / f"out-{bad}", "--max-steps", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert f'{path}:5: field "rewards": item 0 is' in err and "finite" in err
        assert not (tmp_path / f"out-{bad}" / "training_summary.json").exists()


# ----- 4: an encoder is not a teacher --------------------------------------------------------------------------

def test_an_encoder_or_an_lm_without_its_head_is_refused_as_teacher(minilm_dir, tiny_bert_dir, tiny_llama_dir,
                                                                    tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    import shutil

    started = time.perf_counter()
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--llm", str(minilm_dir), "--data", "squad-mini", "--output", str(out),
                 "--no-show-progress"]) == 2
    assert "not a causal language model" in capsys.readouterr().err and not out.exists()
    assert main(["generate", "--llm", str(minilm_dir), "--data", "squad-mini", "--output", str(tmp_path / "gen"),
                 "--no-show-progress"]) == 2
    assert "not a causal language model" in capsys.readouterr().err
    assert time.perf_counter() - started < 15  # refused before any model or data is loaded
    # a BERT that claims to be a causal LM: its cls.predictions.* head is missing from the checkpoint
    claimed = tmp_path / "bert-lm"
    shutil.copytree(tiny_bert_dir, claimed)
    config = json.loads((claimed / "config.json").read_text())
    (claimed / "config.json").write_text(json.dumps({**config, "architectures": ["BertLMHeadModel"], "is_decoder": True}))
    # a Llama checkpoint without its lm_head
    headless = tmp_path / "llama-headless"
    shutil.copytree(tiny_llama_dir, headless)
    weights = load_file(str(headless / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("lm_head")}, str(headless / "model.safetensors"),
              metadata={"format": "pt"})
    for model, missing in ((claimed, "cls.predictions"), (headless, "lm_head")):
        assert main(["label", "--llm", str(model), "--data", "squad-mini", "--output", str(out), "--device", "cpu",
                     "--no-show-progress"]) == 2
        err = capsys.readouterr().err
        assert "weights of the causal LM are missing" in err and missing in err, err
    assert not out.exists()


# ----- 5: damaged progress files --------------------------------------------------------------------------------

def mine_random(out: Path, *extra: str) -> list[str]:
    return ["mine", "--data", "squad-mini", "--split", "train", "--strategy", "random", "--num-negatives", "3",
            "--output", str(out), "--chunk-size", "50", "--no-show-progress", *extra]


def test_damaged_or_edited_progress_files_are_refused(tmp_path, capsys):
    out = tmp_path / "cand.jsonl"
    progress_path = tmp_path / "cand.jsonl.progress.json"
    assert main(mine_random(out)) == 0
    whole, progress = out.read_bytes(), json.loads(progress_path.read_text())
    lines = whole.splitlines(keepends=True)

    def partial(units: int) -> tuple[bytes, dict]:
        data = b"".join(lines[:units])
        start = len(b"".join(lines[:units - 50]))
        import hashlib

        return data, {**progress, "units_done": units, "bytes": len(data), "complete": False,
                      "last_chunk": {"start": start, "sha256": hashlib.sha256(data[start:]).hexdigest()},
                      "content_sha256": hashlib.sha256(data).hexdigest()}

    data, good = partial(100)
    cases = {
        "units_done advanced": (data, {**good, "units_done": 150}),
        "bytes mid-record": (data, {**good, "bytes": len(data) - 7}),
        "last chunk edited": (data[:-30] + b"x" * 29 + b"\n", good),
        "complete but truncated": (whole[:-40], progress),
        "missing key": (data, {k: v for k, v in good.items() if k != "units_done"}),
    }
    for name, (output, record) in cases.items():
        out.write_bytes(output)
        progress_path.write_text(json.dumps(record))
        assert main(mine_random(out)) == 2, name
        err = capsys.readouterr()
        assert "already complete" not in err.out, name
        assert str(progress_path) in err.err and "--overwrite" in err.err, (name, err.err)
    for raw, said in (("[1, 2]", "not an object"), ("{not json", "not valid JSON")):
        progress_path.write_text(raw)
        assert main(mine_random(out)) == 2
        err = capsys.readouterr().err
        assert str(progress_path) in err and said in err
    # an honest partial pair still resumes to the very same bytes
    out.write_bytes(data + lines[100][:10])  # a killed job's cut chunk after the recorded bytes
    progress_path.write_text(json.dumps(good))
    assert main(mine_random(out)) == 0
    assert out.read_bytes() == whole


# ----- 6: Ctrl-C and a dead server ---------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_a_terminal_job() -> None:
    """Ctrl-C as a terminal's foreground job gets it: a test runner started in the background (`cmd &` in a
    script) ignores SIGINT, every child inherits that, and Python then leaves SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _label_openai(tiny_llama_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", "label", "--llm", str(tiny_llama_dir), "--backend",
                             "openai", "--base-url", f"http://127.0.0.1:{_closed_port()}/v1", "--data", "squad-mini",
                             "--output", str(out), "--no-show-progress", *extra], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_as_a_terminal_job)


@pytest.mark.slow
def test_ctrl_c_stops_the_openai_backend_at_once_and_giving_up_is_one_line(tiny_llama_dir, tmp_path):
    out = tmp_path / "labels.jsonl"
    process = _label_openai(tiny_llama_dir, out)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 120
    # interrupt inside the back-off loop (connection refused, retried for up to 600 s), not at a guessed moment:
    # on a loaded machine a fixed sleep could land before the first request
    while not any("Retrying" in line for line in lines) and time.time() < deadline:
        time.sleep(0.1)
    assert process.poll() is None and any("Retrying" in line for line in lines)
    process.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    process.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(lines)
    assert time.perf_counter() - sent < 3, "Ctrl-C took too long"
    assert process.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert json.loads(Path(str(out) + ".progress.json").read_text())["units_done"] == 0  # kept, and resumable
    process = _label_openai(tiny_llama_dir, out, "--max-retry-seconds", "2")
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert process.returncode == 1 and "Traceback" not in err
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "gave up" in lines[0] and "ConnectError" in lines[0]


# ----- 8: memory --------------------------------------------------------------------------------------------------

def test_a_step_over_the_memory_budget_turns_grad_cache_on_or_is_refused(tiny_bert_dir, squad_mini_train_labels,
                                                                         tmp_path, capsys):
    out = tmp_path / "small"
    assert main(train_args(tiny_bert_dir, squad_mini_train_labels, out, "--max-steps", "2",
                           "--memory-budget-gb", "0.005")) == 0
    said = capsys.readouterr().out
    assert "GradCache on with chunks of" in said and "over the 0.0 GiB budget" in said
    chunk = json.loads((out / "training_summary.json").read_text())["memory"]["grad_cache_chunk_size"]
    assert 1 <= chunk < 8 * 4 + 8
    assert main(train_args(tiny_bert_dir, squad_mini_train_labels, tmp_path / "tiny", "--max-steps", "2",
                           "--memory-budget-gb", "0.00001")) == 2
    err = capsys.readouterr().err
    assert "--grad-cache-chunk-size" in err and "--train-batch-size" in err and "--memory-budget-gb" in err


def test_the_memory_measure_matches_what_a_step_keeps(minilm_dir):
    """all-MiniLM-L6-v2's default plan (32 queries, groups of 8, 256-token passages) is what was killed on a
    24 GiB machine; the measure must see it, and must grow with length as attention does."""
    import torch

    from distill.model import BiEncoder
    from distill.training.memory import SAFETY, saved_bytes_per_text

    encoder = BiEncoder.load(str(minilm_dir), device="cpu")
    per = {n: saved_bytes_per_text(encoder, n) for n in (32, 64, 256)}
    assert per[32] < per[64] < per[256] and per[256] > 4 * per[64]  # more than linear: attention is length²
    step = SAFETY * (32 * per[32] + 256 * per[256])
    assert step > 20 * 2 ** 30
    # the measure is what autograd really keeps: the same hooks around a real forward of 3 texts
    kept = {}
    weights = {p.untyped_storage().data_ptr() for p in encoder.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    encoder.train()
    ids = torch.randint(1000, 20000, (3, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(ids, torch.ones_like(ids))
    assert abs(sum(kept.values()) - 3 * per[64]) < 0.05 * 3 * per[64]


def test_memory_plan_picks_the_largest_chunk_that_fits():
    from distill.training.memory import SAFETY, plan_memory

    common = dict(n_queries=4, n_passages=28, query_bytes=1.0, passage_bytes=10.0, longest_tokens=128)
    fits = plan_memory(budget_bytes=SAFETY * (4 + 280), chunk_size=None, **common)
    assert fits.chunk_size is None
    tight = plan_memory(budget_bytes=SAFETY * 10 * 7 + 1, chunk_size=None, **common)
    assert tight.chunk_size == 7
    assert plan_memory(budget_bytes=1e9, chunk_size=5, **common).chunk_size == 5
    with pytest.raises(ValueError, match="--grad-cache-chunk-size 2 or less"):
        plan_memory(budget_bytes=SAFETY * 25, chunk_size=5, **common)
    with pytest.raises(ValueError, match="no --grad-cache-chunk-size fits"):
        plan_memory(budget_bytes=SAFETY * 5, chunk_size=None, **common)


# ----- 9: settings of the wrong type ----------------------------------------------------------------------------

def test_settings_of_the_wrong_type_are_refused_before_anything_runs(tiny_bert_dir, tiny_llama_dir, tmp_path,
                                                                     capsys):
    import yaml

    base = {"output_dir": str(tmp_path / "run"), "data": "squad-mini", "model": str(tiny_bert_dir),
            "llm": str(tiny_llama_dir)}
    cases = [({"train": {"train_batch_size": 4.7}}, "'train_batch_size': 4.7 is not an int"),
             ({"train": {"epochs": 1.5}}, "'epochs': 1.5 is not an int"),
             ({"mine": {"num_negatives": [3]}}, "'num_negatives': list [3] is not an int"),
             ({"eval": {"top_k": 10.5}}, "'top_k': 10.5 is not an int"),
             ({"train": {"loss": 3}}, "'loss': 3 is not a string"),
             ({"mine": {"strategy": "densest"}}, "'strategy': 'densest' is not one of")]
    for extra, said in cases:
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({**base, **extra}))
        for args in (["run", str(config), "--dry-run"], ["run", str(config)]):
            assert main(args) == 2, (extra, args)
            err = capsys.readouterr().err
            assert said in err, (extra, err)
        assert not (tmp_path / "run" / "stages").exists()  # no stage was started
    # the same checker reads `distill --config` (YAML 1.1 reads 3e-5 as a string)
    from distill.cli import make_parser
    from distill.config import config_from_args
    from distill.training.config import TrainConfig

    settings = tmp_path / "train.yaml"
    settings.write_text("learning_rate: 3e-5\ntrain_batch_size: 4\n")
    args = make_parser().parse_args(["--config", str(settings), "train", "--model", "m", "--data", "d",
                                     "--output", "o"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.learning_rate == 3e-5 and isinstance(cfg.learning_rate, float) and cfg.train_batch_size == 4
    settings.write_text("train_batch_size: 4.7\n")
    with pytest.raises(ValueError, match="train_batch_size': 4.7 is not an int"):
        config_from_args(TrainConfig, make_parser().parse_args(["--config", str(settings), "train", "--model", "m",
                                                                "--data", "d", "--output", "o"]))



def test_measuring_memory_leaves_the_random_stream_alone(tiny_bert_dir):
    """The measure runs a forward with dropout on; training's dropout masks must not depend on it."""
    import torch

    from distill.model import BiEncoder
    from distill.training.memory import saved_bytes_per_text

    encoder = BiEncoder.load(str(tiny_bert_dir), device="cpu")
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    saved_bytes_per_text(encoder, 32)
    assert torch.equal(torch.rand(4), expected)


def test_a_job_killed_at_its_first_progress_write_reruns(tmp_path, monkeypatch):
    """Killed at its very first progress write (found by test_run's random kills: `candidates.jsonl exists but has
    no candidates.jsonl.progress.json`): no orphan output is left, so the rerun starts and writes the same bytes."""
    import distill.stages.writer as writer

    reference = tmp_path / "whole.jsonl"
    assert main(mine_random(reference)) == 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here

    out = tmp_path / "cand.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(writer, "write_json_atomic", killed)
        assert main(mine_random(out)) == 130  # the CLI's exit for an interrupt
    assert not out.exists()
    assert main(mine_random(out)) == 0
    assert out.read_bytes() == reference.read_bytes()
