"""README.md as a newcomer reads it: its example runs and leaves what it says, its commands are what CI runs, and
every number it (and docs/) quotes is the one in the committed results JSON (scripts/readme_numbers.py)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
from pathlib import Path

import pytest

from conftest import load_script
from snake_hf import format_plan, load_plan


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && pytest'
# Pages other branches add (payload compression, security, Trainer conformance); linked before they land.
PENDING_PAGES = {"docs/payload_compression.md", "docs/security.md", "docs/trainer_conformance.md"}

numbers = load_script(ROOT / "scripts" / "readme_numbers.py")


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _code_blocks(text: str, language: str) -> list[str]:
    """The fenced blocks of `text` in `language` ("" for blocks without one), in order."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    return [body for lang, body in blocks if lang == language]


@pytest.fixture(scope="module")
def newcomer_run(tmp_path_factory):
    """Runs the README's newcomer example in an empty folder (in this process: no second import of torch);
    returns the folder and what it printed."""
    folder = tmp_path_factory.mktemp("newcomer")
    (script,) = _code_blocks(_section("A newcomer's example"), "python")
    (folder / "example.py").write_text(script)
    cwd, printed = os.getcwd(), io.StringIO()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(str(folder / "example.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
    return folder, printed.getvalue()


def test_readme_newcomer_example_leaves_only_the_saved_adapter(newcomer_run):
    folder, _ = newcomer_run
    assert sorted(p.name for p in folder.iterdir()) == ["example.py", "snake_out"]
    assert [p.name for p in (folder / "snake_out").iterdir()] == ["final"]  # no checkpoint-* folders
    saved = {p.name for p in (folder / "snake_out" / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "snake_plan.json", "snake_report.json"} <= saved


def test_readme_newcomer_example_runs_the_plan_the_readme_prints(newcomer_run):
    folder, stdout = newcomer_run
    shown = [block.strip() for block in _code_blocks(_section("A newcomer's example"), "") if "pass 0" in block]
    assert shown == [format_plan(load_plan(folder / "snake_out" / "final" / "snake_plan.json"))]
    assert "| stage | pass | node | group |" in stdout  # print(trainer.snake_report) prints the stage table


def test_every_number_the_readme_and_docs_quote_matches_its_results_json():
    problems = [
        problem for page in numbers.PAGES if (ROOT / page).is_file() for problem in numbers.check_page(ROOT / page)
    ]
    assert problems == []
    assert "numbers:headline" in README and "numbers:main_job" in README


def test_number_check_flags_a_generated_number_that_disagrees(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    generated = numbers.render("<!-- numbers:memory_full -->\n<!-- /numbers:memory_full -->\n")
    ratio = re.search(r"\*\*(\d\.\d+) with", generated).group(1)
    page.write_text(generated.replace(ratio, "0.100", 1))
    monkeypatch.setattr(numbers, "ROOT", tmp_path)
    assert any("disagree" in problem for problem in numbers.check_page(page))


def test_number_check_flags_a_measured_number_in_prose():
    assert numbers.stray_numbers("Snake reaches 0.770 after 4 minutes, 9.6 MiB in all.") == [
        "0.770",
        "4 minutes",
        "9.6 MiB",
    ]
    assert numbers.stray_numbers("Dirichlet α=0.1 with `learning_rate=0.002` and torch 2.13.") == []


def test_readme_first_screen_says_what_why_and_the_two_commands():
    first_screen = README[: README.index("## Recipes")]
    assert "Snake Learning" in first_screen and "numbers:headline" in first_screen
    assert "bash scripts/main_job.sh" in _code_blocks(first_screen, "bash")[0]
    assert _code_blocks(first_screen, "bash")[1].strip() == TEST_COMMAND


def test_ci_runs_the_readme_test_command_and_the_number_check():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q "torch==2.13.0"' in ci and 'pip install -q -e ".[test]"' in ci
    assert re.search(r"^run_pytest -q\s", ci, flags=re.M)  # the README's `pytest`, through CI's no-tests guard
    assert "python scripts/readme_numbers.py" in ci


def test_recipes_section_shows_the_asset_install_command():
    assert "bash scripts/install_assets.sh" in _code_blocks(_section("Recipes"), "bash")[0]


def test_readme_and_docs_links_resolve():
    missing = []
    for page in ["README.md", *numbers.PAGES]:
        path = ROOT / page
        for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists() and str(resolved.relative_to(ROOT)) not in PENDING_PAGES:
                missing.append(f"{page} -> {target}")
    assert missing == []
