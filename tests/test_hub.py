"""`SnakeTrainer.push_to_hub()` against an in-process fake Hub: no network, the real huggingface_hub client.

huggingface_hub 2.x sends every request through the `httpx2.Client` its client factory builds, so
`set_client_factory` with a `MockTransport` catches them all. The fake Hub answers the calls that `create_repo` and
`upload_folder` make (checked with huggingface_hub 2.4.0):

* `POST /api/repos/create` (`create_repo`, from `Trainer.init_hf_repo`),
* `POST /api/validate-yaml` (the model card's metadata),
* `POST /api/models/{repo}/preupload/{revision}`: the server decides, per file, `regular` (inline in the commit) or
  `lfs`; like the real Hub it sends `*.safetensors` and `*.bin` through LFS,
* `POST /{repo}.git/info/lfs/objects/batch` and `PUT` to the upload address it returns (the classic LFS path; Xet is
  turned off, since `hf_xet` talks to its storage with its own HTTP client),
* `POST /api/models/{repo}/commit/{revision}`: NDJSON of a header, inline `file`s and `lfsFile`s by sha256.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, constants
from peft import LoraConfig, PeftModel

from conftest import cls_dataset, tiny_bert
from snake_hf import SnakeTrainer, format_plan


httpx = pytest.importorskip("httpx2")  # huggingface_hub 2.x's HTTP client

REPO_ID = "local-tests/tiny-snake-adapter"  # a repository on the fake Hub only
TOKEN = "hf_fake_token_for_tests"
LFS_SUFFIXES = (".safetensors", ".bin")


class FakeHub:
    """Answers huggingface_hub's requests in memory and keeps what was committed.

    Attributes:
        requests (`list[httpx.Request]`): every request, in order.
        repos (`dict[str, dict]`): the JSON body of each `create_repo`, by repo id.
        commits (`list[dict]`): each commit: `repo`, `revision`, `summary`, `files` (path -> bytes) and `lfs` (paths
            that came through LFS).
    """

    def __init__(self):
        self.requests: list = []
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self._lfs_objects: dict[str, bytes] = {}

    def __call__(self, request):
        request.read()
        self.requests.append(request)
        path = request.url.path
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            self.repos[repo_id] = body
            return httpx.Response(200, json={"url": f"{request.url.scheme}://{request.url.host}/{repo_id}"})
        if request.method == "POST" and path == "/api/validate-yaml":
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": _upload_mode(f["path"]), "shouldIgnore": False} for f in files]
            return httpx.Response(200, json={"files": modes})
        if request.method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            actions = [
                {**obj, "actions": {"upload": {"href": f"{request.url.scheme}://{request.url.host}/lfs/{obj['oid']}"}}}
                for obj in objects
            ]
            return httpx.Response(200, json={"transfer": "basic", "objects": actions})
        if request.method == "PUT" and path.startswith("/lfs/"):
            self._lfs_objects[path.rsplit("/", 1)[-1]] = request.content
            return httpx.Response(200)
        if request.method == "POST" and "/commit/" in path:
            return self._commit(request)
        return httpx.Response(404, json={"error": f"the fake Hub does not serve {request.method} {path}"})

    def _commit(self, request):
        repo, revision = request.url.path.removeprefix("/api/models/").split("/commit/")
        commit = {"repo": repo, "revision": revision, "files": {}, "lfs": set()}
        for line in request.content.decode().splitlines():
            entry = json.loads(line)
            value = entry["value"]
            if entry["key"] == "header":
                commit["summary"] = value["summary"]
            elif entry["key"] == "file":
                commit["files"][value["path"]] = base64.b64decode(value["content"])
            elif entry["key"] == "lfsFile":
                commit["files"][value["path"]] = self._lfs_objects[value["oid"]]
                commit["lfs"].add(value["path"])
        self.commits.append(commit)
        oid = f"{len(self.commits):040x}"
        url = f"{request.url.scheme}://{request.url.host}/{repo}/commit/{oid}"
        return httpx.Response(200, json={"commitUrl": url, "commitOid": oid})

    def repo_files(self, repo_id: str = REPO_ID) -> dict[str, bytes]:
        """The repository's files after every commit to it (later commits overwrite)."""
        files: dict[str, bytes] = {}
        for commit in self.commits:
            if commit["repo"] == repo_id:
                files.update(commit["files"])
        return files


def _upload_mode(path: str) -> str:
    return "lfs" if path.endswith(LFS_SUFFIXES) else "regular"


@pytest.fixture
def fake_hub(monkeypatch):
    """Routes every huggingface_hub request to a `FakeHub` for the test, and restores the default client after."""
    hub = FakeHub()
    # conftest turns offline mode on for the whole run; the mocked transport never leaves the process.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub), follow_redirects=True))
    yield hub
    from huggingface_hub.utils._http import default_client_factory  # huggingface_hub 2.4.0

    huggingface_hub.set_client_factory(default_client_factory)


def _base_model(folder: Path):
    """The tiny BERT saved to (and loaded from) a local folder, so its name in the card is that folder."""
    if not folder.exists():
        tiny_bert(seed=0).save_pretrained(folder)
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(folder)


def _trained_trainer(tmp_path: Path, snake_args, **overrides) -> SnakeTrainer:
    args = snake_args(
        num_nodes=2,
        num_block_groups=2,
        stage_steps=2,
        push_to_hub=True,
        hub_model_id=REPO_ID,
        hub_token=TOKEN,
        **overrides,
    )
    trainer = SnakeTrainer(
        _base_model(tmp_path / "tiny-bert-base"),
        args,
        train_dataset=cls_dataset(),
        eval_dataset=cls_dataset(n=16, seed=2),
        peft_config=LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    trainer.train()
    trainer.evaluate()
    return trainer


def test_push_to_hub_uploads_adapter_folder_with_snake_files(tmp_path, snake_args, fake_hub):
    trainer = _trained_trainer(tmp_path, snake_args)
    trainer.push_to_hub(tasks="text-classification")
    files = fake_hub.repo_files()
    expected = {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "snake_plan.json",
        "snake_report.json",
    }
    assert expected <= set(files)
    assert not [name for name in files if name.startswith(("checkpoint-", "_"))]
    local = Path(trainer.args.output_dir)
    assert all(files[name] == (local / name).read_bytes() for name in expected)
    assert "adapter_model.safetensors" in fake_hub.commits[-1]["lfs"]  # the LFS path, as on the real Hub
    assert fake_hub.commits[-1]["summary"] == "End of training"


def test_push_to_hub_honours_hub_model_id_token_and_private_repo(tmp_path, snake_args, fake_hub):
    trainer = _trained_trainer(tmp_path, snake_args, hub_private_repo=True)
    trainer.push_to_hub()
    owner, name = REPO_ID.split("/")
    assert fake_hub.repos[REPO_ID]["name"] == name and fake_hub.repos[REPO_ID]["organization"] == owner
    assert fake_hub.repos[REPO_ID].get("visibility") == "private" or fake_hub.repos[REPO_ID].get("private") is True
    assert {commit["repo"] for commit in fake_hub.commits} == {REPO_ID}
    assert all(
        request.headers.get("authorization") == f"Bearer {TOKEN}"
        for request in fake_hub.requests
        if "/lfs/" not in request.url.path
    )


def test_model_card_states_plan_shards_bytes_memory_and_metrics(tmp_path, snake_args, fake_hub):
    trainer = _trained_trainer(tmp_path, snake_args)
    trainer.push_to_hub(tasks="text-classification")
    card = fake_hub.repo_files()["README.md"].decode()
    report = trainer.snake_report
    assert format_plan(trainer.plan) in card
    assert trainer.shard_summary.to_markdown() in card
    assert f"{report.total_bytes:,}" in card and report.total_bytes > 0
    assert "## Memory per node" in card
    eval_accuracy = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert f"| accuracy |  | {eval_accuracy:.4f} |" in card
    metadata = ModelCard(card).data
    assert metadata.base_model is None  # the base model is only a local folder here: not a Hub id, left out
    assert str(tmp_path) not in card
    assert metadata.library_name == "peft"
    assert metadata.to_dict()["communication"]["bytes_total"] == report.total_bytes


def test_model_card_carries_snake_learning_tag(tmp_path, snake_args, fake_hub):
    trainer = _trained_trainer(tmp_path, snake_args)
    trainer.push_to_hub()
    assert "snake-learning" in (ModelCard(fake_hub.repo_files()["README.md"].decode()).data.tags or [])


def test_pushed_adapter_loads_back_with_plain_peft_to_identical_logits(tmp_path, snake_args, fake_hub):
    trainer = _trained_trainer(tmp_path, snake_args)
    trainer.push_to_hub()
    download = tmp_path / "downloaded"
    download.mkdir()
    for name, content in fake_hub.repo_files().items():
        (download / name).write_bytes(content)
    loaded = PeftModel.from_pretrained(_base_model(tmp_path / "tiny-bert-base"), download).eval()
    trained = trainer.model.eval()
    batch = cls_dataset(n=8, seed=3)[:]
    inputs = {k: torch.tensor(batch[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, trained(**inputs).logits)


def test_hub_strategy_end_pushes_nothing_before_the_end(tmp_path, snake_args, fake_hub):
    trainer = _trained_trainer(tmp_path, snake_args, hub_strategy="end")
    assert fake_hub.commits == []  # init_hf_repo created the repository; nothing was uploaded during training
    trainer.push_to_hub()
    assert len(fake_hub.commits) == 1


def test_classification_recipe_push_to_hub_flag_uploads_its_outputs(tmp_path, fake_hub):
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "recipe_cls_for_hub", root / "recipes" / "sequence_classification.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    config = root / "recipes" / "configs" / "tiny_sequence_classification.yaml"
    argv = [str(config), "--output_dir", str(tmp_path), "--push_to_hub", "--hub_model_id", REPO_ID]
    results = recipe.main([*argv, "--hub_token", TOKEN, "--num_passes", "1"])
    files = fake_hub.repo_files()
    assert {"adapter_model.safetensors", "results.json", "snake_report.png", "shards.png", "README.md"} <= set(files)
    assert json.loads(files["results.json"])["total_bytes"] == results["total_bytes"]
    assert "text-classification" in files["README.md"].decode()


def test_hub_strategy_checkpoint_pushes_the_last_checkpoint_during_training(tmp_path, snake_args, fake_hub):
    trainer = _trained_trainer(tmp_path, snake_args, hub_strategy="checkpoint", save_strategy="steps", save_steps=2)
    trainer.push_to_hub()  # waits for the checkpoint pushes still in flight, then pushes the end of training
    assert any(commit["summary"].startswith("Training in progress") for commit in fake_hub.commits)
    assert "last-checkpoint/adapter_model.safetensors" in fake_hub.repo_files()
