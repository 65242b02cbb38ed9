"""`distill train`: distil a bi-encoder from teacher labels and hard negatives (the command; the loop is
`training.trainer`).

Each step takes B queries (the global batch, split over devices under
`torchrun`), each with its labelled positive and `--num-negatives` candidates
(`training.batches`), embeds them with the student, gathers every device's
embeddings (`training.distributed`) and minimises the `--loss` objective
(`distill.losses`, e.g. `rank_filter` or `kl:1.0,infonce:0.2`) over the scores
s(q, k) = <e_q, e_k> / τ. AdamW with warm-up and linear/cosine decay,
gradient accumulation, mixed precision on GPUs, optional gradient
checkpointing and GradCache (Gao et al. 2021: embeddings computed without
gradients chunk by chunk, the loss's gradients w.r.t. them cached, then each
chunk re-encoded with gradients), so big batches fit small memory.

Negatives can follow the student (`training.remine`: ANCE refreshes every
`--remine-steps`, Conan-Embedding's dynamic rule with `--dynamic-remine`).
A dev split is evaluated every `--eval-steps`; the best model goes to
OUTDIR/best, the last to OUTDIR (a sentence-transformers folder with a model
card), the curves to OUTDIR/train_log.jsonl and OUTDIR/training.png.
`OUTDIR/checkpoint/` (safetensors, plain tensors and JSON: `training.checkpoint`)
is written every `--save-steps`; `--resume` continues from it with the same data
order and random state. Before the first step every input is checked, the
step's activation memory is measured (`training.memory`: GradCache goes on
when it would not fit), and the folder must be new or one of our runs
(`training.run_folder`: `--overwrite` removes only what a run wrote).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from ..config import add_command, output_settings
from ..data import data_digest
from ..data.records import read_labels, read_train_log
from ..evaluate import format_table
from ..files import file_digest, write_text_atomic
from .config import TrainConfig
from .distributed import Distributed, run_distributed
from .report import model_card, plot_training
from .run_folder import RunFolder, end_run, finished_summary, resume_point
from .trainer import LOG, Trainer

DONE = "training_summary.json"


def run_settings(cfg: TrainConfig) -> dict:
    """What a run computes from: its settings (less `VOLATILE`) and the content of every file it reads."""
    settings = output_settings(cfg)
    settings["inputs"] = {
        "data": [data_digest(d) for d in cfg.data],
        "labels": [file_digest(p) for p in cfg.labels] if cfg.labels else None,
        "candidates": [file_digest(p) for p in cfg.candidates] if cfg.candidates else None,
        "eval_data": data_digest(cfg.eval_data or cfg.data[0]) if cfg.eval_split else None}
    return settings


def run_train(cfg: TrainConfig) -> dict:
    return run_distributed(cfg.device, lambda ctx: _run_train(cfg, ctx))


def _run_train(cfg: TrainConfig, ctx: Distributed) -> dict:
    out = Path(cfg.output)
    folder = RunFolder(out)
    folder.check_usable()  # a folder of someone else's files is never trained into, nor emptied
    settings = run_settings(cfg)
    summary = finished_summary(folder, DONE, settings, cfg.overwrite)
    if summary is not None:
        print(f"{out}: training already complete (step {summary['steps']}); nothing to do")
        return summary
    resume_from = resume_point(folder, settings, LOG, cfg.resume, cfg.overwrite)
    started = time.perf_counter()
    trainer = Trainer(cfg, ctx, folder)  # reads and checks every input: nothing is removed before this
    trainer.begin(settings, resume_from)
    if ctx.is_main:
        teacher_note = f", teacher labels {[str(p) for p in cfg.labels]}" if cfg.labels else ""
        print(f"{len(trainer.examples)} examples ({', '.join(f'{v} {k}' for k, v in trainer.skipped.items() if v) or 'none skipped'})"
              f", groups of {trainer.group_size}, batch {cfg.train_batch_size} x {ctx.world_size} process(es), "
              f"{trainer.total_steps} steps, objective {trainer.objective}{teacher_note}"
              + (f"; {trainer.plan.left_out} examples do not fill the last batch of an epoch"
                 if trainer.plan.left_out else "")
              + (f"; resumed at step {trainer.state.step}" if resume_from is not None else ""))
        if trainer.memory_note:
            print(trainer.memory_note)
    after = trainer.train()
    trainer.save_model()
    summary = {"steps": trainer.state.step, "examples": len(trainer.examples), "skipped": trainer.skipped,
               "objective": str(trainer.objective), "before": trainer.state.before, "after": after,
               "best": trainer.state.best, "seconds": round(time.perf_counter() - started, 1),
               "processes": ctx.world_size, "remine_rounds": trainer.state.remine_rounds}
    summary["memory"] = {"step_activation_gib": round(trainer.memory.step_bytes / 2 ** 30, 3),
                         "budget_gib": round(trainer.memory.budget_bytes / 2 ** 30, 3),
                         "grad_cache_chunk_size": trainer.grad_cache_chunk}
    summary["throughput"] = trainer.throughput()
    if ctx.is_main:
        teacher = None
        if cfg.labels:
            first = next(iter(read_labels(cfg.labels[0])), None)
            teacher = first.model if first else None
        folder.wrote("README.md", "training.png")
        write_text_atomic(out / "README.md", model_card(
            base_model=cfg.model, data=list(cfg.data), labels=[str(p) for p in (cfg.labels or cfg.candidates or [])],
            teacher=teacher, objective=str(trainer.objective), settings=asdict(cfg), before=trainer.state.before,
            after=after, eval_split=cfg.eval_split))
        plot_training(read_train_log(out / LOG), out / "training.png", cfg.eval_metric)
        end_run(folder, DONE, summary)
        if trainer.state.before and after:
            print(format_table({"base": trainer.state.before, "trained": after}))
        speed = summary["throughput"]
        print(f"trained {summary['steps']} steps in {summary['seconds']} s -> {out}"
              + (f" ({speed['tokens_per_s']:.0f} tokens/s, {speed['padding_fraction']:.1%} padding)"
                 if speed["tokens_per_s"] else ""))
    return summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "train", TrainConfig, run_train,
                help="distil a bi-encoder from teacher labels and hard negatives",
                description=__doc__.split("\n\n")[0])
