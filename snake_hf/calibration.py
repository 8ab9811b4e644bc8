"""End-of-run repairs against label skew, from statistics the nodes compute on their own shards.

Trained one node after another on label-skewed shards, a model ends biased towards the last nodes' classes in two
places that a few statistics can repair without moving any data:

* **The classifier** (CCVR: Luo et al., 2021, "No Fear of Heterogeneity: Classifier Calibration for Federated
  Learning with Non-IID Data"). Each node computes, with the final model, the count, mean and variance (diagonal) or
  covariance (full) of the head's input features for every class it holds ([`class_feature_stats`]). Pooled
  ([`pool_class_stats`]), they give one Gaussian per class; the head is re-fit on an equal number of virtual features
  drawn from every class's Gaussian ([`calibrate_head`]), so no class wins by having been trained last.
* **Batch norm.** A group's running statistics are those of the nodes that trained it last. Each node recomputes them
  over its own shard (a cumulative average, as `torch.optim.swa_utils.update_bn` does; [`batchnorm_moments`]) and the
  pooled, count-weighted moments ([`pool_batchnorm`]) become the model's ([`load_batchnorm`]).

What the statistics reveal about a node: its number of examples of every class, the mean of its examples' features
per class, and their variances (or covariances), plus per batch-norm channel the mean and variance of its
activations. No example travels, but these are aggregates of the node's private data (a class count of 0 says the node
has none of that class).

Pure torch: the trainer's final pass (`snake_hf.trainer.final_pass`) moves the statistics between nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "FEATURE_COVARIANCES",
    "ClassFeatureStats",
    "batchnorm_moments",
    "calibrate_head",
    "class_feature_stats",
    "find_head",
    "load_batchnorm",
    "pool_batchnorm",
    "pool_class_stats",
]

FEATURE_COVARIANCES = ("diagonal", "full")


def find_head(model: nn.Module, tensor_names: Iterable[str]) -> tuple[str, nn.Linear]:
    """The classifier: the last `nn.Linear` (in module order) whose weight is one of `tensor_names` (the tensors that
    train and travel), e.g. VGG's last linear layer or a PEFT classifier's trainable copy (`modules_to_save`).

    Raises:
        `ValueError`: when there is none.
    """
    names = set(tensor_names)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in names]
    if not found:
        raise ValueError(
            "`head_calibration` needs a trainable linear classifier (an nn.Linear whose weight trains), but the model "
            "has none; turn head_calibration off."
        )
    return found[-1]


@dataclass
class ClassFeatureStats:
    """Per-class statistics of the head's input features on one node (or pooled over nodes).

    Args:
        counts (`torch.Tensor`): `[C]` examples per class.
        means (`torch.Tensor`): `[C, D]` feature mean per class (0 where the count is 0).
        spreads (`torch.Tensor`): `[C, D]` variances (diagonal) or `[C, D, D]` covariances (full), population (divided
            by the count), 0 where the count is 0.
    """

    counts: torch.Tensor
    means: torch.Tensor
    spreads: torch.Tensor

    @property
    def covariance(self) -> str:
        return "full" if self.spreads.dim() == 3 else "diagonal"

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Named float32 tensors, as they travel in a payload part."""
        return {f"{prefix}.{k}": getattr(self, k).float().contiguous() for k in ("counts", "means", "spreads")}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> ClassFeatureStats:
        return cls(*(tensors[f"{prefix}.{k}"] for k in ("counts", "means", "spreads")))

    @staticmethod
    def shapes(num_classes: int, dim: int, covariance: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors [`to_tensors`] gives (without the prefix), known before any data is seen."""
        spread = (num_classes, dim, dim) if covariance == "full" else (num_classes, dim)
        return {"counts": (num_classes,), "means": (num_classes, dim), "spreads": spread}


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward(model: nn.Module, batch: Mapping) -> None:
    model(**{k: v for k, v in batch.items() if k != "labels"})


def class_feature_stats(
    model: nn.Module, head: nn.Linear, batches: Iterable[Mapping], num_classes: int, covariance: str = "diagonal"
) -> ClassFeatureStats:
    """Count, mean and variance (or covariance) of `head`'s input features per class, over `batches` (each with
    `labels`), with the model in eval mode and no gradients. Sums are kept in float64."""
    dim = head.in_features
    counts = torch.zeros(num_classes, dtype=torch.float64)
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    squares = torch.zeros((num_classes, dim, dim) if covariance == "full" else (num_classes, dim), dtype=torch.float64)
    captured = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in batches:
                captured.clear()
                _forward(model, batch)
                features = captured[-1].reshape(-1, dim).double().cpu()
                labels = batch["labels"].reshape(-1).cpu()
                counts += torch.bincount(labels, minlength=num_classes).double()
                sums.index_add_(0, labels, features)
                if covariance == "full":
                    squares.index_add_(0, labels, features[:, :, None] * features[:, None, :])
                else:
                    squares.index_add_(0, labels, features**2)
    finally:
        handle.remove()
    return _moments_to_stats(counts, sums, squares)


def _moments_to_stats(counts: torch.Tensor, sums: torch.Tensor, squares: torch.Tensor) -> ClassFeatureStats:
    safe = counts.clamp_min(1)
    means = sums / safe[:, None]
    if squares.dim() == 3:
        spreads = squares / safe[:, None, None] - means[:, :, None] * means[:, None, :]
    else:
        spreads = (squares / safe[:, None] - means**2).clamp_min(0)
    return ClassFeatureStats(counts.float(), means.float(), spreads.float())


def pool_class_stats(stats: Iterable[ClassFeatureStats]) -> ClassFeatureStats:
    """The statistics of the union of the nodes' data: counts add, means and second moments are count-weighted."""
    stats = list(stats)
    counts = sum(s.counts.double() for s in stats)
    sums = sum(s.counts.double()[:, None] * s.means.double() for s in stats)
    squares = 0
    for s in stats:
        means, spreads, weight = s.means.double(), s.spreads.double(), s.counts.double()
        if spreads.dim() == 3:
            squares = squares + weight[:, None, None] * (spreads + means[:, :, None] * means[:, None, :])
        else:
            squares = squares + weight[:, None] * (spreads + means**2)
    return _moments_to_stats(counts, sums, squares)


def _sample(stats: ClassFeatureStats, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` virtual features from every class's Gaussian (classes with fewer than 2 examples are skipped)."""
    features, labels = [], []
    for cls in (stats.counts >= 2).nonzero().flatten().tolist():
        mean, spread = stats.means[cls].double(), stats.spreads[cls].double()
        noise = torch.randn(per_class, mean.numel(), generator=generator, dtype=torch.float64)
        if spread.dim() == 2:  # full covariance: through its Cholesky factor (a little jitter keeps it definite)
            jitter = 1e-5 * spread.diagonal().mean().clamp_min(1e-8)
            factor = torch.linalg.cholesky(spread + jitter * torch.eye(mean.numel(), dtype=torch.float64))
            features.append(mean + noise @ factor.T)
        else:
            features.append(mean + noise * spread.sqrt())
        labels.append(torch.full((per_class,), cls, dtype=torch.long))
    return torch.cat(features).float(), torch.cat(labels)


def calibrate_head(
    head: nn.Linear,
    stats: ClassFeatureStats,
    samples_per_class: int,
    steps: int,
    learning_rate: float = 0.01,
    seed: int = 0,
) -> float:
    """Re-fits `head` in place on virtual features: `samples_per_class` per class drawn from the pooled Gaussians,
    `steps` full-batch Adam steps of cross-entropy from the head's current weights. Draws from its own generator
    (`seed`), never from the global RNG. Returns the final loss on the virtual features."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = _sample(stats, samples_per_class, generator)
    device = head.weight.device
    features, labels = features.to(device, head.weight.dtype), labels.to(device)
    weight = head.weight.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True) if head.bias is not None else None
    optimizer = torch.optim.Adam([p for p in (weight, bias) if p is not None], lr=learning_rate)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(features, weight, bias), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return float(loss.detach())


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's batch-norm layers that keep running statistics, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }


def batchnorm_moments(model: nn.Module, batches: Iterable[Mapping]) -> tuple[dict[str, torch.Tensor], int]:
    """Every batch-norm layer's running mean and variance recomputed over `batches` (a cumulative average over the
    batches, the other modules in eval mode, no gradients), and the number of examples. The model's own buffers are
    left as they were.

    Returns:
        `tuple[dict[str, torch.Tensor], int]`: `{"<layer>.mean": ..., "<layer>.var": ...}` and the example count.
    """
    layers = batchnorm_layers(model)
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for name, m in layers.items()}  # fmt: skip
    count = 0
    try:
        with _eval_mode(model), torch.no_grad():
            for module in layers.values():
                module.reset_running_stats()
                module.momentum = None  # cumulative average
                module.train()
            for batch in batches:
                count += len(batch["labels"]) if "labels" in batch else len(next(iter(batch.values())))
                _forward(model, batch)
            moments = {}
            for name, module in layers.items():
                moments[f"{name}.mean"] = module.running_mean.detach().float().cpu().clone()
                moments[f"{name}.var"] = module.running_var.detach().float().cpu().clone()
    finally:
        for name, module in layers.items():
            mean, var, tracked, momentum = saved[name]
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            module.num_batches_tracked.copy_(tracked)
            module.momentum = momentum
    return moments, count


def pool_batchnorm(moments: Iterable[tuple[Mapping[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Count-weighted pooled moments: mean = Σ w·m, var = Σ w·(v + m²) − mean², w = a node's share of the examples."""
    moments = list(moments)
    total = sum(count for _, count in moments)
    pooled = {}
    for key in moments[0][0]:
        if not key.endswith(".mean"):
            continue
        layer = key[: -len(".mean")]
        mean = sum(count / total * m[f"{layer}.mean"].double() for m, count in moments)
        second = sum(count / total * (m[f"{layer}.var"].double() + m[f"{layer}.mean"].double() ** 2)
                     for m, count in moments)  # fmt: skip
        pooled[f"{layer}.mean"] = mean.float()
        pooled[f"{layer}.var"] = (second - mean**2).clamp_min(0).float()
    return pooled


def load_batchnorm(model: nn.Module, pooled: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Writes pooled moments into the model's batch-norm buffers; returns the buffers it changed."""
    changed = []
    with torch.no_grad():
        for name, module in batchnorm_layers(model).items():
            module.running_mean.copy_(pooled[f"{name}.mean"])
            module.running_var.copy_(pooled[f"{name}.var"])
            changed += [module.running_mean, module.running_var]
    return changed
