"""``slide-train`` (and ``python -m lightning_slide``): compose the Hydra config, train, export, summarize.

Every object comes from the config through ``hydra.utils.instantiate``; this file only orders the steps so that
cheap checks (config, model files, data) run before anything heavy (weights, the Trainer's device setup).
"""

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_slide.app.errors import SlideAppError
from lightning_slide.checkpoint import export_hf
from lightning_slide.app.summary import RunSummary

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
CONF = Path(__file__).parent.parent / "conf"  # a file path: works from a checkout, editable or wheel install
SAMPLE_MAX_PARAMS = 500e6  # sampling runs on the host after training: keep it to models that answer in seconds

_MISSING_HINTS = {
    "model.path": "the model directory: model.path=/path/to/model (config.json, *.safetensors, tokenizer files)",
    "data.path": "the training data: data.path=train.jsonl (one {\"text\"} or {\"prompt\", \"response\"} per line)",
}


def default_precision() -> str:
    """``bf16-true`` (bf16 compute, fp32 masters) on CUDA and on CPUs with native bf16 math (AVX512-BF16 or AMX,
    where the demo measured 1.3x the tokens/s of ``32-true`` on 2 EPYC cores, with the same losses); else
    ``32-true``, as emulated bf16 is slower than fp32."""
    if torch.cuda.is_available():
        return "bf16-true"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so the safe choice
        return "32-true"
    return "bf16-true" if "avx512_bf16" in flags or "amx_bf16" in flags else "32-true"


OmegaConf.register_new_resolver("slide.asset", lambda name: str(ASSETS / name), replace=True)
OmegaConf.register_new_resolver("slide.precision", default_precision, replace=True)


def check_required(cfg: DictConfig) -> None:
    """Name each mandatory option (``???``) left unset, with what to set it to."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise SlideAppError("missing required options: " + "; ".join(
            _MISSING_HINTS.get(key, f"{key}=...") for key in sorted(missing)))


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``, letting the user's errors (``SlideAppError``) out as themselves rather than wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, SlideAppError):
            raise e.__cause__ from None
        raise


def _build_all(group: DictConfig | None) -> list[Any]:
    """The objects of a group that maps names to configs (callbacks, loggers); ``None`` or ``{}`` gives none."""
    return [build(node) for node in (group or {}).values()]


def sample(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy completion of ``prompt_ids`` by ``model``, decoded (on the device the model sits on)."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def setup(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer, RunSummary]:
    """Build the run's objects, cheapest checks first: options, model files, data (nothing heavy is loaded here:
    the weights load in ``configure_model``, inside ``fit``)."""
    check_required(cfg)
    L.seed_everything(cfg.seed, workers=True)
    names = cfg.kernels.names
    module = build(cfg.model, kernels=OmegaConf.to_object(names) if OmegaConf.is_list(names) else names,
                   _convert_="all")
    datamodule = build(cfg.data, tokenizer=module.tokenizer, context_length=module.context_length, _convert_="all")
    datamodule.setup("fit")  # reads, checks and tokenizes the whole data set
    summary = RunSummary()
    strategy = build(cfg.strategy) if "_target_" in cfg.strategy else cfg.strategy.name
    trainer = build(cfg.trainer, strategy=strategy, logger=_build_all(cfg.logger) or False,
                    callbacks=[*_build_all(cfg.callbacks), summary])
    return module, datamodule, trainer, summary


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, export, and log a summary. Returns the module, data module, Trainer, summary, the
    validation losses before and after training, and the Hugging Face export directory."""
    module, datamodule, trainer, summary = setup(cfg)
    output_dir = Path(cfg.output_dir)

    def val_loss(ckpt_path: str | None = None) -> float | None:
        if not datamodule.val_set or trainer.limit_val_batches == 0:
            return None
        return trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]["val/loss"]

    before = val_loss(cfg.ckpt_path)  # when resuming, "before" is the checkpoint's loss
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    after = val_loss()
    result = {"module": module, "datamodule": datamodule, "trainer": trainer, "summary": summary,
              "val_loss_before": before, "val_loss_after": after, "hf_dir": None}
    if not trainer.is_global_zero:  # with several devices, rank 0 exports and reports
        return result

    hf_dir = None
    if cfg.export.enabled:
        dtype = cfg.export.dtype or module.checkpoint_dtype
        hf_dir = export_hf(module.model, module.tokenizer, output_dir / "hf_model", dtype=dtype)

    lines = ["", "=" * 30 + " slide-train summary " + "=" * 30, *summary.report(before, after, output_dir)]
    n_params = sum(p.numel() for p in module.model.parameters())
    if cfg.sample_tokens > 0 and n_params <= SAMPLE_MAX_PARAMS and datamodule.val_set:
        prompt_ids, reference = datamodule.sample_prompt()
        completion = sample(module.model, module.tokenizer, prompt_ids, cfg.sample_tokens)
        prompt = module.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        lines += [f"sample:     {prompt!r} -> {completion!r}", f"            (reference: {reference!r})"]
    lines.append(f"outputs:    {output_dir}" + (f" (Hugging Face model: {hf_dir})" if hf_dir else ""))
    log.info("\n".join(lines))
    return {**result, "hf_dir": hf_dir}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except SlideAppError as e:  # the user's to fix: the message, not a traceback
        sys.exit(f"slide-train: error: {e}")


def main() -> None:
    """Console entry point: ``slide-train [group=option ...] [key=value ...]`` (Hydra command line)."""
    _hydra_main()
