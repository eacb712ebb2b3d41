"""Old name of helpers.quant, kept until every branch imports it; delete then."""

from helpers.quant import *  # noqa: F401,F403
