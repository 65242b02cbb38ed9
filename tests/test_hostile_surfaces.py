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
