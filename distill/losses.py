"""Hash-code distillation losses, in a registry selectable and weighted from the recipe.

Each loss takes a :class:`LossInputs` and returns a scalar. Names (recipe ``student.losses``):

- ``bernoulli_kd`` (default): T^2 · mean_j BCE(sigmoid(z_s/T), sigmoid(z_t/T)), i.e. the
  per-bit Bernoulli KL up to a constant, computed as BCE-with-logits on z_s/T against the soft
  target sigmoid(z_t/T).
- ``dth_mse``: MSE(sigmoid(z_s), sigmoid(z_t)), the DTH paper's own code.
- ``code_bce``: BCE-with-logits(z_s, (C_y + 1) / 2) against the teacher's class codes.
- ``dsh``: the DSH pairwise loss over the batch (similar pairs pulled together, dissimilar
  pushed beyond a margin, plus a regulariser towards ±1), for unlabeled-style training.

Label -1 marks an image whose label is held back (``data.labelled_fraction``, ``data.unlabelled_root``):
the label losses skip it, the teacher-matching losses use it like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossInputs:
    student: torch.Tensor
    teacher: torch.Tensor | None
    labels: torch.Tensor
    class_codes: torch.Tensor
    temperature: float = 2.0
    dsh_margin: float | None = None


def bernoulli_kd(b: LossInputs) -> torch.Tensor:
    t = b.temperature
    return t * t * F.binary_cross_entropy_with_logits(b.student / t, torch.sigmoid(b.teacher / t))


def dth_mse(b: LossInputs) -> torch.Tensor:
    return F.mse_loss(torch.sigmoid(b.student), torch.sigmoid(b.teacher))


def code_bce(b: LossInputs) -> torch.Tensor:
    """Mean over the batch's labelled images (an unlabelled image's row is masked out, not indexed away, so no
    host sync); 0 for a batch without any."""
    labelled = b.labels >= 0
    targets = (b.class_codes[b.labels.clamp(min=0)] + 1) / 2
    per_image = F.binary_cross_entropy_with_logits(b.student, targets, reduction="none").mean(1)
    return (per_image * labelled).sum() / labelled.sum().clamp(min=1)


def dsh(b: LossInputs, regulariser: float = 0.01) -> torch.Tensor:
    """DSH (Liu et al. 2016): 0.5·d² for similar pairs, 0.5·max(m − d², 0) for dissimilar, m = 2k, over the
    pairs of labelled images; the regulariser towards ±1 needs no label and covers every image."""
    z = b.student
    margin = b.dsh_margin if b.dsh_margin is not None else 2.0 * z.shape[1]
    dist2 = torch.cdist(z, z).pow(2)
    similar = (b.labels[:, None] == b.labels[None, :]).float()
    pairwise = 0.5 * similar * dist2 + 0.5 * (1 - similar) * F.relu(margin - dist2)
    labelled = (b.labels >= 0).float()
    pairs = labelled[:, None] * labelled[None, :] * (1 - torch.eye(len(z), device=z.device))
    pair_loss = (pairwise * pairs).sum() / pairs.sum().clamp(min=1)
    return pair_loss + regulariser * (z.abs() - 1).abs().mean()


LOSSES: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "bernoulli_kd": bernoulli_kd,
    "dth_mse": dth_mse,
    "code_bce": code_bce,
    "dsh": dsh,
}
NEEDS_TEACHER = {"bernoulli_kd", "dth_mse"}


def weighted_loss(weights: dict[str, float]) -> Callable[[LossInputs], torch.Tensor]:
    """The recipe's weighted sum of registry losses (zero weights are skipped)."""
    active = {name: w for name, w in weights.items() if w > 0}

    def total(batch: LossInputs) -> torch.Tensor:
        return sum(w * LOSSES[name](batch) for name, w in active.items())

    return total
