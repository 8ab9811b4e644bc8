"""Non-IID mitigations: distillation, logit adjustment, restricted softmax — exactness and measured effect."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import cls_dataset, tiny_bert, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.blocks import find_block_list
from snake_hf.losses import TeacherForward, distillation_kl, label_skew_cross_entropy, node_label_priors


def bert_lora():
    return LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")


def test_distillation_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(4, 3)
    assert distillation_kl(logits, logits, 2.0)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(logits, logits.flip(-1), 2.0)[0].item() > 0


def test_distillation_kl_counts_only_labelled_tokens_for_language_models():
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, -100, -100], [1, 2, 3, 4, 5]])
    _, count = distillation_kl(student, teacher, 1.0, labels)
    assert count == 1 + 4  # shifted: the first row predicts one labelled token, the second four


def test_restricted_softmax_ignores_absent_classes_and_adjustment_shifts_by_the_prior():
    logits, labels = torch.tensor([[5.0, 0.0, 1.0]]), torch.tensor([2])
    prior = torch.tensor([0.0, 0.5, 0.5])
    restricted = label_skew_cross_entropy(logits, labels, prior, restrict=True)
    assert restricted.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:, 1:], labels - 1).item())
    adjusted = label_skew_cross_entropy(logits, labels, torch.tensor([0.25, 0.25, 0.5]), adjustment=1.0)
    expected = torch.nn.functional.cross_entropy(logits + torch.log(torch.tensor([0.25, 0.25, 0.5])), labels)
    assert adjusted.item() == pytest.approx(expected.item())


def test_teacher_forward_equals_a_copy_of_the_arrived_model_and_draws_no_random_numbers():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
    model.base_model.model.config.resid_pdrop = 0.0
    blocks = find_block_list(model)[1]
    names = [n for n, p in model.named_parameters() if p.requires_grad and (".h.2." in n or ".h.3." in n)]
    teacher = TeacherForward(model, blocks, first_block=2, tensor_names=names)
    arrived = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                param.add_(0.5)  # the student trains
    batch = {"input_ids": torch.randint(0, 64, (2, 6))}
    model.eval()  # no dropout anywhere, so the shared prefix is exact
    with teacher.capture():
        model(**batch)
    rng = torch.get_rng_state()
    logits = teacher.logits(batch)
    assert torch.equal(rng, torch.get_rng_state())
    torch.testing.assert_close(logits, arrived(**batch).logits)
    assert not torch.equal(logits, model(**batch).logits), "the student's own weights are back in place"


def _two_disjoint_nodes():
    full = cls_dataset(n=160, num_labels=4, seed=3)
    return full.filter(lambda r: r["label"] < 2), full.filter(lambda r: r["label"] >= 2)


def _first_node_loss_after_both(tmp_path, **mitigation):
    first, second = _two_disjoint_nodes()
    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=str(tmp_path), num_nodes=2, num_block_groups=1, stage_steps=40, per_device_train_batch_size=8,
        learning_rate=3e-2, lr_scheduler_type="constant", report_to="none", use_cpu=True, disable_tqdm=True,
        save_strategy="no", logging_steps=100, seed=0, **mitigation,
    )  # fmt: skip
    trainer = SnakeTrainer(tiny_bert(num_labels=4), args, train_dataset=[first, second], peft_config=bert_lora())
    trainer.train()
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(first["input_ids"]), attention_mask=torch.tensor(first["attention_mask"])
        )
    return torch.nn.functional.cross_entropy(logits.logits, torch.tensor(first["label"])).item(), trainer


def test_distill_alpha_zero_is_exactly_no_distillation(tmp_path):
    plain, a = _first_node_loss_after_both(tmp_path)
    zero, b = _first_node_loss_after_both(tmp_path, distill_alpha=0.0, distill_temperature=3.0)
    assert plain == zero
    assert [r.train_loss for r in a.snake_report.stages] == [r.train_loss for r in b.snake_report.stages]


@pytest.mark.parametrize(
    "mitigation",
    [
        dict(distill_alpha=0.5),
        dict(logit_adjustment=1.0),
        dict(restrict_to_node_classes=True),
        dict(proximal_mu=1.0),
        dict(head_calibration="diagonal"),
    ],
    ids=["distillation", "logit-adjustment", "restricted-softmax", "proximal", "head-calibration"],
)
def test_each_mitigation_reduces_forgetting_of_the_first_nodes_labels(tmp_path, mitigation):
    naive, _ = _first_node_loss_after_both(tmp_path)
    mitigated, trainer = _first_node_loss_after_both(tmp_path, **mitigation)
    # seed 0: naive forgets node 0's classes (loss ~4.5 nats); each mitigation keeps it under ~1.5 nats (proximal
    # 1.40, head calibration of the PEFT classifier copy 1.33)
    assert naive > 3.0 and mitigated < naive / 3
    if "distill_alpha" in mitigation:
        assert 0 < trainer.snake_report.stages[-1].extra["distill_share"] < 1


def test_head_learning_rate_gives_the_head_its_own_scheduled_groups(tmp_path):
    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=str(tmp_path), num_nodes=2, num_block_groups=2, stage_steps=2, learning_rate=1e-3,
        head_learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=cls_dataset(), peft_config=bert_lora())
    trainer.train()
    head = {id(p) for n, p in trainer.model.named_parameters() if "classifier" in n}
    groups = trainer.optimizer.param_groups
    is_head = [any(id(p) in head for p in g["params"]) for g in groups]
    assert any(is_head)
    assert all(g["initial_lr"] == (1e-2 if h else 1e-3) for g, h in zip(groups, is_head))


@pytest.mark.parametrize(
    "options", [dict(adjustment=1.0), dict(restrict=True), dict(adjustment=1.0, restrict=True)],
    ids=["adjustment", "restrict", "both"],
)  # fmt: skip
def test_a_one_class_node_adds_exactly_no_gradient(options):
    # Adam turns a small systematic gradient into a full-size step: a node that holds one class must add none, or it
    # teaches the head its class.
    head = torch.nn.Linear(4, 2)
    logits = head(torch.randn(6, 4))
    loss = label_skew_cross_entropy(logits, torch.zeros(6, dtype=torch.long), torch.tensor([1.0, 0.0]), **options)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(head.weight.grad) == 0 and torch.count_nonzero(head.bias.grad) == 0


def test_examples_of_a_class_below_the_share_are_left_out_but_still_count_in_the_mean():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), torch.tensor([0, 1, 0])
    # The node holds class 1 below the share: class 1 is masked and the class-1 example leaves the loss, but the
    # mean still divides by all 3 examples (Trainer's normalisation). Kept rows then predict class 0 with certainty.
    prior = node_label_priors([[0] * 9 + [1]], 2, min_share=0.2)[0]
    assert prior.tolist() == [1.0, 0.0]
    assert label_skew_cross_entropy(logits, labels, prior, restrict=True).item() == 0.0
    # With a logit adjustment the kept rows still learn: the loss is their adjusted cross-entropy over 3.
    adjusted = label_skew_cross_entropy(logits, labels, torch.tensor([0.75, 0.25]), adjustment=1.0)
    shifted = logits + torch.log(torch.tensor([0.75, 0.25]))
    assert adjusted.item() == pytest.approx(torch.nn.functional.cross_entropy(shifted, labels).item())


@pytest.mark.parametrize(
    "labels, min_share, expected",
    [
        ([[0, 0, 1]], 0.0, [[2 / 3, 1 / 3]]),
        ([[0] * 99 + [1]], 0.01, [[0.99, 0.01]]),
        ([[0] * 999 + [1]], 0.01, [[1.0, 0.0]]),
        ([[0, 1]], 0.9, [[0.5, 0.5]]),  # no class reaches the share: the prior is left as it is
        ([[]], 0.01, [[0.0, 0.0]]),
    ],
    ids=["off", "at-the-share", "below-the-share", "none-reaches-it", "empty"],
)
def test_node_label_priors_drop_classes_below_the_share(labels, min_share, expected):
    torch.testing.assert_close(node_label_priors(labels, 2, min_share=min_share), torch.tensor(expected))


def test_node_class_min_share_reaches_the_node_priors(tmp_path):
    full = cls_dataset(n=40, num_labels=2, seed=1)
    zeros, ones = full.filter(lambda r: r["label"] == 0), full.filter(lambda r: r["label"] == 1)
    skewed = datasets.concatenate_datasets([zeros.select(range(9)), ones.select(range(1))])  # 90% / 10%
    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=str(tmp_path), num_nodes=2, num_block_groups=1, stage_steps=1, report_to="none", use_cpu=True,
        disable_tqdm=True, save_strategy="no", restrict_to_node_classes=True, node_class_min_share=0.2,
    )  # fmt: skip
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=[skewed, full], peft_config=bert_lora())
    torch.testing.assert_close(trainer._node_priors[0], torch.tensor([1.0, 0.0]))
    assert trainer._node_priors[1].min() > 0  # the other node holds both classes above the share
