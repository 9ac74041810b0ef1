"""Sharded (FSDP2 / torch.distributed.checkpoint) checkpoints to single files that one device loads.

Under ``xm2.parallel.FSDP2Strategy`` a checkpoint ``step=N.ckpt`` is a folder: each rank's shard
of the weights and optimizer state (``__<rank>_0.distcp``, ``.metadata``) and, from rank 0,
``meta.pt`` with everything else (loop and callback state, hyperparameters, the xm2 record).
:func:`consolidate_checkpoint` joins the weight shards into full tensors and writes an ordinary
Lightning checkpoint file with ``meta.pt``'s contents, atomically and with its digest record, so
``xm2 validate``, the analysis tools and exports load it on one device. The optimizer state stays
behind: a run continues from the sharded folder itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from xm2.checkpoint import load_weights_only, save_checkpoint_file, sharded_metadata
from xm2.errors import CheckpointError

META_FILE = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META_FILE).is_file()


def load_sharded_checkpoint(path: str | Path) -> dict:
    """A sharded checkpoint folder as one checkpoint dict with full, unsharded weights."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a sharded checkpoint: one is a folder holding .metadata, "
            f"{META_FILE} and __<rank>_0.distcp files, as FSDP2 runs write them")
    checkpoint = sharded_metadata(path)  # weights_only: refused by name if it needs more
    with tempfile.TemporaryDirectory() as scratch:
        joined = Path(scratch) / "joined.pt"
        # DCP unpickles the shards' non-tensor entries (and .metadata) itself, without
        # weights_only: a sharded folder is trusted as a run's own; what it yields is checked.
        dcp_to_torch_save(path, joined)
        state = load_weights_only(joined, what=f"the file joined from the shards of {path}")
    checkpoint["state_dict"] = {name: tensor.contiguous() for name, tensor in state["state_dict"].items()}
    return checkpoint


def consolidate_checkpoint(checkpoint: str, output: str | None = None) -> str:
    """Join a sharded (FSDP2) checkpoint folder into one file that a single device loads.

    The weights become full tensors; the run's record, hyperparameters and loop state are kept,
    the sharded optimizer state is not (continue training from the folder itself). The file is
    written atomically with its digest record beside it, like every xm2 checkpoint.

    Args:
        checkpoint: The checkpoint folder, e.g. artifacts/runs/<experiment>/<run>/checkpoints/step=60.ckpt.
        output: The file to write; default the folder's name with .consolidated.ckpt beside it.
    """
    source = Path(checkpoint)
    target = Path(output) if output else source.with_name(f"{source.stem}.consolidated.ckpt")
    if target.resolve() == source.resolve():
        raise CheckpointError(f"--output {target} is the sharded checkpoint itself; name a new file")
    joined = load_sharded_checkpoint(source)
    save_checkpoint_file(joined, target)
    parameters = sum(t.numel() for t in joined["state_dict"].values())
    print(f"{target}: {len(joined['state_dict'])} tensors, {parameters:,} parameters, "
          f"step {joined.get('global_step')}")
    return str(target)
