"""One training step's loss and summed gradients, written by rank 0 (run alone or under torchrun).

python tests/train_step.py OUT.pt distill-train-flags...
"""
import argparse
import sys

import torch

from distill.config import add_dataclass_arguments, config_from_args
from distill.train import Trainer, TrainConfig
from distill.training.distributed import close_distributed, init_distributed, sum_gradients

out, argv = sys.argv[1], sys.argv[2:]
parser = argparse.ArgumentParser()
add_dataclass_arguments(parser, TrainConfig)
cfg = config_from_args(TrainConfig, parser.parse_args(argv))
ctx = init_distributed("cpu")
trainer = Trainer(cfg, ctx)
loss, parts, _ = trainer.micro_step(trainer.plan.batches[0])
params = [p for p in trainer.encoder.backbone.parameters() if p.requires_grad]
sum_gradients(params, ctx)
if ctx.is_main:
    torch.save({"loss": loss, "parts": parts, "grads": [None if p.grad is None else p.grad.clone() for p in params],
                "queries": [g.example for g in trainer.plan.batches[0]]}, out)
close_distributed(ctx)
