"""lightning-slide: fine-tune language models far larger than GPU memory on one GPU (SlideFormer)."""
