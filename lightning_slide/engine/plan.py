"""The planner: GPU memory, host memory, disk and step time of a slideformer run, known before anything is allocated.

One memory model serves three callers: the engine (its fixed device buffers against ``gpu_memory_limit``), the
strategy (the whole plan at setup, the activations at the first batch) and ``slide-plan`` (a table, before a run).
Every figure is derived from the engine's actual allocations (see each item's comment) and, for activations, from
the tensors autograd saves in one decoder layer (counted with ``saved_tensors_hooks`` on the CPU for Llama, Qwen3
and Mistral layers; ``tests/core/test_plan.py`` recounts them).

Units: bytes for memory, seconds for time, bytes/s and params/s for rates. ``e`` below is the compute dtype's
element size (2 for bf16, 4 for fp32); ``tokens`` = batch × sequence length of one micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_slide.engine.blocks import find_parts

if TYPE_CHECKING:
    from lightning_slide.engine.options import SlideOptions

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

# Device staging through which copies that change dtype travel (elements of fp32; 128 MiB each way).
STAGING_NUMEL = 32 * 2**20
# While updates stream out of a backward, at most window + this many layers hold a host gradient buffer (default).
GRADS_AHEAD = 2
# Host memory of the process before any model: Python, torch, Lightning, transformers (and the CUDA context on a
# GPU machine). Rough; calibrated by benchmarks/bench_plan.py.
RUNTIME_HOST_BYTES = {"cuda": 3 * 2**30, "cpu": 2**29}
# The fused cross-entropy's chunk of logits (elements), as in lightning_slide/kernels/fused_linear_cross_entropy.py.
FUSED_CE_CHUNK_ELEMENTS = 2**29
# Suggestions leave this share of the GPU for the allocator's fragmentation and whatever the model adds.
SUGGEST_MARGIN = 0.9
FUSED_CE = "fused_linear_cross_entropy"


def parse_bytes(value: str | int | float) -> int:
    """``"24GiB"``, ``"24 GB"``, ``"1.5TiB"`` or a number of bytes -> bytes (``GB`` = 10^9, ``GiB`` = 2^30)."""
    wrong = f"not a memory size: {value!r}; write e.g. '24GiB', '22.5GB' or a number of bytes"
    if isinstance(value, bool):
        raise ValueError(wrong)
    if isinstance(value, int):
        size = value
    else:
        if isinstance(value, float):
            number, unit = value, ""
        else:
            match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
            if not match or match.group(2).lower() not in _UNITS:
                raise ValueError(wrong)
            number, unit = float(match.group(1)), match.group(2).lower()
        if not math.isfinite(number * _UNITS[unit]):  # "1e400GB", nan, inf
            raise ValueError(wrong)
        size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return size


def human(size: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (``"22.50 GiB"``, ``"96.0 KiB"``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model: parameter counts of its units and its layer dimensions.

    ``layer_params``/``layer_trainable`` are those of the largest decoder layer (the window's slots are sized for
    it). The dimensions (``hidden`` ...) are ``None`` when no Hugging Face-style config was found: activations are
    then not planned.
    """

    layers: int
    layer_params: int
    layer_trainable: int
    resident_params: int
    resident_trainable: int
    layers_frozen: int = 0  # frozen parameters of all decoder layers together (a LoRA run's base weights)
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    qk_norm: bool = False  # Qwen3-style RMSNorm of queries and keys per head
    attention: str = "sdpa"  # the model's attention implementation ("eager" keeps the T×T probabilities)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.resident_params

    @property
    def has_dims(self) -> bool:
        return None not in (self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim, self.vocab)

    @classmethod
    def of(cls, root: nn.Module, blocks_path: str | None = None) -> ModelShape:
        """The shape of ``root`` (a LightningModule, a causal LM, or one built on the meta device: only shapes are
        read). Dimensions come from the first submodule with a ``config`` that has ``hidden_size``."""
        parts = find_parts(root, blocks_path)
        sizes = [
            (sum(p.numel() for p in b.parameters()), sum(p.numel() for p in b.parameters() if p.requires_grad))
            for b in parts.blocks
        ]
        dims: dict = {}
        config = next((m.config for m in root.modules() if hasattr(getattr(m, "config", None), "hidden_size")), None)
        if config is not None:
            text = getattr(config, "get_text_config", lambda: config)()
            hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
            head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
            dims = dict(
                hidden=hidden,
                intermediate=getattr(text, "intermediate_size", None),
                heads=heads,
                kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                head_dim=head_dim,
                vocab=getattr(text, "vocab_size", None),
                attention=str(getattr(config, "_attn_implementation", None) or "sdpa"),
            )
        qk_norm = any(name.endswith("q_norm") for name, _ in parts.blocks[0].named_modules())
        return cls(
            layers=len(parts.blocks),
            layer_params=max(s[0] for s in sizes),
            layer_trainable=max(s[1] for s in sizes),
            resident_params=sum(p.numel() for _, p in parts.resident),
            resident_trainable=sum(p.numel() for _, p in parts.resident if p.requires_grad),
            layers_frozen=sum(total - trainable for total, trainable in sizes),
            qk_norm=qk_norm,
            **dims,
        )


@dataclass(frozen=True)
class Settings:
    """The run's choices. ``batch``/``seq`` ``None``: activations not planned (only the fixed buffers)."""

    window: int = 2
    batch: int | None = None
    seq: int | None = None
    compute_dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"  # "cuda", or "cpu" (tests: the compute buffers then live in host memory)
    resident_on_device: bool = False
    offload_activations: bool = False
    offload_dir: str | None = None
    kernels: tuple[str, ...] = ()
    # Clipping by norm: every layer keeps its fp32 gradients until the global norm (clipping by value streams: False)
    clipping: bool = True
    accumulate: int = 1  # accumulate_grad_batches
    host_weights: str = "fp32"  # "compute": a page-locked compute-dtype copy of each layer is what uploads read
    grad_buffers: int | None = None  # layer gradient buffers while updates stream (None: window + GRADS_AHEAD)
    offload: tuple[str, ...] | str | None = None  # what lives under offload_dir (disk.parse_offload)
    ranks: int = 1  # data-parallel ranks sharing each unit: each holds 1/ranks of the moments and gradients
    masters_shared_by: int = 1  # ranks of one host keeping one copy of the sharded fp32 masters (shared_masters.py)
    parked_grads: int = 0  # layers' gradients the device may hold while the host has no free buffer

    @classmethod
    def of(cls, options: SlideOptions, **run) -> Settings:
        """The settings of a run with ``options`` (resolved: ``SlideOptions.resolve``) and the run's own facts ``run``
        (``batch``, ``seq``, ``compute_dtype``, ``device``, ``clipping``, ``accumulate``, ``ranks`` ...; ``kernels``
        when the model has more than the option asks for). The one place where options become planner settings."""
        tuning = options.tuning
        if tuning.resident_optimizer == "auto":
            raise ValueError("Settings.of takes resolved options: call options.resolve(...) first")
        return cls(
            **{
                "window": options.window,
                "offload_activations": options.offload_activations,
                "offload_dir": options.offload_dir,
                "offload": options.offload,
                "kernels": options.kernels,
                "resident_on_device": options.resident_on_device,
                "host_weights": tuning.host_weights,
                "grad_buffers": tuning.grad_buffers,
                "parked_grads": tuning.parked_now,
                **run,
            }
        )

    @property
    def on_disk(self) -> frozenset[str]:
        """What lives in files: ``"optimizer"`` (Adam moments) and/or ``"masters"`` (the layers' fp32 masters)."""
        from lightning_slide.engine.disk import parse_offload

        return parse_offload(self.offload, self.offload_dir)

    @property
    def frozen_apart(self) -> bool:
        """The layers' frozen parameters live in the compute dtype only (:func:`frozen_in_compute_dtype`)."""
        return frozen_in_compute_dtype(self.compute_dtype, self.ranks, "masters" in self.on_disk)

    @property
    def compute_copy(self) -> bool:
        """The host keeps a compute-dtype copy of every layer (``host_weights="compute"`` with bf16 compute, or
        whenever the masters are on disk)."""
        masters_on_disk = "masters" in self.on_disk
        return masters_on_disk or self.host_weights == "compute" and self.compute_dtype != torch.float32

    def depth(self, shape: ModelShape) -> int:
        return max(1, min(self.window, shape.layers))

    @property
    def element(self) -> int:
        return torch.empty((), dtype=self.compute_dtype).element_size()

    @property
    def cast(self) -> bool:
        """Copies go through fp32 device staging (a GPU computing in a dtype other than the masters')."""
        return self.device == "cuda" and self.compute_dtype != torch.float32


def frozen_in_compute_dtype(compute_dtype: torch.dtype, ranks: int, masters_on_disk: bool) -> bool:
    """Whether the decoder layers keep their frozen parameters only in the compute dtype (no fp32 master; 2 bytes
    per parameter in bf16; ``host.HostUnit``'s ``frozen_dtype``): with a compute dtype below fp32, one rank and the
    masters in memory. Elsewhere (fp32 compute: the master is the compute copy; several ranks; masters on disk) and
    for the resident parts every parameter keeps its fp32 master."""
    return compute_dtype != torch.float32 and ranks == 1 and not masters_on_disk


def grads_in_flight(depth: int, grad_buffers: int | None = None) -> int:
    """Layer gradient buffers the host holds at most while updates stream: ``grad_buffers``, or the window's depth
    plus :data:`GRADS_AHEAD` by default. The disk tier holds one unit more of arrays read from its files."""
    return grad_buffers if grad_buffers is not None else depth + GRADS_AHEAD


def host_available() -> int:
    """Host memory available to a new allocation now (``MemAvailable`` of ``/proc/meminfo``; elsewhere the
    physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Machine:
    """Memory sizes and rates of the machine. Memory ``None``: unknown, not checked.

    The rate defaults describe a PCIe 4.0 ×16 workstation GPU with a many-core host; give measured figures (or
    ``measure()`` them) for a real plan.
    """

    gpu_memory: int | None = None  # bytes the process may use on the GPU (gpu_memory_limit or the card's memory)
    host_memory: int | None = None  # bytes of host memory available (MemAvailable)
    disk_free: int | None = None  # bytes free under offload_dir
    h2d_bytes_per_s: float = 20e9
    d2h_bytes_per_s: float = 20e9
    disk_read_bytes_per_s: float = 2e9
    disk_write_bytes_per_s: float = 1e9
    host_adamw_params_per_s: float = 1e9
    gpu_flops: float = 150e12  # sustained bf16 matmul FLOP/s

    @classmethod
    def detect(cls, *, gpu_memory_limit: int | None = None, offload_dir: str | None = None, **rates) -> Machine:
        """Memory sizes of this machine: ``gpu_memory_limit`` or the current GPU's memory (``None`` without a GPU),
        ``MemAvailable``, free space under ``offload_dir`` (or its nearest existing parent). ``rates``: any rate
        field to set."""
        gpu = gpu_memory_limit
        if gpu is None and torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        disk = None
        if offload_dir is not None:
            path = Path(offload_dir).absolute()
            while not path.exists():
                path = path.parent
            disk = shutil.disk_usage(path).free
        return cls(gpu_memory=gpu, host_memory=host_available(), disk_free=disk, **rates)

    def measure(self, offload_dir: str | None = None, seconds: float = 0.2) -> Machine:
        """Measure the rates this machine can: host AdamW always; H2D, D2H and matmul FLOP/s with a GPU; disk read
        and write under ``offload_dir`` (one 256 MiB file, removed). Returns a copy with the measured figures."""
        from lightning_slide.engine.measure import measure_rates  # only when asked: it allocates and times

        return dataclasses.replace(self, **measure_rates(offload_dir, seconds))


# ------------------------------------------------------------------------------------------------ memory model
def layer_saved_bytes_per_token(shape: ModelShape, element: int, kernels: tuple[str, ...] = ()) -> float:
    """Bytes autograd saves per token in one decoder layer's forward (what its recompute holds for its backward).

    Counted for Hugging Face Llama/Mistral/Qwen3 layers with torch ops (``e`` = element size; H hidden, q = heads ×
    head_dim, kv = kv heads × head_dim, I intermediate):
      RMSNorm (input norm): an fp32 copy of the input when computing in bf16 (4H; none in fp32, where the input is the
      layer input already kept), the normalized input cast back (eH) and its product with the weight (eH);
      post-attention norm: the same plus, in fp32, the residual sum itself (4H in all, as the fp32 copy in bf16);
      attention (sdpa, flash/efficient): q, k, v and the output (2e·q + 2e·kv) and an fp32 log-sum-exp per head;
      Qwen3's q/k norms: (4 + e) per element of q and k plus fp32 rsqrt per head;
      SwiGLU MLP: gate, up, SiLU(gate) and the product (4e·I).
    With the package's Triton kernels: ``rmsnorm`` keeps the input and the output (eH each, no fp32 copy),
    ``swiglu`` keeps gate and up and its output (3e·I). Eager attention adds the probabilities (fp32 softmax and
    its cast: (4 + e)·heads·T per token; added by the caller, which knows T).
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    upcast = 4 if element < 4 else 0
    if "rmsnorm" in kernels:
        norms = element * h + 2 * element * h
    else:
        norms = (upcast + 2 * element) * h + (4 + 2 * element) * h
    attention = 2 * element * q + 2 * element * kv + 4 * shape.heads
    if shape.qk_norm:
        attention += (4 + element) * (q + kv) + 4 * (shape.heads + shape.kv_heads)
    mlp = (3 if "swiglu" in kernels else 4) * element * i
    return norms + attention + mlp + 8


def layer_backward_extra_bytes_per_token(shape: ModelShape, element: int) -> float:
    """Bytes per token a layer's backward holds besides its saved tensors, at its peak (the MLP's backward):
    the incoming gradient and the input gradient being built (2·eH), and gradients of gate, up and their product
    alive together (3·eI). An estimate from the order of the backward ops; calibrated by bench_plan.py."""
    return 2 * element * shape.hidden + 3 * element * shape.intermediate


def loss_head_bytes(shape: ModelShape, tokens: int, element: int, fused: bool) -> dict[str, int]:
    """Peak bytes of the output head and the loss for ``tokens`` tokens.

    Without the fused kernel (Hugging Face's loss): the logits (e·V per token) are upcast to fp32 (4V, when e < 4),
    log-softmax keeps its fp32 output (4V), and backward builds its fp32 gradient and the input gradient (4V + 4V)
    and casts it (eV): (12 + e)·V per token at the peak (live tensors counted on the CPU: 13.3 V in bf16, 14.5 V in
    fp32, where the logits stay alive through the loss).
    With ``fused_linear_cross_entropy``: one chunk of logits (at most 2^29 elements, e each), dL/dhidden (eH per
    token), the fp32 dL/dweight accumulator (4·V·H) and, in backward, its cast (e·V·H).
    """
    v, h = shape.vocab, shape.hidden
    if not fused:
        return {"loss head: logits, fp32 log-softmax and its gradient": tokens * v * (12 + element)}
    chunk = min(tokens, max(1, FUSED_CE_CHUNK_ELEMENTS // v))
    return {
        "loss head (fused): logits chunk, dL/dhidden": chunk * v * element + tokens * h * element,
        "loss head (fused): fp32 dL/dweight + its cast": v * h * (4 + element),
    }


def device_bytes(shape: ModelShape, s: Settings) -> dict[str, int]:
    """Bytes on the compute device, by item: the fixed buffers the engine allocates (always) and the activations
    (when ``s.batch`` and ``s.seq`` are known and the model's dimensions are)."""
    e = s.element
    depth = s.depth(shape)
    items = {
        # Window: `depth` slots of one flat weight buffer and one flat gradient buffer (window.py).
        "window slots (weights + gradients)": depth * (shape.layer_params + shape.layer_trainable) * e,
        # Resident parts' compute copy and gradients (engine: resident_weights, resident_grads).
        "resident weights + gradients": (shape.resident_params + shape.resident_trainable) * e,
    }
    if s.parked_grads:  # engine._park_free: this rank's shard of the largest layer's gradients, each
        items["parked layer gradients"] = s.parked_grads * -(-shape.layer_trainable // s.ranks) * e
    # fp32 master + gradient + Adam moments on the device (attach_optimizer; nothing when all of them are frozen)
    if s.resident_on_device and shape.resident_trainable:
        items["resident fp32 masters, gradients, Adam moments"] = (
            4 * shape.resident_params + 12 * shape.resident_trainable
        )
    if s.cast:  # upload_staging and download_staging (the engine allocates both whatever the layers upload)
        largest = max(shape.layer_params, shape.resident_params)
        copies = ["upload", "download"]
        if not (s.resident_on_device or s.clipping or s.accumulate > 1):
            copies.append("resident chunks")  # the update thread's own, for streamed steps' resident gradients
        if s.parked_grads:
            copies.append("parked gradients")  # the unpark stream's own
        items[f"copy staging (fp32, {' + '.join(copies)})"] = len(copies) * 4 * min(largest, STAGING_NUMEL)
    if s.batch is None or s.seq is None or not shape.has_dims:
        return items
    tokens = s.batch * s.seq
    boundary = tokens * shape.hidden * e  # one layer's input, as checkpointing keeps it
    if s.offload_activations:  # one being copied out / back, one in use
        items["layer inputs in flight (offloaded)"] = 2 * boundary
    else:
        items["layer inputs (one per layer)"] = shape.layers * boundary
    # The final norm keeps what the post-attention norm does; the head's input is its output.
    upcast = 4 if e < 4 else 0
    final = (2 * e if "rmsnorm" in s.kernels else upcast + 2 * e) * shape.hidden * tokens
    items["final norm"] = final
    items["4-D attention mask (padded batches)"] = s.batch * s.seq * s.seq
    recompute = layer_saved_bytes_per_token(shape, e, s.kernels) * tokens
    if shape.attention == "eager":
        recompute += (4 + e) * shape.heads * s.seq * tokens
    recompute += layer_backward_extra_bytes_per_token(shape, e) * tokens
    # Autograd's weight gradient of the largest matrix, before it is added into the slot's gradient buffer.
    recompute += e * shape.hidden * max(shape.intermediate, shape.heads * shape.head_dim)
    # On the CPU the fused kernel falls back to torch's loss (full logits).
    head = loss_head_bytes(shape, tokens, e, FUSED_CE in s.kernels and s.device == "cuda")
    # The loss head's peak (before the layers' backward) and one layer's recompute + backward do not overlap.
    if sum(head.values()) >= recompute:
        items.update(head)
    else:
        items["one layer's recompute + backward"] = int(recompute)
    return {k: int(v) for k, v in items.items()}


def _host_updated_trainable(shape: ModelShape, s: Settings) -> int:
    return shape.layers * shape.layer_trainable + (0 if s.resident_on_device else shape.resident_trainable)


def host_bytes(shape: ModelShape, s: Settings) -> dict[str, int]:
    """Bytes of host memory, by item (page-locked on a GPU machine where marked)."""
    depth = s.depth(shape)
    pinned = " (page-locked)" if s.device == "cuda" else ""
    items = {
        "runtime (Python, torch, CUDA context)": RUNTIME_HOST_BYTES.get(s.device, RUNTIME_HOST_BYTES["cpu"]),
    }
    on_disk = s.on_disk
    if "masters" in on_disk:  # HostUnit.master of the resident parts only; the layers' are files
        items["fp32 masters (resident parts)" + pinned] = 4 * shape.resident_params
    elif s.frozen_apart:  # HostUnit.master: all but the layers' frozen parameters (one rank)
        items["fp32 masters" + pinned] = 4 * (shape.params - shape.layers_frozen)
    else:  # HostUnit.master of every unit (host.py); one copy per host of the sharded units when shared
        replicated = shape.resident_params if s.resident_on_device and s.ranks > 1 else 0
        items["fp32 masters" + pinned] = int(4 * (shape.params - replicated) / s.masters_shared_by) + 4 * replicated
    element = s.element if s.compute_dtype != torch.float32 or "masters" not in on_disk else 4
    if s.compute_copy:  # HostUnit.weights of every layer (with frozen_apart, its frozen part is their only home)
        items["layer compute copies" + pinned] = shape.layers * shape.layer_params * element
    elif s.frozen_apart and shape.layers_frozen:  # HostUnit.frozen of every layer
        items["layer frozen weights (compute dtype)" + pinned] = shape.layers_frozen * element
    host_updated = _host_updated_trainable(shape, s)
    share = 1 / s.ranks  # with several ranks each keeps its shard of what follows (shard.py)
    if "optimizer" not in on_disk:  # UnitOptimizer.state: exp_avg, exp_avg_sq (fp32) per host-updated unit
        items["Adam moments (fp32)"] = int(8 * host_updated * share)
    if on_disk:  # StateStore: at most grad_buffers + 1 units' arrays read in (the largest units, at worst)
        moments = 8 if "optimizer" in on_disk else 0
        masters = 4 if "masters" in on_disk else 0
        units = [moments * shape.layer_trainable + masters * shape.layer_params] * shape.layers
        units += [] if s.resident_on_device else [moments * shape.resident_trainable]
        what = " + ".join(n for n, b in (("Adam moments", moments), ("fp32 masters", masters)) if b)
        items[f"{what} in flight (disk tier)"] = int(
            sum(sorted(units)[-(grads_in_flight(depth, s.grad_buffers) + 1) :]) * share
        )
    # GradientPool: with clipping or accumulation every layer keeps its fp32 gradients until the step (but for
    # those parked on the device, parked_grads, with one micro-batch per step: they come down after the step, at
    # most window + 2 at a time); otherwise updates stream out of the backward and at most window + 2 are lent.
    streaming = not s.clipping and s.accumulate == 1
    in_flight = grads_in_flight(depth, s.grad_buffers)
    if streaming:
        holders = min(shape.layers, in_flight)
    elif s.accumulate == 1:
        holders = min(shape.layers, max(shape.layers - s.parked_grads, in_flight))
    else:
        holders = shape.layers
    items["layer gradient buffers (fp32)" + pinned] = int(4 * holders * shape.layer_trainable * share)
    resident_grads = int(4 * shape.resident_trainable * share)
    if s.resident_on_device:
        pass  # updated on the device, they accumulate there
    elif (
        streaming
    ):  # engine._chunk_buffer: a streamed step reads them from the device in half-layer chunks, two at a time
        items["resident gradient chunk (fp32)" + pinned] = min(resident_grads, int(4 * shape.layer_trainable * share))
    else:  # engine._resident_accumulator
        items["resident gradient accumulator (fp32)" + pinned] = resident_grads
    if s.accumulate > 1:  # engine._staging: one per window slot (and the resident parts when updated on the host)
        resident = 0 if s.resident_on_device else shape.resident_trainable
        items["accumulation staging (fp32)" + pinned] = int(4 * (depth * shape.layer_trainable + resident) * share)
    if s.offload_activations and s.batch is not None and s.seq is not None and shape.hidden is not None:
        # ActivationOffload allocates through torch's pinned allocator, which rounds each block up to a power of 2.
        size = s.batch * s.seq * shape.hidden * s.element
        if s.device == "cuda":
            size = 1 << (size - 1).bit_length()
        items["offloaded layer inputs" + pinned] = shape.layers * size
    if s.device != "cuda":  # the compute device is the CPU: its buffers are host memory too
        items["compute-device buffers (the device is the CPU)"] = sum(device_bytes(shape, s).values())
    return items


def disk_bytes(shape: ModelShape, s: Settings) -> dict[str, int]:
    """Bytes in ``offload_dir``: the Adam moments of every host-updated unit and/or the layers' fp32 masters
    (disk.py's files)."""
    items = {}
    if "optimizer" in s.on_disk:
        items["Adam moments (fp32 files)"] = int(8 * _host_updated_trainable(shape, s) / s.ranks)  # this rank's
    if "masters" in s.on_disk:
        items["layer fp32 masters (files)"] = 4 * shape.layers * shape.layer_params
    return items


def step_times(shape: ModelShape, s: Settings, m: Machine) -> dict[str, float]:
    """Seconds per optimizer step of each resource, alone: the step takes at least the largest.

    GPU compute: 8·N·tokens FLOPs per micro-batch (forward 2, backward 4, recompute 2; N = the layers' and the
    head's parameters). H2D: every layer's weights twice per micro-batch (forward and recompute; the fp32 masters,
    4 B/param, or with ``host_weights="compute"`` the compute copy, 2 B/param in bf16; frozen parameters kept in
    the compute dtype, 2 B/param),
    the resident parts once per step when updated on the host, offloaded layer inputs coming back. D2H: fp32
    gradients (4 B/param, cast on the device) per micro-batch, offloaded layer inputs going out. Host AdamW: every
    host-updated parameter once per step. Disk: the Adam moments read and written once per step.
    With several ranks on one host (``s.ranks``): each GPU moves its shard of the weights and gradients over its
    own link (the all-gathers and reduce-scatters between GPUs are not counted), while the host's AdamW and its disk
    serve every rank.
    """
    a = s.accumulate
    tokens = (s.batch or 0) * (s.seq or 0)
    layer_params = shape.layers * shape.layer_params
    head = shape.vocab * shape.hidden if shape.has_dims else shape.resident_params
    resident_host = 0 if s.resident_on_device else 1
    offloaded = shape.layers * tokens * (shape.hidden or 0) * s.element if s.offload_activations else 0
    upload = s.element if s.compute_copy else 4  # bytes per layer parameter per upload
    # One upload of every layer; frozen parameters kept in the compute dtype go up as they are.
    frozen = shape.layers_frozen if s.frozen_apart else 0
    layer_upload = upload * (layer_params - frozen) + s.element * frozen
    times = {
        "GPU compute (8·N·tokens)": a * 8 * (layer_params + head) * tokens / m.gpu_flops,
        "H2D weights (forward + recompute)": (
            a * (2 * layer_upload / s.ranks + offloaded) + resident_host * 4 * shape.resident_params / s.ranks
        )
        / m.h2d_bytes_per_s,
        "D2H gradients (fp32)": a
        * (
            (4 * shape.layers * shape.layer_trainable + resident_host * 4 * shape.resident_trainable) / s.ranks
            + offloaded
        )
        / m.d2h_bytes_per_s,
        "host AdamW": _host_updated_trainable(shape, s) / m.host_adamw_params_per_s,
    }
    files = sum(disk_bytes(shape, s).values()) * s.ranks  # every rank's, each read and written once per step
    if files:
        what = " + ".join(
            n for n in ("Adam moments", "masters") if any(n.split()[-1] in k for k in disk_bytes(shape, s))
        )
        times[f"disk read ({what})"] = files / m.disk_read_bytes_per_s
        times[f"disk write ({what})"] = files / m.disk_write_bytes_per_s
    if not tokens:
        del times["GPU compute (8·N·tokens)"]
    return times


# ------------------------------------------------------------------------------------------------ the plan
class PlanError(ValueError):
    """A plan that cannot fit the machine; the message gives the numbers and what to change."""


@dataclass
class Plan:
    """Predicted memory (bytes, by item) and step time (seconds per optimizer step, by resource) of one run."""

    shape: ModelShape
    settings: Settings
    machine: Machine
    gpu: dict[str, int]
    host: dict[str, int]
    disk: dict[str, int]
    time: dict[str, float]
    suggested_batch: int | None = None  # largest batch (at this window) that fits; None: not searched / none fits
    suggested_window: int | None = None  # largest window (at this batch) that fits
    suggested_parked_grads: int | None = None  # most parked layer gradients (at this batch and window) that fit
    notes: list[str] = field(default_factory=list)
    searched: bool = False  # the suggestions were searched for

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def disk_total(self) -> int:
        return sum(self.disk.values())

    @property
    def step_seconds(self) -> float:
        return max(self.time.values()) if self.time else 0.0

    @property
    def binding(self) -> str | None:
        """The resource that bounds the step time."""
        return max(self.time, key=self.time.get) if self.time else None

    @property
    def tokens_per_second(self) -> float | None:
        s = self.settings
        if not s.batch or not s.seq or not self.step_seconds:
            return None
        return s.accumulate * s.batch * s.seq / self.step_seconds

    def problems(self) -> list[str]:
        """Each memory tier that does not fit, as one line with the numbers."""
        m, out = self.machine, []
        gpu_limit = m.gpu_memory if self.settings.device == "cuda" or m.gpu_memory is not None else None
        for name, total, limit in (
            ("GPU", self.gpu_total, gpu_limit),
            ("host", self.host_total, m.host_memory),
            ("disk", self.disk_total, m.disk_free),
        ):
            if limit is not None and total > limit:
                out.append(f"{name}: needs {human(total)}, more than the {human(limit)} available")
        return out

    def advice(self) -> list[str]:
        """What to change, for the tiers that do not fit."""
        s, tips = self.settings, []
        problems = " ".join(self.problems())
        if "GPU" in problems:
            if s.batch is not None:
                tips.append(
                    f"lower the batch size (now {s.batch}"
                    + (f"; at most {self.suggested_batch} fits)" if self.suggested_batch else ")")
                )
            tips.append(f"lower the window (now {s.window})")
            if s.resident_on_device:
                tips.append("set tuning.resident_optimizer='host'")
            if not s.offload_activations and s.batch is not None:
                tips.append("set offload_activations=True")
            if FUSED_CE not in s.kernels and any(k.startswith("loss head") for k in self.gpu):
                tips.append("use kernels='all' (the fused cross-entropy never builds the logits)")
            tips.append("raise gpu_memory_limit or use a larger GPU")
        if "host" in problems:
            if s.offload_dir is None:
                tips.append("set offload_dir (the Adam moments go to disk: 8 bytes/parameter less)")
            elif "masters" not in s.on_disk:
                tips.append("set offload='both' (the layers' fp32 masters go to disk too: down to 2 bytes/parameter)")
            if s.offload_activations:
                tips.append("set offload_activations=False or lower the batch size")
            tips.append("free host memory or use a machine with more")
        if "disk" in problems:
            tips.append("free disk space, choose another offload_dir, or set offload_dir=None")
        return tips

    def check(self) -> None:
        """Raise :class:`PlanError` with the numbers and what to change when a tier does not fit."""
        problems = self.problems()
        if problems:
            raise PlanError(
                "slideformer cannot fit this run: "
                + "; ".join(problems)
                + ".\n"
                + self.table()
                + "\nTo fit: "
                + "; ".join(self.advice())
                + "."
            )

    def table(self) -> str:
        """The plan as a readable table: every item with bytes and human units, the totals against the machine,
        the step-time terms and the one that binds, and the suggestions."""
        s = self.settings
        rows = [f"{'item':<58} {'bytes':>16}"]

        def block(title: str, items: dict[str, int], limit: int | None) -> None:
            rows.append(f"-- {title}")
            rows.extend(f"  {k:<56} {v:>16,}  {human(v):>10}" for k, v in items.items())
            total = sum(items.values())
            against = f"  (of {human(limit)}: {'fits' if total <= limit else 'DOES NOT FIT'})" if limit else ""
            rows.append(f"  {'total':<56} {total:>16,}  {human(total):>10}{against}")

        block("GPU (peak)", self.gpu, self.machine.gpu_memory)
        block("host (peak)", self.host, self.machine.host_memory)
        if self.disk:
            block("disk (offload_dir)", self.disk, self.machine.disk_free)
        rows.append("-- step time lower bound (per optimizer step; each resource alone)")
        rows.extend(
            f"  {k:<56} {_seconds(v):>16}" + ("  <- binds" if k == self.binding else "") for k, v in self.time.items()
        )
        if self.tokens_per_second:
            rows.append(
                f"  {'step bound':<56} {_seconds(self.step_seconds):>16}  "
                f"({self.tokens_per_second:,.0f} tokens/s at most)"
            )
        if self.searched:
            rows.append(f"-- suggestions (GPU peak at most {SUGGEST_MARGIN:.0%} of the GPU, host within its memory)")
            if s.seq is not None and self.machine.gpu_memory is not None:
                rows.append(f"  largest batch at window {s.window}, seq {s.seq}: {self.suggested_batch or 'none fits'}")
            rows.append(f"  largest window at batch {s.batch}: {self.suggested_window or 'none fits'}")
            if self.suggested_parked_grads:
                rows.append(
                    f"  most layer gradients parked on the GPU (parked_grads) at batch {s.batch}, window "
                    f"{s.window}: {self.suggested_parked_grads}"
                )
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """Everything as plain Python (JSON-ready)."""
        return {
            "shape": dataclasses.asdict(self.shape),
            "settings": {**dataclasses.asdict(self.settings), "compute_dtype": str(self.settings.compute_dtype)},
            "machine": dataclasses.asdict(self.machine),
            "gpu": self.gpu,
            "host": self.host,
            "disk": self.disk,
            "time": self.time,
            "gpu_total": self.gpu_total,
            "host_total": self.host_total,
            "disk_total": self.disk_total,
            "step_seconds": self.step_seconds,
            "binding": self.binding,
            "tokens_per_second": self.tokens_per_second,
            "suggested_batch": self.suggested_batch,
            "suggested_window": self.suggested_window,
            "suggested_parked_grads": self.suggested_parked_grads,
            "problems": self.problems(),
            "notes": self.notes,
        }


def _fits(shape: ModelShape, s: Settings, m: Machine, margin: float) -> bool:
    gpu_ok = m.gpu_memory is None or sum(device_bytes(shape, s).values()) <= margin * m.gpu_memory
    host_ok = m.host_memory is None or sum(host_bytes(shape, s).values()) <= m.host_memory
    return gpu_ok and host_ok


def largest_batch(
    shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN, most: int = 2**16
) -> int | None:
    """The largest batch size (at ``s.seq`` and ``s.window``) whose GPU peak is at most ``margin`` of the GPU and
    whose host peak fits; ``None`` when not even 1 fits (or ``s.seq`` is unknown)."""
    if m.gpu_memory is None or s.seq is None or not shape.has_dims:
        return None
    if not _fits(shape, dataclasses.replace(s, batch=1), m, margin):
        return None
    low, high = 1, most  # memory grows with the batch: bisect
    while low < high:
        mid = (low + high + 1) // 2
        if _fits(shape, dataclasses.replace(s, batch=mid), m, margin):
            low = mid
        else:
            high = mid - 1
    return low


def largest_window(shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN) -> int | None:
    """The largest window (at ``s.batch``) that fits as :func:`largest_batch` says; ``None`` when not even 1 does."""
    fitting = [w for w in range(1, shape.layers + 1) if _fits(shape, dataclasses.replace(s, window=w), m, margin)]
    return fitting[-1] if fitting else None


def largest_parking(shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN) -> int | None:
    """The most layers' gradients that may park on the GPU (``parked_grads``, at ``s.batch`` and ``s.window``) with
    the run still fitting as :func:`largest_batch` says; ``None`` when parking does not apply (several micro-batches
    per step), the GPU or the activations are unknown, or the run does not fit even without parking."""
    if s.accumulate > 1 or m.gpu_memory is None or s.batch is None or s.seq is None or not shape.has_dims:
        return None
    fitting = [p for p in range(shape.layers + 1) if _fits(shape, dataclasses.replace(s, parked_grads=p), m, margin)]
    return fitting[-1] if fitting else None


def make_plan(shape: ModelShape, settings: Settings, machine: Machine | None = None, *, suggest: bool = True) -> Plan:
    """The plan of a run: memory by tier and item, step-time terms, and (``suggest``) the largest batch and window
    that fit ``machine`` (sizes ``None`` are not checked)."""
    machine = machine or Machine()
    plan = Plan(
        shape,
        settings,
        machine,
        device_bytes(shape, settings),
        host_bytes(shape, settings),
        disk_bytes(shape, settings),
        step_times(shape, settings, machine),
    )
    if not shape.has_dims:
        plan.notes.append("no model config with hidden_size etc. was found: activations are not planned")
    elif settings.batch is None or settings.seq is None:
        plan.notes.append("batch and sequence length unknown: activations are not planned")
    if suggest:
        plan.suggested_batch = largest_batch(shape, settings, machine)
        plan.suggested_window = largest_window(shape, settings, machine)
        plan.suggested_parked_grads = largest_parking(shape, settings, machine)
        plan.searched = True
    return plan


def check_device(items: dict[str, int], limit: int, window: int) -> None:
    """Raise :class:`PlanError` when the device buffers ``items`` exceed ``limit`` bytes (the engine's own check of
    its fixed buffers, before it allocates them)."""
    total = sum(items.values())
    if total <= limit:
        return
    lines = "\n".join(f"  {name}: {human(size)}" for name, size in items.items())
    raise PlanError(
        f"slideformer needs {human(total)} of device memory before any activation, more than the "
        f"{human(limit)} allowed:\n{lines}\nLower the window (now {window}), set tuning.resident_optimizer='host', "
        "or raise gpu_memory_limit."
    )
