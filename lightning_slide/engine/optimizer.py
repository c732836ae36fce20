"""The host optimizer: the user's optimizer rebuilt over the fp32 masters, run unit by unit on a host thread.

``UnitOptimizer`` is the user's AdamW/Adam over one unit's master views: AdamW runs ``lightning_slide.optim``'s host
loop (bf16 gradients in, the bf16 compute copy out, which torch's fused kernel cannot), Adam and amsgrad torch's
fused CPU kernel; ``update_worker.UpdateWorker`` runs them on the host thread. ``HostOptimizer`` is the optimizer
Lightning steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from lightning_slide import optim
from lightning_slide.engine.host import MASTER_DTYPE, Entry, HostUnit

SUPPORTED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, optim.AdamW)
# Per-group settings read from the user's param groups at every update (LR schedulers change them between steps).
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")


def check_optimizer(optimizer: Optimizer) -> None:
    """Raise a clear error unless ``optimizer`` is one the host can run exactly."""
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = "torch.optim.AdamW, torch.optim.Adam, lightning_slide.optim.AdamW"
        raise ValueError(
            f"slideformer runs the optimizer on the host and supports {names}; configure_optimizers returned "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}. Return one of the supported optimizers."
        )
    for group in optimizer.param_groups:
        for flag in ("differentiable", "capturable"):
            if group.get(flag):
                raise ValueError(
                    f"slideformer does not support {type(optimizer).__name__}({flag}=True); set it to False."
                )


def hyperparameters(param_groups: list[dict]) -> list[dict]:
    """A snapshot of each group's settings, taken when a step is submitted (updates may run after the scheduler)."""
    return [{k: group[k] for k in HYPERPARAMETERS if k in group} for group in param_groups]


def state_names(optimizer: Optimizer) -> tuple[str, ...]:
    """The per-parameter state arrays ``optimizer`` keeps besides its step count."""
    amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())


def state_dtype(optimizer: Optimizer) -> torch.dtype:
    """The dtype of ``optimizer``'s state arrays: fp32, or ``lightning_slide.optim.AdamW``'s ``state_dtype``."""
    return getattr(optimizer, "state_dtype", torch.float32)


@dataclass(frozen=True)
class _Piece:
    """The part ``[start, stop)`` (unit offsets) of one parameter that this process optimizes: all of it, or its
    overlap with the rank's shard (``shard.Shards``)."""

    entry: Entry
    start: int
    stop: int

    def view(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        """The piece in ``flat``, an array that starts at unit offset ``base``; shaped like the parameter when whole."""
        part = flat[self.start - base : self.stop - base]
        return part.view(self.entry.shape) if self.stop - self.start == self.entry.numel else part


@dataclass(eq=False)  # holds a tensor: compared by identity
class _Span:
    """``[start, stop)`` (unit offsets): consecutive parameters of one param group (cut at chunk boundaries), which
    torch's optimizer steps as one flat tensor, ``master``. AdamW is elementwise: one tensor for several parameters
    updates each as its own would be, in a few kernel calls per unit instead of a few per parameter (the update
    thread takes the GIL back after each call, BENCHMARKS.md)."""

    start: int
    stop: int
    master: torch.Tensor

    def view(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        return flat[self.start - base : self.stop - base]


class UnitOptimizer:
    """The user's optimizer over one unit's trainable fp32 masters, grouped like the user's param groups.

    Its state lives in flat arrays (fp32, or the optimizer's ``state_dtype``) laid out like the unit's trainable
    parameters (one per state name); torch's optimizer steps flat spans of the unit, each holding the consecutive
    parameters of one group (``_Span``), and ``state_of`` gives each parameter's state as torch keeps it. The state
    arrays stay in memory, or come from the disk tier (files of that dtype) for each step.
    The masters it steps are views of the unit's flat masters; when those live on disk, each step is handed the
    flat array read from the file and the views are pointed at it for that step (``.data``), then back at the
    unit's resting place (the mapped file).

    Args:
        unit: the unit's host state.
        optimizer: the user's optimizer (its class and param groups are reproduced; it is never stepped).
        group_of: ``id(parameter) -> index`` of its group in ``optimizer.param_groups``; parameters missing from
            it are trained by nobody (plain torch would not update them either).
        master, grad: the flat fp32 buffers to step, laid out like the unit; default: the unit's host masters and
            gradient accumulator. Device buffers run torch's fused kernel on the device instead.
        state_in_memory: allocate the state arrays now and keep them; ``False``: each ``step`` is handed them.
        chunk: cut the spans at every ``chunk`` elements of the unit's gradient (from ``unit.grad_start``), so
            that ``step(only=...)`` can update one chunk at a time from a chunk-sized gradient buffer. Default
            ``None``: no cuts.
    """

    def __init__(
        self,
        unit: HostUnit,
        optimizer: Optimizer,
        group_of: dict[int, int],
        master: torch.Tensor | None = None,
        grad: torch.Tensor | None = None,
        state_in_memory: bool = True,
        chunk: int | None = None,
    ) -> None:
        self.unit = unit
        self._grad = grad  # None: the unit's (lent) host accumulator, looked up at every update
        self._host_masters = master is None  # (a unit updated on the device steps a copy of them there)
        master_flat = (unit.rest if unit.master is None else unit.master) if master is None else master
        self._owned: dict[int, _Piece] = {}  # id(parameter) -> the part of it optimized here
        runs: list[list[int]] = []  # [group, start, stop] of consecutive parameters of one group
        for entry in unit.trainable:
            group = group_of.get(id(entry.param))
            start = max(entry.offset, unit.grad_start)
            stop = min(entry.offset + entry.numel, unit.grad_stop)
            if group is None or start >= stop:
                continue
            self._owned[id(entry.param)] = _Piece(entry, start, stop)
            if runs and runs[-1][0] == group and runs[-1][2] == start:
                runs[-1][2] = stop
            else:
                runs.append([group, start, stop])
        cuts = [] if chunk is None else list(range(unit.grad_start, unit.grad_stop, chunk))
        members: dict[int, list[torch.Tensor]] = {}
        self._spans: list[_Span] = []
        for group, start, stop in runs:
            bounds = sorted({start, stop, *(c for c in cuts if start < c < stop)})
            for lo, hi in zip(bounds, bounds[1:]):
                span = _Span(lo, hi, master_flat[lo:hi])
                members.setdefault(group, []).append(span.master)
                self._spans.append(span)
        self.group_indices = sorted(members)
        self.state_names = state_names(optimizer)
        self.state_dtype = state_dtype(optimizer)
        self.inner: Optimizer | None = None
        self.state: dict[str, torch.Tensor] | None = None
        if members:
            snapshot = hyperparameters(optimizer.param_groups)
            groups = [{"params": members[g], **snapshot[g]} for g in self.group_indices]
            kind, same_state = type(optimizer), {}
            adamw = kind in (torch.optim.AdamW, optim.AdamW) and "max_exp_avg_sq" not in self.state_names
            if adamw and (self.state_dtype != MASTER_DTYPE or self._host_masters and optim.host_loop_ready()):
                # the same AdamW (torch's fused kernel for its ``step``) whose ``update`` runs the host loop that takes
                # bf16 gradients and writes the compute copy
                kind, same_state = optim.AdamW, {"state_dtype": self.state_dtype}
            elif kind is optim.AdamW:  # fp32 moments, on the device or where the loop cannot be built: torch's
                kind = torch.optim.AdamW
            self.inner = kind(groups, fused=True, **same_state)
            for span in self._spans:  # the step count stays in memory whatever holds the moments
                self.inner.state[span.master] = {
                    "step": torch.zeros((), dtype=torch.float32, device=span.master.device)
                }
            if state_in_memory:
                self.state = self.empty_state(master_flat.device)
                self._attach(self.state)

    @property
    def steps_whole_gradient(self) -> bool:
        """Whether it optimizes every element of the unit's gradient (this rank's part): then the norm of the flat
        gradient is the norm over the parameters it steps."""
        return sum(span.stop - span.start for span in self._spans) == self.unit.grad_numel

    def empty_state(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {
            name: torch.zeros(self.unit.grad_numel, dtype=self.state_dtype, device=device) for name in self.state_names
        }

    def _attach(self, state: dict[str, torch.Tensor]) -> None:
        """Point torch's per-tensor state at views of the flat arrays ``state``."""
        base = self.unit.grad_start
        for span in self._spans:
            self.inner.state[span.master].update({name: span.view(state[name], base) for name in self.state_names})

    def _detach(self) -> None:
        for span in self._spans:
            step = self.inner.state[span.master]["step"]
            self.inner.state[span.master] = {"step": step}

    def _point_masters(self, flat: torch.Tensor) -> None:
        """Make the master views this optimizer steps views of ``flat`` (a unit's masters read from disk)."""
        for span in self._spans:
            span.master.data = span.view(flat)

    def bind(self, only: tuple[int, int, torch.Tensor] | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """Point each span's ``.grad`` at its view of the current accumulator; returns those views by span master.
        ``only=(lo, hi, flat)``: only the spans in ``[lo, hi)`` of the unit (a chunk, see ``chunk``), at their view
        of ``flat``, the chunk's gradients; the others get none, so torch's optimizer leaves them alone."""
        if only is not None:
            lo, hi, flat = only
            for span in self._spans:
                span.master.grad = span.view(flat, lo) if lo <= span.start and span.stop <= hi else None
            return {span.master: span.master.grad for span in self._spans if span.master.grad is not None}
        flat = self.unit.grad if self._grad is None else self._grad
        grads = {span.master: span.view(flat, self.unit.grad_start) for span in self._spans}
        if flat.dtype == MASTER_DTYPE:  # (narrower gradients reach the kernel without ``.grad``: ``step``)
            for master, grad in grads.items():
                master.grad = grad
        return grads

    def grad_norm(self, flat: torch.Tensor | None = None, base: int = 0) -> torch.Tensor:
        """The fp32 2-norm of the gradients it steps: their views in ``flat`` (a unit-ordered array that starts at
        unit offset ``base``, e.g. on the device), else in its accumulator."""
        if flat is None:
            flat, base = (self.unit.grad if self._grad is None else self._grad), self.unit.grad_start
        norms = [torch.linalg.vector_norm(span.view(flat, base), dtype=MASTER_DTYPE) for span in self._spans]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=flat.device)

    def takes(self, dtype: torch.dtype) -> bool:
        """Whether its update reads gradients in ``dtype`` as they are (no pass over them first): fp32, or bf16 for
        AdamW's own kernel, which widens them as it reads (torch's fused kernels take their parameters' dtype
        only). Over the whole gradient only, whose norm is then taken on the device."""
        if dtype == MASTER_DTYPE:
            return True
        return self._own_kernel and dtype == torch.bfloat16 and self.steps_whole_gradient

    @property
    def _own_kernel(self) -> bool:
        """Whether its update is ``lightning_slide.optim``'s kernel (AdamW without amsgrad; on the host, or with
        bf16 moments), which widens bf16 gradients, clamps them (clipping by value) and writes a bf16 copy of the
        weights in its own pass. Torch's fused kernel runs the rest (fp32 moments on the device, Adam, amsgrad)."""
        host_or_low = self._host_masters or self.state_dtype != MASTER_DTYPE
        return isinstance(self.inner, optim.AdamW) and host_or_low

    def step(
        self,
        hyper: list[dict],
        clip_coefficient: torch.Tensor | None,
        clip_value: float | None,
        state: dict[str, torch.Tensor] | None = None,
        only: tuple[int, int, torch.Tensor] | None = None,
    ) -> bool:
        """One update of the unit. ``state``: arrays read from the disk tier: the moments when they are not kept in
        memory, and ``"master"``, the unit's flat fp32 masters, when they live on disk (updated in place).
        ``only``: update one chunk from its own gradient buffer (``bind``). Returns whether it also brought the
        unit's compute copy up to date (``_copies``)."""
        if self.inner is None:
            return False
        state = state or {}
        master_flat = state.get("master")
        moments = self.state is None and all(name in state for name in self.state_names)
        grads = self.bind(only)
        # torch's fused kernels divide each gradient by ``grad_scale`` in their own pass over it (the protocol of
        # GradScaler): clipping by norm then costs no pass of its own over the host's memory.
        folded = clip_coefficient is not None and clip_value is None
        folded = folded and getattr(self.inner, "_step_supports_amp_scaling", False)
        if clip_coefficient is not None and not folded:
            for grad in grads.values():
                grad.mul_(clip_coefficient)
        clamped = clip_value is not None and self._own_kernel  # it clamps them as it reads them
        if clip_value is not None and not clamped:
            for grad in grads.values():
                grad.clamp_(-clip_value, clip_value)
        for inner_group, g in zip(self.inner.param_groups, self.group_indices):
            inner_group.update(hyper[g])
        if self.state is None and not moments:
            raise RuntimeError(f"{self.unit.name}: the optimizer state was not read from the disk tier")
        if moments:
            self._attach(state)
        if master_flat is not None:
            self._point_masters(master_flat)
        copies = self._copies() if only is None else {}
        try:
            if folded:
                self.inner.grad_scale = 1.0 / clip_coefficient
            if clamped:
                self.inner.clip_value = clip_value
            if self._own_kernel:  # (one kernel for every host step: each mode trains alike, bit for bit)
                self.inner.update(grads, copies)
            else:
                self.inner.step()
        finally:
            if folded:
                self.inner.grad_scale = None
            if clamped:
                self.inner.clip_value = None
            if moments:
                self._detach()
            if master_flat is not None:
                self._point_masters(self.unit.rest)
            for span in self._spans:
                span.master.grad = None  # the accumulator may be lent to another layer next
        return bool(copies)

    def _copies(self) -> dict[torch.Tensor, torch.Tensor]:
        """Where AdamW's own kernel writes each span's updated weights in bf16 in its own pass: the unit's compute
        copy, which then needs no refresh of its own (``HostUnit.refresh_weights``); empty where it cannot."""
        unit, weights = self.unit, self.unit.weights
        writes = self._host_masters and self._own_kernel
        whole = (unit.start, unit.stop) == (0, unit.numel)  # (with several ranks each updates its shard)
        if not writes or weights is None or weights.dtype != torch.bfloat16 or not whole:
            return {}
        return {span.master: span.view(weights) for span in self._spans}

    def piece_of(self, param: torch.nn.Parameter) -> _Piece | None:
        """The part of ``param`` this optimizer steps, whole (``None``: none of it)."""
        return self._owned.get(id(param))

    def _steps_of(self, piece: _Piece) -> list[torch.Tensor]:
        """The step counts of the spans holding ``piece`` (equal: every span of a unit is stepped together)."""
        return [
            self.inner.state[span.master]["step"]
            for span in self._spans
            if span.start < piece.stop and piece.start < span.stop
        ]

    def state_of(self, param: torch.nn.Parameter, state: dict[str, torch.Tensor] | None = None) -> dict | None:
        """``param``'s state as torch's optimizer keeps it (views); ``state``: the flat arrays, if not in memory."""
        piece = self.piece_of(param)
        if piece is None or self.inner is None:
            return None
        flat = self.state if state is None else state
        base = self.unit.grad_start
        return {"step": self._steps_of(piece)[0], **{n: piece.view(flat[n], base) for n in self.state_names}}

    def load_state_of(
        self, param: torch.nn.Parameter, saved: dict, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Copy ``saved`` (torch's per-parameter layout, the whole parameter's) into ``param``'s state (the owned
        piece of it when ranks share the unit)."""
        current = self.state_of(param, state)
        if current is None:
            raise KeyError("parameter is not optimized here")
        piece = self.piece_of(param)
        for name, value in saved.items():
            if name not in current:
                continue
            value = torch.as_tensor(value, dtype=torch.float32)
            if name == "step":
                for step in self._steps_of(piece):
                    step.copy_(value)
                continue
            if value.dim() and current[name].shape != value.shape:
                value = value.reshape(-1)[piece.start - piece.entry.offset : piece.stop - piece.entry.offset]
            current[name].copy_(value)


class HostOptimizer(Optimizer):
    """The optimizer Lightning steps: the user's param groups, updated on the host by the sliding engine.

    ``param_groups`` are the very dicts of the user's optimizer, so LR schedulers built on it keep working and
    every update reads the current ``lr``. ``step(closure)`` runs the closure (forward and backward of the last
    micro-batch) and submits the host updates; ``zero_grad`` starts a new accumulation. ``state_dict`` has the
    layout of the user's optimizer (param indices, per-parameter state) so it loads back into either.
    """

    def __init__(self, optimizer: Optimizer, engine) -> None:
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.user_optimizer = optimizer
        self.engine = engine
        engine.attach_optimizer(optimizer)

    @classmethod
    def replacing(cls, optimizer: Optimizer, engine, schedulers: list = ()) -> HostOptimizer:
        """A host optimizer standing in for ``optimizer``, named after its class (loggers show "lr-AdamW"), with
        ``schedulers`` re-pointed at it so that Lightning sees one optimizer with its schedulers."""
        named = type(type(optimizer).__name__, (cls,), {"__module__": cls.__module__})
        host = named(optimizer, engine)
        for scheduler in schedulers:
            scheduler.optimizer = host
        return host

    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.engine.step(self.param_groups)
        self._opt_called = True  # what torch's LR schedulers look for to know a step came before theirs
        return loss

    # torch's LR schedulers warn unless the optimizer's step carries this mark (they set it on the optimizers they
    # are built with; this optimizer replaces one of those).
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    def clip_grad_norm(self, max_norm: float) -> None:
        self.engine.clip_grad_norm(max_norm)

    def clip_grad_value(self, clip_value: float) -> None:
        self.engine.clip_grad_value(clip_value)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "engine"):
            raise RuntimeError("slideformer cannot add parameter groups after setup; add them in configure_optimizers")
        super().add_param_group(param_group)

    def _params(self):
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                yield index, param
                index += 1

    def state_dict(self) -> dict:  # type: ignore[override]
        state = {}
        for index, param in self._params():
            found = self.engine.optimizer_state(param)
            if found is not None:
                state[index] = found
        groups = []
        start = 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append(
                {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + count))}
            )
            start += count
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)
        ):
            raise ValueError("optimizer state does not match the optimizer's parameter groups")
        for saved, mine in zip(groups, self.param_groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        states = state_dict["state"]
        for index, param in self._params():
            if index in states:
                self.engine.load_optimizer_state(param, states[index])
