"""SlideFormerStrategy: the Lightning glue around the sliding engine."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.init import _EmptyInit
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy, Strategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_slide.engine.blocks import find_parts
from lightning_slide.engine.engine import SlidingEngine
from lightning_slide.engine.optimizer import HostOptimizer, check_optimizer
from lightning_slide.engine.options import SlideOptions, Tuning
from lightning_slide.engine.plan import Plan, human
from lightning_slide.engine.streams import memory_fraction
from lightning_slide.grad_norm import GradNormMonitor
from lightning_slide.hooks import refuse_weight_averaging, step_observers
from lightning_slide.kernels import apply_kernels, running_kernels
from lightning_slide.monitor import SlideMonitor
from lightning_slide.precision import SUPPORTED_PRECISIONS, SlidePrecision, planned_clipping
from lightning_slide.run_plan import RunPlan
from lightning_slide.strategy_checkpoints import CheckpointHooks

# Options the planner may set at the first training batch and lower for a larger one: the engine's setter of each
SET_BY_PLAN = {"device_layers": "keep_on_device", "parked_grads": "set_parking"}


class SlideFormerStrategy(CheckpointHooks, ParallelStrategy):
    """Full-parameter fine-tuning with only a window of decoder layers on the GPU (SlideFormer).

    fp32 master weights and the optimizer live in host memory; the decoder layers slide through ``window``
    pre-allocated slots on the compute device, each recomputed in backward so that only layer-boundary activations
    are kept. Training equals training without the strategy, up to floating-point rounding.

    Use ``Trainer(strategy="slideformer")`` (after ``import lightning_slide``) or pass an instance to set options.
    The compute device is the Trainer's device (the current CUDA device, or the CPU).

    Several devices (``Trainer(devices=N, num_nodes=M)``): one process per device, launched as Lightning's DDP
    launches them, over ``torch.distributed`` (NCCL on GPUs, gloo on the CPU). Every rank slides its own window over
    the same model and its own part of each global batch (Lightning adds a ``DistributedSampler``); each layer's
    gradients are averaged over ranks as they leave the device, and each rank keeps the Adam moments, gradient
    buffers and current fp32 masters of its 1/N shard of every layer and updates only that shard, so host memory
    for optimizer state per rank falls as 1/N; updated weights are all-gathered on the devices when a layer is
    next loaded. N ranks on a global batch train as one process on it, up to floating-point rounding.

    Args (the README's "Options" says more of each):
        window: decoder layers on the compute device at once (more than there are means all). Default ``2``.
        blocks: dotted path of the ``nn.ModuleList`` of decoder layers in the module (``"model.model.layers"``).
            Default ``None``: found for Llama, Qwen2/3, Mistral, Gemma and any one list of identical blocks.
        kernels: Triton kernels swapped into Hugging Face models at setup: ``"all"``, ``"none"`` (default) or a list
            of ``"rmsnorm"``, ``"rope"``, ``"swiglu"``, ``"fused_linear_cross_entropy"``.
        offload_activations: keep each layer's input in page-locked host memory instead of on the GPU, so long
            sequences fit. Default ``False``.
        offload_dir: a directory for the disk tier (what ``offload`` names lives in files there). Default ``None``.
        offload: what lives under ``offload_dir``: ``"optimizer"`` (Adam moments), ``"masters"`` (the layers' fp32
            masters) or ``"both"``. Default ``None``: ``"optimizer"`` when ``offload_dir`` is set.
        gpu_memory_limit: the most GPU memory this process may use, e.g. ``"24GiB"``: the GPU is capped to it and
            the run's plan is checked against it before anything large is allocated. Default ``None``: the GPU.
        nonfinite: a NaN/Inf loss or gradient: ``"error"`` (default; stop, naming the layer and step) or ``"skip"``
            (drop that optimizer step; its updates then wait for the end of backward).
        monitor: add a :class:`~lightning_slide.SlideMonitor` (tokens/s, TFLOP/s, memory, busy shares). Default
            ``True``.
        tuning: memory-for-speed choices the planner makes by default, same training whatever they say: a dict (or
            :class:`~lightning_slide.engine.options.Tuning`) of ``resident_optimizer``, ``host_weights``,
            ``grad_buffers``, ``parked_grads``, ``host_memory``, ``device_layers``. Default ``None``: as the planner
            decides.
        start_method: how the ranks start with several devices: ``"popen"`` (default), ``"spawn"``, ``"fork"``,
            ``"forkserver"`` (notebooks, tests). The backend follows the device: NCCL on GPUs, gloo on the CPU.
        timeout: how long a collective may wait for the other ranks before failing. Default 30 minutes.

    Precision: ``Trainer(precision="bf16-true")`` (bf16 compute, fp32 masters; recommended) or ``"32-true"``.
    Optimizers: ``torch.optim.AdamW`` or ``torch.optim.Adam`` (one), with any param groups; LR schedulers,
    ``accumulate_grad_batches`` and ``gradient_clip_val`` (norm or value) behave as without the strategy.
    """

    strategy_name = "slideformer"

    def __init__(
        self,
        window: int = 2,
        blocks: str | None = None,
        kernels: str | list[str] = "none",
        offload_activations: bool = False,
        offload_dir: str | None = None,
        offload: str | list[str] | None = None,
        gpu_memory_limit: str | int | None = None,
        nonfinite: str = "error",
        monitor: bool = True,
        tuning: Tuning | Mapping[str, Any] | None = None,
        start_method: str = "popen",
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        #: the options as given, validated (engine/options.py); a run resolves its "auto"s at setup (run_options)
        self.options = SlideOptions(
            window=window,
            blocks=blocks,
            kernels=kernels,
            offload_activations=offload_activations,
            offload_dir=offload_dir,
            offload=offload,
            gpu_memory_limit=gpu_memory_limit,
            nonfinite=nonfinite,
            monitor=monitor,
            tuning=tuning,
            start_method=start_method,
            timeout=timeout,
        )
        super().__init__()
        self._num_nodes = 1
        self.engine: SlidingEngine | None = None
        #: the latest plan of this run (lightning_slide.engine.plan.Plan): made at setup, redone at the first batch
        self._run_plan: RunPlan | None = None  # this run's planner settings and latest plan (run_plan.py)
        self._batch_checked = False
        self._torn = False  # the last run stopped in the middle of an optimizer step
        self._observers: list[str] = []  # user hooks between a step's backward and its update (hooks.py)

    @property
    def plan(self) -> Plan | None:
        """The latest plan of this run (``lightning_slide.engine.plan.Plan``): made at setup, redone at the first
        training batch with its shape; kept when the run was refused."""
        return None if self._run_plan is None else self._run_plan.plan

    # ------------------------------------------------------------ device and precision
    @property
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            return torch.device(self.parallel_devices[self.local_rank])
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------ several devices (Lightning's DDP launch and wiring)
    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices else 1

    @property
    def data_parallel(self) -> bool:
        """Whether this run has several ranks (``devices`` x ``num_nodes`` > 1)."""
        return self.num_processes * self.num_nodes > 1

    @property
    def is_distributed(self) -> bool:  # read by Lightning: a DistributedSampler only with several ranks
        return self.data_parallel

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_processes * self.num_nodes, "rank": self.global_rank}

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_processes * self.num_nodes)
        rank_zero_only.rank = self.global_rank

    def _configure_launcher(self) -> None:
        if not self.data_parallel:
            self._launcher = None  # one process: nothing to launch, no environment variables set
        elif self.options.start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self.options.start_method)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce ``tensor`` over the ranks (``self.log(..., sync_dist=True)``); the identity with one rank."""
        if isinstance(tensor, torch.Tensor) and self.data_parallel:
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else SlidePrecision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if plugin is not None and not isinstance(plugin, SlidePrecision):
            name = getattr(plugin, "precision", type(plugin).__name__)
            if type(plugin) not in (Precision, HalfPrecision) or name not in SUPPORTED_PRECISIONS:
                raise ValueError(
                    f"The slideformer strategy supports precision {' or '.join(map(repr, SUPPORTED_PRECISIONS))}, "
                    f"got {name!r}. Use Trainer(precision='bf16-true') (bf16 compute, fp32 masters) or '32-true'."
                )
            plugin = SlidePrecision(name)
        self._precision_plugin = plugin

    def setup_environment(self) -> None:
        Strategy.setup_environment(self)  # the device
        if self.data_parallel:
            self.set_world_ranks()
            backend = _get_default_process_group_backend_for_device(self.root_device)  # NCCL on GPUs, else gloo
            _init_dist_connection(
                self.cluster_environment,
                backend,
                timeout=self.options.timeout,
                device_id=self.root_device if self.root_device.type == "cuda" else None,
            )

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Models are built on the host in fp32 (they become the masters): never on the GPU.
        with _EmptyInit(enabled=bool(empty_init)), torch.device("cpu"):
            yield

    # ------------------------------------------------------------ setup and teardown
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert isinstance(module, LightningModule)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and not module.automatic_optimization:
            raise ValueError("slideformer supports automatic optimization only; set self.automatic_optimization = True")
        optimizers, schedulers = [], []
        if fitting:
            refuse_weight_averaging(trainer)
            # Before the engine moves parameters: configure_optimizers sees ordinary parameters.
            # (Lightning itself refuses several optimizers under automatic optimization.)
            optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
        # User hooks that observe a step see its gradients: on one device (the host) unless asked otherwise.
        self._observers = step_observers(trainer, module) if fitting else []
        options = self.run_options(module)
        if optimizers:
            check_optimizer(optimizers[0])
        self._run_plan = RunPlan(self, trainer, module, options, optimizers[0] if optimizers else None)
        self._batch_checked = not fitting  # activations are checked at the first training batch
        if fitting:  # before anything large is allocated
            plan = self._run_plan.check(module)
            rank_zero_info(
                f"slideformer plan: GPU {human(plan.gpu_total)} before activations, host {human(plan.host_total)}"
                + (f", disk {human(plan.disk_total)}" if plan.disk else "")
                + " (slide-plan prints every item)"
            )
        apply_kernels(module, options.kernels)
        self._torn = False
        self.engine = SlidingEngine(
            module,
            options,
            device=self.root_device,
            compute_dtype=self.precision_plugin.compute_dtype,
            memory_limit=self.device_memory_limit(),
            data_parallel=self.data_parallel,
        )
        running, fallback = running_kernels(module, self.root_device)
        rank_zero_info(
            f"slideformer: {len(self.engine.layers)} layers at {self.engine.blocks_path}, "
            f"window {self.engine.window.depth}"
            + (f" + {len(self.engine.device_layers)} kept on the device" if self.engine.device_layers else "")
            + ", "
            f"compute {self.precision_plugin.compute_dtype} on {self.root_device}, fp32 masters "
            f"{'on disk' if 'masters' in self.engine.offload else 'on the host'}, "
            f"kernels: {', '.join(running) or 'none'}"
        )
        if fallback:
            rank_zero_info(f"slideformer: {fallback}")
        turned_off = len(self.engine.model_hooks.checkpointing)
        if turned_off:
            rank_zero_info(
                f"slideformer: the model's own gradient checkpointing is off on {turned_off} "
                "decoder layers while training (slideformer recomputes each layer once itself)"
            )
        if self._observers:
            rank_zero_info(
                f"slideformer: {', '.join(self._observers)} may read or change a step between its backward and its "
                "update, so each step's updates wait for its backward (they stream out of it otherwise) and no "
                "gradient parks on the GPU"
            )
        if fitting and any(isinstance(c, GradNormMonitor) for c in trainer.callbacks):
            self.engine.track_grad_norms()
        if fitting and options.monitor and not any(isinstance(c, SlideMonitor) for c in trainer.callbacks):
            trainer.callbacks.append(SlideMonitor())
        if fitting:
            self.optimizers = [HostOptimizer.replacing(optimizers[0], self.engine, [c.scheduler for c in schedulers])]
            self.lr_scheduler_configs = schedulers
        self.model = module

    def run_options(self, module: LightningModule) -> SlideOptions:
        """The options of a run on ``module``: :attr:`options` with what ``"auto"`` leaves to this device and model
        decided (``SlideOptions.resolve``; ``parked_grads="auto"`` waits for the training batches)."""
        resident = sum(p.numel() for _, p in find_parts(module, self.options.blocks).resident)
        return self.options.resolve(
            device=self.root_device,
            resident_params=resident,
            gpu_memory=self.device_memory_limit(),
            observed=bool(self._observers),
        )

    def device_memory_limit(self) -> int | None:
        """The most memory this process may use on its GPU: ``gpu_memory_limit``, or a cap set with
        ``torch.cuda.set_per_process_memory_fraction``, whichever is smaller (the whole card without either);
        ``gpu_memory_limit`` on the CPU."""
        device = self.root_device
        if device.type != "cuda":
            return self.options.gpu_memory_limit
        total = torch.cuda.get_device_properties(device).total_memory
        capped = int(memory_fraction(device) * total)
        limit = self.options.gpu_memory_limit
        return capped if limit is None else min(capped, limit)

    def model_to_device(self) -> None:
        pass  # the engine places the resident parts and slides the layers

    def finish_updates(self) -> None:
        """Finish the last optimizer step's host updates: afterwards the module's parameters hold its fp32 weights,
        as plain Lightning's do between steps. Call it in a callback before reading weights during training (with
        several devices, on every rank); it costs the overlap of those updates with the next forward."""
        if self.engine is not None:
            self.engine.finish_updates()

    def grad_norm(self, step: int) -> float | None:
        """Global step ``step``'s gradient norm, for ``GradNormMonitor`` (``SlidingEngine.grad_norm``)."""
        return None if self.engine is None else self.engine.grad_norm(step)

    def on_exception(self, exception: BaseException) -> None:
        """An exception or Ctrl+C stopped the run (Lightning calls this after the callbacks' ``on_exception``, then
        ``teardown``): stop the engine's threads. Stopped between two optimizer steps, the last step's queued
        updates are finished first, so the weights hold whole steps (as without the strategy) and a checkpoint can
        still be saved. Stopped in the middle of a step (a backward whose updates were streaming, or a failed
        update), the updates not yet started are dropped: the weights hold part of that step, and the engine is let
        go; checkpoints are then refused (the last complete one stays)."""
        if self.engine is None:
            return
        torn = self.engine.step_torn
        try:
            # With several ranks the others may not be stopping: no collective (the other shards stay stale).
            self.engine.close(drain=not torn, gather=not self.data_parallel)
        except Exception as error:  # noqa: BLE001 - finishing the step failed too; the original error is reported
            rank_zero_warn(f"slideformer: the last optimizer step could not be finished ({error!r})")
            torn = True
        if torn:
            self._torn = True
            # Let the engine and its memory go, also from the optimizer and LR schedulers that Lightning keeps.
            for optimizer in self.optimizers:
                optimizer.engine = None
            self.optimizers, self.lr_scheduler_configs = [], []

    def teardown(self) -> None:
        try:
            if self.engine is not None:
                self.engine.close()
        finally:
            self.engine = None
            if self.cluster_environment is not None:
                super().teardown()
            else:
                Strategy.teardown(self)

    # ------------------------------------------------------------ the step
    def _forward(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        assert self.engine is not None
        self.engine.prepare_forward()
        return getattr(super(), hook)(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch, run_plan, module = args[0] if args else kwargs.get("batch"), self._run_plan, self.lightning_module
        # The "auto" options, the layers kept on the device first (parking takes the memory they leave). A step that
        # hooks observe keeps no layer on the device and parks nothing: its gradients all show on the host.
        tuning = self.options.tuning
        automatic = () if self._observers else tuple(o for o in SET_BY_PLAN if getattr(tuning, o) == "auto")
        first = not self._batch_checked
        before = {option: getattr(run_plan.settings, option) for option in automatic}
        if first:
            self._batch_checked = True
            run_plan.check_first_batch(module, self.engine, batch)
            decided = {option: run_plan.most_that_fit(option) for option in automatic}
        else:  # re-planned when a batch is larger than every one before: its activations first
            decided = run_plan.for_larger_batch(module, self.engine, batch, automatic) or {}
        for option, count in decided.items():
            if first or count != before[option]:
                getattr(self.engine, SET_BY_PLAN[option])(count)
                plan = "the first batch's plan" if first else "a larger batch's plan"
                rank_zero_info(f"slideformer: {option}='auto' -> {count} ({plan})")
        return self._forward("training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward("predict_step", *args, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert self.engine is not None
        trainer = self.lightning_module.trainer
        finite = torch.isfinite(closure_loss.detach()).all()
        if self.data_parallel:  # every rank skips or stops alike
            finite = finite.to(torch.uint8)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:  # one small device sync per micro-batch
            if self.options.nonfinite == "error":
                raise FloatingPointError(
                    f"the loss is {closure_loss.item()} at global step {trainer.global_step} (batch "
                    f"{trainer.fit_loop.epoch_loop.batch_idx}). Check the data and the learning rate, or pass "
                    "SlideFormerStrategy(nonfinite='skip') to skip such steps"
                )
            self.engine.skip_step()  # no backward: this optimizer step is dropped
            return closure_loss
        whole, clip_value = planned_clipping(trainer, self.lightning_module)
        observed = bool(self._observers)
        module = self.lightning_module
        # Lightning's Strategy.backward, with the engine's begin and end around the backward itself, so that
        # on_after_backward (post_backward) sees the gradients.
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self.engine.begin_backward(
            last_micro_batch=trainer.training and not trainer.fit_loop._should_accumulate(),
            clipping=whole,
            clip_value=clip_value,
            param_groups=self.optimizers[0].param_groups if self.optimizers else None,
            step=trainer.global_step,
            observed=observed,
        )
        self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        self.engine.end_backward()  # not after a failure: on_exception closes the engine
        if observed:
            self.engine.show_grads()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="sliding-window full fine-tuning (SlideFormer)", override=True
        )
