"""`distill run CONFIG.yaml`: pretrain → simcse → generate → eval (before) → mine → label → train → eval (after)
→ report.

One YAML file holds every stage's settings. Top-level keys (`RunSettings`)
name the data, the student, the teacher, the run folder and where the record
stages run (`executor: ray`, `workers:`, ...: generate, mine and label); a section per
stage (`generate:`, `mine:`, `label:`, `train:`, `eval:`) holds that stage's
own settings under the names of its command-line flags (`learning_rate` is
`distill train --learning-rate`), so the defaults live in one place, the
stage's config dataclass. Any setting can be given on the command line too:
`distill run run.yaml --train.learning-rate 3e-5 --output-dir runs/b`.

`pretrain` and `simcse` (the raw-text recipe's first two steps, both off by default) run when `pretrain: true`
/ `simcse: true` or a section of their settings is set: continued pretraining of the student on the corpus
(`distill pretrain`, mlm or tsdae), then unsupervised SimCSE on it (`distill train --loss simcse`). Every later
stage starts from the student they adapted (the first evaluation keeps the given one, so the report measures
both).

`generate` runs when `generate: true` (or a `generate:` section) is set, or
when the data has no training queries; then the stages after it train on the
generated folder and evaluate on the original data's `eval_split`.

Each stage writes `OUTPUT_DIR/stages/<name>.json` with a fingerprint of its
settings, the content of the data it reads (a hash of the data files, so a
copied or touched folder is still the same data) and the fingerprints of the
stages whose output it reads: "started" before it runs, "complete" after. A
complete stage whose fingerprint is unchanged is skipped; a started one with
the same fingerprint is resumed (the stages resume themselves); anything else
is run from scratch, and the run says why (which settings, which data, which
earlier stage). So a run killed at any point finishes when started again,
redoing no completed stage, and changing a setting reruns that stage and those
that read its output, not the others (a new `eval_data` reruns only the
evaluations).

Both evaluations also write TREC run files (`eval/before.trec`, `eval/after.trec`);
the report gives the nDCG@10 gain with its bootstrap interval and randomization
p-value over the evaluated queries, so a gain can be told from noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.models import checked_model_source
from labelers.errors import UsageError

from .config import config_from_mapping, load_yaml_mapping
from .evaluate import EvalConfig, format_table
from .evaluate import run as run_eval
from .supervision import SUPERVISIONS, Supervision, choose_supervision, mined_pool_size
from .run_ledger import DataHashes, StageLedger, stage_record, why_changed
from .metrics import PairedComparison
from .stages.generate import SUMMARY as GENERATE_SUMMARY
from .stages.generate import GenerateConfig, run_generate
from .stages.label import LabelConfig, run_label
from .stages.executor import ExecutorSettings
from .stages.mine import MineConfig, run_mine
from .stages.writer import is_complete
from .training.config import TrainConfig
from .training.pretrain import DONE as PRETRAIN_DONE
from .training.pretrain import PretrainConfig, run_pretrain
from .training.command import DONE as TRAIN_DONE
from .training.command import run_train

SECTIONS = ("pretrain", "simcse", "generate", "mine", "label", "train", "eval")
TRAINING_DATA_STAGES = ("mine", "label", "train")  # the stages that read the training queries (checked against them)
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
    generate: bool | None = field(default=None, metadata={
        "help": "write synthetic queries first (the same as supervision: raw_text)"})
    pretrain: bool = field(default=False, metadata={
        "help": "continued pretraining of the student on the corpus first (distill pretrain: mlm or tsdae)"})
    simcse: bool = field(default=False, metadata={
        "help": "adapt the student to the corpus with unsupervised SimCSE first (distill train --loss simcse); "
                "every later stage uses the adapted student, the first evaluation the one given"})
    seed: int = field(default=0, metadata={"help": "seed for every stage"})
    show_progress: bool = field(default=True, metadata={"help": "progress bars"})


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
        Stage("label", "label", dict(**teacher, data=train_data, split=run.split, candidates=out / "candidates.jsonl",
                                     output=out / "labels.jsonl"), reads=trains_on, after=generated + ("mine",)),
        Stage("train", "train", dict(model=student, data=[train_data], labels=[out / "labels.jsonl"],
                                     split=run.split, seed=run.seed, output=out / "model"),
              reads=trains_on, after=adapted + generated + ("label",)),
        Stage("eval_after", "eval", dict(model=str(out / "model"), data=eval_data, split=run.eval_split,
                                         output=out / "eval" / "after.json", run_file=out / "eval" / "after.trec",
                                         baseline_run=out / "eval" / "before.trec", seed=run.seed),
              reads=(eval_data,), after=("train", "eval_before")),
    ]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


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


def stage_config(stage: Stage, run: RunSettings, section: dict, where: str):
    values = dict(stage.values)
    known = {f.name for f in dataclasses.fields(stage.cmd.config_cls)}
    if "show_progress" in known:
        values["show_progress"] = run.show_progress
    values.update(section)
    return config_from_mapping(stage.cmd.config_cls, values, where)


def plan(config_path: Path, overrides: dict[str, Any] | None = None,
         supervision: Supervision | None = None) -> tuple[RunSettings, list[tuple[Stage, Any]], Supervision]:
    """The run's settings, each stage with its full config (defaults filled in) in order, and the supervision.
    `supervision` decides it without looking at the data (tests, configs whose data is not there yet)."""
    run, sections = load_run(config_path, overrides or {})
    asked = "raw_text" if run.generate else run.supervision
    if supervision is None:
        supervision = choose_supervision(run.data, run.split, asked)
    elif run.generate:
        supervision = Supervision("raw_text", "asked for")
    run = dataclasses.replace(run, supervision=supervision.kind, generate=supervision.kind == "raw_text")
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
                raise UsageError(f"{config_path}: {stage.settings_section}: {exc}") from None
    return run, planned, supervision


def _inline_yaml(value: Any) -> str:
    """One value as inline YAML that reads back to the same value (3e-05 is a string to YAML 1.1; 3.0e-05 is not)."""
    import yaml

    text = yaml.safe_dump(_jsonable(value), default_flow_style=True, allow_unicode=True, width=1 << 30).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def print_plan(config_path: Path, overrides: dict[str, Any] | None = None) -> None:
    """What `distill run` would do: the stages in order with what each reads and writes, then every setting of
    the run and of each stage, defaults included, each with where it came from (flag, yaml, run or default)."""
    overrides = overrides or {}
    run, stages, supervision = plan(config_path, overrides)
    implied = supervision.stage_defaults()
    raw = {str(k).replace("-", "_"): v for k, v in load_yaml_mapping(config_path).items()}
    given = {name: {str(k).replace("-", "_") for k in (raw.get(name) or {})} if isinstance(raw.get(name), dict)
             else set() for name in SECTIONS}

    def source(section: str | None, name: str, from_run: dict) -> str:
        if (f"{section}.{name}" if section else name) in overrides:
            return "flag"
        if (name in given.get(section, set())) if section else (name in raw):
            return "yaml"
        if section and name in implied.get(section, {}):
            return "supervision"
        return "run" if name in from_run else "default"

    print(f"# {supervision.describe(mined_pool_size(stages))}")
    print("plan:")
    for stage, cfg in stages:
        reads = [*stage.reads, *(f"<{name}>" for name in stage.after)]
        print(f"  {stage.name} ({stage.command}): {', '.join(reads) or '-'} -> {cfg.output}")
    print(f"  report: eval/before.json, eval/after.json -> {run.output_dir / 'report.png'}")
    print("run:")
    for f in dataclasses.fields(run):
        print(f"  {f.name}: {_inline_yaml(getattr(run, f.name))}  # {source(None, f.name, {})}")
    for stage, cfg in stages:
        print(f"{stage.name}:")
        for f in dataclasses.fields(cfg):
            value = _inline_yaml(getattr(cfg, f.name))
            print(f"  {f.name}: {value}  # "
                  f"{source(stage.settings_section, f.name, {**stage.values, 'show_progress': 1})}")


def check_models(run: RunSettings, planned: list[tuple[Stage, Any]]) -> None:
    """Every model a stage will load, checked before the first stage runs: a mistyped --llm must not wait for
    eval and mine to finish. Models the run itself writes (the trained student) are left out."""
    output = Path(run.output_dir).resolve()
    checked: set[tuple[str, str]] = set()
    for _, cfg in planned:
        for name in ("model", "retriever"):
            value = getattr(cfg, name, None)
            if value and output not in Path(str(value)).resolve().parents and ("encoder", str(value)) not in checked:
                checked.add(("encoder", str(value)))
                checked_model_source(str(value))
        if getattr(cfg, "llm", None) and ("llm", cfg.llm) not in checked:
            checked.add(("llm", cfg.llm))
            cfg.check_llm()


def run_pipeline(config_path: Path, overrides: dict[str, Any] | None = None) -> dict:
    run, planned, supervision = plan(config_path, overrides)
    print(supervision.describe(mined_pool_size(planned)))
    check_models(run, planned)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    ledger = StageLedger(run.output_dir)
    stages = [stage for stage, _ in planned]
    data_hash = DataHashes(run.output_dir / "data_hashes.json")
    fingerprints: dict[str, str] = {}
    started_run = time.perf_counter()
    for number, (stage, cfg) in enumerate(planned, 1):
        record = stage_record(stage, cfg, data_hash, fingerprints, run.output_dir)
        fp = fingerprints[stage.name] = record["fingerprint"]
        state = ledger.read(stage.name)
        header = f"== [{number}/{len(stages) + 1}] {stage.name}"
        if state and state.get("fingerprint") == fp and state.get("status") == "complete" and stage.cmd.done(Path(cfg.output)):
            print(f"{header}: complete, skipped ({state.get('seconds', 0):.0f} s when it ran)")
            continue
        # Changed since this stage last ran here: start it again. Otherwise let the stage resume its own
        # partial output (each stage checks that output's settings itself, and reuses a finished one).
        changed = bool(state and state.get("fingerprint") != fp)
        print(header + (f": {why_changed(state, record)}; running again" if changed else ": resuming" if state
                        else ""), flush=True)
        known = {f.name for f in dataclasses.fields(cfg)}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (("overwrite", changed), ("resume", not changed))
                                         if k in known})
        if state is None or changed:
            ledger.write(stage.name, {**record, "status": "started", "started_at": time.time()})
        began = time.perf_counter()
        report = stage.cmd.runner(cfg)
        seconds = time.perf_counter() - began
        ledger.write(stage.name, {**record, "status": "complete", "finished_at": time.time(),
                                  "seconds": round(seconds, 1), "report": _jsonable(report) if isinstance(report, dict)
                                  else None})
    from .stages.report import write_run_report

    print(f"== [{len(stages) + 1}/{len(stages) + 1}] report")
    before = json.loads((run.output_dir / "eval" / "before.json").read_text(encoding="utf-8"))
    after = json.loads((run.output_dir / "eval" / "after.json").read_text(encoding="utf-8"))
    png = write_run_report(run.output_dir, before, after)
    rows = {"before": before, "after": after}
    print(f"{run.eval_split} split of {run.eval_data or run.data}: {before['num_queries']} queries")
    print(format_table(rows))
    comparison = after.get("ndcg@10_vs_baseline")
    gain = (PairedComparison(**comparison).describe() if comparison
            else f"{100 * (after['ndcg@10'] - before['ndcg@10']):+.2f} points")
    print(f"nDCG@10 {gain}; report: {png}; {time.perf_counter() - started_run:.0f} s this run")
    return {"before": before, "after": after, "comparison": comparison, "gain": gain, "report": str(png)}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="the whole pipeline from one YAML config (resumable; completed stages are skipped)",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings: top-level " + ", ".join(f.name for f in dataclasses.fields(RunSettings))
        + "; sections " + ", ".join(SECTIONS) + " take the flags of `distill <stage> --help` (eval's apply to both "
        "evaluations). Override any on the command line: --section.key value.")
    parser.add_argument("run_config", metavar="CONFIG.yaml", type=Path)
    parser.add_argument("--dry-run", action="store_true",
                        help="print every stage's settings (defaults included) as YAML and stop")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value / --section.key value")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    overrides = [t for t in args.overrides if t != "--dry-run"]
    (print_plan if args.dry_run or len(overrides) < len(args.overrides) else run_pipeline)(
        args.run_config, parse_overrides(overrides))
    return 0
