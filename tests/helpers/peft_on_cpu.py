"""peft 0.21's LoftQ functions with their hard-coded CUDA compute device set to "cpu", as test oracles.

bitsandbytes quantises on the CPU here, which is what deltatune does without CUDA; every other line is peft's.
"""

import inspect

import peft.utils.loftq_utils as peft_loftq

CUDA_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


def loftq_function_on_cpu(name: str):
    """peft_loftq.<name>, recompiled from its own source with only the compute-device line changed."""
    source = inspect.getsource(getattr(peft_loftq, name))
    assert CUDA_LINE in source, f"peft changed: re-read its {name}"
    namespace = dict(vars(peft_loftq))
    exec(compile(source.replace(CUDA_LINE, 'compute_device = "cpu"'), peft_loftq.__file__, "exec"), namespace)
    return namespace[name]
