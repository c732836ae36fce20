"""Directory checkpoints in safetensors, and export to a Hugging Face model directory.

A slideformer checkpoint is a directory (named like a Lightning checkpoint, e.g. ``last.ckpt``, so that
``ModelCheckpoint`` finds and rotates it)::

    last.ckpt/
      model/resident.safetensors        fp32 masters of the resident parts (embeddings, norm, head) and the buffers
      model/layer-00000.safetensors     fp32 masters of decoder layer 0, one file per layer ...
      optimizer/resident.safetensors    optimizer state per parameter: "<parameter name>/exp_avg", ".../exp_avg_sq",
      optimizer/layer-00000.safetensors "<parameter name>/step" ... (absent in weights-only checkpoints)
      meta.pt                           Lightning's metadata (loops, schedulers, callbacks, hyperparameters, epoch,
                                        global step, optimizer param groups) with every tensor taken out
      meta.safetensors                  the tensors taken out of the metadata (e.g. ModelCheckpoint's scores)
      hf_config.json                    the Hugging Face config of the model inside the module, when there is one
      index.json                        written last: the format, every file with its size, tied-weight aliases

Saving writes one unit (layer) at a time from the tensors in place, so host memory never holds a second copy of the
model or optimizer. It writes into a hidden sibling directory (``.last.ckpt.tmp``), fsyncs every file and the
directories, and only then swaps it into place (one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux), so an
interrupted save never replaces or damages the previous checkpoint. ``index.json`` is the completion marker: a
directory without it is refused on load with an error saying so. A temporary directory left by an interrupted save
is never taken for a checkpoint (its name does not end in ``.ckpt``) and is removed by the next save to that path;
a save stopped by an exception or Ctrl+C removes it at once.

Loading maps the files (``read_mapped``): tensors are read as they are used, so the state dict of a model larger
than host memory costs no memory until it is copied into the module. Outside the strategy, ``load_from_checkpoint``
builds a LightningModule from a checkpoint (Lightning's own ``_load_state``), ``SlideCheckpointIO`` lets other
Lightning strategies read directories, and ``checkpoint_to_lightning`` writes one single-file Lightning checkpoint.

``export_hf`` writes a model as a Hugging Face directory; ``checkpoint_to_hf`` converts a checkpoint directory into
one (``python -m lightning_slide.checkpoint CKPT OUT [--dtype bfloat16]``; ``--lightning`` writes a Lightning file).

The package, one idea a module: ``format`` (file names, ``index.json`` and its validation, the metadata's tensors),
``writing`` (atomic saving), ``reading`` (``CheckpointReader``, mapped reading, ``load``), ``lightning_io`` (Lightning
checkpoint dicts and files for code outside the strategy), ``hf_export`` (Hugging Face export) and ``cli`` (the
command line). Everything public is imported from here.
"""

from lightning_slide.checkpoint.cli import _main
from lightning_slide.checkpoint.format import (
    DELAY_ENV,
    FORMAT,
    HF_CONFIG,
    INDEX,
    META,
    META_TENSORS,
    READER_KEY,
    RESIDENT,
    VERSION,
    is_checkpoint_dir,
    temp_path,
    unit_file,
    verify,
)
from lightning_slide.checkpoint.hf_export import checkpoint_to_hf, export_hf, hf_info
from lightning_slide.checkpoint.lightning_io import (
    SlideCheckpointIO,
    checkpoint_to_lightning,
    lightning_checkpoint,
    load_from_checkpoint,
)
from lightning_slide.checkpoint.reading import CheckpointReader, load, read_mapped
from lightning_slide.checkpoint.writing import LazyOptimizerState, optimizer_read_order, remove, save

__all__ = [
    "DELAY_ENV",
    "FORMAT",
    "HF_CONFIG",
    "INDEX",
    "META",
    "META_TENSORS",
    "READER_KEY",
    "RESIDENT",
    "VERSION",
    "CheckpointReader",
    "LazyOptimizerState",
    "SlideCheckpointIO",
    "_main",
    "checkpoint_to_hf",
    "checkpoint_to_lightning",
    "export_hf",
    "hf_info",
    "is_checkpoint_dir",
    "lightning_checkpoint",
    "load",
    "load_from_checkpoint",
    "optimizer_read_order",
    "read_mapped",
    "remove",
    "save",
    "temp_path",
    "unit_file",
    "verify",
]
