"""The `PeftModel` subclass for each task type, and `get_peft_model`, the tutorials' entry point.

As in peft, `get_peft_model` (and `PeftModel.from_pretrained`) picks the class from `config.task_type`; the
language-model classes check that the model can generate.
"""

from __future__ import annotations

from torch import nn

from deltatune.core.config import PeftConfig, TaskType
from deltatune.core.peft_model import MODEL_TYPE_TO_PEFT_MODEL, PeftModel


def _check_can_generate(model: nn.Module, task_type: str) -> None:
    """As peft (which fails on the missing attribute): a language-model task needs a model that generates, so a
    classifier wrapped as CAUSAL_LM is refused here rather than at its first forward."""
    if not hasattr(model, "prepare_inputs_for_generation"):
        raise ValueError(
            f"task_type={task_type} needs a model that generates text, but {type(model).__name__} does not (it has "
            "no prepare_inputs_for_generation); load the model with AutoModelForCausalLM / AutoModelForSeq2SeqLM, "
            "or give the task_type it has (SEQ_CLS for a classifier)"
        )


class PeftModelForCausalLM(PeftModel):
    """For `AutoModelForCausalLM` models (task_type CAUSAL_LM)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **options) -> None:
        _check_can_generate(model, "CAUSAL_LM")
        super().__init__(model, peft_config, adapter_name, **options)


class PeftModelForSeq2SeqLM(PeftModel):
    """For encoder-decoder models (task_type SEQ_2_SEQ_LM)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **options) -> None:
        _check_can_generate(model, "SEQ_2_SEQ_LM")
        super().__init__(model, peft_config, adapter_name, **options)


class PeftModelForSequenceClassification(PeftModel):
    """For classifiers (task_type SEQ_CLS)."""


class PeftModelForTokenClassification(PeftModel):
    """For token classifiers (task_type TOKEN_CLS)."""


class PeftModelForQuestionAnswering(PeftModel):
    """For extractive QA (task_type QUESTION_ANS)."""


class PeftModelForFeatureExtraction(PeftModel):
    """For encoders used for their hidden states (task_type FEATURE_EXTRACTION)."""


MODEL_TYPE_TO_PEFT_MODEL.update(  # the table lives in peft_model.py, where from_pretrained reads it
    {
        TaskType.CAUSAL_LM: PeftModelForCausalLM,
        TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
        TaskType.SEQ_CLS: PeftModelForSequenceClassification,
        TaskType.TOKEN_CLS: PeftModelForTokenClassification,
        TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
        TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
    }
)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (the tutorials' entry point).

    peft's arguments: `autocast_adapter_dtype` (default True) keeps adapters over a float16/bfloat16 base in
    float32; `revision` is recorded in the config; `low_cpu_mem_usage` is accepted (adapters are made in place).
    `mixed=True` gives the same `PeftModel`: it already runs several LoRA adapters at once
    (`base_model.set_adapter([...])`); adapters of different methods on one model are refused by `add_adapter`.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a deltatune config such as LoraConfig, not {type(peft_config).__name__}")
    if revision is not None:
        peft_config.revision = revision
    model_class = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    peft_model = model_class(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    return peft_model
