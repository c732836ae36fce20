"""``python -m lightning_slide``: the same as ``slide-train``."""

from lightning_slide.app.train import main

if __name__ == "__main__":
    main()
