"""Find the decoder blocks of a model and the resident parts around them.

The engine slides over one ``nn.ModuleList`` of identical blocks (the decoder layers); every parameter outside it
(embeddings, final norm, output head) is *resident*: it stays on the compute device for the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Where the decoder layers of the supported Hugging Face families sit, relative to the causal-LM model.
# Llama, Mistral, Qwen2, Qwen3 and Gemma(1, 2, 3-text) all use `model.layers`; the generic search below finds the
# same list for them and for any model built the same way — the table only makes the common case explicit.
_KNOWN_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


@dataclass(frozen=True)
class ModelParts:
    """The split of a model into slid blocks and resident parameters.

    Attributes:
        blocks_path: dotted path of the block list inside the root module.
        blocks: the decoder layers, in execution order.
        resident: ``(name, parameter)`` for every unique parameter outside the blocks.
    """

    blocks_path: str
    blocks: nn.ModuleList
    resident: list[tuple[str, nn.Parameter]]

    def block_parameters(self, index: int) -> list[tuple[str, nn.Parameter]]:
        prefix = f"{self.blocks_path}.{index}."
        return [(prefix + name, p) for name, p in self.blocks[index].named_parameters()]

    def check_unshared(self) -> None:
        """Each decoder layer must own its parameters: a parameter in two units would have two masters."""
        seen: dict[int, str] = {}
        units = {
            "the resident parts": self.resident,
            **{f"layer {i}": self.block_parameters(i) for i in range(len(self.blocks))},
        }
        for unit, params in units.items():
            for name, param in params:
                if seen.get(id(param), unit) != unit:
                    raise ValueError(
                        f"parameter {name} is shared between {seen[id(param)]} and {unit}; slideformer needs each "
                        "decoder layer to own its parameters"
                    )
                seen[id(param)] = unit


def _identical_blocks(modules: nn.ModuleList) -> bool:
    if len(modules) == 0:
        return False
    first = modules[0]
    shapes = [(n, p.shape) for n, p in first.named_parameters()]
    if not shapes:
        return False
    return all(type(m) is type(first) and [(n, p.shape) for n, p in m.named_parameters()] == shapes for m in modules)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_parts(root: nn.Module, blocks_path: str | None = None) -> ModelParts:
    """Locate the decoder blocks of ``root`` (a LightningModule or any module holding a causal LM).

    Args:
        root: the module whose parameters are trained.
        blocks_path: dotted path of the ``nn.ModuleList`` of blocks inside ``root`` (e.g. ``"model.model.layers"``).
            Default ``None``: search for the list of identical blocks holding the most parameters.

    Raises:
        ValueError: if no list of identical blocks exists, or ``blocks_path`` does not name one.
    """
    if blocks_path is not None:
        try:
            blocks = root.get_submodule(blocks_path)
        except AttributeError as err:
            raise ValueError(
                f"blocks={blocks_path!r} does not name a submodule of {type(root).__name__}: {err}"
            ) from err
        if not isinstance(blocks, nn.ModuleList) or not _identical_blocks(blocks):
            raise ValueError(
                f"blocks={blocks_path!r} must name an nn.ModuleList of identical blocks with parameters, "
                f"found {type(blocks).__name__}"
            )
    else:
        candidates = [
            (name, module)
            for name, module in root.named_modules()
            if isinstance(module, nn.ModuleList) and _identical_blocks(module)
        ]
        if not candidates:
            raise ValueError(
                f"Cannot find the decoder layers of {type(root).__name__}: slideformer slides over one nn.ModuleList "
                "of identical blocks (as in Llama, Qwen2, Qwen3, Mistral and Gemma models). Pass "
                "SlideFormerStrategy(blocks='dotted.path.to.layers') if your model keeps them elsewhere."
            )
        known = [c for c in candidates if any(c[0] == p or c[0].endswith("." + p) for p in _KNOWN_LAYER_PATHS)]
        blocks_path, blocks = max(known or candidates, key=lambda c: _numel(c[1]))

    in_blocks = {id(p) for p in blocks.parameters()}
    resident = [(name, p) for name, p in root.named_parameters() if id(p) not in in_blocks]
    return ModelParts(blocks_path=blocks_path, blocks=blocks, resident=resident)
