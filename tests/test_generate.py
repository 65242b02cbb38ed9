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
from labelers.generation import parse_pair, question_only
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


def test_sampling_stops_where_the_full_completion_would_be_cut(tiny_llama_dir):
    """A stop string ends a sampled row early; the text is the unstopped text cut before the stop."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from labelers.backends import Sampling, create_backend
    from labelers.backends.base import cut_at_stop

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [tokenizer(t)["input_ids"] for t in ("The river", "A passage about the city", "Question:")]
    backend = create_backend("hf", model=str(tiny_llama_dir), dtype="float32")
    sampling = Sampling(temperature=1.0, top_p=0.95, n=2, seed=3)
    full = backend.generate(prompts, 16, sampling)
    stop = (full[0][0][4:6], full[2][1][-3:])  # certain to cut those two, maybe others
    stopped = backend.generate(prompts, 16, replace(sampling, stop=stop))
    # (the tiny model writes stray bytes: a U+FFFD left at the cut goes, as at any cut)
    assert stopped == [[cut_at_stop(t, stop).rstrip("\ufffd").strip() for t in samples] for samples in full]
    assert len(stopped[0][0]) <= 4 and stopped[2][1] != full[2][1]


@pytest.mark.slow
def test_a_question_without_its_answer_gets_one_from_a_greedy_pass(smollm2_dir):
    """SmolLM2 often stops after the question; the second pass asks for the answer and the real model
    finds it in the passage (made-up facts, so it cannot know them otherwise)."""
    from transformers import AutoTokenizer

    from labelers.backends import create_backend
    from labelers.generation import Generation, PairPrompts, fill_missing_answers, load_few_shot, packaged_examples

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = PairPrompts(tokenizer, load_template("generate_en_chat"), load_few_shot(packaged_examples("en")))
    passages = ["The Zorblat festival is held every spring in the mountain town of Quenby, where bakers compete "
                "to make the largest honey cake.",
                "Dr. Ilsa Marrow discovered the blue fern Pteris caeruleana in 1987 while surveying the cloud "
                "forests of northern Peru."]
    generations = [Generation(0, 0, "Where is the Zorblat festival held?", None, None),
                   Generation(1, 0, "Who discovered the blue fern?\n\nPassage: In 1990", None, None),
                   Generation(1, 1, "When was it found?\nAnswer: 1987", "When was it found?", "1987"),
                   Generation(1, 2, "Who found it?\nAnswer:", None, None)]  # an empty answer stays a failure
    backend = create_backend("hf", model=str(smollm2_dir), dtype="float32")
    filled = fill_missing_answers(backend, prompts, [prompts.build(p) for p in passages], generations)
    assert filled[0].completed and filled[0].question == "Where is the Zorblat festival held?"
    assert "Quenby" in filled[0].answer and "\n" not in filled[0].answer
    assert filled[1].completed and filled[1].question == "Who discovered the blue fern?"
    assert "Marrow" in filled[1].answer
    assert filled[2:] == generations[2:]


def test_question_only_reads_a_completion_that_stopped_before_the_answer_label():
    template = load_template("generate_en")
    assert question_only("  Who built it?\n\nPassage: more", template) == "Who built it?"
    assert question_only("Who built it?\nAnswer: Bob", template) is None
    assert question_only("Who built it?\nAnswer:", template) is None  # the label came: a parse failure
    assert question_only("  \n", template) is None


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


def test_copied_filter_removes_a_repeated_few_shot_question_or_passage():
    """SmolLM2 wrote the last few-shot question for 172 of 600 scifact samples; the copied filter drops them."""
    from dataclasses import replace

    from labelers.generation import load_few_shot, packaged_examples

    few_shot = load_few_shot(packaged_examples("en"))
    examples = tuple(e.question for e in few_shot)
    repeated = Pair(examples[-1].upper().rstrip("?"), "1911", PASSAGE)
    same_start = Pair(examples[-1].split(" win ")[0] + " cross the Amazon River?", "1911", PASSAGE)
    settings = replace(SETTINGS, example_texts=examples + tuple(e.passage for e in few_shot))
    own = Pair("How long is the river that flows from the Andes?", "6,400 km", PASSAGE)
    other = "Warsaw is the capital and largest city of Poland, on the Vistula River."
    recited = Pair(few_shot[1].passage.split(", and")[0], "1911", other)  # an example's passage as "question"
    assert verdicts("copied", [own, repeated, same_start, recited], settings) == [None, "copied", None, "copied"]
    assert verdicts("copied", [own, repeated, recited]) == [None, None, None]  # no examples: new questions


def test_duplicate_filter_keeps_the_first_of_equal_questions():
    again = Pair("where does the amazon river END", "the Atlantic", PASSAGE)
    other = Pair("How long is the Amazon River?", "6,400 km", PASSAGE)
    assert verdicts("duplicate", [GOOD, again, other, again]) == [None, "duplicate", None, "duplicate"]


@pytest.mark.slow
def test_unsupported_filter_uses_the_teachers_answer_likelihood(smollm2_dir):
    """Real SmolLM2 scores: the passage's own answer is kept, an answer the passage does not hold is removed."""
    from labelers.backends import create_backend
    from labelers.reward import RewardGroup, RewardInputs, score_groups
    from transformers import AutoTokenizer

    inputs = RewardInputs(AutoTokenizer.from_pretrained(smollm2_dir), load_template("reward_en_chat"))
    backend = create_backend("hf", model=str(smollm2_dir), dtype="float32")
    pairs = [Pair("Where does the Amazon River flow into?", "the Atlantic Ocean", PASSAGE),
             Pair("Who painted the Mona Lisa in the Louvre?", "Xylophone Quartz Zebra", PASSAGE)]
    for pair, (reward,) in zip(pairs, score_groups(backend, inputs, [RewardGroup(p.question, [p.answer], [p.passage])
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


@pytest.mark.slow
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
    completed = [s for g in generations for s in g["samples"] if s.get("completed")]
    assert summary["completed_answers"]["answered"] == len(completed)
    assert all(s["question"] and s["answer"] and "Answer:" not in s["raw"] for s in completed)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _summary(generated: int, copied: int) -> dict:
    return {"passages": generated // 2, "generated": generated, "kept": generated - copied, "seconds": 1.0,
            "removed": {"parse": 0, "copied": copied}, "examples": []}


def test_a_teacher_that_mostly_copies_is_named_when_the_summary_prints(tmp_path, caplog, capsys):
    """scifact's 444 copies in 1,200 samples (stop 37) warrant a hint; squad's 253 in 2,400 do not."""
    from distill.stages.generated_folder import print_summary
    from labelers.filters import COPIED_WARNING_SHARE, copied_warning

    warning = copied_warning({"copied": 444}, 1200)
    assert warning.startswith("444 of 1200 samples (37%)") and "--few-shot" in warning
    assert copied_warning({"copied": 253}, 2400) is None and copied_warning({}, 0) is None
    at_share = round(COPIED_WARNING_SHARE * 100)
    assert copied_warning({"copied": at_share}, 100) and copied_warning({"copied": at_share - 1}, 100) is None
    with caplog.at_level("WARNING", logger="distill.stages.generate"):
        print_summary(_summary(1200, 444), tmp_path)
        print_summary(_summary(2400, 253), tmp_path)
    assert [r.getMessage() for r in caplog.records] == [warning]
    assert "copied       removed 444" in capsys.readouterr().out
