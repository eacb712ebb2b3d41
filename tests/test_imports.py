"""The package stands on its own: peft is only the tests' oracle, and bitsandbytes loads only for 4/8-bit."""

import subprocess
import sys


def test_import_deltatune_loads_neither_peft_nor_bitsandbytes():
    code = (
        "import sys, deltatune\n"
        "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))\n"
        "deltatune.AdaLoraCallback\n"  # the lazy attribute resolves
        "print(deltatune.AdaLoraCallback.__mro__[1].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "TrainerCallback"], out.stdout + out.stderr


LIBRARY_ONLY = """
import sys
for name in ("datasets", "gguf", "matplotlib"):
    sys.modules[name] = None  # import and find_spec now behave as if the package were not installed
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import deltatune

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
model = deltatune.get_peft_model(LlamaForCausalLM(config), deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
model.save_pretrained(sys.argv[1])
loaded = deltatune.PeftModel.from_pretrained(LlamaForCausalLM(config), sys.argv[1])
print(tuple(loaded(torch.tensor([[1, 2, 3]])).logits.shape))
from deltatune.cli import main
sys.exit(10 + main(["train", "--max-steps", "1", "--output", sys.argv[1] + "/run"]))
"""


def test_library_works_without_the_command_lines_extras_and_the_cli_names_them(tmp_path):
    out = subprocess.run([sys.executable, "-c", LIBRARY_ONLY, str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip() == "(1, 3, 64)", out.stderr
    assert out.returncode == 11  # main returned 1: refused before touching anything
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        "deltatune train: error: the command line needs datasets, gguf, matplotlib, which `pip install deltatune` "
        "(the library) leaves out; install them with: pip install 'deltatune[cli]'"
    )
    assert not (tmp_path / "run").exists()


def test_library_needs_only_torch_transformers_safetensors_accelerate():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = [requirement.split(">=")[0] for requirement in project["dependencies"]]
    assert names == ["torch", "transformers", "safetensors", "accelerate"]
    assert {"datasets", "gguf", "matplotlib"} <= {r.split(">=")[0] for r in project["optional-dependencies"]["cli"]}
