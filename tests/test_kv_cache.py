"""deltatune.kv_cache: the KV cache keyword read from the model (old and new transformers names), the cache found in
a call by its type, and the error that names the method and the transformers release."""

import re

import pytest
import transformers
from helpers.models import tiny_model
from torch import nn
from transformers import DynamicCache

from deltatune.kv_cache import cache_argument, passed_cache, require_cache_argument


class OldName(nn.Module):  # transformers 5.0's spelling
    def forward(self, x, past_key_values=None):
        return x


class NewName(nn.Module):  # later 5.x releases
    def forward(self, x, cache=None):
        return x


class ClassifierHead(nn.Module):  # passes the cache on through **kwargs, like BertForSequenceClassification
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, **kwargs):
        return self.inner(x, **kwargs)


class NoCache(nn.Module):
    def forward(self, x, attention_mask=None):
        return x


@pytest.mark.parametrize(
    "model, name",
    [
        (OldName(), "past_key_values"),
        (NewName(), "cache"),
        (ClassifierHead(OldName()), "past_key_values"),
        (ClassifierHead(NewName()), "cache"),
        (ClassifierHead(NoCache()), None),
    ],
)
def test_the_cache_keyword_is_read_from_the_model(model, name):
    assert cache_argument(model) == name


def test_the_installed_release_names_a_keyword_deltatune_knows():
    model = tiny_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert cache_argument(model) in ("cache", "past_key_values")


def test_the_cache_in_a_call_is_found_by_type_under_any_name():
    cache = DynamicCache()
    assert passed_cache({"input_ids": None, "kv_state": cache}) == ("kv_state", cache)
    assert passed_cache({"past_key_values": None, "cache": None}) == (None, None)


def test_a_model_without_a_cache_is_refused_naming_method_model_and_release():
    with pytest.raises(
        ValueError,
        match=rf"^prefix tuning needs it, but under transformers {re.escape(transformers.__version__)} "
        r"ClassifierHead \(model_type=None\) takes no KV cache \(no forward among its "
        r"modules takes cache or past_key_values\); use LoRA$",
    ):
        require_cache_argument(ClassifierHead(NoCache()), "prefix tuning", "needs it", "use LoRA")
