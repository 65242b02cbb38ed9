"""`distill run`'s own settings and how they are read: the top-level keys of the YAML file (`RunSettings`:
the data, the student, the teacher, the control student, the run folder, where the record stages run), the stage sections beside
them (`SECTIONS`), and the command-line overrides (`--train.learning-rate 3e-5`) on top.

A section holds its stage's settings under the names of its command-line flags, so the defaults live in one
place, the stage's config dataclass; `run_plan` turns both into the stages and their configs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.errors import UsageError

from .config import config_from_mapping, load_yaml_mapping
from .stages.executor import ExecutorSettings
from .supervision import SUPERVISIONS

CONTROLS = ("auto", "self-training", "hard-labels", "none")  # run_plan.CONTROL_TRAIN says what each trains
SECTIONS = ("pretrain", "simcse", "generate", "mine", "label", "train", "eval")
SWITCHED = ("pretrain", "simcse", "generate")  # sections that are also switches: `simcse: true` or a section turns the stage on


@dataclass
class RunSettings(ExecutorSettings):
    output_dir: Path = field(metadata={"help": "folder for every stage's output"})
    data: str = field(metadata={"help": "BEIR-style folder or embedded set: labelled queries, or raw passages"})
    model: str = field(metadata={"help": "student encoder to start from (also the retriever that mines and filters)"})
    llm: str = field(metadata={"help": "teacher LLM (folder or hub name)"})
    backend: str = field(default="hf", metadata={"help": "teacher backend for generate and label"})
    language: str = field(default="en", metadata={"help": "language of the default prompts"})
    split: str = field(default="train", metadata={"help": "training queries' qrels split"})
    eval_data: str | None = field(default=None, metadata={"help": "evaluation set (default: data)"})
    eval_split: str = field(default="test", metadata={"help": "qrels split evaluated before and after"})
    supervision: str = field(default="auto", metadata={
        "help": "where positives come from: qrels, answers (queries with reference answers, no qrels), queries (a "
                "query log), raw_text (passages only: generate queries first); auto decides from the data",
        "choices": list(SUPERVISIONS)})
    check_teacher: bool = field(default=True, metadata={
        "help": "before the label stage, score the pools of up to check_queries queries with a known positive "
                "(distill check-teacher) and stop with exit 3 when the teacher does not beat the retriever; the "
                "label stage reuses those scores"})
    check_queries: int = field(default=50, metadata={"help": "queries the teacher check scores"})
    allow_weak_teacher: bool = field(default=False, metadata={
        "help": "label even when the teacher check finds the teacher no better than the retriever"})
    control: str = field(default="auto", metadata={
        "help": "a control student trained on the same mined pools without the teacher, so the run says what the "
                "teacher added: self-training (each pool's retriever top 1 as the positive; queries without qrels), "
                "hard-labels (the qrels positives and the mined negatives), none; auto: self-training for answers "
                "and queries, hard-labels for qrels, none for raw_text",
        "choices": list(CONTROLS)})
    generate: bool | None = field(default=None, metadata={
        "help": "write synthetic queries first (the same as supervision: raw_text)"})
    pretrain: bool = field(default=False, metadata={
        "help": "continued pretraining of the student on the corpus first (distill pretrain: mlm or tsdae)"})
    simcse: bool = field(default=False, metadata={
        "help": "adapt the student to the corpus with unsupervised SimCSE first (distill train --loss simcse); "
                "every later stage uses the adapted student, the first evaluation the one given"})
    seed: int = field(default=0, metadata={"help": "seed for every stage"})
    show_progress: bool = field(default=True, metadata={"help": "progress bars"})


def load_run(path: Path, overrides: dict[str, Any]) -> tuple[RunSettings, dict[str, dict]]:
    """(top-level settings, each stage section) from the YAML file with command-line overrides applied."""
    loaded = load_yaml_mapping(path)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        target = loaded.setdefault(section, {}) if section else loaded
        if section and not isinstance(target, dict):
            target = loaded[section] = {}
        target[name] = value
    sections: dict[str, dict] = {}
    for name in SECTIONS:
        value = loaded.pop(name, None)
        if name in SWITCHED and isinstance(value, bool):
            loaded[name] = value
            value = None
        if value is not None and not isinstance(value, dict):
            raise UsageError(f"{path}: section {name!r} must be a mapping of {name} settings")
        sections[name] = dict(value or {})
        if name in SWITCHED and value is not None and name not in loaded:
            loaded[name] = True
    run = config_from_mapping(RunSettings, loaded, f"{path}")
    run = dataclasses.replace(run, output_dir=Path(run.output_dir))
    return run, sections


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--train.learning-rate 3e-5 --output-dir=x` -> {"train.learning_rate": 3e-05, "output_dir": "x"} (YAML-typed)."""
    import yaml

    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise UsageError(f"unexpected argument {token!r}: settings look like --key value or --section.key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                # a bare flag switches a setting on; --no-x / --section.no-x off, as the stages' flags do
                section, _, name = key.rpartition(".")
                negated = name.startswith(("no-", "no_"))
                key, value = (section + "." if section else "") + (name[3:] if negated else name), str(not negated)
            else:
                i += 1
                value = tokens[i]
        section, _, name = key.rpartition(".")
        out[(section + "." if section else "") + name.replace("-", "_")] = yaml.safe_load(value)
        i += 1
    return out


