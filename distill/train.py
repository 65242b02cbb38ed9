"""`distill train`: distil a bi-encoder from teacher labels and hard negatives.

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
`OUTDIR/checkpoint.pt` is written atomically every `--save-steps`;
`--resume` continues from it with the same data order and random state.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import add_command
from .data import load_retrieval_set
from .encoding import EncodingSettings
from .evaluate import evaluate, format_table
from .losses import LOSSES, LossInputs, Objective
from .negatives import SamplingParams
from .stages.mine import read_labels
from .training.batches import EpochPlan, Group, false_negative_mask, plan_epoch
from .training.distributed import (Distributed, barrier, broadcast_object, close_distributed, gather_with_local_grad,
                                   init_distributed, sum_gradients)
from .training.remine import RemineSettings, ScoreTracker, due, remine
from .training.report import model_card, plot_training, read_log
from .training.setup import autocast_dtype, load_examples, make_optimizer, make_scheduler, rng_state, set_rng_state

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
DONE = "training_summary.json"


@dataclass(kw_only=True)
class TrainConfig(EncodingSettings):
    model: str = field(metadata={"help": "student to start from: our folder, a sentence-transformers folder or a HF encoder"})
    data: list[str] = field(metadata={"help": "BEIR-style folder(s); several = several tasks, one task per batch"})
    output: Path = field(metadata={"help": "folder for the trained model, checkpoints, log and plot"})
    labels: list[Path] | None = field(default=None, metadata={
        "help": "teacher labels (distill label), one per --data; rewards for the soft-label losses"})
    candidates: list[Path] | None = field(default=None, metadata={
        "help": "instead of --labels: candidates (distill mine), one per --data; hard labels only"})
    split: str = field(default="train", metadata={"help": "qrels split to train on"})
    loss: str = field(default="rank_filter", metadata={
        "help": f"objective: loss[:weight],...  from {sorted(LOSSES)} (e.g. rank_filter, kl:1.0,infonce:0.2)"})
    temperature: float = field(default=0.05, metadata={"help": "τ in s(q,k) = <e_q, e_k> / τ"})
    teacher_temperature: float = field(default=1.0, metadata={"help": "T_t in softmax(r / T_t)"})
    student_temperature: float = field(default=1.0, metadata={"help": "T_s in the KL loss's softmax(s / T_s)"})
    num_negatives: int = field(default=7, metadata={"help": "negatives per query (group size - 1); 0 = in-batch only"})
    positive: str = field(default="first", metadata={"help": "slot-0 positive when a query has several: the first "
                                                               "or the one the teacher rewards most",
                                                       "choices": ["first", "teacher"]})
    drop_disputed: bool = field(default=False, metadata={
        "help": "with --labels: leave out a query whose teacher rewards one of its negatives at least as high as its "
                "positive (for synthetic queries: one that fits another passage as well; InPars-v2's reranker filter)"})
    keep_top_margin: float = field(default=1.0, metadata={
        "help": "with --labels: train on this share of the queries, those the teacher confirms most clearly (largest "
                "r(q,d+) - max r(q,d-); InPars-v2 keeps its reranker's top synthetic queries); 1.0 keeps all"})
    batch_dedup: str = field(default="positives", metadata={
        "help": "what may not repeat within a batch: positives (no positive is another query's key) or strict "
                "(no passage twice) or none; a query's own positives are masked out of its in-batch keys in every mode",
                "choices": ["positives", "strict", "none"]})
    train_batch_size: int = field(default=32, metadata={"help": "queries per step over all devices"})
    epochs: int = field(default=1, metadata={"help": "passes over the examples"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear warm-up"})
    scheduler: str = field(default="linear", metadata={"help": "decay after warm-up",
                                                       "choices": ["linear", "cosine", "constant"]})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    precision: str = field(default="auto", metadata={"help": "auto: bf16 (else fp16) autocast on GPUs, fp32 on CPUs",
                                                     "choices": ["auto", "fp32", "bf16", "fp16"]})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    grad_cache_chunk_size: int | None = field(default=None, metadata={
        "help": "GradCache: encode this many texts at a time with cached gradients (big batches, small memory)"})
    eval_split: str | None = field(default=None, metadata={"help": "qrels split evaluated during training (e.g. dev)"})
    eval_data: str | None = field(default=None, metadata={"help": "folder of --eval-split (default: the first --data)"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: before and after only)"})
    eval_metric: str = field(default="ndcg@10", metadata={"help": "metric that picks the best checkpoint"})
    save_steps: int = field(default=100, metadata={"help": "write the resumable checkpoint every N steps"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of data order, negative draws and dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTDIR/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "delete OUTDIR's previous run and start again"})
    remine_steps: int = field(default=0, metadata={"help": "ANCE: re-mine every pool with the student every N steps"})
    dynamic_remine: bool = field(default=False, metadata={
        "help": "Conan-Embedding: re-mine examples whose mean negative score s has s*1.15 < s_0 and |s| < 0.8"})
    dynamic_remine_steps: int = field(default=100, metadata={"help": "how often the dynamic rule is checked"})
    remine_strategy: str = field(default="dense", metadata={"help": "how re-mined negatives are picked",
                                                            "choices": ["dense", "simans"]})
    remine_pool_size: int | None = field(default=None, metadata={"help": "candidates kept per query when re-mining "
                                                                         "(default: --num-negatives)"})
    range_min: int = field(default=0, metadata={"help": "re-mining: skip the student's first N candidates"})
    range_max: int = field(default=50, metadata={"help": "re-mining: consider candidates up to this rank"})
    simans_a: float = field(default=0.5, metadata={"help": "re-mining with simans: sharpness a"})
    simans_b: float = field(default=0.0, metadata={"help": "re-mining with simans: shift b"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip and count invalid records instead of stopping"})
    show_progress: bool = field(default=True, metadata={"help": "progress bar"})

    def __post_init__(self) -> None:
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        for name in ("labels", "candidates"):
            value = getattr(self, name)
            if value is not None:
                value = [value] if isinstance(value, (str, Path)) else list(value)
                if len(value) != len(self.data):
                    raise ValueError(f"--{name} needs one file per --data ({len(self.data)}), got {len(value)}")
                setattr(self, name, [Path(v) for v in value])
        if self.labels and self.candidates:
            raise ValueError("give --labels or --candidates, not both")
        if (self.drop_disputed or self.keep_top_margin < 1.0) and not self.labels:
            raise ValueError("--drop-disputed and --keep-top-margin need the teacher's rewards: give --labels "
                             "(from distill label)")
        if not 0.0 < self.keep_top_margin <= 1.0:
            raise ValueError(f"--keep-top-margin must be in (0, 1], got {self.keep_top_margin}")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1 or self.num_negatives < 0:
            raise ValueError("--train-batch-size and --gradient-accumulation-steps must be >= 1, "
                             "--num-negatives >= 0")


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: Distributed):
        self.cfg, self.ctx = cfg, ctx
        if cfg.train_batch_size % ctx.world_size:
            raise ValueError(f"--train-batch-size {cfg.train_batch_size} must be a multiple of the "
                             f"{ctx.world_size} processes")
        self.objective = Objective.parse(cfg.loss)
        if self.objective.needs_rewards and not cfg.labels:
            raise ValueError(f"--loss {cfg.loss} needs teacher rewards: give --labels (from distill label)")
        self.rsets, self.examples, self.skipped = load_examples(cfg)
        device = cfg.device or (f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        self.encoder = cfg.load_encoder(cfg.model).to(device)
        self.device = self.encoder.device
        if cfg.gradient_checkpointing:
            self.encoder.backbone.gradient_checkpointing_enable()
        self.amp = autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.optimizer = make_optimizer(self.encoder, cfg)
        self.group_size = 1 + cfg.num_negatives
        self.local_batch = cfg.train_batch_size // ctx.world_size
        self.plan = self.new_plan(0)
        per_epoch = len(self.plan.batches) // cfg.gradient_accumulation_steps
        if per_epoch < 1:
            raise ValueError(f"{len(self.examples)} examples make no full batch of {cfg.train_batch_size} under "
                             f"--batch-dedup {cfg.batch_dedup} (topically clustered data: try --batch-dedup none)")
        self.total_steps = cfg.max_steps or per_epoch * cfg.epochs
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.remine_settings = RemineSettings(
            strategy=cfg.remine_strategy, pool_size=cfg.remine_pool_size or max(cfg.num_negatives, 1),
            params=SamplingParams(range_min=cfg.range_min, range_max=cfg.range_max, simans_a=cfg.simans_a,
                                  simans_b=cfg.simans_b),
            seed=cfg.seed, from_labels=self.objective.needs_rewards, include_title=cfg.include_title,
            batch_size=cfg.batch_size)
        self.tracker = ScoreTracker()
        self.state = {"step": 0, "epoch": 0, "batch": 0, "remine_rounds": 0, "best": None, "before": None,
                      "log_bytes": 0}
        self.eval_rset = (load_retrieval_set(cfg.eval_data or cfg.data[0], cfg.eval_split,
                                             skip_invalid=cfg.skip_invalid) if cfg.eval_split else None)
        self.out = Path(cfg.output)

    # ----- data ----------------------------------------------------------------------------
    def new_plan(self, epoch: int, indices: list[int] | None = None, salt: int = 0) -> EpochPlan:
        return plan_epoch(self.examples, epoch=epoch, seed=self.cfg.seed + 1_000_003 * salt,
                          batch_size=self.cfg.train_batch_size, num_negatives=self.cfg.num_negatives, indices=indices,
                          dedup=self.cfg.batch_dedup)

    def texts(self, groups: list[Group]) -> tuple[list[str], list[str]]:
        queries, keys = [], []
        for group in groups:
            example = self.examples[group.example]
            queries.append(example.query)
            rows = np.concatenate([[example.positive], group.negatives]).astype(np.int64)
            keys.extend(self.rsets[example.task].corpus.passages_at(rows, self.cfg.include_title))
        return queries, keys

    # ----- one step ------------------------------------------------------------------------
    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def embed(self, texts: list[str], kind: str) -> torch.Tensor:
        with self.autocast():
            return self.encoder(**self.encoder.tokenize(texts, kind)).float()

    def loss_of(self, queries: torch.Tensor, keys: torch.Tensor, rewards: torch.Tensor | None,
                masked: torch.Tensor):
        """The global batch's loss from this rank's embeddings (others' gathered without gradients)."""
        q = gather_with_local_grad(queries, self.ctx)
        k = gather_with_local_grad(keys, self.ctx)
        scores = (q @ k.T / self.cfg.temperature).masked_fill(masked, float("-inf"))
        n = self.group_size
        group = torch.arange(len(q), device=q.device)[:, None] * n + torch.arange(n, device=q.device)
        inputs = LossInputs(scores, group, rewards, self.cfg.teacher_temperature, self.cfg.student_temperature)
        total, parts = self.objective(inputs)
        negative_scores = (inputs.group_scores()[:, 1:].detach() * self.cfg.temperature).mean(dim=1) \
            if n > 1 else None
        return total, parts, negative_scores

    def micro_step(self, groups: list[Group]) -> tuple[float, dict, torch.Tensor | None]:
        """Forward and backward of one global batch; gradients are accumulated, not applied."""
        local = groups[self.ctx.rank * self.local_batch:(self.ctx.rank + 1) * self.local_batch]
        queries, keys = self.texts(local)
        rewards = None
        if self.objective.needs_rewards:
            rewards = torch.tensor(np.stack([g.rewards for g in groups]), dtype=torch.float32, device=self.device)
        masked = torch.from_numpy(false_negative_mask(self.examples, groups)).to(self.device)
        scale = 1.0 / self.cfg.gradient_accumulation_steps
        chunk = self.cfg.grad_cache_chunk_size
        if not chunk:
            total, parts, negative = self.loss_of(self.embed(queries, "query"), self.embed(keys, "passage"), rewards,
                                                    masked)
            self.scaler.scale(total * scale).backward()
            return float(total.detach()), parts, negative
        # GradCache: embeddings without a graph, the loss's gradients w.r.t. them, then chunk-wise re-encoding
        cached = {}
        for kind, texts in (("query", queries), ("passage", keys)):
            states, pieces = [], []
            with torch.no_grad():
                for start in range(0, len(texts), chunk):
                    states.append(rng_state())
                    pieces.append(self.embed(texts[start:start + chunk], kind))
            cached[kind] = (torch.cat(pieces).requires_grad_(), states)
        total, parts, negative = self.loss_of(cached["query"][0], cached["passage"][0], rewards, masked)
        self.scaler.scale(total * scale).backward()
        after = rng_state()
        for kind, texts in (("query", queries), ("passage", keys)):
            reps, states = cached[kind]
            for k, start in enumerate(range(0, len(texts), chunk)):
                set_rng_state(states[k])  # the same dropout masks as the cached pass
                piece = self.embed(texts[start:start + chunk], kind)
                piece.backward(reps.grad[start:start + chunk])
        set_rng_state(after)
        return float(total.detach()), parts, negative

    def optimizer_step(self) -> None:
        parameters = [p for p in self.encoder.backbone.parameters() if p.requires_grad]
        sum_gradients(parameters, self.ctx)
        self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ----- evaluation, logging, checkpoints ----------------------------------------------------
    def evaluate(self) -> dict | None:
        if self.eval_rset is None:
            return None
        metrics = None
        if self.ctx.is_main:
            metrics = evaluate(self.encoder, self.eval_rset, batch_size=self.cfg.batch_size,
                               include_title=self.cfg.include_title, cache_dir=None, index=self.cfg.index_config())
        self.encoder.train()
        return broadcast_object(metrics, self.ctx)  # every rank takes the same best-checkpoint decision

    def log(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.state["log_bytes"] = f.tell()

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            payload = {"config": asdict(self.cfg), "state": self.state, "plan": self.plan,
                       "pools": [(e.pool, e.pool_rewards) for e in self.examples],
                       "tracker": self.tracker.state(), "model": self.encoder.backbone.state_dict(),
                       "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "scaler": self.scaler.state_dict(), "rng": rng_state()}
            tmp = self.out / (CHECKPOINT + ".tmp")
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out / CHECKPOINT)
        barrier(self.ctx)

    def load_checkpoint(self) -> None:
        payload = torch.load(self.out / CHECKPOINT, map_location=self.device, weights_only=False)
        self.encoder.backbone.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state, self.plan = payload["state"], payload["plan"]
        for example, (pool, rewards) in zip(self.examples, payload["pools"]):
            example.pool, example.pool_rewards = pool, rewards
        self.tracker = ScoreTracker.from_state(payload["tracker"])
        set_rng_state({k: (v.cpu() if torch.is_tensor(v) else [t.cpu() for t in v]) for k, v in payload["rng"].items()})
        if self.ctx.is_main and (self.out / LOG).exists():
            with open(self.out / LOG, "r+b") as f:  # drop what was logged after the checkpoint
                f.truncate(self.state["log_bytes"])

    def save_model(self, folder: Path) -> None:
        """A sentence-transformers folder; a sub-folder (best/) is replaced whole, OUTDIR itself file by file."""
        if self.ctx.is_main:
            if folder == self.out:
                self.encoder.save(folder)  # the run is marked done only after this (training_summary.json)
            else:
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                self.encoder.save(tmp)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
        barrier(self.ctx)

    # ----- re-mining -----------------------------------------------------------------------------
    def remine(self, chosen: list[int], reason: str) -> None:
        if not chosen:
            return
        started = time.perf_counter()
        changed = remine(self.encoder, self.examples, chosen, self.rsets, self.remine_settings,
                         self.state["remine_rounds"])
        self.encoder.train()
        self.state["remine_rounds"] += 1
        self.tracker.reset(chosen)
        # the rest of this epoch is planned again with the new pools
        done = {g.example for batch in self.plan.batches[:self.state["batch"]] for g in batch}
        remaining = [i for i in range(len(self.examples)) if i not in done]
        replanned = self.new_plan(self.state["epoch"], remaining, salt=self.state["remine_rounds"])
        self.plan = EpochPlan(self.plan.batches[:self.state["batch"]] + replanned.batches,
                              self.plan.left_out + replanned.left_out)
        self.log({"kind": "remine", "step": self.state["step"], "reason": reason, "examples": len(chosen),
                  "changed": changed, "seconds": round(time.perf_counter() - started, 2)})

    # ----- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        if state["step"] == 0 and state["before"] is None and self.eval_rset is not None:
            state["before"] = self.evaluate()
            self.log({"kind": "eval", "step": 0, "metrics": state["before"]})
        self.encoder.train()
        bar = tqdm(total=self.total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.show_progress and self.ctx.is_main))
        window_started, window_samples = time.perf_counter(), 0
        losses: list[float] = []
        while state["step"] < self.total_steps:  # epochs roll over until the step budget is spent
            if state["batch"] >= len(self.plan.batches) - len(self.plan.batches) % cfg.gradient_accumulation_steps:
                state["epoch"] += 1
                state["batch"] = 0
                self.plan = self.new_plan(state["epoch"])
                if len(self.plan.batches) < cfg.gradient_accumulation_steps:
                    raise ValueError(f"epoch {state['epoch']} makes {len(self.plan.batches)} batches, fewer than "
                                     f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps}")
                continue
            terms: dict[str, float] = {}
            for _ in range(cfg.gradient_accumulation_steps):
                groups = self.plan.batches[state["batch"]]
                loss, parts, negative = self.micro_step(groups)
                losses.append(loss)
                for name, value in parts.items():
                    terms[name] = terms.get(name, 0.0) + value / cfg.gradient_accumulation_steps
                if negative is not None:
                    for g, s in zip(groups, negative.tolist()):
                        self.tracker.observe(g.example, s)
                state["batch"] += 1
                window_samples += len(groups)
            self.optimizer_step()
            state["step"] += 1
            bar.update(1)
            step = state["step"]
            if step % cfg.logging_steps == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_started
                record = {"kind": "train", "step": step, "epoch": state["epoch"],
                          "loss": float(np.mean(losses[-cfg.gradient_accumulation_steps * cfg.logging_steps:])),
                          "terms": terms, "lr": self.scheduler.get_last_lr()[0],
                          "samples_per_s": round(window_samples / max(elapsed, 1e-9), 2)}
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window_started, window_samples = time.perf_counter(), 0
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.total_steps:
                self.eval_and_keep_best()
            if due(step, cfg.remine_steps, self.total_steps):
                self.remine(list(range(len(self.examples))), "refresh")
            if cfg.dynamic_remine and due(step, cfg.dynamic_remine_steps, self.total_steps):
                stale = self.tracker.stale(self.remine_settings.factor, self.remine_settings.max_abs_score)
                self.remine(stale, "dynamic")
            if step % cfg.save_steps == 0 and step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        after = self.eval_and_keep_best()
        return after

    def eval_and_keep_best(self) -> dict | None:
        metrics = self.evaluate()
        if metrics is None:
            return None
        self.log({"kind": "eval", "step": self.state["step"], "metrics": metrics})
        best = self.state["best"]
        if best is None or metrics[self.cfg.eval_metric] > best["metrics"][self.cfg.eval_metric]:
            self.state["best"] = {"step": self.state["step"], "metrics": metrics}
            self.save_model(self.out / "best")
        return metrics


def prepare_output(cfg: TrainConfig, ctx: Distributed) -> bool:
    """True when a finished run is already there. Refuses to mix runs."""
    out = Path(cfg.output)
    if ctx.is_main:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier(ctx)
    if (out / DONE).exists() and not cfg.overwrite:
        return True
    has_run = (out / CHECKPOINT).exists() or (out / LOG).exists()
    if has_run and not cfg.resume:
        raise ValueError(f"{out} holds a previous training run: --resume to continue it, --overwrite to start again")
    return False


def run_train(cfg: TrainConfig) -> dict:
    ctx = init_distributed(cfg.device)
    out = Path(cfg.output)
    if prepare_output(cfg, ctx):
        summary = json.loads((out / DONE).read_text())
        print(f"{out}: training already complete (step {summary['steps']}); nothing to do")
        close_distributed(ctx)
        return summary
    started = time.perf_counter()
    trainer = Trainer(cfg, ctx)
    resumed = cfg.resume and (out / CHECKPOINT).exists()
    if resumed:
        trainer.load_checkpoint()
    elif ctx.is_main:
        (out / LOG).unlink(missing_ok=True)
    barrier(ctx)
    if ctx.is_main:
        teacher_note = f", teacher labels {[str(p) for p in cfg.labels]}" if cfg.labels else ""
        print(f"{len(trainer.examples)} examples ({', '.join(f'{v} {k}' for k, v in trainer.skipped.items() if v) or 'none skipped'})"
              f", groups of {trainer.group_size}, batch {cfg.train_batch_size} x {ctx.world_size} process(es), "
              f"{trainer.total_steps} steps, objective {trainer.objective}{teacher_note}"
              + (f"; {trainer.plan.left_out} examples do not fill the last batch of an epoch"
                 if trainer.plan.left_out else "")
              + (f"; resumed at step {trainer.state['step']}" if resumed else ""))
    after = trainer.train()
    trainer.save_model(out)
    summary = {"steps": trainer.state["step"], "examples": len(trainer.examples), "skipped": trainer.skipped,
               "objective": str(trainer.objective), "before": trainer.state["before"], "after": after,
               "best": trainer.state["best"], "seconds": round(time.perf_counter() - started, 1),
               "processes": ctx.world_size, "remine_rounds": trainer.state["remine_rounds"]}
    if ctx.is_main:
        teacher = None
        if cfg.labels:
            first = next(iter(read_labels(cfg.labels[0])), {})
            teacher = first.get("model")
        (out / "README.md").write_text(model_card(
            base_model=cfg.model, data=list(cfg.data), labels=[str(p) for p in (cfg.labels or cfg.candidates or [])],
            teacher=teacher, objective=str(trainer.objective), settings=asdict(cfg), before=trainer.state["before"],
            after=after, eval_split=cfg.eval_split), encoding="utf-8")
        plot_training(read_log(out / LOG), out / "training.png", cfg.eval_metric)
        (out / DONE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (out / CHECKPOINT).unlink(missing_ok=True)
        if trainer.state["before"] and after:
            print(format_table({"base": trainer.state["before"], "trained": after}))
        print(f"trained {summary['steps']} steps in {summary['seconds']} s -> {out}")
    close_distributed(ctx)
    return summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "train", TrainConfig, run_train,
                help="distil a bi-encoder from teacher labels and hard negatives",
                description=__doc__.split("\n\n")[0])
