"""`distill generate`: parsing, each filter on hand-made bad generations, and the resumable, sharded stage."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_9_twice_then_finish, read_jsonl
from distill.cli import main
from labelers.filters import FILTERS, FilterSettings, Pair, apply_filters
from labelers.generation import parse_pair
from labelers.prompts import load_template

PASSAGE = ("The Amazon River in South America is the largest river by discharge volume of water in the world. "
           "It flows for about 6,400 km from the Andes to the Atlantic Ocean.")
GOOD = Pair("Where does the Amazon River end?", "the Atlantic Ocean", PASSAGE, support=-0.5, rank=0)
SETTINGS = FilterSettings()


def verdicts(name: str, pairs: list[Pair], settings: FilterSettings = SETTINGS) -> list[str | None]:
    reasons, counts = apply_filters(pairs, [name], settings)
    assert counts == {name: sum(r is not None for r in reasons)}
    return reasons


def test_parse_pair_reads_the_labels_of_its_template():
    en, zh = load_template("generate_en_chat"), load_template("generate_zh_chat")
    assert parse_pair(" Where does it end?\nAnswer: the Atlantic\n\nPassage: more", en) == ("Where does it end?", "the Atlantic")
    assert parse_pair("Where?\nAnswer: here Question: next one", en) == ("Where?", "here")
    assert parse_pair("长江注入哪里？\n答案：东海", zh) == ("长江注入哪里？", "东海")
    assert parse_pair("Where does it end?", en) is None            # no answer label
    assert parse_pair("Where does it end?\nAnswer:   ", en) is None  # empty answer
    assert parse_pair("\nAnswer: the Atlantic", en) is None          # empty question


def test_parse_filter_removes_unparsed_generations():
    assert verdicts("parse", [GOOD, Pair(None, None, PASSAGE), Pair("Where?", None, PASSAGE)]) == [None, "parse", "parse"]


def test_length_filter_removes_short_and_long_questions_and_answers():
    pairs = [GOOD, Pair("Why?", "x", PASSAGE), Pair("What " * 80 + "?", "x", PASSAGE),
             Pair("Where does the Amazon River end?", "the Atlantic Ocean, " * 20, PASSAGE)]
    assert verdicts("length", pairs) == [None, "length", "length", "length"]


def test_copied_filter_removes_questions_lifted_from_the_passage():
    lifted = Pair("The Amazon River in South America is the largest river by discharge volume?", "yes", PASSAGE)
    recased = Pair("it FLOWS for about 6,400 km from the Andes to the Atlantic ocean", "6,400 km", PASSAGE)
    assert verdicts("copied", [GOOD, lifted, recased]) == [None, "copied", "copied"]


def test_copied_filter_removes_a_repeated_few_shot_question():
    """SmolLM2 wrote the last few-shot question for 172 of 600 scifact samples; the copied filter drops them."""
    from dataclasses import replace

    from labelers.generation import load_examples, packaged_examples

    examples = tuple(e.question for e in load_examples(packaged_examples("en")))
    repeated = Pair(examples[-1].upper().rstrip("?"), "1911", PASSAGE)
    same_start = Pair(examples[-1].split(" win ")[0] + " cross the Amazon River?", "1911", PASSAGE)
    settings = replace(SETTINGS, example_questions=examples)
    own = Pair("How long is the river that flows from the Andes?", "6,400 km", PASSAGE)
    assert verdicts("copied", [own, repeated, same_start], settings) == [None, "copied", None]
    assert verdicts("copied", [own, repeated]) == [None, None]  # without the examples it is a new question


def test_duplicate_filter_keeps_the_first_of_equal_questions():
    again = Pair("where does the amazon river END", "the Atlantic", PASSAGE)
    other = Pair("How long is the Amazon River?", "6,400 km", PASSAGE)
    assert verdicts("duplicate", [GOOD, again, other, again]) == [None, "duplicate", None, "duplicate"]


def test_unsupported_filter_uses_the_teachers_answer_likelihood(smollm2_dir):
    """Real SmolLM2 scores: the passage's own answer is kept, an answer the passage does not hold is removed."""
    from labelers.backends import create_backend
    from labelers.reward import Group, RewardInputs, score_groups
    from transformers import AutoTokenizer

    inputs = RewardInputs(AutoTokenizer.from_pretrained(smollm2_dir), load_template("reward_en_chat"))
    backend = create_backend("hf", model=str(smollm2_dir), dtype="float32")
    pairs = [Pair("Where does the Amazon River flow into?", "the Atlantic Ocean", PASSAGE),
             Pair("Who painted the Mona Lisa in the Louvre?", "Xylophone Quartz Zebra", PASSAGE)]
    for pair, (reward,) in zip(pairs, score_groups(backend, inputs, [Group(p.question, [p.answer], [p.passage])
                                                                      for p in pairs])):
        pair.support = reward.value
    assert pairs[0].support > SETTINGS.min_support > pairs[1].support
    assert verdicts("unsupported", pairs) == [None, "unsupported"]
    with pytest.raises(ValueError, match="support"):
        apply_filters([Pair("q?", "a", PASSAGE)], ["unsupported"], SETTINGS)


def test_round_trip_filter_needs_the_source_in_the_top_k():
    pairs = [GOOD, Pair("Where?", "x", PASSAGE, rank=3), Pair("Who?", "y", PASSAGE, rank=None)]
    assert verdicts("round_trip", pairs, FilterSettings(round_trip_k=3)) == [None, "round_trip", "round_trip"]
    assert verdicts("round_trip", pairs, FilterSettings(round_trip_k=4)) == [None, None, "round_trip"]


def test_filters_run_in_order_on_what_earlier_ones_kept():
    pairs = [Pair(None, None, PASSAGE), Pair("Why?", "x", PASSAGE), GOOD, GOOD]
    reasons, counts = apply_filters(pairs, ["parse", "length", "duplicate"], SETTINGS)
    assert reasons == ["parse", "length", None, "duplicate"]
    assert counts == {"parse": 1, "length": 1, "duplicate": 1}
    assert list(FILTERS) == ["parse", "length", "copied", "duplicate", "unsupported", "round_trip"]


def generate_args(llm: Path, output: Path, retriever: Path, *extra: str) -> list[str]:
    return ["generate", "--llm", str(llm), "--data", "squad-mini", "--output", str(output), "--dtype", "float32",
            "--device", "cpu", "--retriever", str(retriever), "--no-show-progress", *extra]


def test_generate_writes_a_folder_the_next_stages_read(smollm2_dir, minilm_dir, tmp_path, capsys):
    """Real SmolLM2 samples for 4 passages; the folder is a training set (`distill run`'s raw-text test trains on one)."""
    from distill.data import load_retrieval_set

    out = tmp_path / "synthetic"
    args = generate_args(smollm2_dir, out, minilm_dir, "--max-passages", "4", "--chunk-size", "2")
    assert main(args) == 0
    summary = json.loads((out / "generate_summary.json").read_text())
    generations = read_jsonl(out / "generations.jsonl")
    assert len(generations) == 4 and all(len(g["samples"]) == 2 for g in generations)
    queries = read_jsonl(out / "queries.jsonl")
    assert summary["generated"] == 8 and summary["kept"] == len(queries)
    assert summary["kept"] + sum(summary["removed"].values()) == 8
    kept = [s for g in generations for s in g["samples"] if s["rejected"] is None]
    assert len(kept) >= len(queries)  # the corpus-wide filters (duplicate, round_trip) come after
    qrels = (out / "qrels" / "train.tsv").read_text().splitlines()
    assert qrels[1:] == [f"{q['_id']}\t{q['positives'][0]}\t1" for q in queries]
    for q in queries:  # every kept pair passed every filter
        assert q["support"] >= FilterSettings().min_support and q["answers"][0]
    if queries:
        rset = load_retrieval_set(out, "train")
        assert rset.queries.ids == [q["_id"] for q in queries] and len(rset.corpus) == 292
    printed = capsys.readouterr().out
    assert "round_trip" in printed and "kept" in printed
    assert main(args) == 0  # rerun: nothing to do
    assert "already complete" in capsys.readouterr().out


def _generate_process(llm: Path, out: Path, retriever: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", *generate_args(llm, out, retriever, "--max-passages",
                                                                              "40", "--chunk-size", "4", *extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_generate_killed_twice_then_rerun_is_byte_identical(tiny_llama_dir, tiny_bert_dir, tmp_path):
    reference = tmp_path / "reference"
    process = _generate_process(tiny_llama_dir, reference, tiny_bert_dir)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    killed = tmp_path / "killed"
    kill_9_twice_then_finish(lambda: _generate_process(tiny_llama_dir, killed, tiny_bert_dir),
                             killed / "generations.jsonl", max_pause=0.5)
    for name in ("generations.jsonl", "queries.jsonl", "corpus.jsonl", "qrels/train.tsv"):
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((killed / "generate_summary.json").read_text())["generated"] == 80


def test_shards_then_an_unsharded_run_finish_the_folder_without_sampling_again(tiny_llama_dir, tiny_bert_dir,
                                                                                tmp_path, capsys):
    out = tmp_path / "sharded"
    common = ["--max-passages", "10", "--chunk-size", "2", "--filters", "length", "duplicate"]
    for shard in ("0/2", "1/2"):
        assert main(generate_args(tiny_llama_dir, out, tiny_bert_dir, *common, "--shard", shard)) == 0
    assert not (out / "queries.jsonl").exists()
    parts = [read_jsonl(out / f"generations.{i}of2.jsonl") for i in range(2)]
    assert [len(p) for p in parts] == [5, 5]
    assert main(generate_args(tiny_llama_dir, out, tiny_bert_dir, *common)) == 0
    assert not (out / "generations.jsonl").exists()  # the shards' samples were used
    summary = json.loads((out / "generate_summary.json").read_text())
    assert summary["passages"] == 10 and summary["generated"] == 20
    assert set(summary["removed"]) == {"parse", "length", "duplicate"}  # parse always runs
