"""Old name of helpers.chat_model, kept until every branch imports it; delete then."""

from helpers.chat_model import *  # noqa: F401,F403
