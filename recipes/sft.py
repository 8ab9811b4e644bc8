"""Snake Learning supervised fine-tuning (TRL's `SFTTrainer`) of a chat model on instruction pairs, over nodes that
each hold one section of the corpus (a non-IID split by topic).

The instruction data is built here from a real text, because no chat or instruction data set installs on this
machine without the Hugging Face Hub: from the King James Bible (offline asset `bible`), each verse becomes one
prompt–completion pair in chat form, alternately

* "Continue this verse (Genesis 1:3): And God said, Let there be" -> "light: and there was light.", or
* "Which book, chapter and verse is this? ..." -> "Genesis 1:3".

`SnakeSFTTrainer` applies the model's chat template and trains on the completion only (TRL's completion mask). With
`split: book` node k holds the verses of the k-th of `num_nodes` consecutive runs of books of about equal length
(e.g. the Law, the histories, the prophets and the New Testament), handed to the trainer as one dataset per node so TRL
prepares each node's own data. The held-out verses are drawn from the whole Bible; the recipe reports their
completion loss and perplexity = exp(loss) before and after training, prints the stage table, and writes the adapter
(a PEFT folder), `snake_plan.json`, `snake_report.json`, `results.json`, the plots and TRL's model card with Snake's
section to `output_dir`.

Usage:
    python recipes/sft.py recipes/configs/sft.yaml          # SmolLM2-135M-Instruct, needs the smollm2 and bible assets
    python recipes/sft.py recipes/configs/sft_tiny.yaml     # a tiny random Llama on synthetic verses, seconds

The first argument may be a YAML file; flags after it override its values. With no arguments it runs
recipes/configs/sft.yaml (needs `bash scripts/install_assets.sh smollm2 bible` and `pip install "snake_hf[trl]"`).
`--help` lists Snake's options first, `--help-all` every option.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerFast, set_seed

from snake_hf import format_plan
from snake_hf.recipes import (
    ModelArguments,
    build_lora_config,
    load_model_and_tokenizer,
    report_and_save,
    run_summary,
    train_and_evaluate,
)
from snake_hf.recipes.assets import load_bible_text
from snake_hf.recipes.cli import parse_recipe_args, run_recipe
from snake_hf.recipes.metrics import perplexity_from_eval_loss
from snake_hf.trl import SnakeSFTConfig, SnakeSFTTrainer


SPLITS = ("book", "iid")


@dataclass
class ScriptArguments:
    """Which verses become instruction pairs, and how they are split over the nodes.

    Args:
        dataset_name (`str`, defaults to `"bible"`): `bible` (the King James Bible) or `synthetic` (made-up verses in
            the same form, for tests).
        split (`str`, defaults to `"book"`): `book` (node k holds the k-th run of consecutive books) or `iid`.
        max_train_samples (`int`, defaults to 384), max_eval_samples (`int`, defaults to 64): verses drawn (seeded)
            for training and for the held-out set, from the whole text and disjoint.
        synthetic_books (`int`, defaults to 8): books of the synthetic text.
        data_split_seed (`int`, defaults to 42): seed of the draw.
    """

    dataset_name: str = field(default="bible", metadata={"help": "bible, or synthetic (made-up verses, for tests)."})
    split: str = field(default="book", metadata={"help": f"How verses go to nodes: {', '.join(SPLITS)}."})
    max_train_samples: int = field(default=384, metadata={"help": "Training verses (each one instruction pair)."})
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out verses, drawn from the whole text."})
    synthetic_books: int = field(default=8, metadata={"help": "Books of the synthetic text."})
    data_split_seed: int = field(default=42, metadata={"help": "Seed of the draw of training and held-out verses."})


@dataclass
class SFTModelArguments(ModelArguments):
    """Model and LoRA settings (see `snake_hf.recipes.common.ModelArguments`); `tokenizer_name_or_path: chars` is a
    character tokenizer with a small chat template, for a tiny random model without downloads."""

    model_name_or_path: str | None = field(
        default="smollm2", metadata={"help": "Hub id, local folder, or 'smollm2' (offline asset)."}
    )


DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft.yaml"

# ---- data: verses, instruction pairs, node shards -------------------------------------------------------------------

_HEADING = re.compile(r"^(\S.*?) (\d+)$")  # "Genesis 1", "1 Samuel 3", "Song of Solomon 2"
_VERSE = re.compile(r"^\s+(\d+) (.*)$")


def parse_verses(text: str) -> list[dict[str, Any]]:
    """The verses of `bible gen1:1-rev22:21`'s output: `book`, `chapter`, `verse`, `text` (lines joined)."""
    verses: list[dict[str, Any]] = []
    book, chapter = None, 0
    for line in text.splitlines():
        if not line.strip():
            continue
        verse, heading = _VERSE.match(line), _HEADING.match(line)
        if verse and book is not None:
            verses.append({"book": book, "chapter": chapter, "verse": int(verse.group(1)), "text": verse.group(2)})
        elif heading and not line[0].isspace():
            book, chapter = heading.group(1), int(heading.group(2))
        elif verses:
            verses[-1]["text"] += " " + line.strip()
    return verses


def synthetic_verses(num_books: int, seed: int = 0) -> list[dict[str, Any]]:
    """Made-up verses in `parse_verses`' form: each book its own small vocabulary (so books differ, as topics do)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    verses = []
    for b in range(num_books):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(12)]
        for chapter in (1, 2):
            for verse in range(1, 21):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "."
                verses.append({"book": f"book {chr(97 + b)}", "chapter": chapter, "verse": verse, "text": text})
    return verses


def instruction_pair(verse: dict[str, Any], index: int) -> dict[str, Any]:
    """One verse as a conversational prompt–completion pair: even `index` continue the verse, odd name its place."""
    reference = f"{verse['book']} {verse['chapter']}:{verse['verse']}"
    words = verse["text"].split()
    if index % 2 == 0 and len(words) >= 4:
        cut = len(words) // 2
        prompt = f"Continue this verse ({reference}): {' '.join(words[:cut])}"
        answer = " ".join(words[cut:])
    else:
        prompt, answer = f"Which book, chapter and verse is this? {verse['text']}", reference
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def book_sections(verses: list[dict[str, Any]], num_nodes: int) -> dict[str, int]:
    """Book -> node: `num_nodes` runs of consecutive books, each about `len(verses) / num_nodes` verses long."""
    books: dict[str, int] = {}
    for verse in verses:
        books[verse["book"]] = books.get(verse["book"], 0) + 1
    if len(books) < num_nodes:
        raise ValueError(f"`split` 'book' needs at least num_nodes ({num_nodes}) books; the text has {len(books)}.")
    section, seen, names = {}, 0, list(books)
    for i, book in enumerate(names):
        node = min(num_nodes - 1, seen * num_nodes // len(verses))
        node = max(node, num_nodes - (len(names) - i))  # every later node keeps at least one book
        section[book] = node
        seen += books[book]
    return section


def node_datasets(
    verses: list[dict[str, Any]], script_args: ScriptArguments, num_nodes: int
) -> tuple[list[datasets.Dataset], datasets.Dataset, list[str]]:
    """Each node's instruction pairs, the held-out pairs, and each node's books as text (first – last)."""
    if script_args.split not in SPLITS:
        raise ValueError(f"`split` ({script_args.split!r}) must be one of {SPLITS}.")
    wanted = script_args.max_train_samples + script_args.max_eval_samples
    if wanted > len(verses):
        raise ValueError(f"max_train_samples + max_eval_samples ({wanted}) exceeds the {len(verses)} verses.")
    order = list(range(len(verses)))
    random.Random(script_args.data_split_seed).shuffle(order)
    held_out, train = order[: script_args.max_eval_samples], sorted(order[script_args.max_eval_samples : wanted])
    if script_args.split == "book":
        section = book_sections(verses, num_nodes)
        owner = [section[verses[i]["book"]] for i in train]
    else:
        owner = [n % num_nodes for n in range(len(train))]
        random.Random(script_args.data_split_seed + 1).shuffle(owner)
    shards, books = [], []
    for node in range(num_nodes):
        mine = [i for i, o in zip(train, owner) if o == node]
        if not mine:
            raise ValueError(f"Node {node} holds no training verse; raise max_train_samples or lower num_nodes.")
        shards.append(datasets.Dataset.from_list([instruction_pair(verses[i], i) for i in mine]))
        books.append(f"{verses[mine[0]]['book']} – {verses[mine[-1]]['book']}")
    eval_dataset = datasets.Dataset.from_list([instruction_pair(verses[i], i) for i in held_out])
    return shards, eval_dataset, books


def char_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer (lower case, 54 symbols) with a small chat template, for tiny random models."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!'<>|/-\n"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


# ---- the recipe -----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the recipe; `argv` defaults to the command line. Returns the measured results (also in results.json)."""
    types = [ScriptArguments, SFTModelArguments, SnakeSFTConfig]
    script_args, model_args, args = parse_recipe_args(types, argv, description=__doc__, default_config=DEFAULT_CONFIG)
    set_seed(args.seed)
    chars = model_args.tokenizer_name_or_path == "chars"
    if chars:
        model_args.tokenizer_name_or_path = None
    model, tokenizer = load_model_and_tokenizer(model_args, "causal_lm", seed=args.seed)
    if chars:
        tokenizer = char_chat_tokenizer()
    if script_args.dataset_name == "bible":
        verses = parse_verses(load_bible_text())
    elif script_args.dataset_name == "synthetic":
        verses = synthetic_verses(script_args.synthetic_books, seed=script_args.data_split_seed)
    else:
        raise ValueError(f"`dataset_name` ({script_args.dataset_name!r}) must be 'bible' or 'synthetic'.")
    shards, eval_dataset, books = node_datasets(verses, script_args, args.num_nodes)
    print(f"{len(verses)} verses; held out: {len(eval_dataset)} pairs from the whole text")
    print("\nNode shards (instruction pairs):\n| node | books | pairs |\n| ---: | --- | ---: |")
    print("\n".join(f"| {n} | {b} | {len(s)} |" for n, (b, s) in enumerate(zip(books, shards))))

    trainer = SnakeSFTTrainer(
        model,
        args,
        train_dataset=shards,  # one dataset per node: TRL prepares each (chat template, completion mask)
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=build_lora_config(model, "causal_lm", model_args),
    )
    print(f"\nPlan ({len(trainer.plan)} stages, {trainer.total_steps} steps):\n{format_plan(trainer.plan)}")

    # The held-out loss is TRL's completion-only loss; perplexity = exp(loss) per completion token.
    results = train_and_evaluate(trainer, perplexity_from_eval_loss)
    results.update(split=script_args.split, node_books=books, node_pairs=[len(s) for s in shards])
    results["eval_pairs"] = len(eval_dataset)
    print(run_summary(trainer, results, ["eval_loss", "eval_perplexity"], f"completions ({len(eval_dataset)} pairs)"))
    results = report_and_save(trainer, results, model_args, script_args.dataset_name, "text-generation")
    print(f"Wrote the adapter, report, plots and model card to {trainer.args.output_dir}")
    return results


if __name__ == "__main__":
    run_recipe(main)
