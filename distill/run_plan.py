"""What a `distill run` will do, as data: the stage graph (`Stage`: which command, the settings the run gives
it, the data it reads, the earlier stages whose output it reads), each stage's full config (the run's values,
then what the supervision implies, then its YAML section, then what the stage fixes), the control student the
supervision allows (`choose_control`), every setting checked against what the data gives before any stage
runs, and the dry-run printout of all of it.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.errors import UsageError

from .config import config_from_mapping, load_yaml_mapping
from .evaluate import EvalConfig
from .evaluate import run as run_eval
from .run_config import SECTIONS, RunSettings, load_run
from .stages.check_teacher import CheckTeacherConfig, run_check_teacher
from .stages.check_teacher import summary_path as check_summary_path
from .stages.executor import ExecutorSettings
from .stages.generate import GenerateConfig, run_generate
from .stages.generated_folder import SUMMARY as GENERATE_SUMMARY
from .stages.label import LabelConfig, run_label
from .stages.mine import MineConfig, run_mine
from .stages.writer import is_complete
from .supervision import Supervision, choose_supervision
from .training.command import DONE as TRAIN_DONE
from .training.command import run_train
from .training.config import TrainConfig
from .training.pretrain import DONE as PRETRAIN_DONE
from .training.pretrain import PretrainConfig, run_pretrain

TRAINING_DATA_STAGES = ("mine", "check_teacher", "label", "train", "control")  # the stages that read the training queries (checked)

# The control student (DESIGN: "what the teacher added"): the student's training plan (the `train:` section) on
# the same mined pools, without the teacher. Its loss and positives are fixed here, and the settings that only
# the teacher's rewards feed are left at their defaults, so a new teacher or label setting never reruns it.
CONTROL_TRAIN = {"self-training": {"loss": "infonce", "positives": "retriever-top1"},
                 "hard-labels": {"loss": "infonce", "positives": "qrels"}}
AUTO_CONTROL = {"qrels": "hard-labels", "answers": "self-training", "queries": "self-training", "raw_text": "none"}
CONTROL_NAMES = {"self-training": "self-training on the same pools",  # what the report says the teacher beat
                 "hard-labels": "hard labels on the same pools"}
CONTROL_HOW = {"self-training": "each pool's retriever top 1 its positive, the rest its negatives",
               "hard-labels": "the qrels positives against the mined negatives"}
TEACHER_ONLY = ("teacher_temperature", "student_temperature", "positive", "min_positive_margin", "false_negatives",
                "false_negative_margin", "answer_negatives", "drop_disputed", "keep_top_margin")


@dataclass(frozen=True)
class Command:
    """A stage command the pipeline can run: its settings class, its runner, and how it says its output is whole."""

    config_cls: type
    runner: Callable[[Any], Any]
    done: Callable[[Path], bool]   # given the stage's `output`


COMMANDS: dict[str, Command] = {
    "generate": Command(GenerateConfig, run_generate, lambda out: (out / GENERATE_SUMMARY).is_file()),
    "eval": Command(EvalConfig, run_eval, Path.is_file),
    "pretrain": Command(PretrainConfig, run_pretrain, lambda out: (out / PRETRAIN_DONE).is_file()),
    "mine": Command(MineConfig, run_mine, is_complete),
    "check_teacher": Command(CheckTeacherConfig, run_check_teacher, lambda out: check_summary_path(out).is_file()),
    "label": Command(LabelConfig, run_label, is_complete),
    "train": Command(TrainConfig, run_train, lambda out: (out / TRAIN_DONE).is_file()),
}


@dataclass(frozen=True)
class Stage:
    """One step of the run, as data: which command, the settings the run gives it (its YAML section comes on top),
    the data sets it reads, its output, and the earlier stages whose output it reads."""

    name: str
    command: str                      # key of COMMANDS
    values: dict                      # settings from the run's top level, before the section's
    reads: tuple[str, ...] = ()       # data sets (not other stages' output)
    after: tuple[str, ...] = ()
    section: str | None = None        # the YAML section of its settings (default: the command's name)
    fixed: dict = field(default_factory=dict)  # settings the stage fixes, whatever its section says (the control's)

    @property
    def settings_section(self) -> str:
        return self.section or self.command

    @property
    def output(self) -> Path:
        return Path(self.values["output"])

    @property
    def cmd(self) -> Command:
        return COMMANDS[self.command]


def _stages(run: RunSettings) -> list[Stage]:
    out = run.output_dir
    # where generate, mine and label run (`executor: ray`, `workers: 8`, ...), a top-level setting of the run
    executor = {f.name: getattr(run, f.name) for f in dataclasses.fields(ExecutorSettings)}
    teacher = dict(llm=run.llm, backend=run.backend, language=run.language, seed=run.seed, **executor)
    eval_data = run.eval_data or run.data
    # the training stages read the user's data, or the generated folder (then they depend on generate)
    train_data = str(out / "generated") if run.generate else run.data
    trains_on = () if run.generate else (run.data,)
    # with `pretrain` / `simcse`, the student adapted to the corpus first is what every later stage starts from
    stages, student, adapted = [], run.model, ()
    if run.pretrain:
        stages.append(Stage("pretrain", "pretrain", dict(model=student, data=run.data, seed=run.seed,
                                                         output=out / "pretrain"), reads=(run.data,)))
        student, adapted = str(out / "pretrain"), ("pretrain",)
    if run.simcse:
        stages.append(Stage("simcse", "train", dict(model=student, data=[run.data], loss="simcse", seed=run.seed,
                                                    output=out / "simcse"), reads=(run.data,), after=adapted,
                            section="simcse"))
        student, adapted = str(out / "simcse"), adapted + ("simcse",)
    generated = ("generate",) if run.generate else ()
    stages += [Stage("generate", "generate", dict(**teacher, data=run.data, output=out / "generated",
                                                  retriever=student), reads=(run.data,), after=adapted)
               ] if run.generate else []
    return stages + [
        Stage("eval_before", "eval", dict(model=run.model, data=eval_data, split=run.eval_split,
                                          output=out / "eval" / "before.json", run_file=out / "eval" / "before.trec"),
              reads=(eval_data,)),
        Stage("mine", "mine", dict(model=student, data=train_data, split=run.split, seed=run.seed,
                                   output=out / "candidates.jsonl", **executor), reads=trains_on,
              after=adapted + generated),
    ] + ([
        # the label section's settings, so the check scores exactly as the label stage will (which reuses it)
        Stage("check_teacher", "check_teacher", dict(
            **teacher, data=train_data, split=run.split, candidates=out / "candidates.jsonl",
            output=out / "check_teacher.jsonl", num_queries=run.check_queries,
            allow_weak_teacher=run.allow_weak_teacher), reads=trains_on, after=generated + ("mine",), section="label"),
    ] if run.check_teacher else []) + [
        Stage("label", "label", dict(**teacher, data=train_data, split=run.split, candidates=out / "candidates.jsonl",
                                     output=out / "labels.jsonl",
                                     reuse=out / "check_teacher.jsonl" if run.check_teacher else None),
              reads=trains_on, after=generated + ("mine",) + (("check_teacher",) if run.check_teacher else ())),
        Stage("train", "train", dict(model=student, data=[train_data], labels=[out / "labels.jsonl"],
                                     split=run.split, seed=run.seed, output=out / "model"),
              reads=trains_on, after=adapted + generated + ("label",)),
        Stage("eval_after", "eval", dict(model=str(out / "model"), data=eval_data, split=run.eval_split,
                                         output=out / "eval" / "after.json", run_file=out / "eval" / "after.trec",
                                         baseline_run=out / "eval" / "before.trec", seed=run.seed),
              reads=(eval_data,), after=("train", "eval_before")),
    ] + ([] if run.control == "none" else [
        # after the student, so its result comes first; it reads the mined pools, never the labels
        Stage("control", "train", dict(model=student, data=[train_data], split=run.split, seed=run.seed,
                                       output=out / "control"),
              reads=trains_on, after=adapted + generated + ("mine",), section="train",
              fixed=control_settings(run.control, out / "candidates.jsonl")),
        Stage("eval_control", "eval", dict(model=str(out / "control"), data=eval_data, split=run.eval_split,
                                           output=out / "eval" / "control.json",
                                           run_file=out / "eval" / "control.trec",
                                           baseline_run=out / "eval" / "before.trec", seed=run.seed),
              reads=(eval_data,), after=("control", "eval_before")),
    ])


def control_settings(kind: str, candidates: Path) -> dict:
    """The train settings the control fixes: the mined candidates instead of the labels, its loss and positives,
    and the teacher-only settings at their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TEACHER_ONLY}
    return {**defaults, "labels": None, "candidates": [candidates], **CONTROL_TRAIN[kind]}


def choose_control(asked: str, supervision: Supervision, data: str) -> tuple[str, str]:
    """(the control the run trains, why); a control the supervision makes impossible is refused."""
    if asked == "auto":
        kind = AUTO_CONTROL[supervision.kind]
        return kind, f"auto for supervision {supervision.kind}"
    labelled = supervision.supplied(data).labelled
    if asked == "hard-labels" and not labelled:
        raise UsageError(f"control: hard-labels trains on the qrels positives; supervision {supervision.kind} has no "
                         "qrels: use control self-training (or auto)")
    if asked == "self-training" and labelled:
        raise UsageError(f"control: self-training takes each pool's retriever top 1 as its positive, for queries "
                         f"without qrels; supervision {supervision.kind} has qrels, whose positives mining leaves out "
                         "of the pools: use control hard-labels (or auto)")
    return asked, "asked for"


def describe_control(run: RunSettings, planned: list[tuple[Stage, Any]], why: str, config_path: Path) -> str:
    """One line: which control student the run trains, or that it trains none (and how to ask for one)."""
    if run.control == "none":
        line = f"control: none ({why}): this run does not say what the teacher added over training on the same pools"
        if run.supervision == "raw_text":  # the queries are the teacher's own: no student trains without it
            return line + " without it (the teacher wrote the training queries)"
        kind = AUTO_CONTROL[run.supervision]
        return line + (f" without it; `distill run {config_path} --control {kind}` adds that student (about one "
                       "more train and eval; completed stages are skipped)")
    line = (f"control: {run.control} ({why}): a student trained on the same mined pools without the teacher, by "
            f"InfoNCE with {CONTROL_HOW[run.control]}")
    label = next((cfg for stage, cfg in planned if stage.name == "label"), None)
    if getattr(label, "shard", None):  # the student trains on the labelled shard, the control on every pool
        line += (f"; note: the label stage labels shard {label.shard} of the queries only, the control trains on "
                 "every mined pool")
    return line


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def stage_config(stage: Stage, run: RunSettings, section: dict, where: str):
    values = dict(stage.values)
    known = {f.name for f in dataclasses.fields(stage.cmd.config_cls)}
    if "show_progress" in known:
        values["show_progress"] = run.show_progress
    values.update(section)
    values.update(stage.fixed)
    return config_from_mapping(stage.cmd.config_cls, values, where)


def plan(config_path: Path, overrides: dict[str, Any] | None = None,
         supervision: Supervision | None = None) -> tuple[RunSettings, list[tuple[Stage, Any]], Supervision]:
    """The run's settings (its control resolved), each stage with its full config (defaults filled in) in order,
    and the supervision. `supervision` decides it without looking at the data (tests, configs whose data is not
    there yet)."""
    run, planned, supervision, _ = plan_with_control(config_path, overrides, supervision)
    return run, planned, supervision


def plan_with_control(config_path: Path, overrides: dict[str, Any] | None = None,
                      supervision: Supervision | None = None
                      ) -> tuple[RunSettings, list[tuple[Stage, Any]], Supervision, str]:
    """`plan`, and one line on the control student it trains (or that it trains none)."""
    run, sections = load_run(config_path, overrides or {})
    asked = "raw_text" if run.generate else run.supervision
    if supervision is None:
        supervision = choose_supervision(run.data, run.split, asked)
    elif asked != "auto":  # the config names its supervision: that one, still without looking at the data
        supervision = Supervision(asked, "asked for")
    run = dataclasses.replace(run, supervision=supervision.kind, generate=supervision.kind == "raw_text")
    try:
        control, why = choose_control(run.control, supervision, run.data)
    except UsageError as exc:
        raise UsageError(f"{config_path}: {exc}") from None
    run = dataclasses.replace(run, control=control)
    implied = supervision.stage_defaults()
    planned = [(stage, stage_config(stage, run, {**implied.get(stage.settings_section, {}),
                                                 **sections[stage.settings_section]},
                                    f"{config_path}: {stage.settings_section}"))
               for stage in _stages(run)]
    # settings the data makes impossible or a no-op are refused now, not after the stages before them ran
    supplied = supervision.supplied(run.data)
    for stage, cfg in planned:
        if stage.name in TRAINING_DATA_STAGES:
            try:
                cfg.check_against(supplied)
            except UsageError as exc:
                raise UsageError(f"{config_path}: {stage.name if stage.fixed else stage.settings_section}: {exc}") \
                    from None
    return run, planned, supervision, describe_control(run, planned, why, config_path)


def mined_pool_size(planned: list[tuple[Stage, Any]]) -> int | None:
    """The planned mine stage's pool size (None without a mine stage); a YAML section may change the default."""
    return next((getattr(cfg, "pool_size", None) for stage, cfg in planned if stage.name == "mine"), None)


def _inline_yaml(value: Any) -> str:
    """One value as inline YAML that reads back to the same value (3e-05 is a string to YAML 1.1; 3.0e-05 is not)."""
    import yaml

    text = yaml.safe_dump(jsonable(value), default_flow_style=True, allow_unicode=True, width=1 << 30).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def print_plan(config_path: Path, overrides: dict[str, Any] | None = None) -> None:
    """What `distill run` would do: the stages in order with what each reads and writes, then every setting of
    the run and of each stage, defaults included, each with where it came from (flag, yaml, run or default)."""
    overrides = overrides or {}
    run, stages, supervision, control = plan_with_control(config_path, overrides)
    implied = supervision.stage_defaults()
    raw = {str(k).replace("-", "_"): v for k, v in load_yaml_mapping(config_path).items()}
    given = {name: {str(k).replace("-", "_") for k in (raw.get(name) or {})} if isinstance(raw.get(name), dict)
             else set() for name in SECTIONS}

    def source(section: str | None, name: str, from_run: dict, fixed: dict | None = None) -> str:
        if fixed and name in fixed:
            return "control"
        if (f"{section}.{name}" if section else name) in overrides:
            return "flag"
        if (name in given.get(section, set())) if section else (name in raw):
            return "yaml"
        if section and name in implied.get(section, {}):
            return "supervision"
        return "run" if name in from_run else "default"

    print(f"# {supervision.describe(mined_pool_size(stages))}")
    print(f"# {control}")
    print("plan:")
    for stage, cfg in stages:
        reads = [*stage.reads, *(f"<{name}>" for name in stage.after)]
        print(f"  {stage.name} ({stage.command}): {', '.join(reads) or '-'} -> {cfg.output}")
    evals = ["eval/before.json", "eval/after.json"] + (["eval/control.json"] if run.control != "none" else [])
    print(f"  report: {', '.join(evals)} -> {run.output_dir / 'report.png'}, {run.output_dir / 'report.json'}")
    print("run:")
    for f in dataclasses.fields(run):
        print(f"  {f.name}: {_inline_yaml(getattr(run, f.name))}  # {source(None, f.name, {})}")
    for stage, cfg in stages:
        print(f"{stage.name}:")
        for f in dataclasses.fields(cfg):
            value = _inline_yaml(getattr(cfg, f.name))
            print(f"  {f.name}: {value}  # "
                  f"{source(stage.settings_section, f.name, {**stage.values, 'show_progress': 1}, stage.fixed)}")


