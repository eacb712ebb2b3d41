"""Old name of helpers.prompts (its tiny_model is tiny_model_wide_weights), kept until every branch imports it."""

from helpers.models import VOCAB  # noqa: F401
from helpers.prompts import *  # noqa: F401,F403
from helpers.prompts import tiny_model_wide_weights as tiny_model  # noqa: F401
