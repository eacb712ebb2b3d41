"""The Hugging Face Hub side of an adapter folder: the model card `save_pretrained` writes, and `push_to_hub`.

The card is peft's (`PeftModel.create_or_update_model_card`): `library_name: peft` (the files load with peft),
tags, the base model, and a "Framework versions" line; a card already in the folder is updated, not replaced.
`push_to_hub` saves into a temporary folder and uploads that folder with `huggingface_hub` (tests stop at those
two calls: no hub is reached from them).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from torch import nn

from deltatune.core import config as config_module
from deltatune.core.config import TaskType
from deltatune.core.files import atomic_write_text
from deltatune.core.registry import method_for
from deltatune.version import __version__ as deltatune_version

CARD_NAME = "README.md"
FRAMEWORK_HEADING = "### Framework versions"


def _card_tags(model: nn.Module, base: nn.Module) -> set[str]:
    """peft's tags: the base model's own, `transformers`, the method's (`lora`), and `base_model:adapter:<base>`."""
    tags = set(getattr(base, "model_tags", None) or [])
    if type(base).__module__.startswith("transformers."):
        tags.add("transformers")
    tags.update(method_for(model.active_peft_config).card_tags)
    if getattr(base, "name_or_path", None):
        tags.add(f"base_model:adapter:{base.name_or_path}")
    return tags


def _framework_lines(lines: list[str]) -> list[str]:
    """The card's lines with the versions block: the peft format written (as peft's card) and deltatune's release."""
    wanted = [f"- PEFT {config_module.__version__}", f"- deltatune {deltatune_version}"]
    missing = [line for line in wanted if line not in lines]
    if not missing:
        return lines
    if FRAMEWORK_HEADING in lines:
        at = lines.index(FRAMEWORK_HEADING) + 2
        return lines[:at] + missing + lines[at:]
    return [*lines, f"{FRAMEWORK_HEADING}\n", *missing]


def create_or_update_model_card(model: nn.Module, output_dir: str | os.PathLike, tags: list[str] | None = None) -> None:
    """Write `README.md` in `output_dir` for `model` (a PeftModel), or update the card already there, as peft."""
    path = os.path.join(output_dir, CARD_NAME)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    base = model.get_base_model()
    all_tags = _card_tags(model, base) | set(tags or ())
    if all_tags:
        card.data["tags"] = sorted(all_tags | set(card.data.get("tags") or ()))
    if not card.data.get("pipeline_tag") and model.active_peft_config.task_type == TaskType.CAUSAL_LM:
        card.data["pipeline_tag"] = "text-generation"  # one of the rare moments the tag is certain (peft's words)
    model_config = getattr(base, "config", None)
    if hasattr(model_config, "to_dict") and "_name_or_path" in model_config.to_dict():
        card.data["base_model"] = model_config.to_dict()["_name_or_path"]
    card.text = "\n".join(_framework_lines(card.text.splitlines()))
    atomic_write_text(path, str(card))


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **save_kwargs: Any,
) -> Any:
    """Create repo `repo_id` if needed, save the adapters into a temporary folder and upload that folder.

    The arguments are transformers' `push_to_hub` ones (peft's `PeftModel` inherits it); `save_kwargs` go to
    `save_pretrained` (`selected_adapters=...`). Returns `upload_folder`'s commit info.
    """
    save_kwargs.pop("max_shard_size", None)  # adapters are never sharded
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        if tags:
            create_or_update_model_card(model, folder, tags)
        return upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
