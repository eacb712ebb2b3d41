"""Text lines and markdown tables for benchmarks/vs_peft.py; `write_results` builds RESULTS.md from results/*.json."""

from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
INTRO = """# deltatune vs HF peft: measured side by side

Written by `benchmarks/vs_peft.py` (run by hand; never in CI). In every table both libraries ran in the same
process on the same base weights, the same adapter weights (seeded per tensor) and the same batch, their runs
alternating with a rotating order; figures are medians. Ratios are deltatune / peft (below 1 is better for
time and memory, above 1 for tokens/s). *Bound* = the frozen base model's forward + activation backward with
no adapter (its embedding output requires grad), the cost no LoRA implementation can go under; *overhead* =
case - bound. *lean loss* = `deltatune.ops.lean_causal_lm_loss` (chunked lm_head + cross-entropy, no full
logits) instead of `model(..., labels=...).loss`; it is opt-in, so it has its own rows and its own bound.
Memory: CPU = peak RSS (VmHWM) of a fresh process per case, reset after the model is built and the
allocator trimmed, so it is the training peak (weights and the torch runtime included); GPU = how far
`torch.cuda.max_memory_allocated` rises above the memory already allocated over the first three steps of
each case (activations, gradients and AdamW state). Overheads are differences to the bound either way.
"""


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def ratio_line(times: dict) -> str:
    ratio = _ratio(times["deltatune"], times["peft"])
    return f"peft {_ms(times['peft'])} ms, deltatune {_ms(times['deltatune'])} ms, ratio {ratio}"


def train_line(row: dict) -> str:
    t = row["time"]
    line = (
        f"bound {_ms(t['bound'])} ms, peft {_ms(t['peft'])} ms, deltatune {_ms(t['deltatune'])} ms "
        f"(ratio {_ratio(t['deltatune'], t['peft'])}, overhead ratio "
        f"{_ratio(t['deltatune'] - t['bound'], t['peft'] - t['bound'])}); lean loss: deltatune "
        f"{_ms(t['deltatune+lean_loss'])} ms vs bound {_ms(t['bound+lean_loss'])} ms"
    )
    m = row.get("memory")
    if m:
        line += (
            f"; memory over bound: peft {_mb(m['peft'] - m['bound'])} MB, deltatune "
            f"{_mb(m['deltatune'] - m['bound'])} MB "
            f"(ratio {_ratio(m['deltatune'] - m['bound'], m['peft'] - m['bound'])})"
        )
    return line


def generate_line(row: dict) -> str:
    return (
        ", ".join(f"{k} {v:.1f}" for k, v in row["tokens_per_s"].items()) + f" tok/s; same tokens: {row['same_tokens']}"
    )


def mixed_line(row: dict) -> str:
    t = row["tokens_per_s"]
    return (
        f"generate peft {t['peft generate']:.1f} / deltatune {t['deltatune generate']:.1f} tok/s "
        f"(x{_ratio(t['deltatune generate'], t['peft generate'])}); forward 8x128 peft {t['peft forward']:.0f} / "
        f"deltatune {t['deltatune forward']:.0f} tok/s (x{_ratio(t['deltatune forward'], t['peft forward'])})"
        + (
            f"; base model alone {t['base generate']:.1f} / {t['base forward']:.0f} tok/s"
            if "base generate" in t
            else ""
        )
    )


def _train_tables(rows: list[dict]) -> list[str]:
    out = [
        "### 1-2. LoRA training step (4 x 128 tokens, r=8, alpha=16, 7 projections, AdamW), ms",
        "",
        "| model | dropout | bound | peft | deltatune | dt/peft | peft overhead | dt overhead | overhead dt/peft "
        "| bound, lean loss | dt, lean loss | dt lean / peft |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        t = r["time"]
        out.append(
            f"| {r['model']} | {r['dropout']} | {_ms(t['bound'])} | {_ms(t['peft'])} | {_ms(t['deltatune'])} "
            f"| {_ratio(t['deltatune'], t['peft'])} | {_ms(t['peft'] - t['bound'])} "
            f"| {_ms(t['deltatune'] - t['bound'])} "
            f"| {_ratio(t['deltatune'] - t['bound'], t['peft'] - t['bound'])} | {_ms(t['bound+lean_loss'])} "
            f"| {_ms(t['deltatune+lean_loss'])} | {_ratio(t['deltatune+lean_loss'], t['peft'])} |"
        )
    for r in rows:
        t, m = r["time"], r.get("memory") or {}
        if "deltatune+triton" in t:  # --triton-lora: the opt-in fused kernels
            out.append(
                f"\n{r['model']}, dropout {r['dropout']}, deltatune with the Triton kernels "
                f"(`DELTATUNE_TRITON_LORA=1`): {_ms(t['deltatune+triton'])} ms, "
                f"{_ratio(t['deltatune+triton'], t['peft'])} x peft; overhead "
                f"{_ratio(t['deltatune+triton'] - t['bound'], t['peft'] - t['bound'])} x peft's"
                + (
                    f"; memory overhead {_ratio(m['deltatune+triton'] - m['bound'], m['peft'] - m['bound'])} x peft's"
                    if "deltatune+triton" in m
                    else ""
                )
            )
    if not any(r.get("memory") for r in rows):
        return out
    out += [
        "",
        "### 1-2. Peak training memory, MiB (overhead = case - bound of the same loss)",
        "",
        "| model | dropout | bound | peft | deltatune | peft overhead | dt overhead | overhead dt/peft "
        "| bound, lean loss | dt, lean loss | dt lean overhead | dt lean / peft total |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        m = r["memory"]
        if not m:
            continue
        out.append(
            f"| {r['model']} | {r['dropout']} | {_mb(m['bound'])} | {_mb(m['peft'])} | {_mb(m['deltatune'])} "
            f"| {_mb(m['peft'] - m['bound'])} | {_mb(m['deltatune'] - m['bound'])} "
            f"| {_ratio(m['deltatune'] - m['bound'], m['peft'] - m['bound'])} | {_mb(m['bound+lean_loss'])} "
            f"| {_mb(m['deltatune+lean_loss'])} | {_mb(m['deltatune+lean_loss'] - m['bound+lean_loss'])} "
            f"| {_ratio(m['deltatune+lean_loss'], m['peft'])} |"
        )
    return out


def _generate_table(rows: list[dict]) -> list[str]:
    out = [
        "### 3. generate, batch 1, tokens/s (greedy; ratio to the base model alone)",
        "",
        "| model | base | peft unmerged | dt unmerged | peft unm./base | dt unm./base | peft merged | dt merged "
        "| dt merged/base | same tokens as peft |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        t = r["tokens_per_s"]
        out.append(
            f"| {r['model']} | {t['base']:.1f} | {t['peft unmerged']:.1f} | {t['deltatune unmerged']:.1f} "
            f"| {_ratio(t['peft unmerged'], t['base'])} | {_ratio(t['deltatune unmerged'], t['base'])} "
            f"| {t['peft merged']:.1f} | {t['deltatune merged']:.1f} | {_ratio(t['deltatune merged'], t['base'])} "
            f"| {r['same_tokens']} |"
        )
    for r in rows:
        t = r["tokens_per_s"]
        if "deltatune unmerged triton" in t:  # --triton-lora: the opt-in fused kernel
            out.append(
                f"\n{r['model']}, deltatune unmerged with the Triton kernel (`DELTATUNE_TRITON_LORA=1`): "
                f"{t['deltatune unmerged triton']:.1f} tok/s, {_ratio(t['deltatune unmerged triton'], t['base'])} "
                f"of the base model; same tokens as without it: {r['triton_same_tokens']}"
            )
    return out


def _mixed_table(rows: list[dict]) -> list[str]:
    out = [
        "### 4. Mixed batch, 8 rows with 8 different adapters (`adapter_names`), tokens/s",
        "",
        "*base* = the same 8 rows through the base model with no adapter; *base/peft* is the most any "
        "implementation could gain over peft (a mixed batch that cost nothing).",
        "",
        "| model | base generate | peft generate | dt generate | dt/peft | base/peft | base forward 8x128 "
        "| peft forward | dt forward | dt/peft | base/peft | same tokens |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        t = r["tokens_per_s"]
        base_gen, base_fwd = t.get("base generate"), t.get("base forward")
        out.append(
            f"| {r['model']} | {_opt(base_gen, '.1f')} | {t['peft generate']:.1f} | {t['deltatune generate']:.1f} "
            f"| {_ratio(t['deltatune generate'], t['peft generate'])} "
            f"| {_ratio(base_gen, t['peft generate']) if base_gen else 'n/a'} | {_opt(base_fwd, '.0f')} "
            f"| {t['peft forward']:.0f} | {t['deltatune forward']:.0f} "
            f"| {_ratio(t['deltatune forward'], t['peft forward'])} "
            f"| {_ratio(base_fwd, t['peft forward']) if base_fwd else 'n/a'} | {r['same_tokens']} |"
        )
    return out


def _opt(value: float | None, spec: str) -> str:
    """A figure, or 'n/a' for runs made before the column existed."""
    return "n/a" if value is None else format(value, spec)


def _prompt_table(rows: list[dict]) -> list[str]:
    out = [
        "### 5. Prompt / prefix tuning step (20 virtual tokens, 4 x 128 tokens, AdamW), ms",
        "",
        "| model | method | peft | deltatune | dt/peft |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["time"]
        out.append(
            f"| {r['model']} | {r['method']} | {_ms(t['peft'])} | {_ms(t['deltatune'])} "
            f"| {_ratio(t['deltatune'], t['peft'])} |"
        )
    return out


def render_one(results: dict) -> str:
    env = results["env"]
    where = env.get("gpu") or env["cpu"]
    lines = [
        f"## {env['device'].upper()} {env['dtype']}: {where}",
        "",
        f"{env['date']}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}; {env['threads']} threads; load average {env['load_before']:.1f} before, "
        f"{env.get('load_after', float('nan')):.1f} after; {env['rounds']} rounds per case"
        + (f"; memory: median of {env['memory_repeats']} fresh processes." if "memory_repeats" in env else "."),
        "",
    ]
    for key, table in (
        ("train", _train_tables),
        ("generate", _generate_table),
        ("mixed", _mixed_table),
        ("prompt", _prompt_table),
    ):
        if results.get(key):
            lines += table(results[key]) + [""]
    return "\n".join(lines)


def write_results(json_dir: str, path: str = os.path.join(HERE, "RESULTS.md")) -> None:
    """RESULTS.md = intro + one section per results/*.json + results/notes.md (hand-written analysis)."""
    parts = [INTRO]
    for file in sorted(glob.glob(os.path.join(json_dir, "*.json"))):
        with open(file) as f:
            parts.append(render_one(json.load(f)))
    notes = os.path.join(json_dir, "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            parts.append(f.read())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
