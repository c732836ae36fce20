"""Tiny Hugging Face causal LMs built from code, and a LightningModule that trains one like a user would."""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen3Config

# The suite runs on the CPU (CI); SLIDE_TEST_ACCELERATOR=gpu runs the same tests on a GPU with real CUDA copies.
ACCELERATOR = os.environ.get("SLIDE_TEST_ACCELERATOR", "cpu")
VOCAB = 96
SEQ = 16

CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "llama_deep": lambda: LlamaConfig(  # many thin layers: what a bound on layers in flight is about
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "qwen3": lambda: Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "gemma_tied": lambda: GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=8,
        tie_word_embeddings=False,
    ),
}


def initial_state(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    return {k: v.clone() for k, v in model.state_dict().items()}


class TinyLM(L.LightningModule):
    """A user's module: an HF causal LM, AdamW with weight-decay groups and a linear warm-up scheduler."""

    def __init__(
        self,
        family: str,
        state: dict,
        *,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        warmup: int = 4,
        freeze: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_config(CONFIGS[family]())
        self.model.load_state_dict(state)
        for name, param in self.model.named_parameters():
            if any(f in name for f in freeze):
                param.requires_grad_(False)
        self.optimizer_name, self.lr, self.warmup = optimizer, lr, warmup
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.detach().float().item())
        return loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name or "embed" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}.get(self.optimizer_name)
        optimizer = cls(groups, lr=self.lr, betas=(0.9, 0.95)) if cls else self.optimizer_name(groups)
        warmup = self.warmup
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def batches(count: int, batch_size: int = 2, seed: int = 1) -> DataLoader:
    # Arithmetic progressions mod VOCAB: learnable within a few steps, so a test can see training happen.
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count * batch_size, 1), generator=generator)
    stride = torch.randint(1, 4, (count * batch_size, 1), generator=generator)
    ids = (start + stride * torch.arange(SEQ)) % VOCAB
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def growing_batches(count: int, short: int = 3) -> DataLoader:
    """``short`` batches of 2 x 16 tokens, then longer ones of 2 x 64 (padding to each batch's longest does this)."""
    generator = torch.Generator().manual_seed(5)
    rows = []
    for step in range(count):
        seq = 16 if step < short else 64
        start = torch.randint(0, VOCAB, (2, 1), generator=generator)
        rows.append(((start + torch.arange(seq)) % VOCAB,))
    return DataLoader(rows, batch_size=None)


def trainer(strategy, **kwargs) -> L.Trainer:
    options = dict(
        accelerator=ACCELERATOR,
        devices=1,
        precision="32-true",
        max_steps=10,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(strategy=strategy, **options)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def inf_grad(weight):
    """Zero in forward; an all-Inf gradient for ``weight`` in backward (on its device, in its dtype)."""

    class Inf(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            ctx.shape, ctx.dtype, ctx.device = w.shape, w.dtype, w.device
            return w.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            return torch.full(ctx.shape, float("inf"), dtype=ctx.dtype, device=ctx.device)

    return Inf.apply(weight)


def assert_resumes_exactly(directory, strategy, **module_options) -> None:
    """Train 3 steps checkpointing each, resume from ``last.ckpt`` to step 6, and check that equals 6 steps without a
    stop. ``strategy()`` makes each run's strategy; the first run's checkpoints stay in ``directory / "a"``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt_path=None, where="a"):
        module = TinyLM("llama", initial_state("llama"), **module_options)
        saver = ModelCheckpoint(dirpath=directory / where, save_last=True, every_n_train_steps=1)
        run = trainer(strategy(), max_steps=steps, max_epochs=-1, enable_checkpointing=True, callbacks=[saver])
        run.fit(module, batches(2), ckpt_path=ckpt_path)
        return module

    run(3)
    resumed = run(6, ckpt_path="last")
    uninterrupted = run(6, where="b")
    assert resumed.losses == uninterrupted.losses[6:]
    theirs = dict(uninterrupted.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, theirs[name]), name
