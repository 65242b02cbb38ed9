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
`OUTDIR/checkpoint/` (safetensors, plain tensors and JSON: `training.checkpoint`)
is written every `--save-steps`; `--resume` continues from it with the same data
order and random state. Before the first step every input is checked, the
step's activation memory is measured (`training.memory`: GradCache goes on
when it would not fit), and the folder must be new or one of our runs
(`training.run_folder`: `--overwrite` removes only what a run wrote).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import add_command
from .data import DataError, data_digest, load_retrieval_set
from .files import file_digest, write_text_atomic
from .encoding import EncodingSettings
from .evaluate import evaluate, format_table
from .losses import LOSSES, LossInputs, Objective
from .negatives import SamplingParams
from .data.records import read_labels, read_train_log
from .training import checkpoint
from .training.batches import EpochPlan, Group, false_negative_mask, plan_epoch
from .training.distributed import (Distributed, barrier, broadcast_object, close_distributed, gather_with_local_grad,
                                   init_distributed, sum_gradients)
from .training.memory import DEFAULT_SHARE, MemoryPlan, free_memory_bytes, plan_memory, saved_bytes_per_text
from .training.remine import RemineSettings, ScoreTracker, due, remine
from .training.report import model_card, plot_training
from .training.run_folder import RunFolder, differences
from .training.setup import (autocast_dtype, load_examples, longest_texts, make_optimizer, make_scheduler, rng_state,
                             set_rng_state)

logger = logging.getLogger(__name__)

LOG = "train_log.jsonl"
DONE = "training_summary.json"
# settings that do not change what a run computes: a resumed or repeated run may change them
VOLATILE = {"resume", "overwrite", "show_progress", "allow_partial", "cache", "cache_dir", "device",
            "memory_budget_gb"}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops before the bad step changes the weights."""


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
    allow_partial: bool = field(default=False, metadata={
        "help": "train on a --labels/--candidates file whose job has not finished (its progress file says so)"})
    memory_budget_gb: float | None = field(default=None, metadata={
        "help": "activation memory a step may use; above it GradCache goes on (default: 60%% of the free RAM, "
                "or of the free GPU memory)"})
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
        for name in ("temperature", "teacher_temperature", "student_temperature", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "save_steps", "logging_steps", "dynamic_remine_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "grad_cache_chunk_size", "remine_pool_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"--memory-budget-gb must be > 0, got {self.memory_budget_gb}")


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: Distributed, folder: RunFolder | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.output)
        self.folder = folder if folder is not None else RunFolder(self.out)
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
        self.memory = self.plan_memory()
        self.grad_cache_chunk = self.memory.chunk_size
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

    def plan_memory(self) -> MemoryPlan:
        """How this run's steps are cut so their activations fit (GradCache's chunk, None: off); `memory_note`
        says why GradCache went on, when it did."""
        cfg = self.cfg
        n_queries = self.local_batch_size()
        n_passages = n_queries * (1 + cfg.num_negatives)
        query_tokens, passage_tokens = longest_texts(self.encoder, self.rsets, self.examples, cfg.include_title)
        per_query = saved_bytes_per_text(self.encoder, query_tokens, self.amp)
        per_passage = saved_bytes_per_text(self.encoder, passage_tokens, self.amp)
        if cfg.memory_budget_gb is not None:
            budget, where = cfg.memory_budget_gb * 2 ** 30, "--memory-budget-gb"
        else:
            processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.device.type == "cpu" else 1
            free = free_memory_bytes(self.device)
            budget = DEFAULT_SHARE * free / processes
            where = (f"{DEFAULT_SHARE:.0%} of the {free / 2 ** 30:.1f} GiB free "
                     + ("RAM" if self.device.type == "cpu" else f"on {self.device}")
                     + (f", shared by {processes} processes" if processes > 1 else ""))
        plan = plan_memory(n_queries=n_queries, n_passages=n_passages, query_bytes=per_query,
                           passage_bytes=per_passage, budget_bytes=budget, chunk_size=cfg.grad_cache_chunk_size,
                           passage_length=passage_tokens)
        self.memory_note = plan.describe(where) if plan.chunk_size and not cfg.grad_cache_chunk_size else None
        return plan

    def local_batch_size(self) -> int:
        return self.cfg.train_batch_size // self.ctx.world_size

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
        chunk = self.grad_cache_chunk
        if not chunk:
            total, parts, negative = self.loss_of(self.embed(queries, "query"), self.embed(keys, "passage"), rewards,
                                                    masked)
            self.check_finite(total, parts)
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
        self.check_finite(total, parts)
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

    def check_finite(self, total: torch.Tensor, parts: dict) -> None:
        """Stop at the first NaN/infinite loss, before it reaches the weights (the last checkpoint stays good)."""
        value = float(total.detach())
        if math.isfinite(value):
            return
        saved = checkpoint.current_folder(self.out)
        kept = (f"the checkpoint of step {json.loads((saved / checkpoint.STATE).read_text())['state']['step']} "
                f"in {saved} is kept (--resume continues from it)") if saved else "no checkpoint was written yet"
        terms = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
        raise NonFiniteLoss(f"step {self.state['step'] + 1}: the loss is {value} ({terms}); training stopped before "
                            f"this step changed the model; {kept}. Lower --learning-rate, raise --temperature, or check "
                            "the labels' rewards")

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
        self.folder.wrote(LOG)
        with open(self.out / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.state["log_bytes"] = f.tell()

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            self.folder.wrote(checkpoint.FOLDER, checkpoint.FOLDER + ".tmp", checkpoint.FOLDER + ".old")
            state = {"state": self.state, "plan": checkpoint.plan_to_json(self.plan),
                     "pools": [[e.pool.tolist(), None if e.pool_rewards is None else e.pool_rewards.tolist()]
                               for e in self.examples], "tracker": self.tracker.state()}
            optimizer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "scaler": self.scaler.state_dict()}
            checkpoint.save(self.out, model=self.encoder.backbone, optimizer_state=optimizer, rng=rng_state(),
                            state=state)
        barrier(self.ctx)

    def load_checkpoint(self, folder: Path) -> None:
        optimizer, rng, saved = checkpoint.load(folder, self.encoder.backbone, self.device)
        self.optimizer.load_state_dict(optimizer["optimizer"])
        self.scheduler.load_state_dict(optimizer["scheduler"])
        self.scaler.load_state_dict(optimizer["scaler"])
        self.state, self.plan = saved["state"], checkpoint.plan_from_json(saved["plan"])
        if len(saved["pools"]) != len(self.examples):
            raise DataError(f"{folder}: holds {len(saved['pools'])} examples' pools, this run has "
                            f"{len(self.examples)}; --overwrite to start again")
        for example, (pool, rewards) in zip(self.examples, saved["pools"]):
            example.pool = np.asarray(pool, dtype=np.int64)
            example.pool_rewards = None if rewards is None else np.asarray(rewards, dtype=np.float64)
        self.tracker = ScoreTracker.from_state(saved["tracker"])
        set_rng_state({k: (v.cpu() if torch.is_tensor(v) else [t.cpu() for t in v]) for k, v in rng.items()})
        if self.ctx.is_main and (self.out / LOG).exists():
            with open(self.out / LOG, "r+b") as f:  # drop what was logged after the checkpoint
                f.truncate(self.state["log_bytes"])

    def save_model(self, folder: Path) -> None:
        """A sentence-transformers folder; a sub-folder (best/) is replaced whole, OUTDIR itself entry by entry.
        Each is written to a temp folder first, so the run's record names every entry before it exists."""
        if self.ctx.is_main:
            tmp = folder.with_name(folder.name + ".tmp") if folder != self.out else self.out / "model.tmp"
            self.folder.wrote(tmp.name, *([folder.name] if folder != self.out else []))
            shutil.rmtree(tmp, ignore_errors=True)
            self.encoder.save(tmp)
            if folder == self.out:  # the run is marked done only after this (training_summary.json)
                entries = sorted(p.name for p in tmp.iterdir())
                self.folder.wrote(*entries)
                for name in entries:
                    if (self.out / name).is_dir():
                        shutil.rmtree(self.out / name)
                    os.replace(tmp / name, self.out / name)
                tmp.rmdir()
            else:
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


def run_settings(cfg: TrainConfig) -> dict:
    """What a run computes from: its settings (less `VOLATILE`) and the content of every file it reads."""
    settings = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in VOLATILE}, default=str))
    settings["inputs"] = {
        "data": [data_digest(d) for d in cfg.data],
        "labels": [file_digest(p) for p in cfg.labels] if cfg.labels else None,
        "candidates": [file_digest(p) for p in cfg.candidates] if cfg.candidates else None,
        "eval_data": data_digest(cfg.eval_data or cfg.data[0]) if cfg.eval_split else None}
    return settings


def _changed(recorded: dict, settings: dict) -> str:
    flat = lambda d: {**{k: v for k, v in d.items() if k != "inputs"},  # noqa: E731
                      **{f"{k} (content)": v for k, v in (d.get("inputs") or {}).items()}}
    return ", ".join(differences(flat(recorded), flat(settings)))


def finished_summary(cfg: TrainConfig, folder: RunFolder, settings: dict) -> dict | None:
    """The summary of a finished run of these settings in the folder; None when there is none (or --overwrite).
    A finished run of other settings is refused, as a changed resume is."""
    done = folder.path / DONE
    if cfg.overwrite or folder.state not in ("ours", "legacy") or not done.is_file():
        return None
    if folder.settings is not None and folder.settings != settings:
        raise ValueError(f"{folder.path} holds a finished run with other settings ({_changed(folder.settings, settings)});"
                         " --overwrite to train again there, or give another --output")
    return json.loads(done.read_text(encoding="utf-8"))


def check_resumable(cfg: TrainConfig, folder: RunFolder, settings: dict) -> Path | None:
    """The checkpoint folder to resume from (None: start at step 0); refuses to mix runs."""
    out = folder.path
    if cfg.overwrite or folder.state == "new":
        return None
    has_run = any((out / n).exists() for n in (checkpoint.FOLDER, checkpoint.FOLDER + ".old", checkpoint.LEGACY_FILE,
                                                LOG))
    if not has_run:
        return None
    if not cfg.resume:
        raise ValueError(f"{out} holds a previous training run: --resume to continue it, --overwrite to start again")
    if folder.state == "legacy" or (out / checkpoint.LEGACY_FILE).exists():
        raise ValueError(f"{out / checkpoint.LEGACY_FILE}: an older distill's checkpoint (a pickle, which could run "
                         "code when loaded) cannot be resumed; --overwrite to start again")
    if folder.settings != settings:
        raise ValueError(f"{out} was started with other settings ({_changed(folder.settings or {}, settings)}); "
                         "rerun with the same settings to resume, or --overwrite to start again")
    return checkpoint.current_folder(out)


def run_train(cfg: TrainConfig) -> dict:
    ctx = init_distributed(cfg.device)
    try:
        return _run_train(cfg, ctx)
    finally:
        close_distributed(ctx)


def _run_train(cfg: TrainConfig, ctx: Distributed) -> dict:
    out = Path(cfg.output)
    folder = RunFolder(out)
    folder.check_usable()  # a folder of someone else's files is never trained into, nor emptied
    settings = run_settings(cfg)
    summary = finished_summary(cfg, folder, settings)
    if summary is not None:
        print(f"{out}: training already complete (step {summary['steps']}); nothing to do")
        return summary
    resume_from = check_resumable(cfg, folder, settings)
    started = time.perf_counter()
    trainer = Trainer(cfg, ctx, folder)  # reads and checks every input: nothing is removed before this
    if ctx.is_main:
        if cfg.overwrite:
            removed = folder.remove_run()
            if removed:
                print(f"--overwrite: removed the previous run's {len(removed)} entries from {out}")
        if resume_from is None:
            (out / LOG).unlink(missing_ok=True)
        folder.claim(settings)
    barrier(ctx)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    if ctx.is_main:
        teacher_note = f", teacher labels {[str(p) for p in cfg.labels]}" if cfg.labels else ""
        print(f"{len(trainer.examples)} examples ({', '.join(f'{v} {k}' for k, v in trainer.skipped.items() if v) or 'none skipped'})"
              f", groups of {trainer.group_size}, batch {cfg.train_batch_size} x {ctx.world_size} process(es), "
              f"{trainer.total_steps} steps, objective {trainer.objective}{teacher_note}"
              + (f"; {trainer.plan.left_out} examples do not fill the last batch of an epoch"
                 if trainer.plan.left_out else "")
              + (f"; resumed at step {trainer.state['step']}" if resume_from is not None else ""))
        if trainer.memory_note:
            print(trainer.memory_note)
    after = trainer.train()
    trainer.save_model(out)
    summary = {"steps": trainer.state["step"], "examples": len(trainer.examples), "skipped": trainer.skipped,
               "objective": str(trainer.objective), "before": trainer.state["before"], "after": after,
               "best": trainer.state["best"], "seconds": round(time.perf_counter() - started, 1),
               "processes": ctx.world_size, "remine_rounds": trainer.state["remine_rounds"]}
    summary["memory"] = {"step_activation_gib": round(trainer.memory.step_bytes / 2 ** 30, 3),
                         "budget_gib": round(trainer.memory.budget_bytes / 2 ** 30, 3),
                         "grad_cache_chunk_size": trainer.grad_cache_chunk}
    if ctx.is_main:
        teacher = None
        if cfg.labels:
            first = next(iter(read_labels(cfg.labels[0])), None)
            teacher = first.model if first else None
        folder.wrote("README.md", "training.png", DONE)
        write_text_atomic(out / "README.md", model_card(
            base_model=cfg.model, data=list(cfg.data), labels=[str(p) for p in (cfg.labels or cfg.candidates or [])],
            teacher=teacher, objective=str(trainer.objective), settings=asdict(cfg), before=trainer.state["before"],
            after=after, eval_split=cfg.eval_split))
        plot_training(read_train_log(out / LOG), out / "training.png", cfg.eval_metric)
        write_text_atomic(out / DONE, json.dumps(summary, indent=2) + "\n")
        for name in (checkpoint.FOLDER, checkpoint.FOLDER + ".old", checkpoint.FOLDER + ".tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
        if trainer.state["before"] and after:
            print(format_table({"base": trainer.state["before"], "trained": after}))
        print(f"trained {summary['steps']} steps in {summary['seconds']} s -> {out}")
    return summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "train", TrainConfig, run_train,
                help="distil a bi-encoder from teacher labels and hard negatives",
                description=__doc__.split("\n\n")[0])
