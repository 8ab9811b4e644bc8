# Copyright 2025 The snake_hf Authors. Licensed under the Apache License, Version 2.0.
"""Perplexity from cross-entropy losses: `exp(mean loss)`.

Unlike the Hub's `evaluate-metric/perplexity`, this module takes losses, not a model id: it never loads a model and
never needs the logits (which for a 49k-token vocabulary do not fit in memory over an evaluation set). Loadable with
`evaluate.load("path/to/snake_hf/recipes/metrics/perplexity")` (or `snake_hf.recipes.metrics.load_metric("perplexity")`).
"""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Perplexity is the exponential of the mean negative log-likelihood (natural log) per token:
    perplexity = exp(sum_i w_i * loss_i / sum_i w_i)
Pass per-token losses (equal weights), or per-batch mean losses with `weights` set to each batch's number of
predicted tokens so the mean is over tokens. `Trainer`'s `eval_loss` is already such a mean: for it, use
`snake_hf.recipes.metrics.perplexity_from_eval_loss`.
"""

_KWARGS_DESCRIPTION = """
Args:
    losses (`list[float]`): Cross-entropy losses in nats, either one per token or one mean per batch/sequence.
    weights (`list[float]`, *optional*): One weight per loss, e.g. the number of tokens each mean loss averages
        over. Defaults to equal weights, which is exact for per-token losses.

Returns:
    perplexity (`float`): `exp` of the (weighted) mean loss; `inf` if that overflows.

Example:
    >>> perplexity = evaluate.load("snake_hf/recipes/metrics/perplexity")
    >>> perplexity.compute(losses=[math.log(2), math.log(2)])
    {'perplexity': 2.0}
"""

_CITATION = """
@article{jelinek1977perplexity,
  title={Perplexity--a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
  journal={The Journal of the Acoustical Society of America},
  volume={62},
  number={S1},
  pages={S63--S63},
  year={1977}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"losses": datasets.Value("float64")}),
        )

    def _compute(self, losses, weights=None):
        losses = np.asarray(losses, dtype=np.float64)
        if losses.size == 0:
            raise ValueError("Perplexity needs at least one loss; `losses` is empty.")
        if weights is None:
            mean_loss = losses.mean()
        else:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != losses.shape or weights.sum() <= 0:
                raise ValueError(
                    f"`weights` must hold one non-negative weight per loss ({losses.size}) with a positive sum; "
                    f"got {weights.size} weights summing to {weights.sum()}."
                )
            mean_loss = np.average(losses, weights=weights)
        try:
            return {"perplexity": math.exp(mean_loss)}
        except OverflowError:
            return {"perplexity": math.inf}
