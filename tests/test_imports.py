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
