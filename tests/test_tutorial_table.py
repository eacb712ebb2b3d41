"""The tutorials' table of trainable parameters on the bloom-1b4-zh architecture, built on the meta device."""

import pytest
from helpers.models import full_size_on_meta

from deltatune import BitFitConfig, LoraConfig, PeftType, TaskType, get_peft_model


@pytest.mark.parametrize(
    "config, line",
    [
        (
            LoraConfig(task_type=TaskType.CAUSAL_LM),
            "trainable params: 1,572,864 || all params: 1,304,684,544 || trainable%: 0.1206",
        ),
        (
            LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["query_key_value", "dense_4h_to_h"]),
            "trainable params: 3,538,944 || all params: 1,306,650,624 || trainable%: 0.2708",
        ),
        (
            LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                target_modules=r".*\.1.*query_key_value",
                modules_to_save=["word_embeddings"],
            ),
            "trainable params: 95,225,856 || all params: 1,398,337,536 || trainable%: 6.8099",
        ),
    ],
)
def test_lora_rows_of_the_tutorial_table(config, line, capsys):
    model = get_peft_model(full_size_on_meta("bloom-1b4-zh"), config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == line


def test_bitfit_fraction_of_the_tutorial_table():
    model = get_peft_model(full_size_on_meta("bloom-1b4-zh"), BitFitConfig(task_type=TaskType.CAUSAL_LM))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable / total == 0.000418051659240749


def test_the_config_seed_003_prints_types_back_in(capsys):
    # The table's tutorial prints peft 0.11's LoraConfig with every field; a reader may type it back in as it stands.
    config = LoraConfig(
        peft_type=PeftType.LORA,
        auto_mapping=None,
        base_model_name_or_path="D:/pretrained_model/models--Langboat--bloom-1b4-zh",
        revision=None,
        task_type=TaskType.CAUSAL_LM,
        inference_mode=False,
        r=8,
        target_modules={"query_key_value"},
        lora_alpha=8,
        lora_dropout=0.0,
        fan_in_fan_out=False,
        bias="none",
        use_rslora=False,
        modules_to_save=None,
        init_lora_weights=True,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern={},
        alpha_pattern={},
        megatron_config=None,
        megatron_core="megatron.core",
        loftq_config={},
        use_dora=False,
        layer_replication=None,
    )
    get_peft_model(full_size_on_meta("bloom-1b4-zh"), config).print_trainable_parameters()
    assert (
        capsys.readouterr().out.strip()
        == "trainable params: 1,572,864 || all params: 1,304,684,544 || trainable%: 0.1206"
    )


def test_megatron_layers_are_refused_by_name():
    with pytest.raises(ValueError, match=r"megatron_config is not supported: .* leave megatron_config=None"):
        LoraConfig(megatron_config={"tensor_model_parallel_size": 2})
