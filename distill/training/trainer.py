"""`distill train`'s trainer: examples in, a trained student out (its steps run in the loop it shares with
`distill pretrain`: `loop.Loop`).

Setup reads every input (examples from labels, candidates or qrels; the student; the dev split), measures
whether a step fits in memory (`memory`: GradCache goes on when not), and plans the first epoch
(`batches`). Each optimizer step then takes `--gradient-accumulation-steps` batches of the plan; for each,
`backward` embeds its queries and keys, scores them and runs the loss backward (`step`); the gradients are
summed over ranks and applied by fused AdamW with the warm-up schedule (`loop`). Around the steps: the loss
log (`train_log.jsonl`), dev evaluations that keep the best model in `best/`, ANCE/Conan re-mining of the pools
(`remine`), and a checkpoint every `--save-steps` (`checkpoint`: the loop's, plus the epoch plan, the pools and
the re-mining tracker) from which `--resume` continues with the same data order and random state.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from labelers.errors import UsageError

from ..data import DataError, load_retrieval_set
from ..evaluate import evaluate
from .batches import EpochPlan, Group, false_negative_mask, plan_epoch
from .checkpoint import TrainState, plan_from_json, plan_to_json
from .config import TrainConfig
from .distributed import Distributed, broadcast_object
from .inputs import load_training_examples
from .loop import Loop
from .memory import plan_for_run
from .microbatch import PaddingCount, default_token_budget, kind_chunks, sorted_chunks
from .optim import autocast_dtype
from .remine import RemineSettings, ScoreTracker, due, remine
from .run_folder import RunFolder
from .step import Scoring, StepLoss, batch_loss, forward_backward

LOG = "train_log.jsonl"


class Trainer(Loop):
    log_name, progress_name = LOG, "train"
    stop_advice = "Lower --learning-rate, raise --temperature, or check the labels' rewards"

    def __init__(self, cfg: TrainConfig, ctx: Distributed, folder: RunFolder | None = None):
        self.cfg, self.ctx = cfg, ctx
        folder = folder if folder is not None else RunFolder(Path(cfg.output))
        if cfg.train_batch_size % ctx.world_size:
            raise UsageError(f"--train-batch-size {cfg.train_batch_size} must be a multiple of the "
                             f"{ctx.world_size} processes")
        self.objective = cfg.objective()
        self.query_kind = cfg.query_kind()
        if self.objective.needs_rewards and not cfg.labels:
            raise UsageError(f"--loss {cfg.loss} needs teacher rewards: give --labels (from distill label)")
        self.rsets, self.examples, self.skipped = load_training_examples(cfg)
        device = cfg.device or (f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        self.encoder = cfg.load_encoder(cfg.model).to(device)
        self.device = self.encoder.device
        if cfg.gradient_checkpointing:
            self.encoder.backbone.gradient_checkpointing_enable()
        self.amp = autocast_dtype(cfg.precision, self.device)
        self.local_batch = cfg.train_batch_size // ctx.world_size
        self.memory, self.memory_note = plan_for_run(self.encoder, self.rsets, self.examples, cfg, self.local_batch,
                                                     self.amp, self.device)
        self.grad_cache_chunk = self.memory.chunk_size
        self.token_budget = (default_token_budget(self.device.type) if cfg.micro_batch_tokens is None
                             else cfg.micro_batch_tokens)
        if self.token_budget and self.grad_cache_chunk:  # a GradCache chunk's memory: so many texts at the longest
            self.token_budget = min(self.token_budget, self.grad_cache_chunk * self.memory.longest_tokens)
        self.tokens = PaddingCount()  # this process's forwards since it started (a resumed run counts anew)
        self.group_size = 1 + cfg.num_negatives
        self.scoring = Scoring(cfg.temperature, cfg.teacher_temperature, cfg.student_temperature, self.group_size)
        self.plan = self.new_plan(0)
        per_epoch = len(self.plan.batches) // cfg.gradient_accumulation_steps
        if per_epoch < 1:
            raise UsageError(f"{len(self.examples)} examples make no full batch of {cfg.train_batch_size} under "
                             f"--batch-dedup {cfg.batch_dedup} (topically clustered data: try --batch-dedup none)")
        super().__init__(cfg, ctx, folder, encoder=self.encoder, module=self.encoder.backbone,
                         total_steps=cfg.max_steps or per_epoch * cfg.epochs, amp=self.amp)
        self.remine_settings = RemineSettings(
            strategy=cfg.remine_strategy, pool_size=cfg.remine_pool_size or max(cfg.num_negatives, 1),
            params=cfg.candidate_window(),
            seed=cfg.seed, from_labels=self.objective.needs_rewards, include_title=cfg.include_title,
            batch_size=cfg.batch_size)
        self.tracker = ScoreTracker()
        self.state = TrainState()
        self.eval_rset = (load_retrieval_set(cfg.eval_data or cfg.data[0], cfg.eval_split,
                                             skip_invalid=cfg.skip_invalid) if cfg.eval_split else None)

    # ----- data --------------------------------------------------------------------------------------------
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

    # ----- one batch -----------------------------------------------------------------------------------------
    def embed(self, token_ids: list[np.ndarray]) -> torch.Tensor:
        with self.autocast():
            return self.encoder(*self.encoder.padded(token_ids)).float()

    def backward(self, groups: list[Group]) -> StepLoss:
        """Forward and backward of one global batch (this rank's share of it); gradients accumulate in the
        encoder and are not applied. Raises NonFiniteLoss before the backward of a NaN or infinite loss."""
        local = groups[self.ctx.rank * self.local_batch:(self.ctx.rank + 1) * self.local_batch]
        queries, keys = self.texts(local)
        ids = self.encoder.token_ids(queries, self.query_kind) + self.encoder.token_ids(keys, "passage")
        lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
        chunks = (sorted_chunks(lengths, self.token_budget) if self.token_budget
                  else kind_chunks(len(queries), len(keys), self.grad_cache_chunk))
        self.tokens.add(lengths, chunks)
        rewards = None
        if self.objective.needs_rewards:
            rewards = torch.tensor(np.stack([g.rewards for g in groups]), dtype=torch.float32, device=self.device)
        masked = torch.from_numpy(false_negative_mask(self.examples, groups)).to(self.device)
        return forward_backward(
            lambda rows: self.embed([ids[r] for r in rows]), chunks, len(queries),
            loss_of=lambda q, k: batch_loss(self.objective, q, k, rewards, masked, self.scoring, self.ctx),
            backward=self.scaled_backward, grad_cache=bool(self.grad_cache_chunk),
            before_backward=lambda loss: self.check_finite(float(loss.total.detach()), loss.parts))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        # the backbone's own order, as distill train always summed and clipped them (another order would change
        # the last bits of a clipped step's norm, and so a run's bytes)
        return [p for p in self.encoder.backbone.parameters() if p.requires_grad]

    # ----- the loop's hooks -----------------------------------------------------------------------------------
    def before_step(self) -> None:
        accumulate = self.cfg.gradient_accumulation_steps
        while self.state.batch >= len(self.plan.batches) - len(self.plan.batches) % accumulate:
            self.next_epoch()

    def backward_next(self) -> tuple[float, dict[str, float]]:
        groups = self.plan.batches[self.state.batch]
        loss = self.backward(groups)
        if loss.negative_scores is not None:
            for g, s in zip(groups, loss.negative_scores.tolist()):
                self.tracker.observe(g.example, s)
        self.state.batch += 1
        self.window_samples += len(groups)
        return float(loss.total.detach()), loss.parts

    def log_record(self, losses: list[float], terms: dict[str, float]) -> dict:
        cfg, elapsed = self.cfg, time.perf_counter() - self.window_started
        record = {"kind": "train", "step": self.state.step, "epoch": self.state.epoch,
                  "loss": float(np.mean(losses[-cfg.gradient_accumulation_steps * cfg.logging_steps:])),
                  "terms": terms, "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_s": round(self.window_samples / max(elapsed, 1e-9), 2),
                  "tokens_per_s": round((self.tokens.real - self.window_tokens) / max(elapsed, 1e-9), 1)}
        self.start_window()
        return record

    def start_window(self) -> None:
        """The speeds of the next log line count from here."""
        self.window_started, self.window_samples, self.window_tokens = time.perf_counter(), 0, self.tokens.real

    # ----- evaluation, logging, checkpoints ------------------------------------------------------------------
    def evaluate(self) -> dict | None:
        if self.eval_rset is None:
            return None
        metrics = None
        if self.ctx.is_main:
            metrics = evaluate(self.encoder, self.eval_rset, batch_size=self.cfg.batch_size,
                               include_title=self.cfg.include_title, cache_dir=None, index=self.cfg.index_config())
        self.encoder.train()
        return broadcast_object(metrics, self.ctx)  # every rank takes the same best-checkpoint decision

    def checkpoint_extra(self) -> dict:
        return {"plan": plan_to_json(self.plan),
                "pools": [[e.pool.tolist(), None if e.pool_rewards is None else e.pool_rewards.tolist()]
                          for e in self.examples], "tracker": self.tracker.state()}

    def restore(self, saved: dict, folder: Path) -> None:
        self.state, self.plan = TrainState.from_json(saved["state"]), plan_from_json(saved["plan"])
        if len(saved["pools"]) != len(self.examples):
            raise DataError(f"{folder}: holds {len(saved['pools'])} examples' pools, this run has "
                            f"{len(self.examples)}; --overwrite to start again")
        for example, (pool, rewards) in zip(self.examples, saved["pools"]):
            example.pool = np.asarray(pool, dtype=np.int64)
            example.pool_rewards = None if rewards is None else np.asarray(rewards, dtype=np.float64)
        self.tracker = ScoreTracker.from_state(saved["tracker"])

    # ----- re-mining ------------------------------------------------------------------------------------------
    def remine(self, chosen: list[int], reason: str) -> None:
        if not chosen:
            return
        started = time.perf_counter()
        changed = remine(self.encoder, self.examples, chosen, self.rsets, self.remine_settings,
                         self.state.remine_rounds)
        self.encoder.train()
        self.state.remine_rounds += 1
        self.tracker.reset(chosen)
        # the rest of this epoch is planned again with the new pools
        done = {g.example for batch in self.plan.batches[:self.state.batch] for g in batch}
        remaining = [i for i in range(len(self.examples)) if i not in done]
        replanned = self.new_plan(self.state.epoch, remaining, salt=self.state.remine_rounds)
        self.plan = EpochPlan(self.plan.batches[:self.state.batch] + replanned.batches,
                              self.plan.left_out + replanned.left_out)
        self.log({"kind": "remine", "step": self.state.step, "reason": reason, "examples": len(chosen),
                  "changed": changed, "seconds": round(time.perf_counter() - started, 2)})

    # ----- the run -------------------------------------------------------------------------------------------
    def train(self) -> dict | None:
        """The evaluation before (at step 0), the steps until `total_steps` (epochs roll over), then the last
        evaluation; returns its metrics."""
        state = self.state
        if state.step == 0 and state.before is None and self.eval_rset is not None:
            state.before = self.evaluate()
            self.log({"kind": "eval", "step": 0, "metrics": state.before})
        self.encoder.train()
        self.start_window()
        self.run_steps()
        return self.eval_and_keep_best()

    def throughput(self) -> dict:
        """Tokens this process's steps encoded (the texts' own), with padding, and per second of step time."""
        return {"tokens": self.tokens.real, "padded_tokens": self.tokens.padded,
                "padding_fraction": round(self.tokens.padding_fraction, 4),
                "tokens_per_s": round(self.tokens.real / self.step_seconds, 1) if self.step_seconds else None,
                "micro_batch_tokens": self.token_budget}

    def next_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batch = 0
        self.plan = self.new_plan(self.state.epoch)
        if len(self.plan.batches) < self.cfg.gradient_accumulation_steps:
            raise UsageError(f"epoch {self.state.epoch} makes {len(self.plan.batches)} batches, fewer than "
                             f"--gradient-accumulation-steps {self.cfg.gradient_accumulation_steps}")

    def after_step(self) -> None:
        """What runs between steps, before the loop's checkpoint: dev evaluation, re-mining."""
        cfg, step = self.cfg, self.state.step
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.total_steps:
            self.eval_and_keep_best()
        if due(step, cfg.remine_steps, self.total_steps):
            self.remine(list(range(len(self.examples))), "refresh")
        if cfg.dynamic_remine and due(step, cfg.dynamic_remine_steps, self.total_steps):
            self.remine(self.tracker.stale(self.remine_settings.factor, self.remine_settings.max_abs_score),
                        "dynamic")

    def eval_and_keep_best(self) -> dict | None:
        metrics = self.evaluate()
        if metrics is None:
            return None
        self.log({"kind": "eval", "step": self.state.step, "metrics": metrics})
        best = self.state.best
        if best is None or metrics[self.cfg.eval_metric] > best["metrics"][self.cfg.eval_metric]:
            self.state.best = {"step": self.state.step, "metrics": metrics}
            self.save_model("best")
        return metrics
