# Copyright 2025 The snake_hf Authors. Licensed under the Apache License, Version 2.0.
"""Accuracy: the (weighted) fraction of predictions equal to their references.

An offline, numpy-only stand-in for the Hub's `evaluate-metric/accuracy`, loadable with
`evaluate.load("path/to/snake_hf/recipes/metrics/accuracy")` (or `snake_hf.recipes.metrics.load_metric("accuracy")`).
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
    accuracy = (TP + TN) / (TP + TN + FP + FN)
With `sample_weight`, each example counts with its weight.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted labels.
    references (`list[int]`): Ground-truth labels.
    normalize (`bool`, defaults to `True`): If `True`, return the (weighted) fraction of correct predictions;
        if `False`, return the (weighted) number of correct predictions.
    sample_weight (`list[float]`, *optional*): One weight per example. Defaults to equal weights.

Returns:
    accuracy (`float`): In [0, 1] when `normalize=True`, else the (weighted) count of correct predictions.

Example:
    >>> accuracy = evaluate.load("snake_hf/recipes/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            weights = np.ones_like(correct)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != correct.shape:
                raise ValueError(
                    f"`sample_weight` has {weights.size} entries but there are {correct.size} predictions; "
                    "pass one weight per example."
                )
        if not normalize:
            return {"accuracy": float(np.dot(correct, weights))}
        if correct.size == 0 or weights.sum() == 0:
            raise ValueError("Accuracy is undefined for no examples (or all-zero `sample_weight`).")
        return {"accuracy": float(np.average(correct, weights=weights))}
