"""Fast paths (deltatune.ops) against their references: outputs and gradients within 1e-5 in fp32.

Tiny random models; the CUDA cases run only where a GPU is present (the device machine).
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.ops import DEVICES, SEVEN, close, leaves, lora_model, relative_error, tiny_llama_on
from torch import nn

from deltatune import LoraConfig, get_peft_model
from deltatune.ops import lora_linear
from deltatune.ops.lora_dispatch import stored_plan, use_fast_paths, weights_fixed
from deltatune.ops.lora_ops import dropout_mask, lora_linear_inference


def reference_lora(x, weight, bias, a, b, scaling, mask, keep_scale):
    """peft's composition: base(x) + (lora_B(lora_A(dropout(x.to(A.dtype)))) * s).to(dtype)."""
    x_low = x.to(a.dtype)
    if mask is not None:
        x_low = x_low * mask * keep_scale
    return F.linear(x, weight, bias) + ((x_low @ a.T @ b.T) * scaling).to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_matches_reference(device, dropout, with_bias):
    torch.manual_seed(1)
    x, a, b = leaves((2, 5, 16), (4, 16), (24, 4), device=device)
    weight = torch.randn(24, 16, device=device)
    bias = torch.randn(24, device=device, requires_grad=True) if with_bias else None
    mask = dropout_mask(x, dropout)[0] if dropout else None
    keep = 1 / (1 - dropout)
    out = lora_linear(x, weight, bias, a, b, 2.0, dropout, mask=mask)
    ref = reference_lora(x, weight, bias, a, b, 2.0, mask, keep)
    assert close(out, ref)[0], close(out, ref)[1]
    grad = torch.randn_like(out)
    inputs = [t for t in (x, a, b, bias) if t is not None]
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for g, w in zip(got, want, strict=True):
        assert close(g, w)[0], close(g, w)[1]


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_half_precision_base_fp32_adapter(device):
    torch.manual_seed(2)
    x = torch.randn(3, 7, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    a, b = leaves((4, 16), (24, 4), device=device)
    weight = torch.randn(24, 16, device=device, dtype=torch.bfloat16)
    out = lora_linear(x, weight, None, a, b, 0.5)
    ref = reference_lora(x, weight, None, a, b, 0.5, None, 1.0)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2  # bf16 rounding: one rounding here, two in the reference
    got = torch.autograd.grad(out.float().square().sum(), [x, a, b])
    want = torch.autograd.grad(ref.float().square().sum(), [x, a, b])
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 16), (1, 7, 16), (3, 2, 16), (5, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("layout", ["views", "contiguous"])
def test_lora_linear_inference_matches_reference(device, shape, layout):
    """The generate path: batched matmuls on a (1, tokens, in) view, with A^T and B^T as views or copies."""
    torch.manual_seed(3)
    x, weight, bias = (
        torch.randn(*shape, device=device),
        torch.randn(24, 16, device=device),
        torch.randn(24, device=device),
    )
    a, b = torch.randn(4, 16, device=device), torch.randn(24, 4, device=device)
    a_t, b_t = (a.T[None], b.T[None]) if layout == "views" else (a.T.contiguous()[None], b.T.contiguous()[None])
    out = lora_linear_inference(x, weight, bias, a_t, b_t, 2.0)
    assert out.shape == (*shape[:-1], 24)
    assert close(out, reference_lora(x, weight, bias, a, b, 2.0, None, 1.0))[0]


def test_lora_linear_inference_half_precision_base_fp32_adapter():
    torch.manual_seed(4)
    x, weight = torch.randn(1, 5, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16)
    a, b = torch.randn(4, 16), torch.randn(24, 4)
    out = lora_linear_inference(x, weight, None, a.T[None], b.T.contiguous()[None], 0.5)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference_lora(x, weight, None, a, b, 0.5, None, 1.0)) < 1e-2


def test_lora_linear_refuses_trainable_base_weight():
    x, a, b, weight = leaves((2, 16), (4, 16), (8, 4), (8, 16))
    with pytest.raises(ValueError, match="keeps the base weight frozen"):
        lora_linear(x, weight, None, a, b, 1.0)


def test_dropout_mask_keeps_one_minus_p_and_follows_the_seed():
    x = torch.empty(400, 500)
    torch.manual_seed(3)
    (first, keep), (second, _) = dropout_mask(x, 0.2), dropout_mask(x, 0.2)
    assert first.dtype == torch.bool and first.shape == x.shape
    assert keep == 1 - round(0.2 * 65536) / 65536  # the lane threshold's exact keep probability
    assert abs(keep - 0.8) <= 1 / 131072
    assert abs(first.float().mean().item() - keep) < 0.004  # 200,000 draws: 5 standard deviations
    assert not torch.equal(first, second)  # each layer / call draws its own mask
    torch.manual_seed(3)
    assert torch.equal(dropout_mask(x, 0.2)[0], first)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (1, 1, 2)])
def test_dropout_mask_lanes_cover_odd_sizes_with_independent_quarters(shape):
    torch.manual_seed(4)
    mask, _ = dropout_mask(torch.empty(*shape), 0.5)
    assert mask.shape == shape
    big, keep = dropout_mask(torch.empty(4 * 100_000), 0.05)
    for lane in range(4):  # each 16-bit lane of a 64-bit draw keeps at the same rate
        assert abs(big.view(-1, 4)[:, lane].float().mean().item() - keep) < 0.004


def test_dropout_mask_falls_back_to_bernoulli_outside_the_lane_resolution():
    x = torch.empty(100, 100)
    mask, keep = dropout_mask(x, 1e-6)  # round(p * 65536) == 0: drawn exactly
    assert keep == 1 - 1e-6 and mask.all()


def test_lora_linear_with_drawn_dropout_is_unbiased():
    torch.manual_seed(5)
    x = torch.randn(64, 32).repeat(200, 1)  # each row many times: the mean over draws approaches no-dropout
    weight, a, b = torch.zeros(8, 32), torch.randn(4, 32), torch.randn(8, 4)
    out = lora_linear(x, weight, None, a, b, 1.0, dropout=0.3).view(200, 64, 8).mean(0)
    exact = x[:64] @ a.T @ b.T
    assert (out - exact).abs().max().item() < 0.15 * exact.abs().max().item()
    assert not torch.allclose(lora_linear(x[:64], weight, None, a, b, 1.0, dropout=0.3), exact)


def inputs_kept(keep: bool):
    """A block in which LoRA layers keep their inputs (identity saved-tensor hooks: no input is remade under
    hooks), or, with keep=False, a block that changes nothing."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if keep else contextlib.nullcontext()


@pytest.fixture
def remake_any_size(monkeypatch):
    """Tiny test inputs fall under REMAKE_MIN_BYTES: let them be remade as a model-size input would be."""
    from deltatune.ops import lora_ops

    monkeypatch.setattr(lora_ops, "REMAKE_MIN_BYTES", 0)


@pytest.fixture
def remakes(monkeypatch):
    """One entry per layer that takes a remade input in backward: True where it remade it, False where it
    shared one remade by an earlier reader."""
    from deltatune.ops import lora_ops

    taken, take = [], lora_ops.RemadeInput.take
    monkeypatch.setattr(
        lora_ops.RemadeInput, "take", lambda self, leaves: taken.append(self.value is None) or take(self, leaves)
    )
    return taken


def kept_bytes(output: torch.Tensor, model: nn.Module) -> int:
    """Bytes of the distinct storages that the autograd graph behind `output` keeps for backward (the model's
    parameters excluded): what backward needs in memory, measured without changing what is kept."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, seen, stack = {}, set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = [t for t in getattr(node, "saved_tensors", ()) if t is not None]  # custom autograd functions
        saved += [getattr(node, n) for n in dir(node) if n.startswith("_saved_")]  # built-in nodes
        for tensor in (t for t in saved if isinstance(t, torch.Tensor)):
            if tensor.untyped_storage().data_ptr() not in params:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def lora_overhead_bytes(build_lora, dropout):
    """Bytes a LoRA tiny llama keeps for backward above the frozen base (whose embeddings' output needs grad)."""
    base = tiny_llama_on(seed=4)
    ids = torch.randint(0, 100, (2, 64))

    def kept(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        return kept_bytes(model(inputs_embeds=embeds).logits, model)

    for p in base.parameters():
        p.requires_grad_(False)
    config = dict(r=4, lora_alpha=8, target_modules=SEVEN, lora_dropout=dropout)
    return kept(build_lora(copy.deepcopy(base), config).train()) - kept(base)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_keeps_a_fraction_of_what_peft_keeps_for_backward(dropout, remake_any_size):
    peft = pytest.importorskip("peft")
    ours = lora_overhead_bytes(lambda m, c: get_peft_model(m, LoraConfig(**c)), dropout)
    theirs = lora_overhead_bytes(lambda m, c: peft.get_peft_model(m, peft.LoraConfig(**c)), dropout)
    with use_fast_paths(False):
        reference = lora_overhead_bytes(lambda m, c: get_peft_model(m, LoraConfig(**c)), dropout)
    assert reference == theirs  # the reference path keeps what peft keeps
    # peft keeps each layer input (and with dropout an fp32 dropped copy per layer); deltatune keeps the rank-r
    # products, a 1-byte mask per layer, and no input the graph can remake from factors it keeps anyway
    assert ours <= 0.25 * theirs, (ours, theirs)


def test_inputs_are_remade_only_from_factors_the_graph_keeps(remake_any_size):
    torch.manual_seed(7)
    a, b, h, w = torch.randn(2, 5, 16, requires_grad=True), *leaves((2, 5, 16), (2, 5, 16)), torch.randn(16)
    r = torch.rand(2, 5, 1, requires_grad=True)
    lora_a, lora_b = leaves((4, 16), (8, 4))
    weight = torch.randn(8, 16)
    cases = {
        "act(gate) * up": lambda: torch.sigmoid(a) * b,  # both factors kept by the product's node
        "weight * (h * r)": lambda: w * (h * r),  # an fp32 RMSNorm: two products deep
        "matmul": lambda: a @ torch.eye(16),  # nothing to remake from: x is kept
        "under hooks": lambda: torch.sigmoid(a) * b,
    }
    for name, make in cases.items():
        with inputs_kept(name == "under hooks"):
            x = make()
            out = lora_linear(x, weight, None, lora_a, lora_b, 2.0)
        kept_x = out.grad_fn.saved_tensors[0] is not None
        assert kept_x == (name in ("matmul", "under hooks")), name
        inputs = [a, b, h, r, lora_a, lora_b]
        got = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)
        x = make()
        want = torch.autograd.grad(
            reference_lora(x, weight, None, lora_a, lora_b, 2.0, None, 1.0).square().sum(), inputs, allow_unused=True
        )
        for g, ref in zip(got, want, strict=True):
            assert (g is None) == (ref is None) and (g is None or close(g, ref)[0]), name


def loss_and_grads(model, ids, **kwargs):
    loss = model(input_ids=ids, labels=ids, **kwargs).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_remade_input_gives_the_gradients_of_a_kept_one_bit_for_bit(dtype, dropout, remake_any_size):
    """RMSNorm as Llama writes it, in fp32 and in bf16 (a cast between the two products), with and without a
    dropout mask (the remade input is masked in backward as the kept one is)."""
    torch.manual_seed(8)
    h = torch.randn(2, 5, 16, requires_grad=True)
    w, weight = torch.randn(16, dtype=dtype), torch.randn(8, 16, dtype=dtype)
    lora_a, lora_b = leaves((4, 16), (8, 4))
    mask = torch.rand(2, 5, 16) > dropout if dropout else None

    def grads(keep_input):
        with inputs_kept(keep_input):
            rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            out = lora_linear(w * (h * rms).to(dtype), weight, None, lora_a, lora_b, 2.0, dropout, mask)
        assert (out.grad_fn.saved_tensors[0] is None) != keep_input
        return torch.autograd.grad(out.float().square().sum(), [h, lora_a, lora_b])

    for remade, kept in zip(grads(False), grads(True), strict=True):
        assert torch.equal(remade, kept)


def test_layers_reading_one_input_remake_it_once(remakes, remake_any_size):
    torch.manual_seed(9)
    a, b = leaves((2, 5, 16), (2, 5, 16))
    factors = [leaves((4, 16), (8, 4)) for _ in range(3)]  # q, k and v
    weight = torch.randn(8, 16)

    def grads(keep_input):
        with inputs_kept(keep_input):
            x = torch.sigmoid(a) * b
            total = sum(lora_linear(x, weight, None, la, lb, 2.0).square().sum() for la, lb in factors)
        return torch.autograd.grad(total, [a, b, *[t for pair in factors for t in pair]])

    for remade, kept in zip(grads(False), grads(True), strict=True):
        assert torch.equal(remade, kept)
    assert remakes == [True, False, False]  # three readers, one remake


def test_an_input_changed_in_place_between_readers_is_remade_as_each_read_it(remake_any_size):
    """The first reader remakes x as it was; a reader after `x.mul_(2)` must not share that recipe."""
    torch.manual_seed(10)
    a, b = leaves((2, 5, 16), (2, 5, 16))
    weight = torch.randn(8, 16)
    first, second = leaves((4, 16), (8, 4)), leaves((4, 16), (8, 4))

    def grads(doubled_in_place):
        x = torch.sigmoid(a) * b
        before = lora_linear(x if doubled_in_place else x.detach(), weight, None, *first, 2.0)
        after = lora_linear(x.mul_(2) if doubled_in_place else x.detach() * 2, weight, None, *second, 2.0)
        return torch.autograd.grad(before.square().sum() + after.square().sum(), [*first, *second])

    for got, want in zip(grads(True), grads(False), strict=True):
        assert close(got, want)[0]


def test_only_inputs_of_at_least_remake_min_bytes_are_remade():
    from deltatune.ops.lora_ops import REMAKE_MIN_BYTES

    lora_a, lora_b = leaves((4, 64), (8, 4))
    weight = torch.randn(8, 64)
    for rows, remade in [(REMAKE_MIN_BYTES // 256 - 1, False), (REMAKE_MIN_BYTES // 256, True)]:
        a, b = leaves((rows, 64), (rows, 64))  # rows x 64 fp32: 256 bytes a row
        out = lora_linear(torch.sigmoid(a) * b, weight, None, lora_a, lora_b, 2.0)
        assert (out.grad_fn.saved_tensors[0] is None) == remade, rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("remake", [False, True])
def test_model_loss_and_grads_fast_equal_reference(device, bias, remake, remakes, request):
    if remake:  # inputs this small are kept; here they are remade as a model-size input would be
        request.getfixturevalue("remake_any_size")
    model = lora_model(device, bias=bias).train()
    ids = torch.randint(0, 100, (2, 12), device=device)
    nodes = []
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda module, args, out: nodes.append(type(out.grad_fn).__name__))
    loss, grads = loss_and_grads(model, ids)
    with use_fast_paths(False):
        ref_loss, ref_grads = loss_and_grads(model, ids)
    assert nodes == ["_LoraLinearBackward", "AddBackward0"]  # the fast path ran, then the reference
    layers = len(model.get_base_model().model.layers)
    # per decoder layer 6 readers of 3 remade inputs: normed h (q/k/v), normed h (gate/up), act(gate) * up
    # (o_proj reads the attention output, no product: kept); the first layer's q/k/v read the norm of frozen
    # embeddings, which autograd did not record: kept
    want = (3 * layers - 1, 6 * layers - 3) if remake else (0, 0)
    assert (remakes.count(True), len(remakes)) == want
    assert close(loss, ref_loss)[0]
    assert len(grads) == len(ref_grads) > 0
    for g, w in zip(grads, ref_grads, strict=True):
        assert close(g, w)[0], close(g, w)[1]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_plain_training(use_reentrant, remake_any_size, remakes):
    """Non-reentrant checkpointing decides through saved-tensor hooks what is kept (no input is remade under
    them); reentrant checkpointing runs the forward again in backward, where inputs are remade as usual."""
    ids = torch.randint(0, 100, (2, 12))
    model = lora_model().train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads_by_backward():  # reentrant checkpoints support .backward(), not autograd.grad
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in params]
        model.zero_grad(set_to_none=True)
        return loss, grads

    loss, grads = loss_and_grads_by_backward()
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    model.get_base_model().enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    remakes.clear()  # count only the checkpointed run
    checkpointed_loss, checkpointed_grads = loss_and_grads_by_backward()
    assert bool(remakes) == use_reentrant
    assert torch.equal(loss, checkpointed_loss)
    for g, c in zip(grads, checkpointed_grads, strict=True):
        assert torch.equal(g, c)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_torch_compile_traces_lora_in_one_graph_and_trains_as_eager(dropout, remake_any_size, monkeypatch):
    """Under torch.compile there is no recorded graph to remake inputs from (they are kept), and dropout masks
    come from `bernoulli_` (dynamo cannot trace the CPU lane trick's `random_`). fullgraph=True: a graph break
    anywhere in the model fails the test. aot_eager draws the same masks as eager `bernoulli_`, so the eager
    reference runs with the compile-time choices forced."""
    from deltatune.ops import lora_ops

    ids = torch.randint(0, 100, (2, 12))
    model = lora_model(dropout=dropout).train()
    params = [p for p in model.parameters() if p.requires_grad]
    with monkeypatch.context() as patch:
        patch.setattr(lora_ops, "_is_compiling", lambda: True)
        torch.manual_seed(3)
        loss, grads = loss_and_grads(model, ids)
    torch.manual_seed(3)
    compiled_loss = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids).loss
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    assert close(loss, compiled_loss)[0]
    for g, c in zip(grads, compiled_grads, strict=True):
        assert close(g, c)[0], close(g, c)[1]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_fast_equals_reference_loop(device):
    model = lora_model(device, names=("a", "b", "c"))
    ids = torch.randint(0, 100, (5, 9), device=device)
    names = ["b", "__base__", "a", "c", "b"]
    params = [p.requires_grad_() for n, p in model.named_parameters() if ".adapters." in n]
    logits, grads = [], []
    for fast in (True, False):
        with use_fast_paths(fast):
            out = model(input_ids=ids, adapter_names=names).logits
            logits.append(out)
            grads.append(torch.autograd.grad(out.square().sum(), params, allow_unused=True))
    assert close(*logits)[0], close(*logits)[1]
    for g, w in zip(*grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert close(g, w)[0], close(g, w)[1]
    with torch.no_grad(), weights_fixed():  # the cached, in-place inference path (as inside generate)
        assert close(model(input_ids=ids, adapter_names=names).logits, logits[1])[0]
        assert close(model(input_ids=ids, adapter_names=names).logits, logits[1])[0]  # the second call: the plan
        assert stored_plan(model.get_base_model().model.layers[1].self_attn.v_proj, mixed=True).made_for.batch == 5
        model.set_adapter("b")
        alone = model(input_ids=ids[:1]).logits
        assert close(model(input_ids=ids, adapter_names=names).logits[:1], alone)[0]


def test_mixed_batch_generate_repeats_rows_and_checks_counts():
    model = lora_model(names=("a", "b")).eval()
    ids = torch.randint(0, 100, (2, 4))
    out = model.generate(
        input_ids=ids,
        adapter_names=["a", "b"],
        max_new_tokens=3,
        do_sample=False,
        num_beams=2,
        num_return_sequences=2,
        pad_token_id=0,
    )
    with use_fast_paths(False):
        ref = model.generate(
            input_ids=ids,
            adapter_names=["a", "b"],
            max_new_tokens=3,
            do_sample=False,
            num_beams=2,
            num_return_sequences=2,
            pad_token_id=0,
        )
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 3 rows"):
        model(input_ids=torch.randint(0, 100, (3, 4)), adapter_names=["a", "b"])


@pytest.mark.parametrize("fused", [False, True])
def test_inference_sees_every_optimizer_step(fused):
    """Fused AdamW updates weights without bumping their version: no cache may outlive a weight change."""
    model = lora_model(names=("a", "b"))
    model.set_adapter("a")
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad(), weights_fixed():  # fill the caches
        model(input_ids=ids)
        model(input_ids=ids, adapter_names=["a", "b"])
    params = [p for n, p in model.named_parameters() if ".adapters.a." in n]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=fused)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with use_fast_paths(False), torch.no_grad():
        want_single, want_mixed = model(input_ids=ids).logits, model(input_ids=ids, adapter_names=["a", "b"]).logits
    for scope in (contextlib.nullcontext, weights_fixed):  # a plain forward, and a new generate-like block
        with torch.no_grad(), scope():
            assert close(model(input_ids=ids).logits, want_single)[0]
            assert close(model(input_ids=ids, adapter_names=["a", "b"]).logits, want_mixed)[0]


def test_generate_keeps_a_plan_only_for_its_own_call():
    model = lora_model().eval()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    ids = torch.randint(0, 100, (1, 4))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    first_epoch = stored_plan(layer).epoch
    with use_fast_paths(False):
        assert torch.equal(out, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert stored_plan(layer).epoch != first_epoch  # a new call rebuilt it
