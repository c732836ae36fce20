"""What user code can observe of an optimizer step, and so how the strategy must run it.

Updates stream out of the backward only where nothing can tell: a hook that runs between a step's backward and its
optimizer step (``on_after_backward``, ``on_before_optimizer_step``, an overridden ``optimizer_step`` or
``configure_gradient_clipping``) may read the
gradients or change the learning rate, so such steps wait for the backward and show the gradients to it
(``SlidingEngine.show_grads``), as plain Lightning does. ``GradNormMonitor`` observes nothing: it logs the norms the
engine takes on the way.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_slide.grad_norm import GradNormMonitor

_MODULE_HOOKS = ("on_after_backward", "on_before_optimizer_step", "optimizer_step", "configure_gradient_clipping")
_CALLBACK_HOOKS = ("on_after_backward", "on_before_optimizer_step")


def step_observers(trainer: Trainer, module: LightningModule) -> list[str]:
    """The user hooks that run between a step's backward and its optimizer step, as ``"Owner.hook"``."""
    found = [
        f"{type(module).__name__}.{hook}" for hook in _MODULE_HOOKS if is_overridden(hook, module, LightningModule)
    ]
    for callback in trainer.callbacks:
        if isinstance(callback, GradNormMonitor):  # reads the norms the engine takes, not the gradients
            continue
        found += [
            f"{type(callback).__name__}.{hook}" for hook in _CALLBACK_HOOKS if is_overridden(hook, callback, Callback)
        ]
    return found


def refuse_weight_averaging(trainer: Trainer) -> None:
    """Lightning's weight-averaging callbacks swap the module's parameter tensors for their own copies, which the
    engine (pointing each parameter at its master or a device slot) would undo: refuse them with what to use."""
    for callback in trainer.callbacks:
        if isinstance(callback, (WeightAveraging, StochasticWeightAveraging)):
            raise ValueError(
                f"slideformer does not support Lightning's {type(callback).__name__} callback (it swaps the module's "
                "parameter tensors, which the strategy manages). Average the weights in your own callback instead: "
                "call trainer.strategy.finish_updates() in on_train_batch_end, then read the module's parameters "
                "(the fp32 weights of the last step) - see the README, 'Reading weights during training'"
            )
