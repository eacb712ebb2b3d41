"""Old name of helpers.peft_on_cpu, kept until every branch imports it; delete then."""

from helpers.peft_on_cpu import *  # noqa: F401,F403
