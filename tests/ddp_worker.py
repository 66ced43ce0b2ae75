"""Run under torchrun by tests/test_ddp.py: LLC phase 1 with DDP (gloo), then dump this rank's weights.

Phase 1 uses the codebook outside ``forward`` (logits = z · sign(W)^T), the case DDP must still sync.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hashdistill.data import build_dataset
from hashdistill.distill.models import LLCTeacher
from hashdistill.recipe import DataConfig, OptimConfig
from hashdistill.rundir import RunDir
from hashdistill.trainer import TrainTask, fit, init_distributed, is_main_process

out = Path(sys.argv[1])
torch.set_num_threads(1)
device = torch.device("cpu")
rank, world = init_distributed(device)
torch.manual_seed(0)
teacher = LLCTeacher("test_resnet", bits=8, num_classes=4)


def phase1_loss(model, batch):
    x, y = batch
    return F.cross_entropy(teacher.class_logits(model(x)), y, label_smoothing=0.1)


task = TrainTask("ddp-phase1", teacher, [{"params": list(teacher.parameters())}], OptimConfig(epochs=2, lr=3e-3),
                 build_dataset(DataConfig(dataset="synthetic", image_size=16), "train"), phase1_loss, batch_size=16)
fit(task, RunDir(out / "run", writer=is_main_process()), device, seed=0)
save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(out / f"rank{rank}-of-{world}.safetensors"))
