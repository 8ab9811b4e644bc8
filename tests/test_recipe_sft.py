"""recipes/sft.py: instruction pairs from verses, the split by book, and the recipe end to end on its tiny config."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest


pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sft():
    """Imports `recipes/sft.py` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("recipe_sft", ROOT / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# As `bible gen1:1-rev22:21` prints it: headings, verse numbers, verses wrapped over lines, books with digits.
BIBLE_SAMPLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep.

1 Samuel 3

  1 And the child Samuel ministered unto the LORD before Eli.
"""


def test_parse_verses_reads_headings_numbers_and_wrapped_lines(sft):
    verses = sft.parse_verses(BIBLE_SAMPLE)
    assert [(v["book"], v["chapter"], v["verse"]) for v in verses] == [("Genesis", 1, 1), ("Genesis", 1, 2),
                                                                       ("1 Samuel", 3, 1)]  # fmt: skip
    assert verses[1]["text"].endswith("upon the face of the deep.")


def test_instruction_pairs_are_chat_prompt_completion_and_alternate_tasks(sft):
    verse = sft.parse_verses(BIBLE_SAMPLE)[0]
    cont, where = sft.instruction_pair(verse, 0), sft.instruction_pair(verse, 1)
    assert cont["prompt"][0]["role"] == "user" and cont["completion"][0]["role"] == "assistant"
    prompt_tail = cont["prompt"][0]["content"].split(": ", 1)[1]
    assert prompt_tail + " " + cont["completion"][0]["content"] == verse["text"]
    assert "(Genesis 1:1)" in cont["prompt"][0]["content"]
    assert where["completion"][0]["content"] == "Genesis 1:1" and verse["text"] in where["prompt"][0]["content"]


def test_book_split_gives_each_node_a_run_of_consecutive_books_of_similar_length(sft):
    verses = sft.synthetic_verses(8)  # 8 books of 40 verses
    section = sft.book_sections(verses, 3)
    nodes = list(section.values())
    assert nodes == sorted(nodes) and set(nodes) == {0, 1, 2}
    counts = [nodes.count(n) for n in range(3)]
    assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="at least num_nodes"):
        sft.book_sections(verses, 9)


def test_held_out_verses_are_disjoint_from_every_nodes_shard(sft):
    verses = sft.synthetic_verses(8)
    script_args = sft.ScriptArguments(dataset_name="synthetic", max_train_samples=60, max_eval_samples=20)
    shards, held_out, books = sft.node_datasets(verses, script_args, 3)
    assert sum(len(s) for s in shards) == 60 and len(held_out) == 20 and len(books) == 3
    seen = {json.dumps(row["prompt"]) for shard in shards for row in shard}
    assert not seen & {json.dumps(row["prompt"]) for row in held_out}


def test_recipe_runs_end_to_end_on_the_tiny_config(sft, tmp_path):
    results = sft.main([str(ROOT / "recipes" / "configs" / "sft_tiny.yaml"), "--output_dir", str(tmp_path)])
    before, after = results["before"], results["after"]
    assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_loss"]))
    assert after["eval_loss"] < before["eval_loss"]
    assert results["num_stages"] == 6 and results["total_steps"] == 12 and results["split"] == "book"
    assert sum(results["node_pairs"]) == 48 and len(results["node_books"]) == 3
    for name in ("adapter_config.json", "adapter_model.safetensors", "snake_plan.json", "results.json"):
        assert (tmp_path / name).is_file(), name
    card = (tmp_path / "README.md").read_text()
    assert "snake-learning" in card and "sft" in card and "## Snake Learning" in card
    assert f"# Model Card for {tmp_path.name}" in card, "TRL's card titled by the output folder, as Snake's section"


def test_recipe_help_lists_snake_trl_and_data_options(sft, capsys):
    with pytest.raises(SystemExit) as done:
        sft.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--num_nodes" in text and "--split" in text and "Snake Learning supervised fine-tuning" in text
