"""`distill pretrain`: continued pretraining of the student's transformer on the domain's own passages, before
any query exists (step 1 of the raw-text recipe: pretrain → SimCSE → generated pairs).

`--objective mlm` (masked language modelling) or `tsdae` (denoising auto-encoder), both in
`training.pretrain_objectives`. Each batch is `--train-batch-size` passages of the corpus in a seeded
order (epoch e's order is a permutation drawn from (seed, e), so batch b's passages follow from b), split
over the processes under `torchrun`; an MLM batch whose draw masks no token (short passages) is skipped and
counted in the summary. The steps run in the loop `distill train` runs in (`training.loop`): AdamW with
warm-up and decay over the backbone and the objective's head, gradient accumulation, mixed precision on
GPUs, a NaN or infinite loss stopping the run with its last checkpoint kept (exit 1). The output is the student
with its own pooling and normalisation, a sentence-transformers folder that every later stage takes as
`--model`. `OUTDIR/checkpoint/` (the training checkpoint's format: safetensors and plain tensors, nothing
that runs code) is written every `--save-steps`; `--resume` continues from it, to the same bytes as an
uninterrupted run. The folder must be new or one of our pretraining runs (`--overwrite` removes only what a
run wrote).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from labelers.errors import UsageError

from ..config import add_command, output_settings
from ..data import data_digest, load_corpus_of
from .checkpoint import JsonState
from .distributed import Distributed, run_distributed, same_on_every_rank, sum_over_ranks
from .loop import Loop
from .optim import autocast_dtype
from .pretrain_objectives import OBJECTIVES
from .run_folder import RunFolder, end_run, finished_summary, resume_point

logger = logging.getLogger(__name__)

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
    train_batch_size: int = field(default=16, metadata={"help": "passages per batch over all devices"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    epochs: int = field(default=1, metadata={"help": "passes over the corpus"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear warm-up"})
    scheduler: str = field(default="linear", metadata={"help": "decay after warm-up",
                                                       "choices": ["linear", "cosine", "constant"]})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    precision: str = field(default="auto", metadata={"help": "auto: bf16 (else fp16) autocast on GPUs, fp32 on CPUs",
                                                     "choices": ["auto", "fp32", "bf16", "fp16"]})
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
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UsageError(f"--precision {self.precision!r}: choose from auto, fp32, bf16, fp16")
        for name in ("train_batch_size", "gradient_accumulation_steps", "epochs", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, least in (("max_steps", 1), ("max_length", 2)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be > 0, got {self.learning_rate}")


def passages_of_batch(batch: int, n_passages: int, batch_size: int, seed: int) -> np.ndarray:
    """The corpus rows of batch `batch` (counted from the run's start, skipped ones included): epoch
    e = batch // per_epoch takes a permutation drawn from (seed, e) and cuts it into batches (the last partial
    one left out)."""
    per_epoch = n_passages // batch_size
    epoch, position = divmod(batch, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_passages)
    return order[position * batch_size:(position + 1) * batch_size]


def _settings(cfg: PretrainConfig) -> dict:
    return {**output_settings(cfg), "inputs": {"data": data_digest(cfg.data)}}


@dataclass
class PretrainState(JsonState):
    """Where a pretraining run is; the checkpoint saves it."""

    step: int = 0        # optimizer steps done
    batch: int = 0       # batches of the passage order drawn, skipped ones included: the next is `batch`
    skipped: int = 0     # batches whose draw left the loss nothing to predict (an MLM draw that masked nothing)
    log_bytes: int = 0   # pretrain_log.jsonl is cut back to this on resume


MAX_SKIPPED_IN_A_ROW = 100


class Pretrainer(Loop):
    """The corpus's passages in their seeded order under the `--objective`; `Loop` steps it."""

    log_name, progress_name = LOG, "pretrain"
    stop_advice = "Lower --learning-rate (or raise --warmup-ratio)"

    def __init__(self, cfg: PretrainConfig, ctx: Distributed, folder: RunFolder):
        from ..model import BiEncoder

        if cfg.train_batch_size % ctx.world_size:
            raise UsageError(f"--train-batch-size {cfg.train_batch_size} must be a multiple of the "
                             f"{ctx.world_size} processes")
        self.cfg, self.ctx = cfg, ctx
        self.corpus, _ = load_corpus_of(cfg.data)
        device = cfg.device or (f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
        encoder = BiEncoder.load(cfg.model, trust_remote_code=cfg.trust_remote_code, device=device)
        self.max_length = cfg.max_length or encoder.max_length("passage")
        self.local_batch = cfg.train_batch_size // ctx.world_size
        per_epoch = len(self.corpus) // cfg.train_batch_size
        if per_epoch < cfg.gradient_accumulation_steps:
            raise UsageError(f"{cfg.data}: {len(self.corpus)} passages make {per_epoch} batches of "
                             f"{cfg.train_batch_size}, fewer than one step of --gradient-accumulation-steps "
                             f"{cfg.gradient_accumulation_steps}")
        torch.manual_seed(cfg.seed)
        self.objective = OBJECTIVES[cfg.objective](encoder, self.max_length, cfg).to(encoder.device)
        super().__init__(cfg, ctx, folder, encoder=encoder, module=self.objective,
                         total_steps=cfg.max_steps or per_epoch * cfg.epochs // cfg.gradient_accumulation_steps,
                         amp=autocast_dtype(cfg.precision, encoder.device))
        self.state = PretrainState()
        self.logged = 0  # losses already in a log line

    def draw_next(self) -> tuple[dict[str, torch.Tensor], int]:
        """The next batch with something to predict (its draws over the whole global batch) and how many tokens
        it predicts; a batch with none is skipped and counted."""
        cfg, state = self.cfg, self.state
        for _ in range(MAX_SKIPPED_IN_A_ROW):
            rows = passages_of_batch(state.batch, len(self.corpus), cfg.train_batch_size, cfg.seed)
            state.batch += 1
            drawn = self.objective.draw(self.corpus.passages_at(rows, cfg.include_title))
            predicted = self.objective.predicted(drawn)
            if not same_on_every_rank(predicted, self.ctx, self.device):
                raise RuntimeError(f"batch {state.batch - 1}: the processes drew different masks or deletions "
                                   "(their random states parted)")
            if predicted:
                return drawn, predicted
            state.skipped += 1
            logger.info("batch %d: %s; skipped", state.batch - 1, self.objective.skip_reason)
        raise UsageError(f"{cfg.data}: {MAX_SKIPPED_IN_A_ROW} batches in a row left --objective {cfg.objective} "
                         f"nothing to predict ({self.objective.skip_reason}): the passages are too short for "
                         "--mlm-probability; raise it or --train-batch-size")

    # ----- the loop's hooks -----------------------------------------------------------------------------------
    def backward_next(self) -> tuple[float, dict[str, float]]:
        drawn, predicted = self.draw_next()
        first = self.ctx.rank * self.local_batch
        mine = {key: value[first:first + self.local_batch] for key, value in drawn.items()}
        with self.autocast():
            share = self.objective(mine, predicted)  # this rank's share of the global batch's mean
        value = float(sum_over_ranks(share.detach(), self.ctx))
        parts = {self.cfg.objective: value}
        self.check_finite(value, parts)
        self.scaled_backward(share)
        return value, parts

    def log_record(self, losses: list[float], terms: dict[str, float]) -> dict:
        record = {"step": self.state.step, "loss": float(np.mean(losses[self.logged:])),
                  "lr": self.scheduler.get_last_lr()[0]}  # the mean since the last line
        self.logged = len(losses)
        return record

    def restore(self, saved: dict, folder: Path) -> None:
        self.state = PretrainState.from_json(saved["state"])

    def train(self) -> None:
        self.objective.train()
        self.run_steps()


def run_pretrain(cfg: PretrainConfig) -> dict:
    return run_distributed(cfg.device, lambda ctx: _run_pretrain(cfg, ctx))


def _run_pretrain(cfg: PretrainConfig, ctx: Distributed) -> dict:
    out = Path(cfg.output)
    folder = RunFolder(out, kind=KIND, legacy_markers=())
    folder.check_usable()
    settings = _settings(cfg)
    summary = finished_summary(folder, DONE, settings, cfg.overwrite)
    if summary is not None:
        print(f"{out}: pretraining already complete ({summary['steps']} steps); nothing to do")
        return summary
    resume_from = resume_point(folder, settings, LOG, cfg.resume, cfg.overwrite)
    started = time.perf_counter()
    trainer = Pretrainer(cfg, ctx, folder)  # reads the corpus and the student: nothing is removed before this
    trainer.begin(settings, resume_from)
    if ctx.is_main:
        print(f"{len(trainer.corpus)} passages, objective {cfg.objective}, batch {cfg.train_batch_size}"
              + (f" x {ctx.world_size} processes" if ctx.world_size > 1 else "")
              + f", {trainer.total_steps} steps, max {trainer.max_length} tokens"
              + (f"; resumed at step {trainer.state.step}" if trainer.state.step else ""))
    trainer.train()
    trainer.encoder.eval()
    trainer.save_model()
    summary = {"steps": trainer.state.step, "passages": len(trainer.corpus), "objective": cfg.objective,
               "max_length": trainer.max_length, "skipped": {trainer.objective.skip_reason: trainer.state.skipped},
               "processes": ctx.world_size, "seconds": round(time.perf_counter() - started, 1)}
    if ctx.is_main:
        end_run(folder, DONE, summary)
        print(f"pretrained {summary['steps']} steps ({cfg.objective}) in {summary['seconds']} s -> {out}"
              + (f"; {trainer.state.skipped} {trainer.objective.skip_reason} skipped" if trainer.state.skipped
                 else ""))
    return summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "pretrain", PretrainConfig, run_pretrain,
                help="continued pretraining of the student on the corpus (mlm or tsdae)",
                description=__doc__.split("\n\n")[0])
