"""Shared pieces of the prompt-method tests (prompt tuning, P-tuning, prefix tuning): tiny models with wide random
weights, a peft twin with the same weights, decoding references, and the checks every prompt-method file runs."""

from __future__ import annotations

import copy
import inspect
import warnings

import torch

import deltatune
from helpers.models import tiny_model

PAD = 0
# The ids the prompt tests pad and decode with: 0 everywhere (OPT's own pad id is 1, GPT-2's bos/eos 50256).
_SAME_SPECIAL_IDS = {"gpt2": dict(bos_token_id=PAD, eos_token_id=PAD), "opt": dict(pad_token_id=PAD)}


def tiny_model_wide_weights(arch: str, task: str | None = None, seed: int = 0):
    """`tiny_model` with matrices drawn from N(0, 0.3) and no end-of-sequence token, in eval mode.

    Wider random weights than the default init, so greedy decoding does not repeat one token; no EOS, so
    `generate` runs a fixed number of steps like the no-cache reference.
    """
    model = tiny_model(arch, task, seed, **_SAME_SPECIAL_IDS.get(arch, {}))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = model.generation_config.pad_token_id = PAD
    return model.eval()


def peft_on_renamed_cache(theirs):
    """peft 0.21.2 looks for the KV cache under the name `past_key_values` only: in a backbone's forward signature
    (prefix tuning on encoder classifiers) and in the inputs `prepare_inputs_for_generation` returns (prompt methods
    in generate). transformers releases that call the cache `cache` still take the old name, so hand it to peft
    under that name on this instance; the model is unchanged, so peft stays the oracle for what it computes."""
    prepare = theirs.__dict__.get("base_model_prepare_inputs_for_generation")  # generating task models only

    def prepare_with_old_name(*args, **kwargs):
        model_kwargs = prepare(*args, **kwargs)
        if "cache" in model_kwargs and "past_key_values" not in model_kwargs:
            model_kwargs["past_key_values"] = model_kwargs.pop("cache")
        return model_kwargs

    if prepare is not None:
        theirs.base_model_prepare_inputs_for_generation = prepare_with_old_name
    name = getattr(theirs, "transformer_backbone_name", None)
    backbone = theirs.base_model.get_submodule(name) if name else None
    forward = getattr(backbone, "forward", None)
    parameters = inspect.signature(forward).parameters if forward is not None else {}
    if "past_key_values" in parameters or "cache" not in parameters:
        return theirs

    def forward_taking_old_name(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    backbone.forward = forward_taking_old_name
    return theirs


def peft_twin(ours, peft_config, base):
    """peft's model on a copy of `base` with the same adapter weights as `ours` (encoder and trained heads)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_on_renamed_cache(peft.get_peft_model(copy.deepcopy(base), peft_config))
    theirs.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    ours_heads = {
        k.replace("base_model.model.", "base_model."): v
        for k, v in ours.state_dict().items()
        if ".modules_to_save." in k
    }
    missing = set(ours_heads) - set(theirs.state_dict())
    assert not missing, missing
    theirs.load_state_dict(ours_heads, strict=False)
    return theirs.eval()


def batch(arch: str, rows=((5, 6, 7, 8, 9), (11, 12, 13))):
    """Token rows of different lengths, left-padded, with their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` makes them from a left-padded mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def decode_without_cache(model, ids, mask, steps: int, encoder_decoder: bool):
    """Greedy decoding that re-runs the whole sequence at every step (no KV cache): the reference for generate."""
    if encoder_decoder:
        decoder = torch.full((ids.shape[0], 1), PAD)
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=False).logits
            decoder = torch.cat((decoder, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        return decoder
    for _ in range(steps):
        kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
        if "position_ids" in inspect.signature(model.get_base_model().forward).parameters:
            kwargs["position_ids"] = positions(mask)
        logits = model(**kwargs).logits
        ids = torch.cat((ids, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


# ---- the checks every prompt-method test file runs ------------------------------------------------------------

TASK_OF = {
    "llama": "CAUSAL_LM",
    "bloom": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "opt": "CAUSAL_LM",
    "t5": "SEQ_2_SEQ_LM",
    "bert": "SEQ_CLS",
}
DECODERS = ["llama", "bloom", "gpt2", "opt", "t5"]


def model_inputs(arch: str, task: str) -> dict:
    """A left-padded batch with the labels of `task`."""
    ids, mask = batch(arch)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if task == "CAUSAL_LM":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    elif task == "SEQ_2_SEQ_LM":
        inputs["labels"] = torch.tensor([[21, 22, 23], [24, 25, 26]])
    elif task == "SEQ_CLS":
        inputs["labels"] = torch.tensor([0, 2])
        inputs["token_type_ids"] = torch.zeros_like(ids)
    elif task == "TOKEN_CLS":
        inputs["labels"] = torch.ones_like(ids).masked_fill(mask == 0, -100)
    elif task == "QUESTION_ANS":
        inputs["start_positions"], inputs["end_positions"] = torch.tensor([1, 3]), torch.tensor([2, 4])
    return inputs


def main_output(outputs, task: str) -> torch.Tensor:
    if task == "FEATURE_EXTRACTION":
        return outputs.last_hidden_state
    if task == "QUESTION_ANS":
        return torch.stack((outputs.start_logits, outputs.end_logits))
    return outputs.logits


def make_pair(ours_config, peft_config, arch: str, task: str):
    """(ours, peft's) on copies of one tiny model, with equal adapter weights."""
    base = tiny_model_wide_weights(arch, task)
    ours = deltatune.get_peft_model(copy.deepcopy(base), ours_config).eval()
    return ours, peft_twin(ours, peft_config, base)


def assert_same_outputs(ours, theirs, arch: str, task: str, with_loss: bool = True) -> None:
    inputs = model_inputs(arch, task)
    if not with_loss:
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        if task == "SEQ_2_SEQ_LM":
            inputs["decoder_input_ids"] = torch.tensor([[PAD, 21, 22], [PAD, 24, 25]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ours(**inputs), theirs(**inputs)
    torch.testing.assert_close(main_output(a, task), main_output(b, task), atol=1e-5, rtol=1e-5)
    if with_loss and "labels" in inputs:
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def check_parity(ours_config, peft_config, arch: str, task: str) -> None:
    """Equal trainable/all counts and equal outputs (and losses) for equal weights."""
    ours, theirs = make_pair(ours_config, peft_config, arch, task)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_same_outputs(ours, theirs, arch, task)


def comparable_config(path) -> dict:
    import json

    with open(path / "adapter_config.json") as handle:
        data = json.load(handle)
    data.pop("peft_version", None)
    data.pop("auto_mapping", None)
    if data.get("modules_to_save"):  # peft lists the classifier heads twice
        data["modules_to_save"] = sorted(set(data["modules_to_save"]))
    return data


def check_files_both_ways(ours_config, peft_config, arch: str, task: str, tmp_path) -> None:
    """Our file loads in peft and peft's in ours with equal outputs; both files have the same keys, shapes, config."""
    import peft
    from safetensors.torch import load_file

    ours, theirs = make_pair(ours_config, peft_config, arch, task)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
        peft_loaded = peft_on_renamed_cache(
            peft.PeftModel.from_pretrained(tiny_model_wide_weights(arch, task), tmp_path / "ours")
        )
    peft_loaded.eval()
    ours_loaded = deltatune.PeftModel.from_pretrained(tiny_model_wide_weights(arch, task), tmp_path / "peft").eval()
    assert_same_outputs(peft_loaded, ours, arch, task, with_loss=False)
    assert_same_outputs(ours_loaded, theirs, arch, task, with_loss=False)
    ours_file, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    assert "prompt_embeddings" in ours_file
    assert comparable_config(tmp_path / "ours") == comparable_config(tmp_path / "peft")


def check_generate_matches_no_cache(config, arch: str, steps: int = 6) -> None:
    """Greedy generate (KV cache on) == re-running the whole sequence each step, on a left-padded batch; every step
    after the first feeds the model one new token (the cache is really used); generate(use_cache=False) agrees."""
    task = TASK_OF[arch]
    model = deltatune.get_peft_model(tiny_model_wide_weights(arch, task), config).eval()
    ids, mask = batch(arch)
    fed = []
    base = model.get_base_model()
    embeddings = base.get_decoder().embed_tokens if arch == "t5" else base.get_input_embeddings()
    hook = embeddings.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[-1]))
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    finally:
        hook.remove()
    reference = decode_without_cache(model, ids, mask, steps, encoder_decoder=arch == "t5")
    assert torch.equal(out, reference), (out, reference)
    uncached = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=False
    )
    assert torch.equal(uncached, reference), (uncached, reference)
    assert fed[-(steps - 1) :] == [1] * (steps - 1), fed


def check_sampling_matches_peft(ours_config, peft_config, arch: str) -> None:
    """Sampling with two sequences per prompt draws the same tokens as peft with the same seed."""
    ours, theirs = make_pair(ours_config, peft_config, arch, TASK_OF[arch])
    ids, mask = batch(arch)
    kwargs = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=2
    )
    torch.manual_seed(7)
    a = ours.generate(**kwargs)
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = theirs.generate(**kwargs)
    assert a.shape[0] == 2 * ids.shape[0]
    assert torch.equal(a, b), (a, b)


def check_training_lowers_loss(config, arch: str, task: str, steps: int = 10, lr: float = 0.03) -> None:
    """Adam steps on one batch lower its loss (measured in eval mode, without dropout, before and after); the base
    model's weights stay bit-identical."""
    base = tiny_model_wide_weights(arch, task)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = deltatune.get_peft_model(base, config)
    inputs = model_inputs(arch, task)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**inputs).loss.item()

    start = eval_loss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = eval_loss()
    assert end < 0.7 * start, (start, end)
    after = model.get_base_model().state_dict()
    for key, value in before.items():
        # a trained head (modules_to_save) keeps the original under .original_module
        wrapped = key.rsplit(".", 1)[0] + ".original_module." + key.rsplit(".", 1)[1]
        assert torch.equal(after[key if key in after else wrapped], value), key


def word_tokenizer(words: list[str], name: str = "tiny-word-tokenizer"):
    """An offline word-level tokenizer: word i gets id i + 1 (0 is [UNK]); words are cut out wherever they occur, so
    it also splits Chinese text without spaces."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    pattern = "|".join(sorted(map(__import__("re").escape, words), key=len, reverse=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(pattern), behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.name_or_path = name
    return tokenizer


TUTORIAL_PROMPT_TEXT = "下面是一段人与机器人的对话。"


def tutorial_tokenizer():
    """Stands in for bloom-389m-zh's tokenizer, which splits the tutorial's text into 7 tokens (the tutorials' table:
    7 x 2048 = 14,336 trainable); this one splits it into the same number of words."""
    return word_tokenizer(["下面", "是", "一段", "人与", "机器人", "的对话", "。"], name="tiny-zh-word-tokenizer")
