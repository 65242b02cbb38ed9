"""The resumable training checkpoint, in files that load without running code.

`OUTDIR/checkpoint/` holds

    model.safetensors   the trained module's weights (the backbone; under `distill pretrain` with its MLM
                        head or TSDAE decoder): safetensors, no pickle at all
    optimizer.pt        AdamW, scheduler and grad-scaler state: tensors and numbers only, read back with
                        `torch.load(weights_only=True)`, whose unpickler refuses any other object
    rng.safetensors     torch's CPU (and CUDA) generator states, as uint8 tensors
    state.json          {"state": counters and data position, ...}: for `distill train` also the
                        best/before metrics, the epoch plan, every example's pool, the re-mining tracker
                        (`loop.Loop` writes it, the trainer says what goes in)

A checkpoint folder from an untrusted place can therefore at worst fail to
load; it cannot run code (an older `checkpoint.pt`, a full pickle, is refused).
A new checkpoint is written beside the old one and swapped in by renames,
with `checkpoint.old/` covering a kill between the two renames, so a killed
save leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import DataError
from ..files import fsync_folder, write_json_atomic
from .batches import EpochPlan, Group

class JsonState:
    """A dataclass of counters that a checkpoint's state.json holds as a plain object."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict):
        return cls(**payload)


@dataclass
class TrainState(JsonState):
    """Where a run is: counters, the evaluations kept, and how much of the log belongs to this state."""

    step: int = 0                  # optimizer steps done
    epoch: int = 0
    batch: int = 0                 # batches of this epoch's plan done
    remine_rounds: int = 0
    best: dict | None = None       # {"step", "metrics"} of the best evaluation so far
    before: dict | None = None     # metrics before training
    log_bytes: int = 0             # train_log.jsonl is cut back to this on resume


FOLDER = "checkpoint"
LEGACY_FILE = "checkpoint.pt"
MODEL, OPTIMIZER, RNG, STATE = "model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"


def plan_to_json(plan: EpochPlan) -> dict:
    return {"left_out": plan.left_out, "batches": [[{
        "example": g.example, "negatives": g.negatives.tolist(),
        "rewards": None if g.rewards is None else g.rewards.tolist()} for g in batch] for batch in plan.batches]}


def plan_from_json(payload: dict) -> EpochPlan:
    return EpochPlan([[Group(g["example"], np.asarray(g["negatives"], dtype=np.int64),
                             None if g["rewards"] is None else np.asarray(g["rewards"], dtype=np.float64))
                       for g in batch] for batch in payload["batches"]], payload["left_out"])


def rng_tensors(state: dict) -> dict[str, torch.Tensor]:
    tensors = {"cpu": state["cpu"]}
    tensors.update({f"cuda.{i}": t for i, t in enumerate(state.get("cuda", []))})
    return tensors


def rng_from_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    state = {"cpu": tensors["cpu"]}
    cuda = sorted((int(k.split(".")[1]), t) for k, t in tensors.items() if k.startswith("cuda."))
    if cuda:
        state["cuda"] = [t for _, t in cuda]
    return state


def _fsynced(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def current_folder(out: Path) -> Path | None:
    """The checkpoint folder to resume from: checkpoint/, or checkpoint.old/ when a save was killed between
    its two renames; None when there is none."""
    for name in (FOLDER, FOLDER + ".old"):
        if (out / name / STATE).is_file():
            return out / name
    return None


def save(out: Path, *, model: torch.nn.Module, optimizer_state: dict, rng: dict, state: dict) -> None:
    """Write a checkpoint folder next to the current one, then swap it in."""
    from safetensors.torch import save_file, save_model

    tmp, old, final = out / (FOLDER + ".tmp"), out / (FOLDER + ".old"), out / FOLDER
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL))
    torch.save(optimizer_state, tmp / OPTIMIZER)
    save_file({k: v.contiguous() for k, v in rng_tensors(rng).items()}, str(tmp / RNG))
    for name in (MODEL, OPTIMIZER, RNG):
        _fsynced(tmp / name)
    write_json_atomic(tmp / STATE, state)  # written last: a folder with state.json is whole
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_folder(out)
    shutil.rmtree(old, ignore_errors=True)


def load(folder: Path, model: torch.nn.Module, device: torch.device) -> tuple[dict, dict, dict]:
    """(optimizer state, rng state, state.json) of a checkpoint folder, with the model's weights loaded in place.
    Nothing in it can run code: a file that is not plain tensors and numbers is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    try:
        missing, unexpected = load_model(model, str(folder / MODEL), strict=False, device=str(device))
        if missing or unexpected:
            raise DataError(f"{folder / MODEL}: does not fit this model (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}): it belongs to another run")
        optimizer_state = torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
        rng = rng_from_tensors(load_file(str(folder / RNG)))
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except DataError:
        raise
    except pickle.UnpicklingError:  # torch's weights-only unpickler met an object other than tensors and numbers
        raise DataError(f"{folder / OPTIMIZER}: refused: it holds objects other than tensors and numbers, and "
                        "loading it could run code; --overwrite to start again") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"{folder}: cannot be loaded as a training checkpoint ({type(exc).__name__}: {first}); "
                        "--overwrite to start again") from None
    return optimizer_state, rng, state
