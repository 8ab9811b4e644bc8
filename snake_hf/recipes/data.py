"""The recipes' data: data sets by name (offline assets, local files), synthetic data, tokenization and splits.

The `*_splits` helpers return a `datasets.DatasetDict` with `"train"` and `"eval"` splits. `snake_hf.recipes`
re-exports every public name here; recipes, benchmarks and tests import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


__all__ = [
    "DataArguments",
    "causal_lm_splits",
    "classification_splits",
    "load_text_classification",
    "load_text_corpus",
    "split_blocks",
    "synthetic_causal_lm",
    "synthetic_classification",
    "tokenize_classification",
]


@dataclass
class DataArguments:
    """Which data, how much of it, and how it is cut into tokens.

    Args:
        dataset_name (`str`, *optional*):
            `synthetic` (generated, no tokenizer needed), `rotten_tomatoes`, `bible`, `hamlet`, or a local `.csv`,
            `.json`, `.jsonl` or `.txt` file. Each recipe sets its own default.
        text_column (`str`, defaults to `"text"`), label_column (`str`, defaults to `"label"`): for csv/json files.
        max_length (`int`, defaults to 64): tokens per example (classification) or per block (causal LM).
        max_train_samples (`int`, *optional*), max_eval_samples (`int`, *optional*): seeded subsets.
        eval_fraction (`float`, defaults to 0.1): held-out share where the data has no test split.
        synthetic_size (`int`, defaults to 64): examples of the synthetic data set (train and eval together).
        synthetic_vocab_size (`int`, defaults to 64): synthetic token ids lie in `[0, synthetic_vocab_size)`.
        data_split_seed (`int`, defaults to 42): seed of the train/eval split and of the subsets.
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "synthetic, rotten_tomatoes, bible, hamlet, or a .csv/.json/.jsonl/.txt file."}
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a csv/json file."})
    label_column: str = field(default="label", metadata={"help": "Label column of a csv/json file."})
    max_length: int = field(default=64, metadata={"help": "Tokens per example (classification) or block (LM)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a seeded subset of training data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep a seeded subset of held-out data."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out share where there is no test split."})
    synthetic_size: int = field(default=64, metadata={"help": "Examples of the synthetic data set."})
    synthetic_vocab_size: int = field(default=64, metadata={"help": "Vocabulary of the synthetic data set."})
    data_split_seed: int = field(default=42, metadata={"help": "Seed of the train/eval split and subsets."})


def synthetic_classification(
    num_examples: int, length: int = 16, vocab_size: int = 64, num_labels: int = 2, seed: int = 0
) -> datasets.Dataset:
    """Tokenized random sequences whose first token encodes the label (a signal a tiny model learns in seconds).

    Args:
        num_examples (`int`): rows. length (`int`, defaults to 16): tokens per row.
        vocab_size (`int`, defaults to 64): ids lie in `[num_labels + 1, vocab_size)` except the first token,
            which is `label + 1` (id 0 stays free as padding).
        num_labels (`int`, defaults to 2): classes. seed (`int`, defaults to 0): the data's seed.

    Returns:
        `datasets.Dataset`: `input_ids`, `attention_mask` and `label`.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, num_examples)
    ids = rng.integers(num_labels + 1, vocab_size, (num_examples, length))
    ids[:, 0] = labels + 1
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), "label": labels.tolist()}
    )


def synthetic_causal_lm(num_examples: int, length: int = 16, vocab_size: int = 64, seed: int = 0) -> datasets.Dataset:
    """Tokenized arithmetic sequences `(a + d·t) mod vocab_size` (random start `a` and step `d` in 1..3 per row): the
    next token follows from the two before it, a pattern a model can learn; seeded, so runs can be pinned.

    Returns:
        `datasets.Dataset`: `input_ids`, `attention_mask` and `labels` (equal to `input_ids`).
    """
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab_size, (num_examples, 1))
    step = rng.integers(1, 4, (num_examples, 1))
    ids = (start + step * np.arange(length)) % vocab_size
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def _split(dataset: datasets.Dataset, eval_fraction: float, seed: int) -> datasets.DatasetDict:
    if not 0 < eval_fraction < 1:
        raise ValueError(f"`eval_fraction` ({eval_fraction}) must be between 0 and 1.")
    parts = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    return datasets.DatasetDict({"train": parts["train"], "eval": parts["test"]})


def load_text_classification(
    dataset_name: str,
    text_column: str = "text",
    label_column: str = "label",
    eval_fraction: float = 0.1,
    seed: int = 42,
) -> datasets.DatasetDict:
    """A text classification data set by name, with `"train"` and `"eval"` splits of `text` and `label` columns.

    Args:
        dataset_name (`str`): `"rotten_tomatoes"` (offline asset; its own stratified 80/20 split) or a local `.csv`,
            `.json` or `.jsonl` file (split by `eval_fraction`).
        text_column (`str`, defaults to `"text"`), label_column (`str`, defaults to `"label"`): columns of a file,
            renamed to `text` and `label`. String labels become a `ClassLabel` (sorted names).
        eval_fraction (`float`, defaults to 0.1), seed (`int`, defaults to 42): split of a file.

    Example:
        ```python
        >>> splits = load_text_classification("reviews.csv", text_column="review", label_column="stars")
        ```
    """
    if dataset_name == "rotten_tomatoes":
        from .assets import load_rotten_tomatoes

        splits = load_rotten_tomatoes(seed=seed)
        return datasets.DatasetDict({"train": splits["train"], "eval": splits["test"]})
    dataset = _load_file(dataset_name)
    for column in (text_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"{dataset_name} has columns {dataset.column_names}, not {column!r}; set the column name."
            )
    dataset = dataset.select_columns([text_column, label_column])
    dataset = dataset.rename_columns({text_column: "text", label_column: "label"})
    if "string" in getattr(dataset.features["label"], "dtype", ""):  # "string" or "large_string"
        dataset = dataset.class_encode_column("label")
    return _split(dataset, eval_fraction, seed)


def _load_file(path: str) -> datasets.Dataset:
    suffix = Path(path).suffix.lower()
    builders = {".csv": "csv", ".json": "json", ".jsonl": "json"}
    if suffix not in builders or not Path(path).is_file():
        raise ValueError(
            f"`dataset_name` ({path!r}) is not a known data set (synthetic, rotten_tomatoes, bible, hamlet) nor an "
            "existing .csv, .json or .jsonl file."
        )
    return datasets.load_dataset(builders[suffix], data_files=path, split="train")


def load_text_corpus(dataset_name: str) -> str:
    """A long text by name: `"bible"`, `"hamlet"` (offline assets) or a local `.txt` file."""
    from . import assets

    if dataset_name == "bible":
        return assets.load_bible_text()
    if dataset_name == "hamlet":
        return assets.load_hamlet_text()
    if Path(dataset_name).suffix.lower() == ".txt" and Path(dataset_name).is_file():
        return Path(dataset_name).read_text(encoding="utf-8")
    raise ValueError(
        f"`dataset_name` ({dataset_name!r}) is not a text corpus for the causal LM recipe; use synthetic, bible, "
        "hamlet or a .txt file."
    )


def split_blocks(blocks: datasets.Dataset, eval_fraction: float) -> datasets.DatasetDict:
    """Holds out the last `eval_fraction` of a packed corpus as one contiguous tail: neighbouring blocks share
    context, so a random split would leak text from training into evaluation.

    Example:
        ```python
        >>> split_blocks(datasets.Dataset.from_dict({"x": list(range(10))}), 0.2)["eval"]["x"]
        [8, 9]
        ```
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"`eval_fraction` ({eval_fraction}) must be between 0 and 1.")
    num_eval = max(1, round(len(blocks) * eval_fraction))
    if num_eval >= len(blocks):
        raise ValueError(f"{len(blocks)} blocks are too few to hold out {eval_fraction:.0%} and still train.")
    cut = len(blocks) - num_eval
    return datasets.DatasetDict({"train": blocks.select(range(cut)), "eval": blocks.select(range(cut, len(blocks)))})


def tokenize_classification(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Tokenizes the `text` column (truncated to `max_length`, unpadded: pad per batch with
    `DataCollatorWithPadding`) and drops it, keeping `label`."""
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


def _subset(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size))


def classification_splits(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase | None, num_labels: int = 2
) -> datasets.DatasetDict:
    """The classification recipe's data: tokenized `"train"` and `"eval"` splits, subset as `data_args` asks."""
    if data_args.dataset_name == "synthetic":
        data = synthetic_classification(
            data_args.synthetic_size, data_args.max_length, data_args.synthetic_vocab_size, num_labels, seed=0
        )
        splits = _split(data, data_args.eval_fraction, data_args.data_split_seed)
    else:
        if tokenizer is None:
            raise ValueError(f"{data_args.dataset_name!r} is text; give a tokenizer (`tokenizer_name_or_path`).")
        splits = load_text_classification(
            data_args.dataset_name,
            data_args.text_column,
            data_args.label_column,
            data_args.eval_fraction,
            data_args.data_split_seed,
        )
        splits = datasets.DatasetDict(
            {name: tokenize_classification(split, tokenizer, data_args.max_length) for name, split in splits.items()}
        )
    return _subset_splits(splits, data_args)


def causal_lm_splits(data_args: DataArguments, tokenizer: PreTrainedTokenizerBase | None) -> datasets.DatasetDict:
    """The causal LM recipe's data: packed blocks of `max_length` tokens, the corpus tail held out as `"eval"`.

    Only as many blocks as the subsets need are tokenized (a long corpus such as the Bible is cut early).
    """
    if data_args.dataset_name == "synthetic":
        blocks = synthetic_causal_lm(data_args.synthetic_size, data_args.max_length, data_args.synthetic_vocab_size)
        splits = _split(blocks, data_args.eval_fraction, data_args.data_split_seed)
        return _subset_splits(splits, data_args)
    if tokenizer is None:
        raise ValueError(f"{data_args.dataset_name!r} is text; give a tokenizer (`tokenizer_name_or_path`).")
    from .assets import text_corpus_dataset

    max_blocks = None
    if data_args.max_train_samples is not None and data_args.max_eval_samples is not None:
        max_blocks = data_args.max_train_samples + data_args.max_eval_samples
    text = load_text_corpus(data_args.dataset_name)
    blocks = text_corpus_dataset(text, tokenizer, block_size=data_args.max_length, max_blocks=max_blocks)
    if max_blocks is not None and len(blocks) == max_blocks:
        cut = data_args.max_train_samples
        return datasets.DatasetDict(
            {"train": blocks.select(range(cut)), "eval": blocks.select(range(cut, max_blocks))}
        )
    return _subset_splits(split_blocks(blocks, data_args.eval_fraction), data_args)


def _subset_splits(splits: datasets.DatasetDict, data_args: DataArguments) -> datasets.DatasetDict:
    seed = data_args.data_split_seed
    return datasets.DatasetDict(
        {
            "train": _subset(splits["train"], data_args.max_train_samples, seed),
            "eval": _subset(splits["eval"], data_args.max_eval_samples, seed),
        }
    )
