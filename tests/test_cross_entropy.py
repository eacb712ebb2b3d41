"""The memory-lean cross-entropy (deltatune.ops.cross_entropy) against full-logits cross-entropy and model.loss."""

import pytest
import torch
import torch.nn.functional as F
from helpers.ops import DEVICES, close, leaves, lora_model, tiny_llama_on

from deltatune import AdaLoraConfig, LoraConfig, get_peft_model
from deltatune.ops import lean_causal_lm_loss, linear_cross_entropy
from deltatune.ops.cross_entropy import ce_chunk_torch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 3])
def test_linear_cross_entropy_matches_full_logits(device, chunk):
    torch.manual_seed(6)
    hidden, weight, bias = leaves((10, 16), (50, 16), (50,), device=device)
    labels = torch.randint(0, 50, (10,), device=device)
    labels[[1, 7]] = -100
    loss = linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk)
    ref = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)
    assert close(loss, ref)[0]
    got = torch.autograd.grad(loss * 3, [hidden, weight, bias])
    want = torch.autograd.grad(ref * 3, [hidden, weight, bias])
    for g, w in zip(got, want, strict=True):
        assert close(g, w)[0], close(g, w)[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA only")
def test_triton_ce_chunk_matches_torch():
    from deltatune.ops import triton_ce

    assert triton_ce.available()
    logits = torch.randn(37, 50_001, device="cuda") * 4
    labels = torch.randint(0, 50_001, (37,), device="cuda")
    labels[5] = -100
    scale = torch.tensor(0.25, device="cuda")
    mine, ref = logits.clone(), logits.clone()
    loss = triton_ce.ce_chunk_triton(mine, labels, -100, scale)
    ref_loss = ce_chunk_torch(ref, labels, -100, scale)
    assert close(loss, ref_loss, 1e-4)[0] and close(mine, ref)[0], close(mine, ref)[1]


def test_lean_causal_lm_loss_equals_model_loss():
    model = lora_model().train()
    ids = torch.randint(0, 100, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    loss = lean_causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    ref = model(input_ids=ids, labels=labels, attention_mask=mask).loss
    for g, w in zip(grads, torch.autograd.grad(ref, params), strict=True):
        assert close(g, w)[0], close(g, w)[1]
    assert close(loss, ref)[0]


def test_lean_causal_lm_loss_refuses_a_wrapped_head():
    model = get_peft_model(tiny_llama_on(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="output head is a plain nn.Linear; LlamaForCausalLM has LoraLayer"):
        lean_causal_lm_loss(model, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_lean_causal_lm_loss_refuses_adalora_whose_loss_has_a_regulariser():
    model = get_peft_model(tiny_llama_on(), AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    with pytest.raises(ValueError, match="ADALORA adds a term to the model's loss: use model"):
        lean_causal_lm_loss(model, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("divisor", [9, torch.tensor(9)])
def test_linear_cross_entropy_divides_by_num_items_in_batch(divisor):
    """transformers' gradient-accumulation form: the summed loss over a count of the whole accumulated batch."""
    torch.manual_seed(6)
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=4, num_items_in_batch=divisor)
    want = F.cross_entropy(hidden @ weight.T, labels, reduction="sum") / 9
    assert close(got, want)[0]
    assert close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0])[0]
