"""What save_pretrained writes beside the adapter (peft's model card, `peft_version`) and push_to_hub, tested up to
the two huggingface_hub calls (mocked: no hub is reached)."""

import json
import os
import types

import peft
import pytest
import yaml
from helpers.models import tiny_model
from huggingface_hub import ModelCard

import deltatune.core.config
import deltatune.core.hub
from deltatune import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, get_peft_model


def card_of(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_save_writes_peft_model_card(tmp_path):
    base = tiny_model("llama")
    base.config._name_or_path = base.name_or_path = "org/tiny-llama"  # as from_pretrained("org/tiny-llama")
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    meta, body = card_of(tmp_path)
    assert meta["library_name"] == "peft"  # the Hub shows it loads with peft
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["base_model:adapter:org/tiny-llama", "lora", "transformers"]
    assert f"### Framework versions\n\n- PEFT {peft.__version__}\n- deltatune {deltatune.__version__}" in body
    assert len(body) > 1000  # huggingface_hub's template, as peft's card
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "peft"


def test_an_existing_card_is_updated_not_replaced(tmp_path):
    (tmp_path / "README.md").write_text("---\nmeta: hello\n---\nThis is a model card\n", encoding="utf-8")
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # twice: the versions are listed once
    meta, body = card_of(tmp_path)
    assert meta["meta"] == "hello" and meta["library_name"] == "peft"
    assert "lora" not in meta.get("tags", []) and "pipeline_tag" not in meta
    assert "This is a model card" in body
    assert body.count("- PEFT ") == 1 and body.count("### Framework versions") == 1


def test_config_records_the_peft_format_version(tmp_path, monkeypatch):
    assert deltatune.core.config.__version__ == peft.__version__  # the release the file tests check against
    monkeypatch.setattr(deltatune.core.config, "__version__", "0.17.0")
    config = LoraConfig(r=2)
    assert config.peft_version == "0.17.0"
    config.save_pretrained(tmp_path)
    monkeypatch.setattr(deltatune.core.config, "__version__", "0.18.0")
    assert PeftConfig.from_pretrained(tmp_path).peft_version == "0.17.0"  # what the file says, not the current one
    assert LoraConfig.from_json_file(tmp_path / "adapter_config.json") == config.to_dict()
    assert peft.PeftConfig.from_pretrained(tmp_path).peft_version == "0.17.0"


def test_a_dev_version_gets_the_commit(monkeypatch):
    monkeypatch.setattr(deltatune.core.config, "__version__", "0.22.0.dev0")
    monkeypatch.setattr(deltatune.core.config, "_get_commit_hash", lambda name: "abc123")
    assert LoraConfig().peft_version == "0.22.0.dev0@abc123"

    def broken(name):
        raise OSError("unreadable")

    monkeypatch.setattr(deltatune.core.config, "_get_commit_hash", broken)
    with pytest.warns(UserWarning, match="error while trying to determine the commit hash"):
        assert LoraConfig().peft_version == "0.22.0.dev0@UNKNOWN"


def test_from_json_file_drops_a_runtime_config(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 2, "runtime_config": {"x": 1}}))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert PeftConfig.from_json_file(path) == {"peft_type": "LORA", "r": 2}


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace huggingface_hub's create_repo / upload_folder; record what would be sent."""
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, **kwargs)
        return types.SimpleNamespace(repo_id=f"someone/{repo_id}")

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)
        calls["upload_folder"] = dict(kwargs, files=files)
        if "adapter_config.json" in files:
            calls["config"] = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
        return "commit-info"

    monkeypatch.setattr(deltatune.core.hub, "create_repo", create_repo)
    monkeypatch.setattr(deltatune.core.hub, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_what_save_pretrained_writes(hub_calls):
    model = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", r=2))
    model.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", r=4))
    result = model.push_to_hub("my-adapter", private=True, token="tok", commit_message="first", tags=["demo"])
    assert result == "commit-info"
    assert hub_calls["create_repo"] == dict(repo_id="my-adapter", private=True, token="tok", exist_ok=True)
    upload = hub_calls["upload_folder"]
    assert upload["repo_id"] == "someone/my-adapter" and upload["token"] == "tok"
    assert upload["commit_message"] == "first" and upload["create_pr"] is False
    assert upload["files"] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    ]
    assert hub_calls["config"]["r"] == 2 and hub_calls["config"]["inference_mode"] is True
    assert not os.path.exists(upload["folder_path"])  # the temporary folder is gone


def test_push_to_hub_passes_save_options_and_tags(hub_calls):
    model = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM"))
    model.add_adapter("other", LoraConfig(task_type="CAUSAL_LM"))
    model.push_to_hub("repo", selected_adapters=["other"], tags=["demo"])
    assert hub_calls["upload_folder"]["files"] == [
        "README.md",
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    ]
    with pytest.raises(ValueError, match="deltatune writes safetensors only"):
        model.push_to_hub("repo", safe_serialization=False)


def test_pushed_folder_loads_in_peft(hub_calls, tmp_path, monkeypatch):
    def keep(**kwargs):  # keep a copy of the folder that would be uploaded
        import shutil

        shutil.copytree(kwargs["folder_path"], tmp_path / "pushed")

    monkeypatch.setattr(deltatune.core.hub, "upload_folder", keep)
    get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM")).push_to_hub("repo")
    assert isinstance(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "pushed"), peft.PeftModel)
    assert isinstance(PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "pushed")), PeftModel)
