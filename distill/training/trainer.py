"""The training loop: examples in, a trained student out.

Setup reads every input (examples from labels, candidates or qrels; the student; the dev split), measures
whether a step fits in memory (`memory`: GradCache goes on when not), and plans the first epoch
(`batches`). Each optimizer step then takes `--gradient-accumulation-steps` batches of the plan; for each,
`backward` embeds its queries and keys, scores them and runs the loss backward (`step`); the gradients are
summed over ranks and applied by fused AdamW with the warm-up schedule. Around the steps: the loss log
(`train_log.jsonl`), dev evaluations that keep the best model in `best/`, ANCE/Conan re-mining of the pools
(`remine`), and a checkpoint every `--save-steps` (`checkpoint`) from which `--resume` continues with the
same data order and random state.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from labelers.errors import UsageError

from ..data import DataError, load_retrieval_set
from ..evaluate import evaluate
from . import checkpoint
from .batches import EpochPlan, Group, false_negative_mask, plan_epoch
from .checkpoint import TrainState
from .config import TrainConfig
from .distributed import Distributed, barrier, broadcast_object, sum_gradients
from .memory import plan_for_run
from .microbatch import PaddingCount, default_token_budget, kind_chunks, sorted_chunks
from .remine import RemineSettings, ScoreTracker, due, remine
from .run_folder import RunFolder
from .inputs import load_training_examples
from .optim import autocast_dtype, make_optimizer, make_scheduler, rng_state, set_rng_state
from .step import Scoring, StepLoss, batch_loss, check_finite, forward_backward

LOG = "train_log.jsonl"


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: Distributed, folder: RunFolder | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.output)
        self.folder = folder if folder is not None else RunFolder(self.out)
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
        self.step_seconds = 0.0       # ... and the time its steps took (forward, backward, optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.optimizer = make_optimizer(self.encoder, cfg)
        self.group_size = 1 + cfg.num_negatives
        self.scoring = Scoring(cfg.temperature, cfg.teacher_temperature, cfg.student_temperature, self.group_size)
        self.plan = self.new_plan(0)
        per_epoch = len(self.plan.batches) // cfg.gradient_accumulation_steps
        if per_epoch < 1:
            raise UsageError(f"{len(self.examples)} examples make no full batch of {cfg.train_batch_size} under "
                             f"--batch-dedup {cfg.batch_dedup} (topically clustered data: try --batch-dedup none)")
        self.total_steps = cfg.max_steps or per_epoch * cfg.epochs
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
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
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                    else contextlib.nullcontext())
        with autocast:
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
        scale = 1.0 / self.cfg.gradient_accumulation_steps
        return forward_backward(
            lambda rows: self.embed([ids[r] for r in rows]), chunks, len(queries),
            loss_of=lambda q, k: batch_loss(self.objective, q, k, rewards, masked, self.scoring, self.ctx),
            backward=lambda total: self.scaler.scale(total * scale).backward(), grad_cache=bool(self.grad_cache_chunk),
            before_backward=lambda loss: check_finite(loss, self.describe_stop))

    def describe_stop(self, value: float, parts: dict) -> str:
        saved = checkpoint.current_folder(self.out)
        kept = (f"the checkpoint of step {json.loads((saved / checkpoint.STATE).read_text())['state']['step']} "
                f"in {saved} is kept (--resume continues from it)") if saved else "no checkpoint was written yet"
        terms = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
        return (f"step {self.state.step + 1}: the loss is {value} ({terms}); training stopped before this step "
                f"changed the model; {kept}. Lower --learning-rate, raise --temperature, or check the labels' rewards")

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

    def log(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        self.folder.wrote(LOG)
        with open(self.out / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.state.log_bytes = f.tell()

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            self.folder.wrote(checkpoint.FOLDER, checkpoint.FOLDER + ".tmp", checkpoint.FOLDER + ".old")
            state = {"state": self.state.to_json(), "plan": checkpoint.plan_to_json(self.plan),
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
        self.state, self.plan = TrainState.from_json(saved["state"]), checkpoint.plan_from_json(saved["plan"])
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
                f.truncate(self.state.log_bytes)

    def save_model(self, name: str | None = None) -> None:
        """The student into the run folder (None) or a sub-folder of it (`best`)."""
        if self.ctx.is_main:
            self.folder.save_model(self.encoder, name)
        barrier(self.ctx)

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

    # ----- the loop -------------------------------------------------------------------------------------------
    def train(self) -> dict | None:
        """Steps until `total_steps` (epochs roll over), then the last evaluation; returns its metrics."""
        from tqdm.auto import tqdm

        cfg, state, accumulate = self.cfg, self.state, self.cfg.gradient_accumulation_steps
        if state.step == 0 and state.before is None and self.eval_rset is not None:
            state.before = self.evaluate()
            self.log({"kind": "eval", "step": 0, "metrics": state.before})
        self.encoder.train()
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.show_progress and self.ctx.is_main))
        window_started, window_samples, window_tokens = time.perf_counter(), 0, self.tokens.real
        losses: list[float] = []
        while state.step < self.total_steps:
            if state.batch >= len(self.plan.batches) - len(self.plan.batches) % accumulate:
                self.next_epoch()
                continue
            terms: dict[str, float] = {}
            step_started = time.perf_counter()
            for _ in range(accumulate):
                groups = self.plan.batches[state.batch]
                loss = self.backward(groups)
                losses.append(float(loss.total.detach()))
                for name, value in loss.parts.items():
                    terms[name] = terms.get(name, 0.0) + value / accumulate
                if loss.negative_scores is not None:
                    for g, s in zip(groups, loss.negative_scores.tolist()):
                        self.tracker.observe(g.example, s)
                state.batch += 1
                window_samples += len(groups)
            self.optimizer_step()
            self.step_seconds += time.perf_counter() - step_started
            state.step += 1
            bar.update(1)
            if state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                elapsed = time.perf_counter() - window_started
                record = {"kind": "train", "step": state.step, "epoch": state.epoch,
                          "loss": float(np.mean(losses[-accumulate * cfg.logging_steps:])), "terms": terms,
                          "lr": self.scheduler.get_last_lr()[0],
                          "samples_per_s": round(window_samples / max(elapsed, 1e-9), 2),
                          "tokens_per_s": round((self.tokens.real - window_tokens) / max(elapsed, 1e-9), 1)}
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
                window_started, window_samples, window_tokens = time.perf_counter(), 0, self.tokens.real
            self.after_step()
        bar.close()
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
        """What runs between steps: dev evaluation, re-mining, the checkpoint (never after the last step)."""
        cfg, step = self.cfg, self.state.step
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.total_steps:
            self.eval_and_keep_best()
        if due(step, cfg.remine_steps, self.total_steps):
            self.remine(list(range(len(self.examples))), "refresh")
        if cfg.dynamic_remine and due(step, cfg.dynamic_remine_steps, self.total_steps):
            self.remine(self.tracker.stale(self.remine_settings.factor, self.remine_settings.max_abs_score),
                        "dynamic")
        if step % cfg.save_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

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
