"""SlideFormerStrategy: the Lightning glue around the sliding engine."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized, _get_default_process_group_backend_for_device, _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.init import _EmptyInit
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy, Strategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_slide.engine.blocks import find_parts
from lightning_slide.engine.disk import parse_offload
from lightning_slide.engine.engine import SlidingEngine, check_count, memory_fraction
from lightning_slide.engine.optimizer import HostOptimizer
from lightning_slide.engine.plan import Plan, human, parse_bytes, resident_on_device_auto
from lightning_slide.hooks import refuse_weight_averaging, step_observers
from lightning_slide.kernels import KERNEL_NAMES, apply_kernels, running_kernels
from lightning_slide.monitor import SlideMonitor
from lightning_slide.precision import SUPPORTED_PRECISIONS, SlidePrecision, planned_clipping
from lightning_slide.run_plan import RunPlan
from lightning_slide.strategy_checkpoints import CheckpointHooks


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

    Args:
        window: decoder layers held on the compute device at once. Default ``2``. Larger windows prefetch deeper;
            values above the number of layers mean "all layers".
        blocks: dotted path, inside the LightningModule, of the ``nn.ModuleList`` of decoder layers (e.g.
            ``"model.model.layers"``). Default ``None``: found automatically for Llama, Qwen2, Qwen3, Mistral, Gemma
            and any model whose blocks sit in one list of identical blocks.
        kernels: Triton kernels swapped into Hugging Face Llama/Qwen2/Qwen3/Mistral/Gemma models at setup:
            ``"all"``, ``"none"`` (default) or a list of ``"rmsnorm"``, ``"rope"``, ``"swiglu"``,
            ``"fused_linear_cross_entropy"``. With the fused loss, a model called with ``labels`` returns the loss
            and ``logits=None`` (the B×T×V logits never exist). Other models are left untouched, with a warning.
        resident_optimizer: where the parameters outside the decoder layers (embeddings, final norm, output head)
            are updated. ``"device"``: on the GPU, with their fp32 masters and Adam state there (16 bytes per
            resident parameter of GPU memory); their gradients arrive last and their weights are needed first, so
            this removes a host update from between two steps. ``"host"``: with the layers, on the host.
            ``"auto"`` (default): ``"device"`` on a GPU when that memory is at most a quarter of the GPU's (or of
            ``gpu_memory_limit``), otherwise ``"host"``.
        gpu_memory_limit: the most device memory this process may use, e.g. ``"24GiB"`` (also ``"22.5GB"`` or
            bytes): the GPU is capped to it (to emulate a smaller card or share one). Default ``None``: the whole
            GPU. Either way the run's plan (:mod:`lightning_slide.engine.plan`, what ``slide-plan`` prints) is
            checked before anything large is allocated: the fixed GPU buffers, host memory and disk at setup, the
            activations at the first training batch; a run that cannot fit stops with the numbers and what to
            change.
        monitor: add a :class:`~lightning_slide.SlideMonitor` to the Trainer (unless it has one), which logs
            tokens/s, TFLOP/s, peak GPU and host memory and how busy host and GPU were at every optimizer step.
            Default ``True``.
        offload_activations: keep each decoder layer's input — the one activation a recomputed layer keeps from
            forward to backward — in page-locked host memory instead of on the GPU, so long sequences fit (one
            B×T×H tensor per layer moves each way per step). Default ``False``.
        offload_dir: a directory for the disk tier: what ``offload`` names lives in files there, read ahead of each
            layer's update and written behind it, with at most ``grad_buffers + 1`` layers' worth (``window + 3`` by default) in host memory at once.
            The free space is checked before anything is written. Default ``None``: everything in host memory.
        offload: what lives under ``offload_dir``: ``"optimizer"`` (the Adam moments, 8 bytes per parameter),
            ``"masters"`` (the decoder layers' fp32 masters, 4 bytes per parameter; embeddings, final norm and head
            keep theirs in memory) or ``"both"`` (also ``["optimizer", "masters"]``). With the masters on disk the
            host keeps a page-locked bf16 copy of every layer (``host_weights="compute"``), refreshed after each
            update, from which layers are uploaded; after training the module's parameters are fp32 views of the
            master files mapped into memory (read on access: keep ``offload_dir`` until you have saved the model).
            Default ``None``: ``"optimizer"`` when ``offload_dir`` is set.
        nonfinite: what a NaN or Inf loss (checked every micro-batch) or gradient does. Gradients are checked
            on the device as each layer's arrive (one flag per layer, read on the host before that layer's update:
            no host sync), or through the global norm when clipping by norm. ``"error"`` (default): training stops
            with a ``FloatingPointError`` naming the layer (or the norm) and the global step; without clipping,
            layers updated earlier in that step keep their update (resume from a checkpoint). ``"skip"``: that
            whole optimizer step is skipped (its gradients are dropped, no weight or optimizer state changes; LR
            schedulers still step) and counted in ``slide/skipped_steps``. Trade-off: since no layer may be updated
            before every gradient of the step is known to be finite, ``"skip"`` makes updates wait for the end of
            backward (as clipping by norm does) instead of streaming out of it, which lengthens a step by up to
            the host update time of the layers that would have overlapped the backward.
        host_weights: what each decoder layer's upload reads. ``"fp32"``: the fp32 masters, cast to bf16 on the GPU
            (4 bytes per parameter cross PCIe). ``"compute"``: a page-locked bf16 copy of every layer kept in host
            memory and refreshed by the host optimizer after each update, uploaded as it is (2 bytes per parameter
            cross PCIe; 2 bytes per parameter more host memory and a host cast per update). Same training either
            way. ``"auto"`` (default): ``"compute"`` when the masters are on disk (required there), else ``"fp32"``.
        grad_buffers: layer gradient buffers (fp32, one layer each) the host may hold while updates stream out of a
            backward (no clipping by norm, last micro-batch); the backward waits for the host rather than hold more.
            More lets the host keep updating through more of the next forward: at the Llama-3.1-8B shape 8 instead of 4
            gave 1.05x the speed for 0.4 bytes per parameter of host memory (BENCHMARKS.md). Default ``None``:
            ``window + 2``.
        parked_grads: layers' gradients the GPU may hold (bf16, one layer each). When every host gradient buffer
            is lent during a backward that streams updates: the backward parks them and goes on instead of waiting
            for the host, and they go down as buffers come back (the lowest layer whose gradients have landed
            first), so the host keeps updating through the next forward instead of idling in it — more overlap
            without more host memory. Pairs with a small ``grad_buffers`` (2): at the Llama-3.1-8B shape 24 parked
            layers gave 1.09x the speed for 9.8 GiB of GPU memory. With clipping (one micro-batch per step), where
            every layer's gradients wait for the global norm: the parked layers' wait on the GPU instead of in
            host memory (4 bytes per parameter of those layers less on the host). ``"auto"``: as many as the plan
            of the first training batch leaves room for (the GPU peak at most 90% of ``gpu_memory_limit`` or the
            GPU, and the host within its memory; later, longer batches are not counted). Default ``0``: no
            parking.
        host_memory: the host memory this run may count on, e.g. ``"240GiB"``, for the plan's check (shared by the
            ranks of one host). Default ``None``: what the OS reports available at setup (``MemAvailable``); give
            it where that reads low, e.g. a virtual machine whose memory grows as it is used.
        start_method: how Lightning starts the ranks with several devices: ``"popen"`` (default; the script is
            run again for each rank, as with DDP), ``"spawn"``, ``"fork"`` or ``"forkserver"`` (notebooks,
            tests).
        process_group_backend: ``torch.distributed`` backend with several devices. Default ``None``: NCCL on
            GPUs, gloo on the CPU.
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
        resident_optimizer: str = "auto",
        gpu_memory_limit: str | int | None = None,
        monitor: bool = True,
        offload_activations: bool = False,
        offload_dir: str | None = None,
        nonfinite: str = "error",
        host_weights: str = "auto",
        grad_buffers: int | None = None,
        parked_grads: int | str = 0,
        offload: str | list[str] | None = None,
        host_memory: str | int | None = None,
        start_method: str = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"SlideFormerStrategy(window=...) must be a positive integer, got {window!r}")
        if blocks is not None and not isinstance(blocks, str):
            raise ValueError(f"SlideFormerStrategy(blocks=...) must be a dotted module path or None, got {blocks!r}")
        names = [kernels] if isinstance(kernels, str) else list(kernels)
        unknown = [n for n in names if n not in (*KERNEL_NAMES, "all", "none")]
        if unknown:
            raise ValueError(
                f"SlideFormerStrategy(kernels=...) got unknown {unknown}; use 'all', 'none' or a list of {list(KERNEL_NAMES)}"
            )
        if resident_optimizer not in ("auto", "device", "host"):
            raise ValueError(
                f"SlideFormerStrategy(resident_optimizer=...) must be 'auto', 'device' or 'host', got {resident_optimizer!r}"
            )
        self.gpu_memory_limit = None if gpu_memory_limit is None else parse_bytes(gpu_memory_limit)
        self.monitor = monitor
        self.offload_activations = offload_activations
        self.offload_dir = None if offload_dir is None else str(offload_dir)
        try:
            on_disk = parse_offload(offload, self.offload_dir)
        except ValueError as error:
            raise ValueError(f"SlideFormerStrategy(offload=...): {error}") from None
        self.offload = None if offload is None else tuple(sorted(on_disk))
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"SlideFormerStrategy(nonfinite=...) must be 'error' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        if host_weights not in ("auto", "fp32", "compute"):
            raise ValueError(
                f"SlideFormerStrategy(host_weights=...) must be 'auto', 'fp32' or 'compute', got {host_weights!r}"
            )
        if host_weights == "fp32" and "masters" in on_disk:
            raise ValueError(
                "SlideFormerStrategy(host_weights='fp32') uploads from fp32 masters in host memory, but offload puts "
                "the masters on disk; use host_weights='compute' or 'auto'"
            )
        self.host_weights = "compute" if host_weights == "auto" and "masters" in on_disk else host_weights
        check_count("SlideFormerStrategy(grad_buffers=...)", grad_buffers, minimum=1, optional=True)
        self.grad_buffers = grad_buffers
        if parked_grads != "auto":
            check_count("SlideFormerStrategy(parked_grads=...)", parked_grads, minimum=0)
        self.parked_grads = parked_grads
        self.host_memory = None if host_memory is None else parse_bytes(host_memory)
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(
                f"SlideFormerStrategy(start_method=...) must be 'popen', 'spawn', 'fork' or 'forkserver', got {start_method!r}"
            )
        super().__init__()
        self.start_method = start_method
        self.process_group_backend = process_group_backend
        self.timeout = timeout
        self._num_nodes = 1
        self.resident_optimizer = resident_optimizer
        self.window = window
        self.blocks = blocks
        self.kernels = kernels
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
        elif self.start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self.start_method)

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
            backend = self.process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
            _init_dist_connection(
                self.cluster_environment, backend, timeout=self.timeout,
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
        resident_on_device = self._resident_on_device(module)
        self._run_plan = RunPlan(self, trainer, module, resident_on_device)
        self._batch_checked = not fitting  # activations are checked at the first training batch
        if fitting:  # before anything large is allocated
            plan = self._run_plan.check(module)
            rank_zero_info(
                f"slideformer plan: GPU {human(plan.gpu_total)} before activations, host {human(plan.host_total)}"
                + (f", disk {human(plan.disk_total)}" if plan.disk else "")
                + " (slide-plan prints every item)"
            )
        apply_kernels(module, self.kernels)
        self._torn = False
        self.engine = SlidingEngine(
            module,
            window=self.window,
            device=self.root_device,
            compute_dtype=self.precision_plugin.compute_dtype,
            blocks_path=self.blocks,
            resident_on_device=resident_on_device,
            memory_limit=self.device_memory_limit(),
            offload_activations=self.offload_activations,
            offload_dir=self.offload_dir,
            nonfinite=self.nonfinite,
            host_weights="fp32" if self.host_weights == "auto" else self.host_weights,
            grad_buffers=self.grad_buffers,
            offload=self.offload,
            data_parallel=self.data_parallel,
            parked_grads=0 if self.parked_grads == "auto" else self.parked_grads,  # auto: at the first batch
        )
        running, fallback = running_kernels(module, self.root_device)
        self._observers = step_observers(trainer, module) if fitting else []
        rank_zero_info(
            f"slideformer: {len(self.engine.layers)} layers at {self.engine.blocks_path}, window {self.engine.depth}, "
            f"compute {self.precision_plugin.compute_dtype} on {self.root_device}, fp32 masters "
            f"{'on disk' if 'masters' in self.engine.offload else 'on the host'}, "
            f"kernels: {', '.join(running) or 'none'}"
        )
        if fallback:
            rank_zero_info(f"slideformer: {fallback}")
        if self.engine.model_checkpointing_off:
            rank_zero_info(
                f"slideformer: the model's own gradient checkpointing is off on {self.engine.model_checkpointing_off} "
                "decoder layers while training (slideformer recomputes each layer once itself)"
            )
        if self._observers:
            rank_zero_info(
                f"slideformer: {', '.join(self._observers)} may read or change a step between its backward and its "
                "update, so each step's updates wait for its backward (they stream out of it otherwise)"
            )
        if fitting and self.monitor and not any(isinstance(c, SlideMonitor) for c in trainer.callbacks):
            trainer.callbacks.append(SlideMonitor())
        if fitting:
            self.optimizers = [HostOptimizer.replacing(optimizers[0], self.engine, [c.scheduler for c in schedulers])]
            self.lr_scheduler_configs = schedulers
        self.model = module

    def _resident_on_device(self, module: LightningModule) -> bool:
        if self.resident_optimizer != "auto":
            return self.resident_optimizer == "device"
        device = self.root_device
        if device.type != "cuda":
            return False
        resident = sum(p.numel() for _, p in find_parts(module, self.blocks).resident)
        return resident_on_device_auto(resident, self.device_memory_limit())

    def device_memory_limit(self) -> int | None:
        """The most memory this process may use on its GPU: ``gpu_memory_limit``, or a cap set with
        ``torch.cuda.set_per_process_memory_fraction``, whichever is smaller (the whole card without either);
        ``gpu_memory_limit`` on the CPU."""
        device = self.root_device
        if device.type != "cuda":
            return self.gpu_memory_limit
        total = torch.cuda.get_device_properties(device).total_memory
        capped = int(memory_fraction(device) * total)
        return capped if self.gpu_memory_limit is None else min(capped, self.gpu_memory_limit)

    def model_to_device(self) -> None:
        pass  # the engine places the resident parts and slides the layers

    def finish_updates(self) -> None:
        """Finish the last optimizer step's host updates: afterwards the module's parameters hold its fp32 weights,
        as plain Lightning's do between steps. Call it in a callback before reading weights during training (with
        several devices, on every rank); it costs the overlap of those updates with the next forward."""
        if self.engine is not None:
            self.engine.finish_updates()

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
        if not self._batch_checked:
            self._batch_checked = True
            self._run_plan.check_first_batch(self.lightning_module, self.engine, args[0] if args else kwargs.get("batch"))
            if self.parked_grads == "auto":
                parked = self._run_plan.most_parked_grads()
                self.engine.add_parking(parked)
                rank_zero_info(f"slideformer: parked_grads='auto' -> {parked} (the first batch's plan)")
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
            if self.nonfinite == "error":
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
            clipping=whole, clip_value=clip_value,
            param_groups=self.optimizers[0].param_groups if self.optimizers else None,
            step=trainer.global_step, observed=observed,
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

