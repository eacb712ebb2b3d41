"""Old name of helpers.peft_pairs, kept until every branch imports it; delete then."""

from helpers.peft_pairs import *  # noqa: F401,F403
