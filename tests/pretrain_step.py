"""One pretraining batch's loss and summed gradients, written by rank 0 (run alone or under torchrun).

python tests/pretrain_step.py OUT.pt distill-pretrain-flags...
"""
import argparse
import sys

import torch

from distill.config import add_dataclass_arguments, config_from_args
from distill.training.distributed import close_distributed, init_distributed, sum_gradients
from distill.training.pretrain import KIND, PretrainConfig, Pretrainer
from distill.training.run_folder import RunFolder

out, argv = sys.argv[1], sys.argv[2:]
parser = argparse.ArgumentParser()
add_dataclass_arguments(parser, PretrainConfig)
cfg = config_from_args(PretrainConfig, parser.parse_args(argv))
ctx = init_distributed("cpu")
trainer = Pretrainer(cfg, ctx, RunFolder(cfg.output, kind=KIND))
trainer.objective.train()
loss, parts = trainer.backward_next()
params = trainer.trainable_parameters()
sum_gradients(params, ctx)
if ctx.is_main:
    torch.save({"loss": loss, "grads": [None if p.grad is None else p.grad.clone() for p in params]}, out)
close_distributed(ctx)
