"""`distill pretrain`: continued pretraining (mlm, tsdae) of the student on a corpus alone; the output is the
student with its own pooling, loadable by sentence-transformers; kill -9 and --resume give the same bytes. Its
steps run in `distill train`'s loop: a diverging loss stops it as it stops `train`, two gloo processes take the
gradient one process takes, and an MLM draw that masks nothing is skipped and counted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kill_9_after_new_checkpoints, read_jsonl, write_jsonl
from distill.cli import main
from distill.model import BiEncoder
from distill.training.pretrain import PretrainConfig, passages_of_batch
from distill.training.pretrain_objectives import DenoisingAutoEncoder, token_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def flags(model: Path, data: Path, objective: str, *extra: str) -> list[str]:
    return ["pretrain", "--model", str(model), "--data", str(data), "--objective", objective, "--train-batch-size",
            "8", "--max-length", "128", "--device", "cpu", "--no-show-progress", *extra]  # passages of many lengths


def backbone_state(path: Path) -> dict[str, torch.Tensor]:
    return BiEncoder.load(path, device="cpu").backbone.state_dict()


@pytest.mark.parametrize("objective", ["mlm", "tsdae"])
def test_pretrain_adapts_the_backbone_and_keeps_the_students_pooling(tiny_bert_dir, corpus_only, tmp_path, objective):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / objective
    passages = read_jsonl(corpus_only / "corpus.jsonl")  # cut to 4..40 words: a batch's rows differ in length
    write_jsonl(corpus_only / "corpus.jsonl", [{**p, "text": " ".join(p["text"].split()[:4 + i % 37])}
                                               for i, p in enumerate(passages)])
    assert main(flags(tiny_bert_dir, corpus_only, objective, "--output", str(out), "--max-steps", "6",
                      "--logging-steps", "2", "--learning-rate", "1e-3")) == 0
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["steps"] == 6 and summary["passages"] == 292 and summary["objective"] == objective
    assert [r["step"] for r in read_jsonl(out / "pretrain_log.jsonl")] == [2, 4, 6]
    assert not (out / "checkpoint").exists()
    before, after = backbone_state(tiny_bert_dir), backbone_state(out)
    assert before.keys() == after.keys()  # the encoder alone: no masked-LM head, no decoder
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("encoder.layer.0.attention" in name for name in moved) and "embeddings.word_embeddings.weight" in moved
    ours = BiEncoder.load(out, device="cpu")
    assert ours.config == BiEncoder.load(tiny_bert_dir, device="cpu").config  # pooling, normalisation, lengths
    texts = [p["text"] for p in read_jsonl(corpus_only / "corpus.jsonl")[:4]]
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts)
    np.testing.assert_allclose(ours.encode(texts), theirs, atol=1e-5)


def test_tsdae_deletes_whole_words_and_shares_all_but_cross_attention(tiny_bert_dir):
    encoder = BiEncoder.load(tiny_bert_dir, device="cpu")
    torch.manual_seed(0)
    model = DenoisingAutoEncoder(encoder, 64, PretrainConfig(model="m", data="d", output=Path("o")))
    own = {id(p) for p in encoder.backbone.parameters()}
    decoder = dict(model.decoder.named_parameters(remove_duplicate=False))
    for name, parameter in decoder.items():
        assert (id(parameter) in own) == ("crossattention" not in name and "cls.predictions" not in name
                                          or name.endswith("decoder.weight")), name
    text = "the quick brown fox jumps over the lazy dog near the riverbank at dawn"
    tokens = encoder.tokenizer([text] * 200, truncation=True, max_length=64)
    kept = model.noisy(tokens, 200)
    words = text.split()
    special = set(encoder.tokenizer.all_special_ids)
    shares = []
    for ids in kept:
        assert ids[0] == encoder.tokenizer.cls_token_id and ids[-1] == encoder.tokenizer.sep_token_id
        pieces = encoder.tokenizer.convert_ids_to_tokens([t for t in ids if t not in special])
        left = " ".join(pieces).replace(" ##", "").split()  # WordPiece: "##" continues a word
        assert left and all(w in words for w in left)  # whole words, never a piece of one
        shares.append(len(left) / len(words))
    assert 0.3 < np.mean(shares) < 0.5  # 60% of the words deleted


def test_passages_of_batch_cover_each_epoch_once_and_follow_from_the_batch():
    rows = np.concatenate([passages_of_batch(b, 50, 8, seed=3) for b in range(6)])
    assert len(set(rows.tolist())) == 48  # one epoch: 6 batches of 8, two passages left out
    assert not np.array_equal(passages_of_batch(6, 50, 8, 3), passages_of_batch(0, 50, 8, 3))  # a new order
    assert np.array_equal(passages_of_batch(7, 50, 8, 3), passages_of_batch(7, 50, 8, 3))


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_bytes(tiny_bert_dir, corpus_only, tmp_path):
    common = flags(tiny_bert_dir, corpus_only, "mlm", "--max-steps", "60", "--save-steps", "3", "--logging-steps",
                   "3", "--seed", "1")
    whole = tmp_path / "whole"
    assert subprocess.run([sys.executable, "-m", "distill", *common, "--output", str(whole)], env=ENV,
                          capture_output=True, timeout=600).returncode == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "distill", *common, "--output", str(killed), "--resume"]
    kills = kill_9_after_new_checkpoints([command, command], killed / "checkpoint" / "state.json", 0.2, ENV)
    assert kills >= 1 and not (killed / "pretrain_summary.json").exists()
    finished = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (killed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert (killed / "pretrain_log.jsonl").read_bytes() == (whole / "pretrain_log.jsonl").read_bytes()


def test_a_foreign_folder_or_other_settings_are_refused(tiny_bert_dir, corpus_only, tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(flags(tiny_bert_dir, corpus_only, "mlm", "--output", str(foreign), "--max-steps", "2")) == 2
    assert "notes.txt" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "run"
    assert main(flags(tiny_bert_dir, corpus_only, "mlm", "--output", str(out), "--max-steps", "2")) == 0
    assert main(flags(tiny_bert_dir, corpus_only, "mlm", "--output", str(out), "--max-steps", "2")) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(flags(tiny_bert_dir, corpus_only, "tsdae", "--output", str(out), "--max-steps", "2")) == 2
    assert "objective 'mlm' -> 'tsdae'" in capsys.readouterr().err
    assert main(flags(tiny_bert_dir, corpus_only, "tsdae", "--output", str(out), "--max-steps", "2",
                      "--overwrite")) == 0
    assert json.loads((out / "pretrain_summary.json").read_text())["objective"] == "tsdae"


def test_token_cross_entropy_is_the_mean_over_predicted_tokens_and_ranks_shares_add_up():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=generator)
    labels = torch.randint(7, (4, 5), generator=generator)
    labels[torch.rand(4, 5, generator=generator) < 0.5] = -100
    labels[2] = -100  # a row with nothing to predict
    terms = [-(logits[i, t].double().log_softmax(-1)[labels[i, t]]) for i in range(4) for t in range(5)
             if labels[i, t] != -100]
    n = len(terms)
    whole = token_cross_entropy(logits, labels, n)
    assert abs(float(whole) - float(sum(terms) / n)) < 1e-6
    shares = [token_cross_entropy(logits[rows], labels[rows], n) for rows in (slice(0, 2), slice(2, 4))]
    assert abs(float(sum(shares)) - float(whole)) < 1e-6
    assert float(token_cross_entropy(logits[2:3], labels[2:3], n)) == 0.0  # nothing predicted: no NaN


def test_an_mlm_batch_with_nothing_masked_is_skipped_and_counted(tiny_bert_dir, corpus_only, tmp_path, capsys):
    # one word per passage: a batch of four masks nothing about half the time, whose mean loss was NaN (exit 2,
    # "lower --learning-rate", at the same step on every rerun: the masks are seeded)
    passages = read_jsonl(corpus_only / "corpus.jsonl")
    write_jsonl(corpus_only / "corpus.jsonl", [{"_id": p["_id"], "title": "", "text": p["text"].split()[0]}
                                               for p in passages])
    out = tmp_path / "short"
    assert main([*flags(tiny_bert_dir, corpus_only, "mlm", "--output", str(out), "--max-steps", "6",
                        "--logging-steps", "1", "--no-include-title"), "--train-batch-size", "4"]) == 0
    summary = json.loads((out / "pretrain_summary.json").read_text())
    skipped = summary["skipped"]["batches with no masked token"]
    assert summary["steps"] == 6 and skipped >= 1
    assert f"{skipped} batches with no masked token skipped" in capsys.readouterr().out
    log = read_jsonl(out / "pretrain_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in log)


def test_a_non_finite_loss_stops_pretraining_as_it_stops_train(tiny_bert_dir, corpus_only, tmp_path, capsys):
    out = tmp_path / "diverged"
    assert main(flags(tiny_bert_dir, corpus_only, "mlm", "--output", str(out), "--learning-rate", "1e30",
                      "--save-steps", "1", "--max-steps", "10")) == 1  # not 2: the input is fine, the run went wrong
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # not the bars
    assert len(err) == 1 and "the loss is " in err[0] and "training stopped before this step changed" in err[0]
    step = int(err[0].split("step ")[1].split(":")[0])
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["state"]["step"] == step - 1 >= 1 and f"checkpoint of step {step - 1}" in err[0]
    assert "--learning-rate" in err[0] and not (out / "pretrain_summary.json").exists()


@pytest.mark.parametrize("objective", ["mlm", "tsdae"])
def test_two_gloo_processes_take_the_gradient_of_one(tiny_bert_no_dropout, corpus_only, tmp_path, objective):
    args = ["--model", str(tiny_bert_no_dropout), "--data", str(corpus_only), "--objective", objective,
            "--train-batch-size", "8", "--max-length", "64", "--device", "cpu", "--seed", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = []
    for processes in (1, 2):
        out = tmp_path / f"{processes}.pt"
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*launcher, str(ROOT / "tests" / "pretrain_step.py"), str(out), *args, "--output",
                   str(tmp_path / str(processes))]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        results.append(torch.load(out, weights_only=True))
    one, two = results
    assert abs(one["loss"] - two["loss"]) < 1e-5
    assert sum(float(g.abs().sum()) for g in one["grads"] if g is not None) > 0
    for a, b in zip(one["grads"], two["grads"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
