"""A user's own pieces, as ``slide-train model._target_=... data._target_=... +callbacks.<name>=...`` takes them: they
know nothing of the app (no tokenizer, kernels or context length arguments)."""

import json
from pathlib import Path

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

VOCAB = 64


class CountingLM(L.LightningModule):
    """A tiny Llama that learns to count modulo ``VOCAB``; its network sits at ``.model`` as a Hugging Face model
    (so the app exports it) unless ``hf_attribute`` names another attribute."""

    def __init__(self, hidden: int = 32, layers: int = 2, lr: float = 1e-2, hf_attribute: str = "model") -> None:
        super().__init__()
        self.save_hyperparameters()
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
        setattr(self, hf_attribute, AutoModelForCausalLM.from_config(config, dtype=torch.float32))
        self.hf_attribute = hf_attribute

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = getattr(self, self.hf_attribute)(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", getattr(self, self.hf_attribute)(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class CountingData(L.LightningDataModule):
    """Sequences ``k, k+1, ...`` (mod ``VOCAB``) as ``input_ids`` / ``attention_mask`` / ``labels`` batches."""

    def __init__(self, seq: int = 16, batch_size: int = 4, size: int = 64) -> None:
        super().__init__()
        starts = torch.arange(size).unsqueeze(1)
        ids = (starts + torch.arange(seq)) % VOCAB
        self.examples = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.examples[8:], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.examples[:8], batch_size=self.batch_size)


class RecordReturns(HydraCallback):
    """A Hydra callback (``+hydra.callbacks.record=...``) that appends each job's return value to ``path``: what a
    sweeper would compare."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(job_return.return_value) + "\n")
