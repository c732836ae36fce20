"""Your own LightningModule on the slideformer strategy: nothing in the module knows about the sliding window.

    python examples/own_module.py          # a few seconds on a CPU; on a GPU the layers slide through it

The model is a tiny Llama built from a config (swap in ``AutoModelForCausalLM.from_pretrained(path,
dtype=torch.float32)`` for a real one); the data is random tokens, so the loss only shows that steps happen.
"""

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

import lightning_slide  # registers strategy="slideformer"


class CausalLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=128,
        )
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # fp32: these become the masters

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    torch.manual_seed(0)
    tokens = DataLoader(torch.randint(0, 512, (64, 32)), batch_size=8)
    trainer = L.Trainer(
        strategy=lightning_slide.SlideFormerStrategy(window=2),  # or strategy="slideformer" for the defaults
        precision="bf16-true" if torch.cuda.is_available() else "32-true",
        max_steps=8,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
    )
    module = CausalLM()
    trainer.fit(module, tokens)
    # After fit the module's parameters hold the trained fp32 weights on the host.
    print("first layer on", next(module.model.model.layers[0].parameters()).device)
