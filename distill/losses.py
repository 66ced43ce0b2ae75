"""Hash-code distillation losses, in a registry selectable and weighted from the recipe.

Each loss takes a :class:`LossInputs` and returns a scalar. Names (recipe ``student.losses``):

- ``bernoulli_kd`` (default): T^2 · mean_j BCE(sigmoid(z_s/T), sigmoid(z_t/T)), i.e. the
  per-bit Bernoulli KL up to a constant, computed as BCE-with-logits on z_s/T against the soft
  target sigmoid(z_t/T).
- ``dth_mse``: MSE(sigmoid(z_s), sigmoid(z_t)), the DTH paper's own code.
- ``code_bce``: BCE-with-logits(z_s, (C_y + 1) / 2) against the teacher's class codes.
- ``dsh``: the DSH pairwise loss over the batch (similar pairs pulled together, dissimilar
  pushed beyond a margin, plus a regulariser towards ±1): the labels-only baseline of the DTH paper.
- ``code_relation``: matches the distribution of the code (not each bit): for every image of the batch, the
  teacher's distribution over the other images by Hamming distance, softmax(-d / tau), learnt twice, once with
  student codes on both sides (a student-built database) and once with student queries against teacher codes
  (a teacher-built database, the asymmetric search). KL(teacher || student), summed over the two.

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
    relation_temperature: float = 2.0  # code_relation: tau, in bits of Hamming distance


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


def sign_tanh_ste(z: torch.Tensor) -> torch.Tensor:
    """sign(z) forward (sign(0) = +1); the gradient of tanh(z) backward, so bits already far from 0 are left alone."""
    soft = torch.tanh(z)
    return soft + (torch.where(z >= 0, 1.0, -1.0) - soft).detach()


def _log_neighbours(queries: torch.Tensor, database: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax_j(-d(q_i, c_j) / tau) over the other items j != i of the batch, from ±1 codes [B, k]: with
    d = (k - <q, c>) / 2 that is a softmax of <q, c> / (2 tau). Shape [B, B - 1]."""
    n = len(queries)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=queries.device)
    similarity = (queries @ database.t()) / (2 * tau)
    return torch.log_softmax(similarity[off_diagonal].view(n, n - 1), dim=1)


def code_relation(b: LossInputs) -> torch.Tensor:
    """KL(teacher || student) of each image's distribution over its batch neighbours by Hamming distance, for
    student codes against student codes and against the teacher's codes; 0 when the student's codes equal the
    teacher's. Student codes are sign(z_s) with :func:`sign_tanh_ste`, so the distances are those a search
    computes; the teacher's are sign(z_t)."""
    if len(b.student) < 2:
        return b.student.sum() * 0.0  # no neighbours to match
    teacher_codes = torch.where(b.teacher >= 0, 1.0, -1.0).to(b.student.dtype)
    student_codes = sign_tanh_ste(b.student)
    target = _log_neighbours(teacher_codes, teacher_codes, b.relation_temperature)
    symmetric = _log_neighbours(student_codes, student_codes, b.relation_temperature)
    asymmetric = _log_neighbours(student_codes, teacher_codes, b.relation_temperature)
    kl = F.kl_div(symmetric, target, log_target=True, reduction="batchmean") + \
        F.kl_div(asymmetric, target, log_target=True, reduction="batchmean")
    return kl


LOSSES: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "bernoulli_kd": bernoulli_kd,
    "dth_mse": dth_mse,
    "code_bce": code_bce,
    "dsh": dsh,
    "code_relation": code_relation,
}
NEEDS_TEACHER = {"bernoulli_kd", "dth_mse", "code_relation"}
NEEDS_LABELS = {"code_bce", "dsh"}


def weighted_loss(weights: dict[str, float]) -> Callable[[LossInputs], dict[str, torch.Tensor]]:
    """The recipe's weighted sum of registry losses (zero weights are skipped), returned with its parts:
    ``{"loss": total, name: unweighted part, ...}`` (the trainer logs each part per epoch)."""
    active = {name: w for name, w in weights.items() if w > 0}

    def total(batch: LossInputs) -> dict[str, torch.Tensor]:
        parts = {name: LOSSES[name](batch) for name in active}
        return {"loss": sum(w * parts[name] for name, w in active.items()), **parts}

    return total
