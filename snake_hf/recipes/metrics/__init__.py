# Copyright 2025 The snake_hf Authors. Licensed under the Apache License, Version 2.0.
"""Offline evaluation metrics for `Trainer`.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub, and the `evaluate` wheel ships none, so it
fails offline. This package ships its own metric modules (`accuracy`, `f1`, `perplexity`, numpy only) in the layout
`evaluate.load(local_dir)` reads — `<name>/<name>.py` — and loads them by path, which never touches the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
from transformers import EvalPrediction
from transformers.utils import logging


logger = logging.get_logger(__name__)

METRICS_DIR: Path = Path(__file__).resolve().parent
"""The folder holding one `<name>/<name>.py` module per metric that `load_metric` can load."""

# Label id that `DataCollatorForTokenClassification` and friends give to positions that are not scored.
_IGNORE_INDEX = -100


def available_metrics() -> list[str]:
    """Names of the metrics shipped in `METRICS_DIR`, sorted.

    Example:

    ```python
    >>> from snake_hf.recipes.metrics import available_metrics
    >>> available_metrics()
    ['accuracy', 'f1', 'perplexity']
    ```
    """
    return sorted(path.parent.name for path in METRICS_DIR.glob("*/*.py") if path.stem == path.parent.name)


def load_metric(name: str, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load one of snake_hf's offline metrics with `evaluate.load`, by path.

    The module is copied into `evaluate`'s module cache (`HF_MODULES_CACHE`, by default
    `~/.cache/huggingface/modules`) as for any local metric; the predictions are kept in memory (no cache files).

    Args:
        name (`str`):
            One of `available_metrics()`: `"accuracy"`, `"f1"` or `"perplexity"`.
        **load_kwargs:
            Passed on to `evaluate.load` (e.g. `experiment_id`, `keep_in_memory=False` with `cache_dir`).

    Returns:
        `evaluate.EvaluationModule`: the metric, ready for `compute`/`add_batch`.

    Raises:
        `ValueError`: if `name` is not a shipped metric.

    Example:

    ```python
    >>> from snake_hf.recipes.metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
    ```
    """
    names = available_metrics()
    if name not in names:
        raise ValueError(
            f"Unknown metric {name!r}: snake_hf ships {names} (in {METRICS_DIR}). Hub metrics need "
            f"`evaluate.load({name!r})` and a connection to the Hugging Face Hub."
        )
    load_kwargs.setdefault("keep_in_memory", True)
    logger.debug("Loading metric %s from %s", name, METRICS_DIR / name)
    return evaluate.load(str(METRICS_DIR / name), **load_kwargs)


def _first(array_or_tuple: np.ndarray | tuple) -> np.ndarray:
    """The main output when a model returned a tuple (e.g. `(logits, hidden_states)`)."""
    while isinstance(array_or_tuple, (tuple, list)):
        array_or_tuple = array_or_tuple[0]
    return np.asarray(array_or_tuple)


def classification_compute_metrics(
    metric_names: Sequence[str] = ("accuracy", "f1"),
    metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[EvalPrediction], dict[str, float]]:
    """Build a `compute_metrics` function for `Trainer` from snake_hf's offline metrics.

    The returned function takes the `EvalPrediction` that `Trainer` passes, keeps the first element when the
    predictions (or label ids) are a tuple, takes the argmax over the last axis of the logits, drops positions whose
    label is -100 (token classification), and returns the merged results of every metric (`Trainer` prefixes the
    keys with `eval_`). The metrics are loaded once, here.

    Args:
        metric_names (`Sequence[str]`, defaults to `("accuracy", "f1")`):
            Metrics to compute; each must be a classification metric of `available_metrics()`.
        metric_kwargs (`Mapping[str, Mapping[str, Any]]`, *optional*):
            Extra `compute` arguments per metric, e.g. `{"f1": {"average": "weighted"}}`. Unless given, `f1` uses
            `average="binary"` for two classes and `"macro"` for more.

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`: a function for `Trainer(compute_metrics=...)`.

    Example:

    ```python
    >>> import numpy as np
    >>> from transformers import EvalPrediction
    >>> from snake_hf.recipes.metrics import classification_compute_metrics
    >>> compute_metrics = classification_compute_metrics()
    >>> logits = np.array([[2.0, 0.1], [0.3, 1.0], [0.2, 0.9], [1.5, -1.0]])
    >>> compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 0, 0])))
    {'accuracy': 0.75, 'f1': 0.6666666666666666}
    ```
    """
    if "perplexity" in metric_names:
        raise ValueError(
            "`perplexity` is not a classification metric: compute it from the evaluation loss with "
            "`perplexity_from_eval_loss(trainer.evaluate())` instead of from logits."
        )
    metric_kwargs = dict(metric_kwargs or {})
    unknown = set(metric_kwargs) - set(metric_names)
    if unknown:
        raise ValueError(
            f"`metric_kwargs` names {sorted(unknown)}, which are not in `metric_names` {list(metric_names)}."
        )
    metrics = {name: load_metric(name) for name in metric_names}

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = _first(eval_pred.predictions)
        labels = _first(eval_pred.label_ids)
        predictions = logits.argmax(axis=-1)
        if predictions.shape != labels.shape:
            raise ValueError(
                f"Predictions of shape {predictions.shape} (argmax of logits {logits.shape}) do not match labels of "
                f"shape {labels.shape}."
            )
        keep = labels != _IGNORE_INDEX
        predictions, labels = predictions[keep], labels[keep]
        results: dict[str, float] = {}
        for name, metric in metrics.items():
            kwargs = dict(metric_kwargs.get(name, {}))
            if name == "f1":
                kwargs.setdefault("average", "binary" if logits.shape[-1] <= 2 else "macro")
            results.update(metric.compute(predictions=predictions, references=labels, **kwargs))
        return results

    return compute_metrics


def perplexity_from_eval_loss(metrics: Mapping[str, float], metric_key_prefix: str = "eval") -> dict[str, float]:
    """Add `<prefix>_perplexity = exp(<prefix>_loss)` to the metrics `Trainer.evaluate` returned.

    `Trainer`'s evaluation loss is the mean cross-entropy per predicted token, so its exponential is the perplexity;
    computing it this way never keeps the logits of the evaluation set in memory.

    Args:
        metrics (`Mapping[str, float]`):
            Metrics holding `<metric_key_prefix>_loss`, e.g. the result of `trainer.evaluate()`.
        metric_key_prefix (`str`, defaults to `"eval"`):
            The prefix `Trainer` used (`"eval"` for `evaluate`, `"test"` for `predict`).

    Returns:
        `dict[str, float]`: a copy of `metrics` with `<metric_key_prefix>_perplexity` added (`inf` on overflow).

    Raises:
        `KeyError`: if `metrics` has no `<metric_key_prefix>_loss`.

    Example:

    ```python
    >>> from snake_hf.recipes.metrics import perplexity_from_eval_loss
    >>> perplexity_from_eval_loss({"eval_loss": 0.6931471805599453})
    {'eval_loss': 0.6931471805599453, 'eval_perplexity': 2.0}
    ```
    """
    loss_key = f"{metric_key_prefix}_loss"
    if loss_key not in metrics:
        raise KeyError(
            f"{loss_key!r} is not in the metrics ({sorted(metrics)}); evaluate with labels in the dataset so `Trainer` "
            "computes a loss, or pass the matching `metric_key_prefix`."
        )
    try:
        perplexity = math.exp(metrics[loss_key])
    except OverflowError:
        perplexity = math.inf
    return {**metrics, f"{metric_key_prefix}_perplexity": perplexity}


__all__ = [
    "METRICS_DIR",
    "available_metrics",
    "classification_compute_metrics",
    "load_metric",
    "perplexity_from_eval_loss",
]
