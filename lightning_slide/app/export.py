"""Export trained weights as a Hugging Face model directory: ``export_hf`` lives in ``lightning_slide.checkpoint``
(one implementation, shared with the checkpoint converter); this name stays for existing imports."""

from lightning_slide.checkpoint import export_hf

__all__ = ["export_hf"]
