"""snake_hf.recipes.metrics: offline metric modules for `evaluate.load(path)` and `Trainer(compute_metrics=...)`."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction, Trainer, TrainingArguments

from conftest import cls_dataset, tiny_bert
from snake_hf.recipes.metrics import (
    METRICS_DIR,
    available_metrics,
    classification_compute_metrics,
    load_metric,
    perplexity_from_eval_loss,
)


# The scikit-learn documentation's f1_score example: per-class F1 is [0.8, 0, 0].
SKLEARN_REFS = [0, 1, 2, 0, 1, 2]
SKLEARN_PREDS = [0, 2, 1, 0, 0, 1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


@pytest.fixture(scope="module")
def accuracy():
    return load_metric("accuracy")


@pytest.fixture(scope="module")
def f1():
    return load_metric("f1")


@pytest.fixture(scope="module")
def perplexity():
    return load_metric("perplexity")


def test_available_metrics_lists_shipped_modules():
    assert available_metrics() == ["accuracy", "f1", "perplexity"]


@pytest.mark.parametrize("name", ["accuracy", "f1", "perplexity"])
def test_evaluate_load_reads_local_directory_offline(name):
    metric = evaluate.load(str(METRICS_DIR / name))
    assert isinstance(metric, evaluate.EvaluationModule)
    assert metric.name == name


def test_load_metric_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"'bleu'.*\['accuracy', 'f1', 'perplexity'\]"):
        load_metric("bleu")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 0.75),
        ({"normalize": False}, 3.0),
        # correct = [1, 1, 0, 1]; weighted by [1, 1, 2, 0]: (1 + 1) / 4
        ({"sample_weight": [1.0, 1.0, 2.0, 0.0]}, 0.5),
        ({"sample_weight": [1.0, 1.0, 2.0, 0.0], "normalize": False}, 2.0),
    ],
    ids=["plain", "count", "weighted", "weighted-count"],
)
def test_accuracy_known_values(accuracy, kwargs, expected):
    result = accuracy.compute(predictions=[0, 1, 0, 0], references=[0, 1, 1, 0], **kwargs)
    assert result == {"accuracy": pytest.approx(expected)}


@pytest.mark.parametrize(
    ("predictions", "references", "kwargs", "expected"),
    [
        # positive class 1: TP=1, FP=0, FN=1 -> 2 / 3
        ([0, 1, 0, 0], [0, 1, 1, 0], {}, 2 / 3),
        # positive class 0: TP=2, FP=1, FN=0 -> 4 / 5
        ([0, 1, 0, 0], [0, 1, 1, 0], {"pos_label": 0}, 0.8),
        (SKLEARN_PREDS, SKLEARN_REFS, {"average": "macro"}, 0.8 / 3),
        (SKLEARN_PREDS, SKLEARN_REFS, {"average": "micro"}, 1 / 3),  # equals accuracy for single-label data
        (SKLEARN_PREDS, SKLEARN_REFS, {"average": "weighted"}, 0.8 / 3),  # supports are equal
        (SKLEARN_PREDS, SKLEARN_REFS, {"average": "macro", "labels": [0, 1]}, 0.4),
        (SKLEARN_PREDS, SKLEARN_REFS, {"average": "macro", "labels": [0, 1, 2, 3]}, 0.2),  # absent label scores 0
        # micro over label 0 only: TP=2, FP=1, FN=0
        (SKLEARN_PREDS, SKLEARN_REFS, {"average": "micro", "labels": [0]}, 0.8),
        # weighted with supports [3, 1]: class 0 F1 = 6/7 (TP=3, FP=1, FN=0), class 1 F1 = 0
        ([0, 0, 0, 0], [0, 0, 0, 1], {"average": "weighted"}, 0.75 * 6 / 7),
        ([1, 1], [1, 1], {}, 1.0),
        ([0, 0], [0, 0], {}, 0.0),  # no positive at all: 0, as scikit-learn's default zero_division
    ],
    ids=[
        "binary",
        "binary-pos-label-0",
        "macro",
        "micro",
        "weighted",
        "macro-subset",
        "macro-absent-label",
        "micro-subset",
        "weighted-unequal-support",
        "binary-perfect",
        "binary-no-positives",
    ],
)
def test_f1_known_values(f1, predictions, references, kwargs, expected):
    result = f1.compute(predictions=predictions, references=references, **kwargs)
    assert result == {"f1": pytest.approx(expected)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "average='binary'"), ({"average": "samples"}, "average"), ({"pos_label": 5, "average": "binary"}, "binary")],
    ids=["binary-on-multiclass", "unknown-average", "bad-pos-label"],
)
def test_f1_invalid_arguments_raise(f1, kwargs, message):
    with pytest.raises(ValueError, match=message):
        f1.compute(predictions=SKLEARN_PREDS, references=SKLEARN_REFS, **kwargs)


def test_f1_pos_label_absent_from_two_classes_raises(f1):
    with pytest.raises(ValueError, match="pos_label"):
        f1.compute(predictions=[0, 2], references=[2, 0], pos_label=1)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"losses": [math.log(2), math.log(2)]}, 2.0),
        ({"losses": [0.0, 2 * math.log(3)]}, 3.0),
        # token-weighted mean of batch means: (2 log 2 + 1 * 3 log 2) / 3
        ({"losses": [math.log(2), math.log(8)], "weights": [2, 1]}, 2 ** (5 / 3)),
        ({"losses": [1000.0]}, math.inf),
    ],
    ids=["per-token", "mean-of-two", "weighted-batches", "overflow"],
)
def test_perplexity_known_values(perplexity, kwargs, expected):
    assert perplexity.compute(**kwargs) == {"perplexity": pytest.approx(expected)}


def test_perplexity_mismatched_weights_raise(perplexity):
    with pytest.raises(ValueError, match="one non-negative weight per loss"):
        perplexity.compute(losses=[1.0, 2.0], weights=[1.0])


def test_compute_metrics_binary_logits():
    compute_metrics = classification_compute_metrics()
    logits = np.array([[2.0, 0.1], [0.3, 1.0], [0.2, 0.9], [1.5, -1.0]])  # argmax: [0, 1, 1, 0]
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 0, 0])))
    assert result == {"accuracy": pytest.approx(0.75), "f1": pytest.approx(2 / 3)}


def test_compute_metrics_tuple_predictions_use_first():
    compute_metrics = classification_compute_metrics(("accuracy",))
    logits = np.array([[2.0, 0.1], [0.3, 1.0]])
    hidden = np.zeros((2, 3, 4))
    result = compute_metrics(EvalPrediction(predictions=(logits, hidden), label_ids=np.array([0, 0])))
    assert result == {"accuracy": pytest.approx(0.5)}


def test_compute_metrics_multiclass_defaults_to_macro_f1():
    compute_metrics = classification_compute_metrics()
    logits = np.eye(3)[SKLEARN_PREDS]
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array(SKLEARN_REFS)))
    assert result == {"accuracy": pytest.approx(1 / 3), "f1": pytest.approx(0.8 / 3)}


def test_compute_metrics_metric_kwargs_override_average():
    compute_metrics = classification_compute_metrics(("f1",), metric_kwargs={"f1": {"average": "micro"}})
    logits = np.eye(3)[SKLEARN_PREDS]
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array(SKLEARN_REFS)))
    assert result == {"f1": pytest.approx(1 / 3)}


def test_compute_metrics_token_labels_skip_ignore_index():
    compute_metrics = classification_compute_metrics(("accuracy",))
    logits = np.eye(2)[[[0, 1, 1], [1, 0, 0]]]  # (2 sequences, 3 tokens, 2 classes)
    labels = np.array([[0, 0, -100], [1, -100, -100]])  # scored: preds [0, 1, 1] vs labels [0, 0, 1]
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert result == {"accuracy": pytest.approx(2 / 3)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric_names": ("accuracy", "perplexity")}, "perplexity_from_eval_loss"),
        ({"metric_names": ("accuracy",), "metric_kwargs": {"f1": {}}}, "not in `metric_names`"),
        ({"metric_names": ("rouge",)}, "Unknown metric 'rouge'"),
    ],
    ids=["perplexity", "kwargs-for-unused-metric", "unknown-metric"],
)
def test_compute_metrics_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        classification_compute_metrics(**kwargs)


def test_compute_metrics_in_trainer_matches_predictions(tmp_path):
    dataset = cls_dataset(n=16)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    trainer = Trainer(
        model=tiny_bert(), args=args, eval_dataset=dataset, compute_metrics=classification_compute_metrics()
    )
    metrics = trainer.evaluate()

    output = trainer.predict(dataset)
    predictions = output.predictions.argmax(-1)
    labels = np.asarray(dataset["label"])
    true_pos = np.sum((predictions == 1) & (labels == 1))
    expected_f1 = 2 * true_pos / (np.sum(predictions == 1) + np.sum(labels == 1))
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert metrics["eval_f1"] == pytest.approx(expected_f1)
    assert perplexity_from_eval_loss(metrics)["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_perplexity_from_eval_loss_adds_key_without_mutating():
    metrics = {"eval_loss": math.log(2), "eval_runtime": 1.0}
    result = perplexity_from_eval_loss(metrics)
    assert result == {"eval_loss": math.log(2), "eval_runtime": 1.0, "eval_perplexity": pytest.approx(2.0)}
    assert "eval_perplexity" not in metrics


def test_perplexity_from_eval_loss_custom_prefix():
    assert perplexity_from_eval_loss({"test_loss": 0.0}, metric_key_prefix="test")["test_perplexity"] == 1.0


def test_perplexity_from_eval_loss_overflow_is_inf():
    assert perplexity_from_eval_loss({"eval_loss": 1e4})["eval_perplexity"] == math.inf


def test_perplexity_from_eval_loss_missing_loss_raises():
    with pytest.raises(KeyError, match="eval_loss"):
        perplexity_from_eval_loss({"eval_accuracy": 0.5})
