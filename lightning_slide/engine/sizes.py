"""The planner's memory model: bytes on the GPU, in host memory and on disk of a slideformer run, by item.

Every figure is derived from the engine's actual allocations (see each item's comment) and, for activations, from
the tensors autograd saves in one decoder layer (counted with ``saved_tensors_hooks`` on the CPU for Llama, Qwen3
and Mistral layers; ``tests/core/test_plan.py`` recounts them). Its inputs: the model's :class:`ModelShape` and the
run's :class:`Settings`. Also the units of memory sizes (:func:`parse_bytes`, :func:`human`).

Units: bytes for memory. ``e`` below is the compute dtype's element size (2 for bf16, 4 for fp32); ``tokens`` =
batch × sequence length of one micro-batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
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
    def resident_frozen(self) -> int:
        """Resident parameters kept apart with the layers' frozen ones (``Settings.frozen_apart``): all of them when
        none is trained (a LoRA run's embeddings and head)."""
        return self.resident_params if not self.resident_trainable else 0

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


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


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
    moments_dtype: torch.dtype = torch.float32  # the optimizer's (lightning_slide.optim.AdamW keeps them in bf16)
    device_layers: int = 0  # the first layers kept and updated on the device (tuning.device_layers)

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
                "device_layers": tuning.device_layers_now,
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
        return max(1, min(self.window, self.sliding(shape)))

    def sliding(self, shape: ModelShape) -> int:
        """Layers that slide through the window (the others are kept on the device)."""
        return shape.layers - self.device_layers

    @property
    def moment_element(self) -> int:
        return torch.empty((), dtype=self.moments_dtype).element_size()

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
    masters in memory; the resident parts too when none of them is trained (``ModelShape.resident_frozen``).
    Elsewhere (fp32 compute: the master is the compute copy; several ranks; masters on disk) every parameter keeps
    its fp32 master."""
    return compute_dtype != torch.float32 and ranks == 1 and not masters_on_disk


def grads_in_flight(depth: int, grad_buffers: int | None = None) -> int:
    """Layer gradient buffers the host holds at most while updates stream: ``grad_buffers``, or the window's depth
    plus :data:`GRADS_AHEAD` by default. The disk tier holds one unit more of arrays read from its files."""
    return grad_buffers if grad_buffers is not None else depth + GRADS_AHEAD


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
    state = 4 + 2 * s.moment_element  # per trainable parameter: the fp32 gradient accumulator and the moments
    if s.resident_on_device and shape.resident_trainable:
        items["resident fp32 masters, gradients, Adam moments"] = (
            4 * shape.resident_params + state * shape.resident_trainable
        )
    if s.device_layers:  # device_units.DeviceUnit.layer: compute copy and gradients, fp32 masters and state
        layer = (e + 4) * shape.layer_params + (e + state) * shape.layer_trainable
        items["layers kept on the device (weights, gradients, fp32 masters, Adam moments)"] = s.device_layers * layer
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


def host_updated_trainable(shape: ModelShape, s: Settings) -> int:
    return s.sliding(shape) * shape.layer_trainable + (0 if s.resident_on_device else shape.resident_trainable)


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
    elif s.frozen_apart:  # HostUnit.master: all but the frozen parameters kept apart (one rank)
        items["fp32 masters" + pinned] = 4 * (shape.params - shape.layers_frozen - shape.resident_frozen)
    else:  # HostUnit.master of every unit (host.py); one copy per host of the sharded units when shared
        replicated = shape.resident_params if s.resident_on_device and s.ranks > 1 else 0
        items["fp32 masters" + pinned] = int(4 * (shape.params - replicated) / s.masters_shared_by) + 4 * replicated
    element = s.element if s.compute_dtype != torch.float32 or "masters" not in on_disk else 4
    if s.compute_copy:  # HostUnit.weights of every layer (with frozen_apart, its frozen part is their only home)
        items["layer compute copies" + pinned] = shape.layers * shape.layer_params * element
    elif s.frozen_apart and shape.layers_frozen:  # HostUnit.frozen of every layer
        items["layer frozen weights (compute dtype)" + pinned] = shape.layers_frozen * element
    if s.frozen_apart and shape.resident_frozen:  # HostUnit.frozen of the resident unit
        items["resident frozen weights (compute dtype)" + pinned] = shape.resident_frozen * element
    host_updated = host_updated_trainable(shape, s)
    share = 1 / s.ranks  # with several ranks each keeps its shard of what follows (shard.py)
    if "optimizer" not in on_disk:  # UnitOptimizer.state: exp_avg, exp_avg_sq per host-updated unit
        moment, name = torch.empty((), dtype=s.moments_dtype).element_size(), _DTYPE_NAMES.get(s.moments_dtype)
        items[f"Adam moments ({name})"] = int(2 * moment * host_updated * share)
    if on_disk:  # StateStore: at most grad_buffers + 1 units' arrays read in (the largest units, at worst)
        moments = 2 * s.moments_dtype.itemsize if "optimizer" in on_disk else 0  # the files' dtype
        masters = 4 if "masters" in on_disk else 0
        units = [moments * shape.layer_trainable + masters * shape.layer_params] * s.sliding(shape)
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
    sliding = s.sliding(shape)
    if streaming:
        holders = min(sliding, in_flight)
    elif s.accumulate == 1:
        holders = min(sliding, max(sliding - s.parked_grads, in_flight))
    else:
        holders = sliding
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
    if "optimizer" in s.on_disk:  # in the optimizer's state dtype
        name = _DTYPE_NAMES.get(s.moments_dtype, str(s.moments_dtype))
        moments = 2 * s.moments_dtype.itemsize * host_updated_trainable(shape, s)
        items[f"Adam moments ({name} files)"] = int(moments / s.ranks)  # this rank's
    if "masters" in s.on_disk:
        items["layer fp32 masters (files)"] = 4 * shape.layers * shape.layer_params
    return items
