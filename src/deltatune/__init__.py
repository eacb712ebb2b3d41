"""deltatune: parameter-efficient fine-tuning for Hugging Face transformers.

The public names match peft's, so `from deltatune import LoraConfig, get_peft_model, TaskType` runs the
code of peft tutorials (such as the Chinese PEFT tutorials the README names) unchanged.
"""

from deltatune import methods  # noqa: F401  (registers every method)
from deltatune.core.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from deltatune.core.config import (
    NoMatchingPeftModuleError,
    PeftConfig,
    PeftError,
    PeftType,
    PeftWarning,
    TaskType,
    get_peft_config,
)
from deltatune.core.peft_model import PeftModel
from deltatune.core.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from deltatune.core.task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.bottleneck import AdapterConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora.initialization import LoftQConfig
from deltatune.methods.lora.loftq import replace_lora_weights_loftq
from deltatune.methods.lora.lora import LoraConfig
from deltatune.methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from deltatune.methods.prefix_tuning import PrefixTuningConfig
from deltatune.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
from deltatune.moved_modules import install as _install_moved_modules
from deltatune.ops import fast_paths_enabled, set_fast_paths, use_fast_paths
from deltatune.quantization import prepare_model_for_int8_training, prepare_model_for_kbit_training
from deltatune.version import __version__ as __version__

_install_moved_modules()


def __getattr__(name: str):
    # These need transformers' Trainer: imported on first use, not with the package.
    if name == "AdaLoraCallback":
        from deltatune.training.adalora_callback import AdaLoraCallback

        return AdaLoraCallback
    if name == "LeanLossTrainer":
        from deltatune.training.lean_loss_trainer import LeanLossTrainer

        return LeanLossTrainer
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdapterConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BitFitConfig",
    "IA3Config",
    "LeanLossTrainer",
    "LoftQConfig",
    "LoraConfig",
    "NoMatchingPeftModuleError",
    "PeftConfig",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "fast_paths_enabled",
    "get_base_model_state_dict",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_int8_training",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_fast_paths",
    "set_peft_model_state_dict",
    "use_fast_paths",
]
