# Copyright 2025 The snake_hf Authors. Licensed under the Apache License, Version 2.0.
"""F1: the harmonic mean of precision and recall, with scikit-learn's averaging rules.

An offline, numpy-only stand-in for the Hub's `evaluate-metric/f1`, loadable with
`evaluate.load("path/to/snake_hf/recipes/metrics/f1")` (or `snake_hf.recipes.metrics.load_metric("f1")`).
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall:
    F1 = 2 * (precision * recall) / (precision + recall) = 2 TP / (2 TP + FP + FN)
A class with 2 TP + FP + FN = 0 scores 0, as in scikit-learn's default `zero_division`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted labels.
    references (`list[int]`): Ground-truth labels.
    labels (`list[int]`, *optional*): The labels to score when `average` is not `"binary"`. Labels absent from the
        data score 0; labels not listed are ignored. Defaults to every label seen in `predictions` or `references`.
    pos_label (`int`, defaults to 1): The class to score when `average="binary"`.
    average (`str`, defaults to `"binary"`): One of
        - `"binary"`: the F1 of `pos_label` only; the data must hold at most two distinct labels.
        - `"micro"`: F1 from the true positives, false negatives and false positives summed over `labels`.
        - `"macro"`: the unweighted mean of the per-label F1.
        - `"weighted"`: the mean of the per-label F1, weighted by each label's support (number of references).
    sample_weight (`list[float]`, *optional*): One weight per example. Defaults to equal weights.

Returns:
    f1 (`float`): In [0, 1]; higher is better.

Example:
    >>> f1 = evaluate.load("snake_hf/recipes/metrics/f1")
    >>> f1.compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average="macro")
    {'f1': 0.26666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_AVERAGES = ("binary", "macro", "micro", "weighted")


def _safe_ratio(numerator, denominator):
    """Elementwise `numerator / denominator`, 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in _AVERAGES:
            raise ValueError(f"`average` is {average!r}; choose one of {list(_AVERAGES)}.")
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != references.shape:
            raise ValueError(
                f"`sample_weight` has {weights.size} entries but there are {references.size} references; "
                "pass one weight per example."
            )
        present = np.union1d(predictions, references)
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    f"`average='binary'` needs at most two classes but the data holds {len(present)} "
                    f"({present.tolist()}); pass `average='macro'`, `'micro'` or `'weighted'`."
                )
            if len(present) == 2 and pos_label not in present:
                raise ValueError(f"`pos_label` ({pos_label}) is not one of the labels present: {present.tolist()}.")
            labels = [pos_label]
        elif labels is None:
            labels = present
        labels = np.asarray(labels)

        # One row per scored label: does each example predict / reference that label?
        predicted = predictions[None, :] == labels[:, None]
        actual = references[None, :] == labels[:, None]
        true_pos = (predicted & actual) @ weights
        false_pos = (predicted & ~actual) @ weights
        false_neg = (~predicted & actual) @ weights

        if average == "micro":
            score = _safe_ratio(2 * true_pos.sum(), 2 * true_pos.sum() + false_pos.sum() + false_neg.sum())
        else:
            per_label = _safe_ratio(2 * true_pos, 2 * true_pos + false_pos + false_neg)
            if average == "weighted":
                support = true_pos + false_neg
                score = _safe_ratio((per_label * support).sum(), support.sum())
            else:  # "binary" scores the single label `pos_label`; "macro" averages the labels equally
                score = per_label.mean() if per_label.size else 0.0
        return {"f1": float(score)}
