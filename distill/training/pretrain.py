"""`distill pretrain`: continued pretraining of the student's transformer on the domain's own passages, before
any query exists (step 1 of the raw-text recipe: pretrain → SimCSE → generated pairs).

`--objective mlm` (masked language modelling) or `tsdae` (denoising auto-encoder), both in
`training.pretrain_objectives`. Each step takes `--train-batch-size` passages of the corpus in a seeded
order (epoch e's order is a permutation drawn from (seed, e), so any step's passages follow from its
number), and AdamW with warm-up and linear decay updates the student's backbone. The output is the student
with its own pooling and normalisation, a sentence-transformers folder that every later stage takes as
`--model`. `OUTDIR/checkpoint/` (the training checkpoint's format: safetensors and plain tensors, nothing
that runs code) is written every `--save-steps`; `--resume` continues from it, to the same bytes as an
uninterrupted run. The folder must be new or one of our pretraining runs (`--overwrite` removes only what a
run wrote).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from labelers.errors import UsageError

from ..config import add_command, output_settings
from ..data import data_digest, load_corpus_of
from ..files import write_text_atomic
from . import checkpoint
from .pretrain_objectives import OBJECTIVES
from .run_folder import RunFolder, differences
from .optim import make_scheduler, rng_state, set_rng_state

DONE = "pretrain_summary.json"
LOG = "pretrain_log.jsonl"
KIND = "distill pretrain"


@dataclass(kw_only=True)
class PretrainConfig:
    model: str = field(metadata={
        "help": "student to start from: our folder, a sentence-transformers folder or a HF encoder"})
    data: str = field(metadata={"help": "BEIR-style folder (its corpus; queries, if any, are not read)"})
    output: Path = field(metadata={"help": "folder for the adapted student, its checkpoint and log"})
    objective: str = field(default="mlm", metadata={
        "help": "mlm: masked language modelling (15%% of tokens, whole words); tsdae: denoising auto-encoder "
                "(60%% of words deleted, the passage decoded from its pooled vector)", "choices": sorted(OBJECTIVES)})
    mlm_probability: float = field(default=0.15, metadata={"help": "mlm: share of tokens (whole words) predicted"})
    deletion_ratio: float = field(default=0.6, metadata={"help": "tsdae: share of each passage's words deleted"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens per passage (default: the student's passage length)"})
    include_title: bool = field(default=True, metadata={"help": "passages as 'title text'"})
    train_batch_size: int = field(default=16, metadata={"help": "passages per step"})
    epochs: int = field(default=1, metadata={"help": "passes over the corpus"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear warm-up"})
    scheduler: str = field(default="linear", metadata={"help": "decay after warm-up",
                                                       "choices": ["linear", "cosine", "constant"]})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    save_steps: int = field(default=100, metadata={"help": "write the resumable checkpoint every N steps"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of passage order, masks, deletions and dropout"})
    device: str | None = field(default=None, metadata={"volatile": True,
                                                        "help": "torch device (default: cuda if available)"})
    trust_remote_code: bool = field(default=False, metadata={"volatile": True,
                                                             "help": "allow the model's own code to run"})
    resume: bool = field(default=False, metadata={"volatile": True, "help": "continue from OUTDIR/checkpoint/"})
    overwrite: bool = field(default=False, metadata={"volatile": True,
                                                     "help": "delete OUTDIR's previous run and start again"})
    show_progress: bool = field(default=True, metadata={"volatile": True, "help": "progress bar"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: choose from {sorted(OBJECTIVES)}")
        for name in ("mlm_probability", "deletion_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(self, name)}")
        for name in ("train_batch_size", "epochs", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, least in (("max_steps", 1), ("max_length", 2)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be > 0, got {self.learning_rate}")


def passages_of_step(step: int, n_passages: int, batch_size: int, seed: int) -> np.ndarray:
    """The corpus rows step `step` trains on: epoch e = step // per_epoch takes a permutation drawn from
    (seed, e) and cuts it into batches (the last partial one left out)."""
    per_epoch = n_passages // batch_size
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_passages)
    return order[position * batch_size:(position + 1) * batch_size]


def _optimizer(module: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for name, parameter in module.named_parameters():  # shared (tied) tensors once
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, fused=fused or None)


def _settings(cfg: PretrainConfig) -> dict:
    return {**output_settings(cfg), "inputs": {"data": data_digest(cfg.data)}}


def _resume_point(cfg: PretrainConfig, folder: RunFolder, settings: dict) -> Path | None:
    """The checkpoint to continue from (None: step 0); a folder with another run's settings is refused."""
    out = folder.path
    if cfg.overwrite or folder.state == "new":
        return None
    if folder.settings is not None and folder.settings != settings:
        changed = ", ".join(differences(folder.settings, settings))
        raise UsageError(f"{out} holds a pretraining run with other settings ({changed}); --overwrite to start "
                         "again there, or give another --output")
    saved = checkpoint.current_folder(out)
    if saved is not None and not cfg.resume:
        raise UsageError(f"{out} holds an unfinished pretraining run: --resume to continue it, --overwrite to "
                         "start again")
    return saved


def run_pretrain(cfg: PretrainConfig) -> dict:
    from tqdm.auto import tqdm

    from ..model import BiEncoder

    out = Path(cfg.output)
    folder = RunFolder(out, kind=KIND, legacy_markers=())
    folder.check_usable()
    settings = _settings(cfg)
    resume_from = _resume_point(cfg, folder, settings)
    if not cfg.overwrite and (out / DONE).is_file() and folder.state == "ours":
        summary = json.loads((out / DONE).read_text(encoding="utf-8"))
        print(f"{out}: pretraining already complete ({summary['steps']} steps); nothing to do")
        return summary
    started = time.perf_counter()
    corpus, _ = load_corpus_of(cfg.data)
    encoder = BiEncoder.load(cfg.model, trust_remote_code=cfg.trust_remote_code, device=cfg.device)
    max_length = cfg.max_length or encoder.max_length("passage")
    per_epoch = len(corpus) // cfg.train_batch_size
    if per_epoch < 1:
        raise UsageError(f"{cfg.data}: {len(corpus)} passages make no batch of {cfg.train_batch_size}")
    total = cfg.max_steps or per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    module = OBJECTIVES[cfg.objective](encoder, max_length, cfg).to(encoder.device)
    optimizer = _optimizer(module, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    step, log_bytes = 0, 0
    if cfg.overwrite:
        removed = folder.remove_run()
        if removed:
            print(f"--overwrite: removed the previous run's {len(removed)} entries from {out}")
    if resume_from is not None:
        saved_optimizer, rng, state = checkpoint.load(resume_from, module, encoder.device)
        optimizer.load_state_dict(saved_optimizer["optimizer"])
        scheduler.load_state_dict(saved_optimizer["scheduler"])
        set_rng_state(rng)
        step, log_bytes = state["step"], state["log_bytes"]
    folder.claim(settings)
    folder.wrote(LOG)
    with open(out / LOG, "ab") as f:  # what a killed run logged after its checkpoint goes
        f.truncate(log_bytes)
    print(f"{len(corpus)} passages, objective {cfg.objective}, batch {cfg.train_batch_size}, {total} steps, "
          f"max {max_length} tokens" + (f"; resumed at step {step}" if step else ""))
    module.train()
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=not cfg.show_progress)
    losses: list[float] = []
    while step < total:
        rows = passages_of_step(step, len(corpus), cfg.train_batch_size, cfg.seed)
        loss = module(corpus.passages_at(rows, cfg.include_title))
        if not torch.isfinite(loss):
            raise UsageError(f"step {step + 1}: the loss is {float(loss)}; lower --learning-rate")
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if step % cfg.logging_steps == 0 or step == total:
            with open(out / LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "loss": float(np.mean(losses)),
                                    "lr": scheduler.get_last_lr()[0]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                log_bytes = f.tell()
            losses = []
        if step % cfg.save_steps == 0 and step < total:
            folder.wrote(checkpoint.FOLDER, checkpoint.FOLDER + ".tmp", checkpoint.FOLDER + ".old")
            checkpoint.save(out, model=module, optimizer_state={"optimizer": optimizer.state_dict(),
                                                                 "scheduler": scheduler.state_dict()},
                            rng=rng_state(), state={"step": step, "log_bytes": log_bytes})
    bar.close()
    encoder.eval()
    folder.save_model(encoder)
    summary = {"steps": step, "passages": len(corpus), "objective": cfg.objective, "max_length": max_length,
               "seconds": round(time.perf_counter() - started, 1)}
    folder.wrote(DONE)
    write_text_atomic(out / DONE, json.dumps(summary, indent=2) + "\n")
    for name in (checkpoint.FOLDER, checkpoint.FOLDER + ".old", checkpoint.FOLDER + ".tmp"):
        shutil.rmtree(out / name, ignore_errors=True)
    print(f"pretrained {step} steps ({cfg.objective}) in {summary['seconds']} s -> {out}")
    return summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "pretrain", PretrainConfig, run_pretrain,
                help="continued pretraining of the student on the corpus (mlm or tsdae)",
                description=__doc__.split("\n\n")[0])
