"""`PeftWarning`: the category of deltatune's own warnings, under peft's name so `pytest.warns(PeftWarning)` and
`warnings.filterwarnings(..., category=PeftWarning)` written for peft work unchanged."""


class PeftWarning(UserWarning):
    """A warning about how an adapter is used or saved (peft's `peft.utils.warning.PeftWarning`)."""
