import os

import torch

# Triton kernels run on the CPU through Triton's interpreter when there is no GPU; it must be set before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
