"""One training step's loss and summed gradients, written by rank 0 (run alone or under torchrun).

python tests/train_step.py OUT.pt distill-train-flags...
"""
import argparse
import sys

import torch

from distill.config import add_dataclass_arguments, config_from_args
from distill.training.config import TrainConfig
from distill.training.trainer import Trainer
from distill.training.distributed import close_distributed, init_distributed, sum_gradients

out, argv = sys.argv[1], sys.argv[2:]
parser = argparse.ArgumentParser()
add_dataclass_arguments(parser, TrainConfig)
cfg = config_from_args(TrainConfig, parser.parse_args(argv))
ctx = init_distributed("cpu")
trainer = Trainer(cfg, ctx)
step = trainer.backward(trainer.plan.batches[0])
loss, parts = float(step.total.detach()), step.parts
params = [p for p in trainer.encoder.backbone.parameters() if p.requires_grad]
sum_gradients(params, ctx)
if ctx.is_main:
    torch.save({"loss": loss, "parts": parts, "grads": [None if p.grad is None else p.grad.clone() for p in params],
                "queries": [g.example for g in trainer.plan.batches[0]]}, out)
close_distributed(ctx)
