"""lightning-slide: fine-tune language models far larger than GPU memory on one GPU (SlideFormer).

Importing the package registers ``Trainer(strategy="slideformer")``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_slide.checkpoint import SlideCheckpointIO, load_from_checkpoint
from lightning_slide.grad_norm import GradNormMonitor
from lightning_slide.monitor import SlideMonitor
from lightning_slide.precision import SlidePrecision
from lightning_slide.strategy import SlideFormerStrategy

SlideFormerStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "GradNormMonitor",
    "SlideCheckpointIO",
    "SlideFormerStrategy",
    "SlideMonitor",
    "SlidePrecision",
    "load_from_checkpoint",
]
