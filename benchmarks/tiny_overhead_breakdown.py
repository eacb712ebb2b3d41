"""Where the LoRA step overhead goes on the tiny CPU model of vs_peft.py (run by hand, never in CI).

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        .venv/bin/python benchmarks/tiny_overhead_breakdown.py

The malloc settings stop glibc from handing freed buffers back to the OS between steps (the page faults
that follow cost both libraries alike and blur the split). Prints, for the frozen bound, peft and deltatune:
forward + backward and the AdamW step separately (with minor page faults per step), then one adapted layer
in isolation: deltatune's backward against the frozen layer's, and the rank-r products on their own.
"""

import copy
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_peft  # noqa: E402


def median_us(call, calls: int = 300, repeats: int = 7) -> float:
    for _ in range(calls // 10):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def step_split() -> None:
    base = vs_peft.load_base("tiny", "cpu", torch.float32)
    ids = vs_peft.batch(base, 4, 128, "cpu")
    models = {
        "bound": vs_peft.frozen_bound(copy.deepcopy(base)),
        "peft": vs_peft.wrap("peft", copy.deepcopy(base)),
        "deltatune": vs_peft.wrap("deltatune", copy.deepcopy(base)),
    }
    print("model      fwd+bwd ms  faults/step  AdamW ms")
    for name, model in models.items():
        model.train()
        forward_backward = lambda model=model: vs_peft.hf_loss(model, ids).backward()  # noqa: E731
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        took = median_us(forward_backward, calls=30) / 1e3
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (30 * 7 + 3)
        params = [p for p in model.parameters() if p.requires_grad]
        adamw = median_us(torch.optim.AdamW(params, lr=1e-5).step, calls=100) / 1e3 if params else 0.0
        print(f"{name:10s} {took:10.2f}  {faults:11.0f}  {adamw:8.2f}")


def layer_split() -> None:
    from deltatune.ops.lora_ops import lora_linear

    x = torch.randn(4, 128, 64, requires_grad=True)
    weight, grad_out = torch.randn(64, 64), torch.randn(4, 128, 64)
    lora_a, lora_b = torch.randn(8, 64, requires_grad=True), torch.randn(64, 8, requires_grad=True)
    frozen, adapted = F.linear(x, weight), lora_linear(x, weight, None, lora_a, lora_b, 2.0)
    g, x2 = grad_out.reshape(-1, 64), x.detach().reshape(-1, 64)
    a, b = lora_a.detach(), lora_b.detach()
    after_a = x2 @ a.T

    def rank_r_backward():  # the four rank-r products of a LoRA backward
        g_after_a = g @ b
        return after_a.T @ g, g_after_a @ a, g_after_a.T @ x2

    print("\none 512 x 64 -> 64 layer, r=8 (us)")
    frozen_backward = median_us(lambda: torch.autograd.grad(frozen, [x], grad_out, retain_graph=True))
    print(f"frozen layer backward     {frozen_backward:7.1f}")
    adapted_backward = median_us(lambda: torch.autograd.grad(adapted, [x, lora_a, lora_b], grad_out, retain_graph=True))
    print(f"deltatune layer backward  {adapted_backward:7.1f}")
    print(f"the frozen product g @ W  {median_us(lambda: g @ weight):7.1f}")
    print(f"rank-r products, backward {median_us(rank_r_backward):7.1f}")
    print(f"rank-r products, forward  {median_us(lambda: (x2 @ a.T) @ b.T):7.1f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    step_split()
    layer_split()
