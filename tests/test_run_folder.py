"""A run folder is refused when it is not this command's run: another command's (`distill train` vs `distill
pretrain`), a damaged record, or no record at all; the message says what the folder holds and what to do, and
nothing in it is removed, --overwrite or not."""
from __future__ import annotations

import json
from pathlib import Path

from distill.cli import main


def pretrain(model: Path, data: Path, *extra: str) -> list[str]:
    return ["pretrain", "--model", str(model), "--data", str(data), "--train-batch-size", "8", "--max-length", "64",
            "--device", "cpu", "--no-show-progress", *extra]


def test_a_folder_of_the_other_command_or_a_damaged_record_is_refused_saying_what_is_there(
        tiny_bert_dir, corpus_only, tmp_path, capsys):
    pretrained, trained = tmp_path / "pretrained", tmp_path / "trained"
    assert main(pretrain(tiny_bert_dir, corpus_only, "--output", str(pretrained), "--max-steps", "1")) == 0
    assert main(["train", "--model", str(tiny_bert_dir), "--data", str(corpus_only), "--loss", "simcse", "--device",
                 "cpu", "--no-show-progress", "--no-cache", "--train-batch-size", "8", "--max-steps", "1",
                 "--output", str(trained)]) == 0
    before = {p.name for p in pretrained.iterdir()}
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_bert_dir), "--data", str(corpus_only), "--loss", "simcse",
                 "--output", str(pretrained), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{pretrained}: holds a distill pretrain run (" in err and "not a distill train one" in err, err
    assert "config.json" in err and "give --output another folder" in err and "record (kind, written)" not in err
    assert main(pretrain(tiny_bert_dir, corpus_only, "--output", str(trained), "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "holds a distill train run (" in err and "not a distill pretrain one" in err, err
    record = json.loads((pretrained / "distill_run.json").read_text())
    (pretrained / "distill_run.json").write_text(json.dumps({**record, "written": "everything"}))
    assert main(pretrain(tiny_bert_dir, corpus_only, "--output", str(pretrained), "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "a damaged distill pretrain record" in err and "config.json" in err and "another folder" in err, err
    (pretrained / "distill_run.json").write_text("[]")
    assert main(pretrain(tiny_bert_dir, corpus_only, "--output", str(pretrained), "--overwrite")) == 2
    assert "is not the record of a distill run" in capsys.readouterr().err
    assert {p.name for p in pretrained.iterdir()} == before  # nothing was removed
