"""The optimizer steps that `distill train` (`trainer.Trainer`) and `distill pretrain` (`pretrain.Pretrainer`)
share: one loop, so resume, kill -9, mixed precision, data parallelism and a diverging loss behave alike in both.

A subclass says what is trained and on what data; `Loop` does the rest:

    module              what the checkpoint saves (the student's backbone, or the backbone under its MLM head or
                        TSDAE decoder); AdamW is built over its parameters
    state               a dataclass with `step` and `log_bytes` plus the subclass's data position, saved as JSON
    before_step()       make sure one more optimizer step's batches exist (train: plan the next epoch)
    backward_next()     forward and backward of the next batch (this rank's share), advancing the data position;
                        `check_finite` before the backward; returns the loss and its terms
    log_record(losses, terms)   the log line of a logging step
    after_step()        what runs between steps, before the checkpoint (train: evaluation, re-mining)
    checkpoint_extra() / restore(saved, folder)   what else the checkpoint holds (train: plan, pools, tracker)
    stop_advice         what to change when the loss is NaN or infinite

Each optimizer step takes `--gradient-accumulation-steps` batches, each backward scaled by 1/accumulation (and by
the fp16 grad scaler; bf16/fp16 autocast on GPUs under `--precision auto`). Each rank's loss is its share of the
global batch's, so the gradients summed over ranks are the global batch's (`distributed`); they are unscaled,
clipped to `--max-grad-norm`, and AdamW steps under the warm-up schedule. A NaN or infinite loss raises
`NonFiniteLoss` before its backward: the weights stay those of the last good step and the last checkpoint is kept.
The log is appended and fsync'd a line at a time; every `--save-steps` `OUTDIR/checkpoint/` takes the weights,
the AdamW, schedule and scaler state, the random state and `state` (`checkpoint`), and `load_checkpoint` puts all
of it back and cuts the log to what was logged by then: a run killed and resumed ends with the bytes of one
never killed.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from labelers.errors import UsageError

from ..data import DataError
from . import checkpoint
from .distributed import Distributed, barrier, sum_gradients
from .optim import make_optimizer, make_scheduler, rng_state, set_rng_state
from .run_folder import RunFolder
from .step import NonFiniteLoss


class Loop:
    log_name: str            # the run's log in OUTDIR (train_log.jsonl, pretrain_log.jsonl)
    progress_name: str       # the progress bar's label
    stop_advice: str         # the end of the non-finite loss message: what to change
    state: object            # step, log_bytes, and the subclass's data position (to_json / from_json)

    def __init__(self, cfg, ctx: Distributed, folder: RunFolder, *, encoder, module: torch.nn.Module,
                 total_steps: int, amp: torch.dtype | None) -> None:
        """`cfg` gives learning_rate, weight_decay, scheduler, warmup_ratio, gradient_accumulation_steps,
        max_grad_norm, logging_steps, save_steps, show_progress and overwrite; `encoder` is the student saved at
        the end."""
        self.cfg, self.ctx, self.folder = cfg, ctx, folder
        self.out = folder.path
        self.encoder, self.module = encoder, module
        self.device = encoder.device
        self.total_steps, self.amp = total_steps, amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.optimizer = make_optimizer(module, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        self.step_seconds = 0.0  # time this process's steps took (forward, backward, optimizer)

    # ----- what a subclass provides ---------------------------------------------------------------------------
    def before_step(self) -> None:
        pass

    def backward_next(self) -> tuple[float, dict[str, float]]:
        raise NotImplementedError

    def log_record(self, losses: list[float], terms: dict[str, float]) -> dict:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        return {}

    def restore(self, saved: dict, folder: Path) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradients are summed over ranks and clipped, in that order (AdamW's)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ----- one step -------------------------------------------------------------------------------------------
    def autocast(self):
        return (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                else contextlib.nullcontext())

    def scaled_backward(self, total: torch.Tensor) -> None:
        """Backward of one of the step's batches: scaled by 1/accumulation and by the fp16 grad scaler."""
        self.scaler.scale(total * (1.0 / self.cfg.gradient_accumulation_steps)).backward()

    def check_finite(self, value: float, parts: dict[str, float]) -> None:
        """NonFiniteLoss when the loss is NaN or infinite (call it before the backward, on every rank alike)."""
        if not math.isfinite(value):
            raise NonFiniteLoss(self.describe_stop(value, parts))

    def describe_stop(self, value: float, parts: dict) -> str:
        saved = checkpoint.current_folder(self.out)
        kept = (f"the checkpoint of step {json.loads((saved / checkpoint.STATE).read_text())['state']['step']} "
                f"in {saved} is kept (--resume continues from it)") if saved else "no checkpoint was written yet"
        terms = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
        return (f"step {self.state.step + 1}: the loss is {value} ({terms}); training stopped before this step "
                f"changed the model; {kept}. {self.stop_advice}")

    def optimizer_step(self) -> None:
        parameters = self.trainable_parameters()
        sum_gradients(parameters, self.ctx)
        self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ----- the loop -------------------------------------------------------------------------------------------
    def run_steps(self) -> None:
        """Steps until `total_steps`: log every `--logging-steps` (and at the last), checkpoint every
        `--save-steps` (never at the last: the finished model is written instead)."""
        from tqdm.auto import tqdm

        cfg, state, accumulate = self.cfg, self.state, self.cfg.gradient_accumulation_steps
        bar = tqdm(total=self.total_steps, initial=state.step, desc=self.progress_name, unit="step",
                   dynamic_ncols=True, disable=not (cfg.show_progress and self.ctx.is_main))
        losses: list[float] = []  # every batch's loss since this process started
        while state.step < self.total_steps:
            self.before_step()
            terms: dict[str, float] = {}
            step_started = time.perf_counter()
            for _ in range(accumulate):
                value, parts = self.backward_next()
                losses.append(value)
                for name, part in parts.items():
                    terms[name] = terms.get(name, 0.0) + part / accumulate
            self.optimizer_step()
            self.step_seconds += time.perf_counter() - step_started
            state.step += 1
            bar.update(1)
            if state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                record = self.log_record(losses, terms)
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
            self.after_step()
            if state.step % cfg.save_steps == 0 and state.step < self.total_steps:
                self.save_checkpoint()
        bar.close()

    # ----- the run's first writes, log, checkpoint, model -------------------------------------------------------
    def begin(self, settings: dict, resume_from: Path | None) -> None:
        """The run's first writes, once the subclass read and checked every input: --overwrite removes the previous
        run's entries (and no more), a new run starts its log afresh, the folder is claimed with these settings;
        then a resumed run loads its checkpoint (`run_folder.resume_point` found it)."""
        if self.ctx.is_main:
            if self.cfg.overwrite:
                removed = self.folder.remove_run()
                if removed:
                    print(f"--overwrite: removed the previous run's {len(removed)} entries from {self.out}")
            if resume_from is None:
                (self.out / self.log_name).unlink(missing_ok=True)
            self.folder.claim(settings)
        barrier(self.ctx)
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    def log(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        self.folder.wrote(self.log_name)
        with open(self.out / self.log_name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.state.log_bytes = f.tell()

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            self.folder.wrote(checkpoint.FOLDER, checkpoint.FOLDER + ".tmp", checkpoint.FOLDER + ".old")
            optimizer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "scaler": self.scaler.state_dict()}
            checkpoint.save(self.out, model=self.module, optimizer_state=optimizer, rng=rng_state(),
                            state={"state": self.state.to_json(), **self.checkpoint_extra()})
        barrier(self.ctx)

    def load_checkpoint(self, folder: Path) -> None:
        optimizer, rng, saved = checkpoint.load(folder, self.module, self.device)
        try:
            self.optimizer.load_state_dict(optimizer["optimizer"])
            self.scheduler.load_state_dict(optimizer["scheduler"])
            self.scaler.load_state_dict(optimizer["scaler"])
            self.restore(saved, folder)
        except UsageError:
            raise
        except (KeyError, TypeError, ValueError) as exc:  # another run's or another version's checkpoint
            raise DataError(f"{folder}: does not fit this run ({type(exc).__name__}: {exc}); --overwrite to start "
                            "again") from None
        set_rng_state({k: (v.cpu() if torch.is_tensor(v) else [t.cpu() for t in v]) for k, v in rng.items()})
        if self.ctx.is_main and (self.out / self.log_name).exists():
            with open(self.out / self.log_name, "r+b") as f:  # drop what was logged after the checkpoint
                f.truncate(self.state.log_bytes)

    def save_model(self, name: str | None = None) -> None:
        """The student into the run folder (None) or a sub-folder of it (`best`)."""
        if self.ctx.is_main:
            self.folder.save_model(self.encoder, name)
        barrier(self.ctx)
