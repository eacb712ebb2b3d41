"""Old name of helpers.models + helpers.peft_pairs, kept until every branch imports those; delete then."""

from helpers.models import *  # noqa: F401,F403
from helpers.peft_pairs import *  # noqa: F401,F403

CONFIGS = {arch: (lambda arch=arch: tiny_config(arch)) for arch in COMMON_ARCHS}  # noqa: F405
