"""`distill run CONFIG.yaml`: pretrain → simcse → generate → eval (before) → mine → label → train → eval (after)
→ control → eval (control) → report.

This module is the loop: each planned stage is skipped, resumed or run, and the report follows. One YAML file
holds every stage's settings (`run_config`: top-level keys (`RunSettings`) name the data, the student, the
teacher, the run folder and where the record stages run (`executor: ray`, `workers:`, ...); a section per
stage (`generate:`, `mine:`, `label:`, `train:`, `eval:`) holds that stage's own settings under the names of
its command-line flags (`learning_rate` is `distill train --learning-rate`), so the defaults live in one
place, the stage's config dataclass). Any setting can be given on the command line too: `distill run
run.yaml --train.learning-rate 3e-5 --output-dir runs/b`. `run_plan` makes the stages and their configs,
checks every setting before any stage runs, and prints them for `--dry-run`; `run_ledger` records what each
stage did.

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

The `control` student (`control: auto | self-training | hard-labels | none`, `run_plan.CONTROL_TRAIN`) trains
by the `train:` section's plan on the same mined pools without the teacher (the retriever's top 1 as each
query's positive, or the qrels with the mined negatives), reading the candidates and never the labels, so a new
teacher does not rerun it.

The evaluations also write TREC run files (`eval/before.trec`, `eval/after.trec`, `eval/control.trec`); the
report gives, one line each, the student's and the control's nDCG@10 gain over the base and the student's over
the control (what the teacher added), each with its bootstrap interval and randomization p-value over the
evaluated queries, so a gain can be told from noise; `OUTPUT_DIR/report.json` holds them for other tools.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from labelers.models import checked_model_source

from .evaluate import compare_to_run, format_table
from .files import write_json_atomic, write_text_atomic
from .metrics import PairedComparison
from .run_config import SECTIONS, RunSettings, parse_overrides
from .run_ledger import DataHashes, StageLedger, stage_record, why_changed
from .run_plan import CONTROL_NAMES, Stage, jsonable, mined_pool_size, plan_with_control, print_plan


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
    run, planned, supervision, control_line = plan_with_control(config_path, overrides)
    print(supervision.describe(mined_pool_size(planned)))
    print(control_line)
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
                                  "seconds": round(seconds, 1), "report": jsonable(report) if isinstance(report, dict)
                                  else None})
    print(f"== [{len(stages) + 1}/{len(stages) + 1}] report")
    return run_report(run, planned, control_line, time.perf_counter() - started_run)


def compared(comparison: PairedComparison | dict) -> str:
    """"+0.41 nDCG@10 points [+0.16, +0.66], p = 0.002": a paired comparison's mean gain, 95% interval and p."""
    c = comparison if isinstance(comparison, PairedComparison) else PairedComparison(**comparison)
    return (f"{100 * c.mean_difference:+.2f} nDCG@10 points [{100 * c.low:+.2f}, {100 * c.high:+.2f}], "
            f"p = {c.p_value:.2g}")


def run_report(run: RunSettings, planned: list[tuple[Stage, Any]], control_line: str, seconds: float) -> dict:
    """The run's last lines: the metrics table, then one line each for the student against the base, the control
    against the base and the student against the control (paired over the evaluated queries); also written to
    OUTPUT_DIR/report.json for other tools (the model card), and drawn in report.png."""
    from .stages.report import write_run_report

    out = run.output_dir
    before = json.loads((out / "eval" / "before.json").read_text(encoding="utf-8"))
    after = json.loads((out / "eval" / "after.json").read_text(encoding="utf-8"))
    rows = {"before": before, "after": after}
    comparison = after.get("ndcg@10_vs_baseline")
    gain = (PairedComparison(**comparison).describe() if comparison
            else f"{100 * (after['ndcg@10'] - before['ndcg@10']):+.2f} points")

    def against_base(who: str, evaluation: dict) -> str:
        paired = evaluation.get("ndcg@10_vs_baseline")
        if paired:
            return f"{who} against the base: {compared(paired)} ({paired['queries']} queries)"
        return f"{who} against the base: {100 * (evaluation['ndcg@10'] - before['ndcg@10']):+.2f} nDCG@10 points"

    lines = [against_base("the student", after)]
    control = teacher_added = None
    if run.control != "none":
        control = json.loads((out / "eval" / "control.json").read_text(encoding="utf-8"))
        rows["control"] = control
        name = CONTROL_NAMES[run.control]
        lines.append(against_base(f"the control ({name})", control))
        evaluation = next(cfg for stage, cfg in planned if stage.name == "eval_control")
        teacher_added = dataclasses.asdict(teacher_over_control(evaluation, out / "eval" / "after.trec"))
        lines.append(f"the teacher added {compared(teacher_added)}, over {name} ({teacher_added['queries']} "
                     "queries)")
    else:
        lines.append(control_line)
    png = write_run_report(out, before, after, control=control, lines=lines)
    print(f"{run.eval_split} split of {run.eval_data or run.data}: {before['num_queries']} queries")
    print(format_table(rows))
    print(f"nDCG@10 {gain}; report: {png}; {seconds:.0f} s this run")
    for line in lines:
        print(line)

    def metrics(evaluation: dict | None) -> dict | None:
        return None if evaluation is None else {k: v for k, v in evaluation.items() if k != "config"}

    result = {"before": before, "after": after, "comparison": comparison, "gain": gain, "report": str(png),
              "control": None if control is None else {"kind": run.control, "metrics": control,
                                                       "vs_base": control.get("ndcg@10_vs_baseline")},
              "teacher_added": teacher_added, "lines": lines}
    write_json_atomic(out / "report.json", jsonable({
        "supervision": run.supervision, "before": metrics(before), "after": metrics(after),
        "student_vs_base": comparison, "teacher_added": teacher_added, "lines": lines,
        "control": None if control is None else {**result["control"], "metrics": metrics(control)}}))
    write_model_card(run, planned, before, after, control, teacher_added)
    return result


def write_model_card(run: RunSettings, planned: list[tuple[Stage, Any]], before: dict, after: dict,
                     control: dict | None, teacher_added: dict | None) -> None:
    """OUTPUT_DIR/model/README.md, written again now that the run knows where the model came from and what it
    measured (`run_card`: provenance, the teacher check, the three gains, a model-index the Hub shows)."""
    from .run_card import RunFacts, run_model_card
    from .stages.check_teacher import read_check

    configs = {stage.name: cfg for stage, cfg in planned}
    out, train = run.output_dir, configs["train"]
    summary = json.loads((out / "model" / "training_summary.json").read_text(encoding="utf-8"))
    check = read_check(configs["check_teacher"].output) if "check_teacher" in configs else None
    paired = (lambda e: None if not e or not e.get("ndcg@10_vs_baseline") else
              PairedComparison(**e["ndcg@10_vs_baseline"]))
    facts = RunFacts(
        base_model=run.model, teacher=run.llm, supervision=run.supervision, positives=train.positives,
        pool_size=getattr(configs.get("mine"), "pool_size", None), queries_kept=summary["examples"],
        queries_left_out={k: v for k, v in summary.get("skipped", {}).items() if v and "(kept)" not in k},
        eval_data=str(run.eval_data or run.data), eval_split=run.eval_split, eval_queries=before["num_queries"],
        before=before, after=after, gain=paired(after), control_name=None if control is None else run.control,
        control=control, control_gain=paired(control),
        teacher_added=None if teacher_added is None else PairedComparison(**teacher_added),
        check=None if check is None else {k: check[k] for k in ("teacher_first", "retriever_first", "known_from",
                                                                 "verdict") if check.get(k)},
        loss=train.loss)
    write_text_atomic(out / "model" / "README.md", run_model_card(facts))


def teacher_over_control(evaluation, student_run: Path) -> PairedComparison:
    """The student's paired nDCG@10 gain over the control's, from their TREC runs on the split the control's
    evaluation (`evaluation`, an EvalConfig) judged."""
    from .data import load_retrieval_set
    from .data.records import read_trec_run

    qrels = load_retrieval_set(evaluation.data, evaluation.split, skip_invalid=evaluation.skip_invalid).qrels
    student = read_trec_run(student_run).rankings()
    control = read_trec_run(evaluation.run_file).rankings()
    return compare_to_run(student, control, qrels, seed=evaluation.seed)


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
