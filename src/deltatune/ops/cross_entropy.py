"""Memory-lean causal-LM loss: the lm_head projection and cross-entropy done a chunk of tokens at a time.

The usual loss materialises the logits (N x vocab, fp32), log-softmax keeps another N x vocab for backward,
and backward makes two more; for SmolLM2 (vocab 49,152) at 4 x 128 tokens that is four 100 MB tensors, more
than all of LoRA's activations. Here each chunk's logits live only while its loss and its gradient are
computed (the gradient of a cross-entropy is known in forward: softmax - one-hot), so the peak holds one
chunk of logits and an N x hidden gradient. On a CUDA device with Triton, one kernel turns a chunk of logits
into its gradient in place (`deltatune.ops.triton_ce`); elsewhere the PyTorch path below does it, and it is
the reference the kernel is tested against.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
CHUNK_ELEMENTS = 2**23  # logits per chunk (32 MB in fp32): small against the full N x vocab


def ce_chunk_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: torch.Tensor) -> torch.Tensor:
    """Summed loss of a chunk; `logits` (c, V) fp32 is overwritten with scale * (softmax - one-hot) (0 if ignored)."""
    valid = labels != ignore_index  # (c,)
    target = labels.clamp(min=0)  # (c,) ignored rows point at class 0, masked below
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    loss = ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
    logits.sub_(lse[:, None]).exp_()  # softmax
    logits[torch.arange(len(labels), device=logits.device), target] -= 1.0
    logits.mul_((valid * scale)[:, None])
    return loss


def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on CUDA when available, else the PyTorch reference."""
    if logits.is_cuda:
        from deltatune.ops import triton_ce

        if triton_ce.available():
            return triton_ce.ce_chunk_triton(logits, labels, ignore_index, scale)
    return ce_chunk_torch(logits, labels, ignore_index, scale)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against `labels`, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk, divisor):
        counted = (labels != ignore_index).sum() if divisor is None else torch.as_tensor(divisor, device=hidden.device)
        scale = 1.0 / counted.float()  # mean over counted tokens; 0 of them gives nan, as F.cross_entropy
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, H)
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None  # (V,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]  # (c, H)
            logits = F.linear(h, weight, bias).float()  # (c, V), as the model's loss upcasts them
            total += _ce_chunk(logits, labels[start : start + chunk], ignore_index, scale)
            g = logits.to(hidden.dtype)  # (c, V): d loss / d logits
            if need_h:
                grad_h[start : start + chunk] = g @ weight
            if need_w:
                grad_w.addmm_(g.T.float(), h.float())
            if need_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.dtypes[0]) if grad_w is not None else None
        grad_b = (grad_b * grad_loss).to(ctx.dtypes[1]) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` without the full logits.

    Args:
        hidden: (N, H) final hidden states. weight: (V, H) output projection. bias: (V,) or None.
        labels: (N,) class ids; `ignore_index` rows count neither in the loss nor in the mean.
        chunk_size: tokens per chunk; default keeps a chunk's logits near 2**23 elements.
        num_items_in_batch: divide the summed loss by this instead of the counted tokens (what transformers
            does with Trainer's count over all gradient-accumulation batches).

    Returns:
        The mean loss (fp32 scalar).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, H) and labels (N,); got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, chunk, num_items_in_batch)


def lean_loss_refusal(model: nn.Module) -> str | None:
    """Why `lean_causal_lm_loss` would not equal the loss of `model(..., labels=...)`, or None when it would."""
    if _is_peft_wrapper(model):
        name = model.active_peft_config.peft_type.value
        method = model.method  # the registry's description of the adapters' method
        if method.forward is not None:
            return f"lean_causal_lm_loss works for layer methods such as LoRA; {name} changes the inputs"
        if method.after_forward is not None:
            return f"lean_causal_lm_loss computes the cross-entropy alone; {name} adds a term to the model's loss"
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or getattr(config, "is_encoder_decoder", False):
        return (
            f"lean_causal_lm_loss needs a decoder-only model whose output head is a plain nn.Linear; "
            f"{type(model).__name__} has {type(head).__name__}"
        )
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return f"{type(model).__name__} rescales its logits; lean_causal_lm_loss would differ"
    return None


def _causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(decoder stack, lm_head) of a decoder-only transformers model or a PeftModel around one."""
    refusal = lean_loss_refusal(model)
    if refusal:
        raise ValueError(f"{refusal}: use model(..., labels=...)")
    if _is_peft_wrapper(model):
        model = model.get_base_model()
    return model.base_model, model.get_output_embeddings()


def _is_peft_wrapper(model: nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def lean_causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    **kwargs,
) -> torch.Tensor:
    """The loss `model(input_ids, labels=labels).loss` computes, without materialising the logits.

    Same shift as transformers (position t predicts token t + 1; -100 labels are ignored) and the same mean.
    Works for decoder-only models with a plain lm_head (Llama, Mistral, Qwen, GPT-2 style...), wrapped in a
    deltatune `PeftModel` with a layer method (LoRA, BitFit, ...) or bare.

    Args:
        model: the (Peft)model. input_ids: (B, T). labels: (B, T), usually input_ids with -100 on padding.
        attention_mask: (B, T) or None. chunk_size: tokens per chunk (see `linear_cross_entropy`).
        num_items_in_batch: the divisor of the summed loss, as transformers takes it (see `linear_cross_entropy`).
        **kwargs: passed to the decoder stack (position_ids, ...).

    Returns:
        The mean loss (fp32 scalar).
    """
    backbone, head = _causal_lm_parts(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, H)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(hidden.device)  # (B, T): token t + 1 at t
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    return linear_cross_entropy(
        flat, head.weight, shifted.reshape(-1), head.bias, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch
    )
