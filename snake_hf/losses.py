"""Losses against non-IID forgetting: distillation from the model as it arrived, and label-skew-aware local losses.

* Distillation (DESIGN §4 step 5): loss = (1-λ)·task + λ·T²·KL(softmax(teacher/T) ‖ softmax(student/T)). The
  teacher is the model as it arrived at the stage; it differs from the student only in the active group and the
  always-trainable modules, so [`TeacherForward`] swaps those tensors in for one no-grad forward in eval mode (no
  dropout, no random draws) and reuses the student's output of the last frozen block instead of recomputing the
  frozen prefix.
* Logit adjustment (Menon et al., 2021): train on `logits + τ·log(prior)`, where the prior is the node's own label
  frequencies, so a node does not learn its skew into the classifier's bias.
* Restricted softmax: absent classes are masked out of the node's softmax, so it does not push them down.
* Proximal term (FedProx, Li et al., 2020): μ/2·‖w − w_start‖² over the stage's trainable tensors, towards the values
  the stage started from, so one node's skewed shard cannot carry the group far from what earlier nodes left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "ProximalTerm",
    "StageObjective",
    "TeacherForward",
    "distillation_kl",
    "label_skew_cross_entropy",
    "node_label_priors",
]


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Sum over items of T²·KL(softmax(teacher/T) ‖ softmax(student/T)), and the number of items.

    Items are rows for classification logits `[batch, classes]`; for language-model logits `[batch, tokens, vocab]`
    they are the predicted tokens whose (shifted) label is not -100.
    """
    if student.dim() == 3:
        if labels is not None:
            mask = labels[:, 1:] != -100
            student, teacher = student[:, :-1][mask], teacher[:, :-1][mask]
        else:
            student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
    return kl * temperature**2, student.shape[0]


def label_skew_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor, adjustment: float = 0.0, restrict: bool = False
) -> torch.Tensor:
    """Cross-entropy with the node's label prior: logits shifted by `adjustment·log(prior)`, and/or absent classes
    (prior 0) masked out of the softmax. Mean over the batch.

    An absent class is masked in both cases (`adjustment·log(0)` is -inf), so a node whose examples all belong to
    one class contributes an exactly zero gradient. That matters because Adam normalises a gradient by its own
    running scale: a small but systematic gradient (well above Adam's epsilon) moves the weights as far as a large
    one. A class a node holds only through a stray example or two (a share of 4e-4 shifts its logit by -7.8) leaves
    exactly such a gradient, pushing the head towards the node's majority class; `node_class_min_share` (see
    [`node_label_priors`]) counts such classes as absent. Examples whose own class is absent from the prior are left
    out of the loss; they still count in the batch size, so the mean keeps `Trainer`'s normalisation.
    """
    logits = logits.float()
    prior = prior.to(logits.device, torch.float32)
    absent = prior <= 0
    if adjustment:
        logits = logits + adjustment * torch.log(prior.masked_fill(absent, 1.0))
    if adjustment or restrict:
        logits = logits.masked_fill(absent, torch.finfo(logits.dtype).min)
    kept = ~absent[labels]
    per_example = F.cross_entropy(logits, labels.masked_fill(~kept, 0), reduction="none")
    return torch.where(kept, per_example, per_example.new_zeros(())).mean()


class TeacherForward:
    """The model as it arrived at a stage, evaluated without a copy of the model.

    Args:
        model (`nn.Module`): the trained model.
        blocks (`Sequence[nn.Module]`): the block list.
        first_block (`int`): first block of the active group; blocks below it are frozen and shared.
        tensor_names (`Sequence[str]`): the tensors that differ between teacher and student (the active group's
            trainable tensors and the always-trainable modules).

    Example:
        ```python
        >>> teacher = TeacherForward(model, blocks, first_block=2, tensor_names=names)  # at stage start
        >>> with teacher.capture():
        ...     outputs = model(**batch)            # the student's forward
        >>> teacher_logits = teacher.logits(batch)  # one no-grad forward from block 2 upward
        ```
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], first_block: int, tensor_names: Sequence[str]):
        self.model = model
        self.blocks = blocks
        self.first_block = first_block
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        self.tensors = {name: named[name] for name in tensor_names}
        self.snapshot = {name: tensor.detach().clone() for name, tensor in self.tensors.items()}
        self._prefix_output = None

    @contextlib.contextmanager
    def capture(self):
        """Keeps the student's output of the last frozen block (the shared prefix) during the student's forward."""
        if self.first_block == 0:
            yield
            return

        def keep(module, args, output):
            self._prefix_output = output

        handle = self.blocks[self.first_block - 1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def logits(self, inputs: dict) -> torch.Tensor:
        """Teacher logits for `inputs`: eval mode, teacher tensors swapped in, frozen prefix replayed from the cache."""
        was_training = self.model.training
        live = {name: tensor.data for name, tensor in self.tensors.items()}
        replayed = []
        try:
            self.model.eval()
            for name, tensor in self.tensors.items():
                tensor.data = self.snapshot[name]
            if self._prefix_output is not None:
                cached = self._prefix_output
                for block in self.blocks[: self.first_block]:
                    # The blocks below the group are identical in teacher and student: hand back the student's
                    # output of the last one instead of recomputing them (all blocks share one output format).
                    block.forward = lambda *args, _cached=cached, **kwargs: _cached
                    replayed.append(block)
            with torch.no_grad():
                outputs = self.model(**{k: v for k, v in inputs.items() if k != "labels"})
        finally:
            for block in replayed:
                del block.forward  # back to the class's forward
            for name, tensor in self.tensors.items():
                tensor.data = live[name]
            self.model.train(was_training)
            self._prefix_output = None
        return outputs["logits"] if isinstance(outputs, dict) else outputs.logits


class ProximalTerm:
    """μ/2·‖w − w_start‖² over the stage's trainable tensors, against a snapshot taken when the stage starts.

    Args:
        mu (`float`): the weight μ.
        parameters (`Sequence[torch.nn.Parameter]`): the tensors that train in the stage.

    Example:
        ```python
        >>> term = ProximalTerm(0.01, [p for p in model.parameters() if p.requires_grad])  # at stage start
        >>> loss = task_loss + term()
        ```
    """

    def __init__(self, mu: float, parameters: Sequence[torch.Tensor]):
        self.mu = mu
        self.parameters = list(parameters)
        self.start = [p.detach().clone() for p in self.parameters]

    def __call__(self) -> torch.Tensor:
        total = sum(((p.float() - s.float()) ** 2).sum() for p, s in zip(self.parameters, self.start))
        return 0.5 * self.mu * total


class StageObjective:
    """The training loss of one stage when a mitigation is on (distillation and/or a label-skew-aware loss).

    Args:
        alpha (`float`): distillation weight λ (0: no teacher).
        temperature (`float`): distillation temperature T.
        teacher ([`TeacherForward`], *optional*): the model as it arrived at the stage.
        prior (`torch.Tensor`, *optional*): the node's label frequencies, for the label-skew-aware loss.
        adjustment (`float`): logit-adjustment strength τ.
        restrict (`bool`): mask the classes the node lacks out of the softmax.
        proximal ([`ProximalTerm`], *optional*): the proximal term towards the stage's starting values.
    """

    def __init__(self, alpha, temperature, teacher=None, prior=None, adjustment=0.0, restrict=False, proximal=None):
        self.alpha = alpha
        self.temperature = temperature
        self.teacher = teacher if alpha > 0 else None
        self.prior = prior if (adjustment or restrict) else None
        self.adjustment = adjustment
        self.restrict = restrict
        self.proximal = proximal
        self.distill_total = 0.0
        self.loss_total = 0.0

    def __call__(self, base_loss, inputs: dict, num_items_in_batch, scaled: bool):
        """Returns `(loss, outputs)`.

        Args:
            base_loss (`Callable[[], tuple]`): `Trainer.compute_loss(..., return_outputs=True)` for this batch.
            inputs (`dict`): the batch.
            num_items_in_batch: as `Trainer` passes it.
            scaled (`bool`): whether `Trainer` normalises this loss by `num_items_in_batch` (then the added terms are
                normalised the same way, so gradient accumulation weighs them alike).
        """
        with self.teacher.capture() if self.teacher is not None else contextlib.nullcontext():
            loss, outputs = base_loss()
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        labels = inputs.get("labels")
        if self.prior is not None:
            task = label_skew_cross_entropy(logits, labels, self.prior, self.adjustment, self.restrict)
            loss = task * labels.shape[0] / num_items_in_batch if scaled else task
        if self.teacher is not None:
            kl_sum, count = distillation_kl(
                logits, self.teacher.logits(inputs), self.temperature, labels if logits.dim() == 3 else None
            )
            distill = kl_sum / (num_items_in_batch if scaled else max(count, 1))
            loss = (1 - self.alpha) * loss + self.alpha * distill
            self.distill_total += float(self.alpha * distill.detach())
        if self.proximal is not None:
            # Once per optimizer step: each micro-batch adds its share (Trainer divides an unscaled loss by the
            # accumulation steps itself; a scaled one is this micro-batch's share of the step's items).
            share = _batch_items(logits, labels) / num_items_in_batch if scaled else 1.0
            loss = loss + self.proximal() * share
        self.loss_total += float(loss.detach())
        return loss, outputs

    def start_values(self) -> dict[str, torch.Tensor]:
        """The values the stage started from that this objective keeps (the teacher's tensors, the proximal term's
        anchor), by name: a checkpoint taken inside the stage saves them, so a resume goes on towards the same ones."""
        values = {}
        if self.teacher is not None:
            values |= {f"teacher/{name}": tensor for name, tensor in self.teacher.snapshot.items()}
        if self.proximal is not None:
            values |= {f"proximal/{i}": tensor for i, tensor in enumerate(self.proximal.start)}
        return values

    def restore_start_values(self, values: dict[str, torch.Tensor]) -> None:
        """Puts back the stage-start values [`start_values`] gave (from a checkpoint taken inside the stage); raises
        `ValueError` naming what differs when they are not this objective's (names or shapes)."""
        own = self.start_values()
        differ = sorted(set(own) ^ set(values)) or [n for n in own if own[n].shape != values[n].shape]
        if differ:
            raise ValueError(
                f"the saved stage-start values do not match this stage's objective (first: {differ[0]!r})"
            )
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(values[name])

    @property
    def distill_share(self) -> float | None:
        """Share of the stage's training loss that came from distillation."""
        if self.teacher is None or not self.loss_total:
            return None
        return self.distill_total / self.loss_total


def _batch_items(logits: torch.Tensor, labels: torch.Tensor | None) -> int:
    """Items this micro-batch counts in `num_items_in_batch`: rows, or (language models) shifted labels not -100."""
    if labels is None:
        return logits.shape[0]
    if logits.dim() == 3:
        return int((labels[:, 1:] != -100).sum())
    return labels.shape[0]


def node_label_priors(label_ids: Sequence[Sequence[int]], num_classes: int, min_share: float = 0.0) -> torch.Tensor:
    """Per-node label frequencies `[num_nodes, num_classes]` from each node's labels.

    Args:
        label_ids (`Sequence[Sequence[int]]`): each node's class ids.
        num_classes (`int`): number of classes.
        min_share (`float`, defaults to `0.0`): a class below this share of a node's labels counts as absent there
            (frequency 0, the others renormalised), so a stray example or two does not make a class "held".

    Example:
        ```python
        >>> node_label_priors([[0, 0, 0, 1], [1, 1]], num_classes=2, min_share=0.3)
        tensor([[1., 0.],
                [0., 1.]])
        ```
    """
    priors = torch.zeros(len(label_ids), num_classes)
    for node, labels in enumerate(label_ids):
        counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).float()
        share = counts / counts.sum().clamp_min(1)
        if min_share > 0 and bool((share >= min_share).any()):
            share = share.masked_fill(share < min_share, 0.0)
            share = share / share.sum()
        priors[node] = share
    return priors
