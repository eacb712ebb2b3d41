"""P-Tuning (prompt encoder, MLP or LSTM): the tutorials' numbers, parity with peft 0.21.2, files both ways, generation
with the cache, training and bad input."""

import warnings

import peft
import pytest
import torch
from helpers.models import full_size_on_meta
from helpers.prompts import (
    DECODERS,
    TASK_OF,
    assert_same_outputs,
    check_files_both_ways,
    check_generate_matches_no_cache,
    check_parity,
    check_sampling_matches_peft,
    check_training_lowers_loss,
    make_pair,
    tiny_model_wide_weights,
)

from deltatune import PeftModel, PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType, get_peft_model

CASES = [(arch, TASK_OF[arch]) for arch in TASK_OF] + [
    ("bert", t) for t in ("TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
]
LSTM = PromptEncoderReparameterizationType.LSTM


def configs(task, kind="MLP", n=4, **extra):
    if kind == "LSTM":
        extra = {"encoder_hidden_size": 8, **extra}
    fields = dict(task_type=task, num_virtual_tokens=n, encoder_reparameterization_type=kind, **extra)
    return PromptEncoderConfig(**fields), peft.PromptEncoderConfig(**fields)


@pytest.mark.parametrize(
    "kind, line",
    [
        ("MLP", "trainable params: 12,609,536 || all params: 1,315,721,216 || trainable%: 0.9584"),
        (LSTM, "trainable params: 193,030,144 || all params: 1,496,141,824 || trainable%: 12.9019"),
    ],
)
def test_tutorial_table_on_bloom_1b4_zh(kind, line, capsys):
    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10, encoder_reparameterization_type=kind
    )
    model = get_peft_model(full_size_on_meta("bloom-1b4-zh"), config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == line
    assert config.encoder_hidden_size == 2048  # the default: the model's hidden size


def test_tutorial_snippet_config_counts_as_peft_and_warns_about_encoder_num_layers():
    # The tutorials' P-tuning snippet: MLP, dropout 0.1, encoder_num_layers=5 (ignored by the MLP), hidden 1024.
    fields = dict(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=10,
        encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP,
        encoder_dropout=0.1,
        encoder_num_layers=5,
        encoder_hidden_size=1024,
    )
    # peft's warning, word for word (peft's tests compare it whole); none with the default encoder_num_layers.
    with pytest.warns(UserWarning) as record:
        ours = get_peft_model(full_size_on_meta("bloom-1b4-zh"), PromptEncoderConfig(**fields))
    messages = [str(w.message) for w in record if "encoder_num_layers" in str(w.message)]
    assert messages == ["for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(full_size_on_meta("bloom-1b4-zh"), PromptEncoderConfig(**{**fields, "encoder_num_layers": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(full_size_on_meta("bloom-1b4-zh"), peft.PromptEncoderConfig(**fields))
    # 10*2048 + (2048*1024 + 1024) + (1024*1024 + 1024) + (1024*2048 + 2048)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (5_267_456, 1_308_379_136)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch, task", CASES)
def test_same_weights_same_outputs_and_counts_as_peft(arch, task, kind):
    if task in ("TOKEN_CLS", "QUESTION_ANS"):  # our losses differ on purpose, see test_prompt_tuning
        ours, theirs = make_pair(*configs(task, kind), arch, task)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        assert_same_outputs(ours, theirs, arch, task, with_loss=False)
    else:
        check_parity(*configs(task, kind), arch, task)


@pytest.mark.parametrize("arch, kind", [("llama", "MLP"), ("t5", "LSTM"), ("bert", "MLP"), ("gpt2", "LSTM")])
def test_files_load_both_ways(arch, kind, tmp_path):
    check_files_both_ways(*configs(TASK_OF[arch], kind), arch, TASK_OF[arch], tmp_path)


def test_file_holds_the_encoder_output_so_training_cannot_resume_from_it(tmp_path):
    model = get_peft_model(
        tiny_model_wide_weights("llama"), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model_wide_weights("llama"), tmp_path)
    assert [n for n, _ in loaded.named_parameters() if "prompt_encoder" in n] == [
        "prompt_encoder.default.embedding.weight"
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].table()
        )
    with pytest.raises(ValueError, match="holds the prompt encoder's output .* load it with is_trainable=False"):
        PeftModel.from_pretrained(tiny_model_wide_weights("llama"), tmp_path, is_trainable=True)


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_with_cache_equals_decoding_without_cache(arch):
    kind = LSTM if arch in ("gpt2", "t5") else "MLP"
    config = PromptEncoderConfig(task_type=TASK_OF[arch], num_virtual_tokens=3, encoder_reparameterization_type=kind)
    check_generate_matches_no_cache(config, arch)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_sampling_draws_what_peft_draws(arch):
    check_sampling_matches_peft(*configs(TASK_OF[arch]), arch)


@pytest.mark.parametrize("arch, kind", [("gpt2", "MLP"), ("bert", "LSTM")])
def test_training_lowers_loss_and_keeps_base_weights(arch, kind):
    config = PromptEncoderConfig(task_type=TASK_OF[arch], num_virtual_tokens=4, encoder_reparameterization_type=kind)
    # 20 steps: after 10, the tiny gpt2's loss ratio is 0.69 or 0.75 depending on the release's random init
    check_training_lowers_loss(config, arch, TASK_OF[arch], steps=20)


def test_merge_is_refused_and_disable_gives_the_base_model():
    model = get_peft_model(
        tiny_model_wide_weights("opt"), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    ids = torch.tensor([[5, 6, 7]])
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model_wide_weights("opt")(input_ids=ids).logits)
    with pytest.raises(TypeError, match="P_TUNING adds no weight that can be folded into the base"):
        model.merge_adapter()


@pytest.mark.parametrize("n", [0, -1])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ValueError, match=rf"num_virtual_tokens={n} is invalid: it must be a positive integer"):
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)


def test_bad_encoder_settings():
    with pytest.raises(ValueError, match="encoder_reparameterization_type='GRU' is not known; use one of: MLP, LSTM"):
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match=r"encoder_dropout=1.5 is outside \[0.0, 1.0\)"):
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_dropout=1.5)
    with pytest.raises(ValueError, match="encoder_num_layers=0 is outside"):
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_num_layers=0)
