"""`AdaLoraCallback`: AdaLoRA's rank allocation inside `transformers.Trainer`.

A module of its own because importing `transformers.TrainerCallback` pulls in the Trainer's utilities (and,
where it is installed, all of peft): seconds that `import deltatune` should not pay. `deltatune` imports this
module the first time `AdaLoraCallback` is asked for.
"""

from __future__ import annotations

from transformers import TrainerCallback

from deltatune.methods.adalora import logger, trainable_adapter, transformers_model, update_and_allocate


class AdaLoraCallback(TrainerCallback):
    """Runs AdaLoRA's `update_and_allocate` inside `transformers.Trainer`.

    It runs right after each optimizer step, while the gradients are still there, with step numbers 1, 2, ...
    so that a run with `max_steps == total_step` ends on the final allocation. Pass it as
    `Trainer(..., callbacks=[AdaLoraCallback()])`.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _, config, _ = trainable_adapter(transformers_model(model))
        if state.max_steps and state.max_steps != config.total_step:
            logger.warning(
                "AdaLoRA total_step=%d but the Trainer runs %d optimizer steps; the rank budget schedule assumes "
                "total_step (set total_step to the run's number of steps)",
                config.total_step,
                state.max_steps,
            )

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        update_and_allocate(model, state.global_step + 1)
