"""The app's building blocks without Hydra: CausalLMModule + JSONLDataModule + export_hf in plain Python.

    python examples/app_module_in_python.py /models/Qwen3-0.6B train.jsonl

(``slide-train model=causal_lm model.path=... data=jsonl data.path=...`` does the same from the command line.)
Subclass ``CausalLMModule`` to change the loss, the metrics or the optimizer; the strategy does not care.
"""

import sys

import lightning as L
import torch

import lightning_slide  # noqa: F401  (registers strategy="slideformer")
from lightning_slide.app.data import JSONLDataModule
from lightning_slide.app.module import CausalLMModule
from lightning_slide.checkpoint import export_hf

if __name__ == "__main__":
    model_dir, data_file = sys.argv[1], sys.argv[2]
    module = CausalLMModule(path=model_dir, lr=1e-5, warmup_steps=20)  # reads config + tokenizer; weights later
    data = JSONLDataModule(
        data_file,
        module.tokenizer,
        batch_size=4,  # max_length: the context, at most 2048
        context_length=module.context_length,
    )
    trainer = L.Trainer(
        strategy="slideformer",
        precision="bf16-true" if torch.cuda.is_available() else "32-true",
        max_steps=100,
        accumulate_grad_batches=4,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=data)
    export_hf(module.model, module.tokenizer, "finetuned", dtype=module.checkpoint_dtype)
