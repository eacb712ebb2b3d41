"""Prompt Tuning, P-Tuning and Prefix Tuning on a CUDA device: checks and step times next to peft (run by hand).

Checks, on tiny random llama / bloom / gpt2 / opt / t5 / bert models moved to the GPU:
  - fp32: the same outputs as peft 0.21.2 for the same weights (max |diff| <= 1e-5);
  - bf16 base model: outputs within bf16 tolerance of peft's, and greedy `generate` equal to peft's;
  - greedy `generate` with the KV cache equals re-running the whole sequence each step (left-padded batch);
  - an adapter saved from the GPU model loads into a CPU model with the same outputs;
  - a few Adam steps on a bf16 base lower the loss (the encoder stays fp32).
Then the time of one training step (forward + backward + Adam) of ours and peft's on a SmolLM2-135M-shaped random
Llama in bf16 (batch 8 x 256 tokens, 20 virtual tokens): the median of 20 timed steps after 5 warm-ups, measured
for ours and peft in turn three times, the best of each kept.

Run: python benchmarks/prompt_methods_cuda.py   (needs a GPU, transformers 5.23, peft 0.21.2; ONLY=benchmark skips
the checks, DEVICE=cpu dry-runs them)
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
warnings.simplefilter("ignore")

import peft  # noqa: E402
from helpers.prompts import (  # noqa: E402
    TASK_OF,
    batch,
    main_output,
    model_inputs,
    peft_twin,
    positions,
    tiny_model_wide_weights,
)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import deltatune as dt  # noqa: E402

DEVICE = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu for a dry run of the checks
METHODS = {
    "prompt-tuning": lambda task: (dt.PromptTuningConfig, peft.PromptTuningConfig, {}),
    "p-tuning": lambda task: (dt.PromptEncoderConfig, peft.PromptEncoderConfig, {}),
    "prefix": lambda task: (dt.PrefixTuningConfig, peft.PrefixTuningConfig, {}),
    "prefix-proj": lambda task: (dt.PrefixTuningConfig, peft.PrefixTuningConfig, {"prefix_projection": True}),
}


def on(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def pair(method: str, arch: str, dtype=torch.float32, n: int = 4):
    task = TASK_OF[arch]
    ours_class, peft_class, extra = METHODS[method](task)
    base = tiny_model_wide_weights(arch, task).to(DEVICE, dtype)
    ours = dt.get_peft_model(copy.deepcopy(base), ours_class(task_type=task, num_virtual_tokens=n, **extra)).eval()
    theirs = peft_twin(ours, peft_class(task_type=task, num_virtual_tokens=n, **extra), base)
    return ours, theirs, task


def outputs(model, arch, task, device=DEVICE) -> torch.Tensor:
    inputs = {k: v for k, v in on(model_inputs(arch, task), device).items() if k in ("input_ids", "attention_mask")}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.tensor([[0, 21, 22], [0, 24, 25]], device=device)
    with torch.no_grad():
        return main_output(model(**inputs), task).float().cpu()


def max_diff(ours, theirs, arch, task, theirs_device=DEVICE) -> float:
    return (outputs(ours, arch, task) - outputs(theirs, arch, task, theirs_device)).abs().max().item()


def no_cache_decoding(model, ids, mask, steps, encoder_decoder):
    if encoder_decoder:
        decoder = torch.zeros((ids.shape[0], 1), dtype=torch.long, device=ids.device)
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=False).logits
            decoder = torch.cat((decoder, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        return decoder
    takes_positions = "position_ids" in __import__("inspect").signature(model.get_base_model().forward).parameters
    for _ in range(steps):
        extra = {"position_ids": positions(mask)} if takes_positions else {}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        ids = torch.cat((ids, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


def check(method: str, arch: str) -> dict:
    row = {"method": method, "arch": arch}
    ours, theirs, task = pair(method, arch)
    row["fp32 |diff|"] = max_diff(ours, theirs, arch, task)
    ids, mask = (t.to(DEVICE) for t in batch(arch))
    if arch != "bert":
        out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        row["cache==no-cache"] = torch.equal(out, no_cache_decoding(ours, ids, mask, 6, arch == "t5"))
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        cpu = dt.PeftModel.from_pretrained(tiny_model_wide_weights(arch, task), folder)
        row["gpu file->cpu |diff|"] = max_diff(ours, cpu, arch, task, theirs_device=torch.device("cpu"))
    ours, theirs, task = pair(method, arch, torch.bfloat16)
    row["bf16 |diff|"] = max_diff(ours, theirs, arch, task)
    if arch != "bert":
        a = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        b = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        row["bf16 generate==peft"] = torch.equal(a, b)
    row["bf16 train loss"] = train_loss_drop(method, arch)
    return row


def train_loss_drop(method: str, arch: str, steps: int = 10) -> str:
    ours, _, task = pair(method, arch, torch.bfloat16)
    inputs = on(model_inputs(arch, task), DEVICE)
    optimizer = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=0.03)
    assert all(p.dtype == torch.float32 for p in ours.prompt_encoder.parameters())
    with torch.no_grad():
        start = ours(**inputs).loss.item()
    for _ in range(steps):
        loss = ours(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = ours(**inputs).loss.item()
    return f"{start:.3f}->{end:.3f}"


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def step_time(model, inputs, steps: int = 20, warmup: int = 5) -> float:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def benchmark(rounds: int = 3) -> list[dict]:
    """ms per training step, ours and peft's measured in turn `rounds` times (the best median of each is kept)."""
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )  # SmolLM2-135M's shape
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, 49152, (8, 256), device=DEVICE)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = []
    for method, make in METHODS.items():
        ours_class, peft_class, extra = make("CAUSAL_LM")
        ours = dt.get_peft_model(copy.deepcopy(base), ours_class(task_type="CAUSAL_LM", num_virtual_tokens=20, **extra))
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft_class(task_type="CAUSAL_LM", num_virtual_tokens=20, **extra)
        )
        times = {"ours": [], "peft": []}
        for _ in range(rounds):
            times["ours"].append(step_time(ours.train(), inputs))
            times["peft"].append(step_time(theirs.train(), inputs))
        rows.append(
            {
                "method": method,
                "trainable": ours.get_nb_trainable_parameters()[0],
                "ours ms/step": min(times["ours"]),
                "peft ms/step": min(times["peft"]),
            }
        )
        del ours, theirs
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def show(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [
            f"{row[k]:.2e}"
            if isinstance(row.get(k), float) and "diff" in k
            else f"{row[k]:.1f}"
            if isinstance(row.get(k), float)
            else str(row.get(k, ""))
            for k in keys
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    print(
        torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch",
        torch.__version__,
        "transformers",
        __import__("transformers").__version__,
        "peft",
        peft.__version__,
    )
    if os.environ.get("ONLY") != "benchmark":
        show([check(method, arch) for method in METHODS for arch in TASK_OF])
    show(benchmark())
