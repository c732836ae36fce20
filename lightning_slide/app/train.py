"""``slide-train`` (and ``python -m lightning_slide``): compose the Hydra config, train, export, summarize.

Every object comes from the config through ``hydra.utils.instantiate``; this file only orders the steps so that
cheap checks (config, model files, data) run before anything heavy (weights, the Trainer's device setup).
"""

import importlib.metadata
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from lightning_slide.app.errors import SlideAppError
from lightning_slide.app.summary import RunSummary
from lightning_slide.checkpoint import export_hf

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
CONF = Path(__file__).parent.parent / "conf"  # a file path: works from a checkout, editable or wheel install
SAMPLE_MAX_PARAMS = 500e6  # sampling runs on the host after training: keep it to models that answer in seconds

_MISSING_HINTS = {
    "model.path": "the model directory: model.path=/path/to/model (config.json, *.safetensors, tokenizer files)",
    "data.path": 'the training data: data.path=train.jsonl (one {"text"} or {"prompt", "response"} per line)',
}


def default_precision() -> str:
    """``bf16-true`` (bf16 compute, fp32 masters) on CUDA and on CPUs with native bf16 math (AVX512-BF16 or AMX,
    where the demo trains faster than with ``32-true``, with the same losses: measured in commit 38691a9); else
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
        raise SlideAppError(
            "missing required options: " + "; ".join(_MISSING_HINTS.get(key, f"{key}=...") for key in sorted(missing))
        )


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


def build_loggers(group: DictConfig | None) -> list[Any]:
    """The loggers of ``cfg.logger``; one whose package is missing names the extra that installs it."""
    loggers = []
    for name, node in (group or {}).items():
        try:
            loggers.append(build(node))
        except InstantiationException as e:
            if not isinstance(e.__cause__, ImportError):
                raise
            try:  # the shipped loggers are named after the package's extras (tensorboard, wandb, mlflow)
                extras = importlib.metadata.metadata("lightning-slide").get_all("Provides-Extra") or []
            except importlib.metadata.PackageNotFoundError:
                extras = []
            fix = f'pip install "lightning-slide[{name}]"' if name in extras else "install the package it names"
            missing = " ".join(str(e.__cause__).split())  # the package's own message, on one line
            raise SlideAppError(
                f"logger={name} needs a package that is not installed ({missing}); {fix}, or "
                "choose another logger (logger=csv)"
            ) from None
    return loggers


def target_of(group: str, node: DictConfig) -> Any:
    """The class (or function) ``node._target_`` names."""
    try:
        return get_object(node._target_)
    except ImportError as e:
        raise SlideAppError(f"{group}._target_={node._target_}: cannot import it ({e.__cause__ or e})") from None


def build_piece(group: str, node: DictConfig, **extras: Any) -> Any:
    """Instantiate ``cfg.model`` or ``cfg.data`` with whatever ``_target_`` the user gave, passing only what its
    signature takes: the group's options (the app's own options, such as ``model.config``, are left out, with a
    warning, when a target of yours has no such argument) and the app's ``extras`` (the tokenizer, the kernels...),
    which go only to an argument of that name, never into ``**kwargs``."""
    target = node._target_
    params = inspect.signature(target_of(group, node)).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    options = OmegaConf.to_container(node, resolve=True)  # resolved here: the kept options leave the config tree
    left_out = [k for k in options if not k.startswith("_") and k not in named and not any_keyword]
    if left_out:
        log.warning("%s: %s takes no %s: left out", group, target, ", ".join(left_out))
    options = {k: v for k, v in options.items() if k not in left_out}
    given = {k: v for k, v in extras.items() if k in named and k not in options and v is not None}
    return build(OmegaConf.create(options), **given, _convert_="all")


def has_val_data(module: L.LightningModule, datamodule: L.LightningDataModule) -> bool:
    """Whether the run can validate: the module has a validation step and the data module a non-empty loader."""
    if not (is_overridden("validation_step", module) and is_overridden("val_dataloader", datamodule)):
        return False
    loaders = datamodule.val_dataloader()
    try:
        return len(loaders) > 0
    except TypeError:  # an iterable dataset: no length to tell, so assume it has batches
        return True


def sample(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy completion of ``prompt_ids`` by ``model``, decoded (on the device the model sits on)."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids], device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def setup(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer, RunSummary]:
    """Build the run's objects, cheapest checks first: options, model files, data (nothing heavy is loaded here:
    the weights load in ``configure_model``, inside ``fit``)."""
    check_required(cfg)
    L.seed_everything(cfg.seed, workers=True)
    loggers, callbacks = build_loggers(cfg.logger), _build_all(cfg.callbacks)
    names = cfg.kernels.names
    kernels = OmegaConf.to_object(names) if OmegaConf.is_list(names) else names
    if kernels != "none" and "kernels" not in inspect.signature(target_of("model", cfg.model)).parameters:
        raise SlideAppError(
            f"kernels={kernels}: {cfg.model._target_} takes no kernels argument; drop kernels=... "
            "or apply them in your module (lightning_slide.kernels.apply_kernels)"
        )
    module = build_piece("model", cfg.model, kernels=kernels)
    datamodule = build_piece(
        "data",
        cfg.data,
        tokenizer=getattr(module, "tokenizer", None),
        context_length=getattr(module, "context_length", None),
    )
    datamodule.setup("fit")  # the app's data module reads, checks and tokenizes the whole data set here
    summary = RunSummary()
    strategy = build(cfg.strategy) if "_target_" in cfg.strategy else cfg.strategy.name
    trainer = build(cfg.trainer, strategy=strategy, logger=loggers or False, callbacks=[*callbacks, summary])
    return module, datamodule, trainer, summary


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, export, and log a summary. Returns the module, data module, Trainer, summary, the
    monitored metric (``cfg.monitor``) before and after training (``metric_before``, ``metric``), and the Hugging
    Face export directory."""
    module, datamodule, trainer, summary = setup(cfg)
    output_dir = Path(cfg.output_dir)
    validates = trainer.limit_val_batches != 0 and has_val_data(module, datamodule)

    def validate(ckpt_path: str | None = None) -> float | None:
        if not validates:
            return None
        results = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        value = results[0].get(cfg.monitor) if results else None
        return None if value is None else float(value)

    before = validate(cfg.ckpt_path)  # when resuming, "before" is the checkpoint's
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    after = validate()
    if after is None and cfg.monitor in trainer.callback_metrics:  # a training metric, such as train/loss
        after = float(trainer.callback_metrics[cfg.monitor])
    if after is None:
        log.warning(
            "monitor=%s: the run logged no such metric (it logged %s); set monitor= to one of them",
            cfg.monitor,
            ", ".join(sorted(trainer.callback_metrics)) or "none",
        )
    result = {
        "module": module,
        "datamodule": datamodule,
        "trainer": trainer,
        "summary": summary,
        "metric_before": before,
        "metric": after,
        "hf_dir": None,
    }
    if not trainer.is_global_zero:  # with several devices, rank 0 exports and reports
        return result

    # Export and sampling need a Hugging Face model at module.model (the app's module, and most modules wrapping one)
    model = getattr(module, "model", None)
    tokenizer = getattr(module, "tokenizer", None)
    hf_model = model if isinstance(model, PreTrainedModel) else None
    hf_dir = None
    if cfg.export.enabled and hf_model is None:
        log.info(
            "export: skipped, %s has no Hugging Face model at .model (export.enabled=false says so quietly)",
            type(module).__name__,
        )
    elif cfg.export.enabled:
        dtype = cfg.export.dtype or getattr(module, "checkpoint_dtype", None) or torch.float32
        hf_dir = export_hf(hf_model, tokenizer, output_dir / "hf_model", dtype=dtype)

    lines = [
        "",
        "=" * 30 + " slide-train summary " + "=" * 30,
        *summary.report(before, after, output_dir, metric=cfg.monitor, offload_dir=cfg.strategy.get("offload_dir")),
    ]
    samples = hf_model is not None and tokenizer is not None and hasattr(datamodule, "sample_prompt")
    n_params = sum(p.numel() for p in module.parameters())
    if cfg.sample_tokens > 0 and samples and n_params <= SAMPLE_MAX_PARAMS and validates:
        prompt_ids, reference = datamodule.sample_prompt()
        completion = sample(hf_model, tokenizer, prompt_ids, cfg.sample_tokens)
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        lines += [f"sample:     {prompt!r} -> {completion!r}", f"            (reference: {reference!r})"]
    lines.append(f"outputs:    {output_dir}" + (f" (Hugging Face model: {hf_dir})" if hf_dir else ""))
    log.info("\n".join(lines))
    return {**result, "hf_dir": hf_dir}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run; returns the monitored metric, which Hydra's sweepers (``--multirun``) compare across runs."""
    try:
        return train(cfg)["metric"]
    except SlideAppError as e:  # the user's to fix: the message, not a traceback
        sys.exit(f"slide-train: error: {e}")


def main() -> None:
    """Console entry point: ``slide-train [group=option ...] [key=value ...]`` (Hydra command line)."""
    _hydra_main()


if __name__ == "__main__":
    main()
