"""Starting a backbone from a weights file on disk, and failing fast on the hub when offline."""

from __future__ import annotations

import pickle
import time

import pytest
import timm
import torch
import yaml
from cli_support import refused
from conftest import TINY
from safetensors.torch import save_file

from hashdistill.distill.models import HashStudent, LLCTeacher, create_backbone
from hashdistill.distill.weights import hub_reachable
from hashdistill.errors import UserError


@pytest.fixture(scope="module")
def full_model_state():
    """A whole timm model's state dict, classifier included, as a user would have it from training elsewhere."""
    torch.manual_seed(7)
    return timm.create_model("test_resnet", num_classes=10).state_dict()


def _backbone_part(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("form", ["safetensors", "pth", "pth-wrapped", "pth-ddp"])
def test_a_weights_file_gives_the_state_dict_it_came_from(full_model_state, tmp_path, form):
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in full_model_state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        state = {f"module.{k}": v for k, v in full_model_state.items()} if form == "pth-ddp" else full_model_state
        torch.save({"state_dict": state, "epoch": 3} if form == "pth-wrapped" else state, path)
    teacher = LLCTeacher("test_resnet", 8, 3, weights=str(path))
    loaded = teacher.backbone.state_dict()
    expected = _backbone_part(full_model_state)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    student = HashStudent("test_resnet", 8, 3, weights=str(path))
    assert torch.equal(student.backbone.conv1[0].weight, full_model_state["conv1.0.weight"])


def test_a_weights_file_of_another_architecture_is_one_clear_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), str(path))
    with pytest.raises(UserError, match="does not fit this backbone .*missing"):
        create_backbone("test_resnet", weights=str(path))


def test_a_mismatched_weights_file_exits_2_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), str(path))
    recipe = tmp_path / "input.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "teacher": {**TINY["teacher"], "weights": str(path)}}))
    refused(capsys, tmp_path, "run", recipe, "--out", tmp_path / "run", "--stages", "teacher",
            expect="does not fit this backbone")


def test_a_pth_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.0.weight": Payload()}))
    with pytest.raises(UserError, match="is a pickle file holding more than tensors: hashdistill never unpickles"):
        create_backbone("test_resnet", weights=str(path))
    assert not marker.exists()


def test_pretrained_and_a_weights_file_are_exclusive(tmp_path):
    with pytest.raises(UserError, match="either pretrained: true .* or a weights file"):
        create_backbone("test_resnet", pretrained=True, weights=str(tmp_path / "w.safetensors"))


@pytest.mark.skipif(hub_reachable(), reason="the hub is reachable here: nothing to fail")
def test_pretrained_without_the_hub_fails_in_seconds():
    start = time.perf_counter()
    with pytest.raises(UserError, match="could not fetch pretrained weights for 'resnet18'.*weights file"):
        create_backbone("resnet18", pretrained=True)
    assert time.perf_counter() - start < 15


@pytest.mark.skipif(hub_reachable(), reason="the hub is reachable here: nothing to fail")
def test_the_offline_switch_is_undone_after_the_attempt(monkeypatch):
    import os

    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hub_constants.HF_HUB_OFFLINE
    with pytest.raises(UserError):
        create_backbone("resnet18", pretrained=True)
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE == before


def test_a_proxy_or_mirror_is_left_to_the_hub_client(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a mirror: no direct probe of the hub is made
    assert hub_reachable()
