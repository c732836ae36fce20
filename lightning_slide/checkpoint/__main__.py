from lightning_slide.checkpoint.cli import _main

if __name__ == "__main__":
    _main()
