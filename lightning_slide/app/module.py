"""A LightningModule that fine-tunes a Hugging Face causal language model; use it as is or subclass it."""

import functools
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from lightning_slide import optim
from lightning_slide.app.data import IGNORE_INDEX
from lightning_slide.app.errors import ModelDirError
from lightning_slide.app.loading import build_causal_lm, load_causal_lm, load_config
from lightning_slide.app.packing import model_inputs
from lightning_slide.strategy import SlideFormerStrategy


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step ``step``: linear warm-up to 1, then constant or cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # the first update already moves: no wasted step at lr = 0
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(L.LightningModule):
    """Full-parameter training of a causal LM from a local Hugging Face directory (or a config, from scratch).

    Batches are dicts of ``input_ids``, ``attention_mask`` (0 on padding) and ``labels`` (``-100`` where no loss is
    taken: prompts and padding), as :class:`~lightning_slide.app.data.JSONLDataModule` makes them. The model is built in
    ``configure_model`` (on the host, loaded shard by shard: as stored under slideformer, which makes its own fp32
    masters, else in fp32; refused first if the host cannot hold it), so the Trainer's strategy decides where it runs.

    Args:
        path: local model directory (``config.json``, safetensors weights, tokenizer). Either ``path`` or ``config``.
        config: fields of a Hugging Face config (with ``model_type``) to train a new, randomly initialized model;
            ``vocab_size`` and special token ids default to the tokenizer's. Default ``None``.
        tokenizer: tokenizer directory. Default ``None``: ``path``.
        expect: ``config.json`` fields the directory must have (e.g. ``{"hidden_size": 4096}``), so that a model config
            is not silently used with another model's directory. Default ``None``.
        lr: peak learning rate of AdamW. Default ``1e-5``.
        weight_decay: AdamW weight decay of weight matrices; biases, norm weights and embeddings get none.
            Default ``0.01``.
        betas: AdamW betas. Default ``(0.9, 0.95)``.
        eps: AdamW epsilon. Default ``1e-8``.
        moments: dtype of the Adam moments: ``"fp32"`` (``torch.optim.AdamW``) or ``"bf16"``
            (``lightning_slide.optim.AdamW``: half the optimizer state). Default ``"fp32"``.
        warmup_steps: optimizer steps of linear LR warm-up. Default ``100``.
        decay: LR after warm-up: ``"cosine"`` (to ``min_lr_ratio * lr`` at the last step) or ``"constant"``.
            Default ``"cosine"``.
        min_lr_ratio: final LR of the cosine decay, as a fraction of ``lr``. Default ``0.1``.
        kernels: Triton kernels to swap in (``"all"``, ``"none"`` or a list of names; see ``lightning_slide.kernels``).
            Default ``"none"``.
        trust_remote_code: run the model directory's own Python code. Default ``False``.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        tokenizer: str | None = None,
        expect: dict | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        moments: str = "fp32",
        warmup_steps: int = 100,
        decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        kernels: str | list[str] = "none",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (path is None) == (config is None):
            raise ModelDirError("set exactly one of model.path (a Hugging Face model directory) and model.config")
        if decay not in ("cosine", "constant"):
            raise ValueError(f"decay must be 'cosine' or 'constant', got {decay!r}")
        if moments not in ("fp32", "bf16"):
            raise ValueError(f"moments must be 'fp32' or 'bf16', got {moments!r}")
        self.path = None if path is None else Path(path)
        tokenizer_dir = tokenizer if tokenizer is not None else path
        if path is not None:
            self.config: PretrainedConfig = load_config(path, trust_remote_code)  # checks the files, reads no weights
        elif not Path(tokenizer_dir or "").is_dir():
            raise ModelDirError(f"model.tokenizer {tokenizer_dir!r} is not a tokenizer directory")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
        if config is not None:
            self.config = self._new_config(dict(config))
        self._check_expected(expect or {})
        dtype = getattr(self.config, "dtype", None) if path is not None else None
        #: dtype the weights were stored in (bfloat16 for most checkpoints); float32 for a new model
        self.checkpoint_dtype: torch.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
        self.model: torch.nn.Module | None = None
        self.train_acc = MulticlassAccuracy(self.config.vocab_size, average="micro", ignore_index=IGNORE_INDEX)
        self.val_acc = MulticlassAccuracy(self.config.vocab_size, average="micro", ignore_index=IGNORE_INDEX)
        self.val_loss = MeanMetric()  # token-weighted: perplexity is exp of the mean loss per target token
        self._last_step_end: float | None = None

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model supports (``max_position_embeddings``), if the config says."""
        return getattr(self.config, "max_position_embeddings", None)

    def _new_config(self, fields: dict) -> PretrainedConfig:
        tok = self.tokenizer
        fields.setdefault("vocab_size", len(tok))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields.setdefault(name, getattr(tok, name))
        if fields["vocab_size"] < len(tok):
            raise ModelDirError(
                f"model.config.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {len(tok)} tokens"
            )
        return AutoConfig.for_model(**fields)

    def _check_expected(self, expect: dict) -> None:
        wrong = {k: getattr(self.config, k, None) for k, v in expect.items() if getattr(self.config, k, None) != v}
        if wrong:
            found = ", ".join(f"{k}={v!r} (expected {expect[k]!r})" for k, v in wrong.items())
            raise ModelDirError(
                f"model directory {str(self.path)!r} is not the model this config describes: "
                f"config.json has {found}. Pick the matching model=..., or model=causal_lm for any "
                "causal LM."
            )

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        trust = self.hparams.trust_remote_code
        # Every process of this host loads its own copy; slideformer's tuning.host_memory, where given, is the room
        trainer = self._trainer
        tuning = getattr(getattr(trainer.strategy, "options", None), "tuning", None) if trainer else None
        room = dict(copies=trainer.num_devices if trainer else 1, host_memory=getattr(tuning, "host_memory", None))
        if self.path:  # slideformer makes fp32 masters of the weights as stored: the same values in less memory
            as_stored = trainer is not None and isinstance(trainer.strategy, SlideFormerStrategy)
            self.model = load_causal_lm(self.path, trust, **room, as_stored=as_stored)
        else:
            self.model = build_causal_lm(self.config, trust, **room)
        kernels = self.hparams.kernels
        if kernels != "none":
            from lightning_slide.kernels import apply_kernels

            apply_kernels(self.model, kernels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Mean loss over target tokens, the predicted and target tokens (predictions ``None`` when a fused loss
        kernel never built the logits), and the number of target tokens."""
        out = self(**model_inputs(batch))  # a packed batch gives positions instead of a padding mask
        target = batch["labels"][:, 1:]  # the model shifts labels the same way inside its loss
        preds = None if out.logits is None else out.logits[:, :-1].argmax(-1)
        return out.loss, preds, target

    # ------------------------------------------------------------------ training and validation
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, preds, target = self._step(batch)
        self.log("train/loss", loss, prog_bar=True)
        if preds is not None:
            self.train_acc(preds, target)
            self.log("train/acc", self.train_acc)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._last_step_end is None:
            self._last_step_end = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Wall time from one batch's end to the next's covers data, forward, backward and the (host) optimizer.
        now = time.perf_counter()
        tokens = batch["attention_mask"].sum().item()  # real tokens: padding is not trained
        self.log("train/tokens_per_sec", tokens / max(now - self._last_step_end, 1e-9), prog_bar=True)
        self._last_step_end = now

    def on_validation_start(self) -> None:
        self._last_step_end = None  # validation time is not training time

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, preds, target = self._step(batch)
        self.val_loss.update(loss, weight=(target != IGNORE_INDEX).sum())
        if preds is not None:
            self.val_acc.update(preds, target)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)
        if self.val_acc.update_called:
            self.log("val/acc", self.val_acc.compute())
        # Fresh states made under trainer.validate's inference mode would be inference tensors, which the no-grad
        # validation inside fit may not update in place.
        with torch.inference_mode(False):
            self.val_loss.reset()
            self.val_acc.reset()

    # ------------------------------------------------------------------ optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on weight matrices; none on biases, norm weights and embeddings (tied heads
        included), whose shrinkage only hurts. Frozen parameters are left out."""
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        settings = dict(lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        if hp.get("moments", "fp32") == "bf16":  # (hparams saved before the option have none)
            optimizer = optim.AdamW(self.parameter_groups(), **settings, state_dtype=torch.bfloat16)
        else:
            optimizer = torch.optim.AdamW(self.parameter_groups(), **settings)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 0  # unbounded training: no decay
        schedule = functools.partial(
            warmup_cosine, warmup_steps=hp.warmup_steps, total_steps=total, decay=hp.decay, min_lr_ratio=hp.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
