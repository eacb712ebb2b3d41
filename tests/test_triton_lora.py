"""The opt-in Triton LoRA kernels against the PyTorch paths (`lora_linear_inference`, `lora_linear`).

Runs where Triton imports: compiled on a CUDA device (the device machine), else on the CPU through Triton's
interpreter. CPU-only installs of torch have no Triton, so CI skips this file; to run it here:
`pip install triton` beside the CPU torch (the interpreter needs no GPU).
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (CPU builds of torch come without it)", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is decorated, so before the import below

from helpers.ops import SEVEN, relative_error, tiny_llama_on  # noqa: E402

from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.ops import triton_lora  # noqa: E402
from deltatune.ops.lora_dispatch import use_fast_paths  # noqa: E402
from deltatune.ops.lora_ops import (  # noqa: E402
    dropout_mask,
    lora_linear,
    lora_linear_inference,
    triton_kernels_for,
    use_triton_kernels,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int) -> bool:
    """|got - want| <= ulps units in the last place of `want` (bf16 sums differ in accumulation order)."""
    unit = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1.0)
    return bool(((got.float() - want.float()).abs() <= ulps * unit).all())


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def factors(n_out, n_in, rank, dtype):
    return torch.randn(rank, n_in, dtype=dtype, device=DEVICE), torch.randn(n_out, rank, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("shape, n_out, rank", [((1, 1, 40), 50, 8), ((3, 7, 70), 130, 4), ((100, 33), 20, 20)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_reference_fp32(shape, n_out, rank, with_bias):
    """One token and many, sizes off the 64-wide tiles, ranks padded to 16 and 32, within 1e-5."""
    torch.manual_seed(0)
    x, weight = torch.randn(*shape, device=DEVICE), torch.randn(n_out, shape[-1], device=DEVICE)
    bias = torch.randn(n_out, device=DEVICE) if with_bias else None
    a, b = factors(n_out, shape[-1], rank, torch.float32)
    want = lora_linear_inference(x, weight, bias, a.T[None], b.T.contiguous()[None], 0.7)
    got = triton_lora.lora_linear_triton(x, weight, bias, a, b, 0.7)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_reference_bf16_base(adapter_dtype):
    """A bf16 base with a bf16 or an fp32 adapter: near the exact product everywhere; on a GPU within 2 bf16
    ulps of the reference (Triton's interpreter rounds fp32 -> bf16 by truncation, so not there)."""
    torch.manual_seed(1)
    x, weight, bias = (randn(*s, dtype=torch.bfloat16) for s in ((2, 9, 40), (50, 40), (50,)))
    a, b = factors(50, 40, 8, adapter_dtype)
    want = lora_linear_inference(x, weight, bias, a.T[None], b.T.contiguous()[None], 2.0)
    got = triton_lora.lora_linear_triton(x, weight, bias, a, b, 2.0)
    exact = F.linear(x.double(), weight.double(), bias.double()) + 2.0 * x.double() @ a.double().T @ b.double().T
    assert got.dtype == torch.bfloat16
    assert relative_error(got, exact) < 1e-2
    if DEVICE == "cuda":
        assert within_ulps(got, want, 2), (got.float() - want.float()).abs().max()


def test_kernels_are_opt_in_and_need_a_row_major_weight():
    x, weight = torch.zeros(1, 4, device=DEVICE), torch.zeros(6, 4, device=DEVICE)
    assert triton_kernels_for(x, weight) is None  # off unless DELTATUNE_TRITON_LORA=1 at import
    with use_triton_kernels(True):
        assert triton_kernels_for(x, weight) is triton_lora
        assert triton_kernels_for(x, torch.zeros(4, 6, device=DEVICE).T) is None  # a transposed view
    assert triton_kernels_for(x, weight) is None


def test_generate_with_the_kernel_gives_the_reference_tokens(monkeypatch):
    """Opted in, every adapted layer of a tiny llama decodes through the kernel, and the tokens are the same."""
    model = get_peft_model(tiny_llama_on(DEVICE), LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter change the output
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(0, 100, (2, 5), device=DEVICE)
    with use_fast_paths(False):
        want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    calls = []
    kernel = triton_lora.lora_linear_triton
    monkeypatch.setattr(triton_lora, "lora_linear_triton", lambda *args: calls.append(1) or kernel(*args))
    with use_triton_kernels(True):
        got = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert len(calls) == 2 * 7 * 6  # 2 layers x 7 projections x (prefill + 5 decoding steps)


def lora_grads(opted_in, x, weight, bias, a, b, scaling, mask):
    """lora_linear's output and the gradients of x, bias, A and B, with the kernels or the PyTorch path."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, bias, a, b)]
    with use_triton_kernels(opted_in):
        out = lora_linear(
            leaves[0],
            weight,
            leaves[1],
            leaves[2],
            leaves[3],
            scaling,
            dropout=0.25 if mask is not None else 0.0,
            mask=mask,
        )
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).sum().backward()
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(2, 5, 40), (70, 33)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_training_kernels_match_the_pytorch_path_fp32(shape, with_mask):
    """Forward and input-gradient kernels under autograd: output and all four gradients within 1e-5."""
    torch.manual_seed(2)
    x, weight, bias = randn(*shape), randn(50, shape[-1]), randn(50)
    a, b = factors(50, shape[-1], 6, torch.float32)
    mask = dropout_mask(x, 0.25)[0] if with_mask else None
    want = lora_grads(False, x, weight, bias, a, b, 1.5, mask)
    got = lora_grads(True, x, weight, bias, a, b, 1.5, mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_training_kernels_bf16_base_fp32_adapter():
    torch.manual_seed(3)
    x, weight, bias = (randn(*s, dtype=torch.bfloat16) for s in ((3, 8, 40), (50, 40), (50,)))
    a, b = factors(50, 40, 8, torch.float32)
    mask = dropout_mask(x, 0.25)[0]
    want = lora_grads(False, x, weight, bias, a, b, 2.0, mask)
    got = lora_grads(True, x, weight, bias, a, b, 2.0, mask)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and relative_error(g, w) < 1e-2


def test_a_tiny_llama_trains_through_the_kernels(monkeypatch):
    """Loss and every LoRA gradient of a training step equal the PyTorch path; every layer used both kernels."""
    model = get_peft_model(tiny_llama_on(DEVICE), LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(0, 100, (2, 9), device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        return [loss, *torch.autograd.grad(loss, params)]

    want = step()
    calls = {"forward": 0, "input_grad": 0}
    for kind in calls:
        kernel = getattr(triton_lora, f"lora_{kind}")
        monkeypatch.setattr(
            triton_lora,
            f"lora_{kind}",
            lambda *a, _k=kernel, _n=kind, **kw: calls.__setitem__(_n, calls[_n] + 1) or _k(*a, **kw),
        )
    with use_triton_kernels(True):
        got = step()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # 2 layers x 7 projections; layer 0's q, k, v read the frozen embeddings' output: no input-gradient there
    assert calls == {"forward": 14, "input_grad": 11}


HOPPER_BUILD = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deltatune.ops import triton_lora

dtype, adapter_dtype, rank, block_m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
adapter_pointers = {"a_ptr", "b_ptr", "low_ptr", "gb_ptr"}
constants = dict(K=576, HAS_BIAS=True, HAS_MASK=True, STORE_LOW=True, R=rank, UPCAST=False, BLOCK_M=block_m,
                 BLOCK_N=64, BLOCK_K=64, BASE_PRECISION="ieee" if dtype == "fp32" else None,
                 LOW_PRECISION="ieee" if adapter_dtype == "fp32" else None)
for kernel in (triton_lora._lora_forward_kernel, triton_lora._lora_input_grad_kernel):
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constants else "fp32" if n == "scaling" else "*u8" if n == "keep_ptr"
                 else f"*{adapter_dtype if n in adapter_pointers else dtype}" if n.endswith("_ptr") else "i32"
                 for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): constants[n] for n in names if n in constants})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    print(".target sm_90" in compiled.asm["ptx"], compiled.metadata.shared)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile and run the kernel itself")
@pytest.mark.parametrize(
    "dtype, adapter_dtype, rank, block_m",  # the row tiles of a decoding step and of training
    [("bf16", "fp32", 16, 16), ("bf16", "bf16", 16, 64), ("fp32", "fp32", 32, 64)],
)
def test_kernel_compiles_for_hopper(dtype, adapter_dtype, rank, block_m):
    """With no GPU the interpreter checks what the kernels compute; this checks that they build for sm_90 (H100)
    with the GPU-only choices (tensor-core dot, no upcast), through Triton's own ptxas: no device needed. In a
    fresh process, because this one runs Triton as the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", HOPPER_BUILD, dtype, adapter_dtype, str(rank), str(block_m)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built = done.stdout.split()  # per kernel (forward, input-gradient): has the sm_90 target, shared memory bytes
    assert built[0::2] == ["True", "True"], done.stdout
    assert all(0 < int(n) <= 227 * 1024 for n in built[1::2]), done.stdout  # fits an H100 SM's shared memory
