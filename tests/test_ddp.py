"""The trainer under torchrun: 2 CPU processes with gloo end with identical weights."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hashdistill.distill.models import LLCTeacher


def test_two_ranks_agree(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = load_file(tmp_path / "rank0-of-2.safetensors")
    rank1 = load_file(tmp_path / "rank1-of-2.safetensors")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    torch.manual_seed(0)
    initial = LLCTeacher("test_resnet", bits=8, num_classes=4).state_dict()
    assert not torch.equal(initial["codebook"], rank0["codebook"])  # the codebook trained (and stayed in sync)
    assert not torch.equal(initial["hash_head.weight"], rank0["hash_head.weight"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per epoch, written by rank 0 only
