"""`AutoPeftModelFor*`: load the base model named in an adapter's config, then the adapter, in one call."""

from __future__ import annotations

import os
from typing import Any

from deltatune.core.config import PeftConfig
from deltatune.core.peft_model import PeftModel
from deltatune.core.task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)


class _AutoPeftModel:
    auto_class_name = "AutoModel"
    peft_model_class: type[PeftModel] = PeftModel

    @classmethod
    def from_pretrained(
        cls,
        adapter_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **model_kwargs: Any,
    ) -> PeftModel:
        """Read `adapter_config.json`, load its `base_model_name_or_path`, then the adapter."""
        import transformers

        config = PeftConfig.from_pretrained(adapter_path)
        base = config.base_model_name_or_path
        if not base:
            raise ValueError(
                f"{adapter_path}/adapter_config.json has no base_model_name_or_path; load the base model yourself "
                "and call PeftModel.from_pretrained(model, adapter_path)"
            )
        auto_class = getattr(transformers, cls.auto_class_name)
        model = auto_class.from_pretrained(base, **model_kwargs)
        return cls.peft_model_class.from_pretrained(model, adapter_path, adapter_name, is_trainable, config=config)


class AutoPeftModel(_AutoPeftModel):
    """Any model type: `AutoModel` + adapter."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    """`AutoModelForCausalLM` + adapter."""

    auto_class_name = "AutoModelForCausalLM"
    peft_model_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    auto_class_name = "AutoModelForSeq2SeqLM"
    peft_model_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForSequenceClassification"
    peft_model_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForTokenClassification"
    peft_model_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    auto_class_name = "AutoModelForQuestionAnswering"
    peft_model_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    auto_class_name = "AutoModel"
    peft_model_class = PeftModelForFeatureExtraction
