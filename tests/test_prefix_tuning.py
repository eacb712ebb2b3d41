"""Prefix Tuning (keys/values in every attention layer through the transformers Cache): the tutorials' numbers,
grouped-query attention, parity with peft 0.21.2, files both ways, generation with the cache, training and bad
input."""

import peft
import pytest
import torch
from helpers.models import full_size_on_meta, tiny_model
from helpers.prompts import (
    DECODERS,
    TASK_OF,
    batch,
    check_files_both_ways,
    check_generate_matches_no_cache,
    check_parity,
    check_sampling_matches_peft,
    check_training_lowers_loss,
    tiny_model_wide_weights,
)
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from deltatune import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from deltatune.methods.prefix_tuning import prefix_cache

CASES = [(arch, TASK_OF[arch]) for arch in TASK_OF] + [
    ("bert", t) for t in ("TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
]


def configs(task, projection=False, n=4):
    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    fields = dict(task_type=task, num_virtual_tokens=n, **extra)
    return PrefixTuningConfig(**fields), peft.PrefixTuningConfig(**fields)


@pytest.mark.parametrize(
    "projection, line",
    [
        (False, "trainable params: 983,040 || all params: 1,304,094,720 || trainable%: 0.0754"),
        (True, "trainable params: 205,641,728 || all params: 1,508,753,408 || trainable%: 13.6299"),
    ],
)
def test_tutorial_table_on_bloom_1b4_zh(projection, line, capsys):
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10, prefix_projection=projection)
    model = get_peft_model(full_size_on_meta("bloom-1b4-zh"), config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == line
    # 10 x (24 layers x 2 x 2048); with projection + 10*2048 + (2048*2048 + 2048) + (2048*98304 + 98304)


def test_grouped_query_attention_gets_key_value_sized_prefixes():
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = get_peft_model(tiny_model_wide_weights("llama"), config)  # 4 query heads, 2 key/value heads of size 8
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    assert model.prompt_encoder["default"].embedding.weight.shape == (4, 2 * 2 * 16)
    cache = prefix_cache(model, 3)
    assert isinstance(cache, DynamicCache) and cache.layers[1].keys.shape == (3, 2, 4, 8)  # (B, kv heads, n, head)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch, task", CASES)
def test_same_weights_same_outputs_and_counts_as_peft(arch, task, projection):
    check_parity(*configs(task, projection), arch, task)


def test_position_ids_move_past_the_prefix():
    model = get_peft_model(
        tiny_model_wide_weights("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        implicit = model(input_ids=ids).logits
        explicit = model(input_ids=ids, position_ids=torch.arange(4)[None]).logits
    torch.testing.assert_close(explicit, implicit)
    assert implicit.shape == (1, 4, 100)  # the prefix is not in the logits


@pytest.mark.parametrize(
    "arch, projection",
    [("llama", True), ("bloom", False), ("gpt2", False), ("opt", True), ("t5", False), ("bert", True)],
)
def test_files_load_both_ways(arch, projection, tmp_path):
    check_files_both_ways(*configs(TASK_OF[arch], projection), arch, TASK_OF[arch], tmp_path)


def test_training_resumes_from_a_file_only_without_projection(tmp_path):
    for projection in (False, True):
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection)
        get_peft_model(tiny_model_wide_weights("gpt2"), config).save_pretrained(tmp_path / str(projection))
    resumed = PeftModel.from_pretrained(tiny_model_wide_weights("gpt2"), tmp_path / "False", is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == 4 * 2 * 2 * 32
    with pytest.raises(ValueError, match="holds the prompt encoder's output .* PrefixEncoder weights"):
        PeftModel.from_pretrained(tiny_model_wide_weights("gpt2"), tmp_path / "True", is_trainable=True)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("projection", [False, True])
def test_greedy_generate_with_cache_equals_decoding_without_cache(arch, projection):
    config = PrefixTuningConfig(task_type=TASK_OF[arch], num_virtual_tokens=3, prefix_projection=projection)
    check_generate_matches_no_cache(config, arch)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_sampling_draws_what_peft_draws(arch):
    check_sampling_matches_peft(*configs(TASK_OF[arch]), arch)


@pytest.mark.parametrize("arch, projection", [("llama", False), ("opt", True), ("bert", False)])
def test_training_lowers_loss_and_keeps_base_weights(arch, projection):
    config = PrefixTuningConfig(task_type=TASK_OF[arch], num_virtual_tokens=4, prefix_projection=projection)
    check_training_lowers_loss(config, arch, TASK_OF[arch])


def test_merge_is_refused_and_disable_gives_the_base_model():
    model = get_peft_model(
        tiny_model_wide_weights("bloom"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    ids, mask = batch("bloom")
    with model.disable_adapter():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            tiny_model_wide_weights("bloom")(input_ids=ids, attention_mask=mask).logits,
        )
    with pytest.raises(TypeError, match="PREFIX_TUNING adds no weight that can be folded into the base"):
        model.merge_and_unload()


def test_an_architecture_without_past_key_values_is_refused_by_name():
    model = tiny_model("distilbert", n_layers=1)
    with pytest.raises(
        ValueError,
        match=r"prefix tuning puts learned keys/values .* but under transformers \d+\.\d+\S* "
        r"DistilBertForSequenceClassification \(model_type='distilbert'\) takes no KV "
        r"cache \(no forward among its modules takes cache or past_key_values\); use "
        r"prompt tuning or P-tuning",
    ):
        get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))


class DictConfig(dict):
    """A dict read by attribute, as peft's key-mapping tests fake a model config."""

    def __getattr__(self, name):
        if name in self:
            return self[name]
        raise AttributeError(name)


class NotTransformers(nn.Module):
    """A plain module with a config, as peft's key-mapping tests build: it takes no KV cache."""

    def __init__(self) -> None:
        super().__init__()
        self.config = DictConfig(vocab_size=10)
        self.device = "cpu"  # peft reads it
        self.layers = nn.ModuleList([nn.Linear(10, 10) for _ in range(2)])

    def forward(self, input_ids, attention_mask=None):
        return self.layers[0](input_ids.float())

    def prepare_inputs_for_generation(self):  # what CAUSAL_LM asks of a model
        return None


def test_a_module_outside_transformers_takes_a_prefix_but_cannot_run_it(tmp_path):
    # peft adds (and saves and loads) prefixes on any module; only a run needs the KV cache.
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, num_layers=2, token_dim=10, num_attention_heads=2)
    model = get_peft_model(NotTransformers(), PrefixTuningConfig(**config))
    model.prompt_encoder["default"].embedding.weight.data.fill_(1.0)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(NotTransformers(), tmp_path)
    torch.testing.assert_close(loaded.prompt_encoder["default"].embedding.weight, torch.ones(5, 2 * 2 * 10))
    with pytest.raises(ValueError, match=r"prefix tuning puts learned keys/values .* NotTransformers .* takes no KV"):
        loaded(input_ids=torch.ones(1, 10, dtype=torch.long))
    theirs = peft.get_peft_model(NotTransformers(), peft.PrefixTuningConfig(**config))
    assert theirs.prompt_encoder["default"].embedding.weight.shape == (5, 40)


class LlamaThatDropsThePast(LlamaForCausalLM):
    """Its layers take past key/values but its forward throws them away: only a run can tell."""

    def forward(self, *args, past_key_values=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_silently_ignores_the_prefix_is_caught_at_the_first_forward():
    model = LlamaThatDropsThePast(tiny_model_wide_weights("llama").config)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(
        ValueError,
        match=r"LlamaThatDropsThePast \(model_type='llama'\) ran without reading its KV cache \(passed as "
        r"past_key_values=\) under transformers \d+\.\d+",
    ):
        peft_model(input_ids=torch.tensor([[5, 6]]))


def test_gradient_checkpointing_is_refused():
    model = tiny_model_wide_weights("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="prefix tuning does not work with gradient checkpointing"):
        get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


@pytest.mark.parametrize("n", [0, -2])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ValueError, match=rf"num_virtual_tokens={n} is invalid: it must be a positive integer"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)


def test_unknown_init_weights():
    with pytest.raises(ValueError, match="init_weights='ones' is not known; use None \\(random\\) or 'zero'"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, init_weights="ones")
