"""jaxserve's own checkpoint format: an orbax PyTree of the stacked params plus config and tokenizer.

Layout of a checkpoint directory:
    jaxserve.json       {"format": "jaxserve-orbax", "version": 1, "dtype": ...}
    model_config.json   ModelConfig as JSON
    params/             orbax StandardCheckpointer tree (the model's pure-dict state)
    tokenizer.json, tokenizer_config.json
Restoring reads each array straight into the sharding asked for.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError

FORMAT = "jaxserve-orbax"
log = logging.getLogger(__name__)


def is_orbax_checkpoint(path: Path) -> bool:
    return (Path(path) / "jaxserve.json").is_file()


def check_destination(dst: Path) -> Path:
    """The absolute destination of a new checkpoint; CheckpointError if something is already there."""
    dst = Path(dst).absolute()
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; remove it or choose another destination")
    return dst


def save_orbax(dst: Path, cfg: ModelConfig, params: dict, tokenizer, dtype: str):
    """Writes the checkpoint into a temporary sibling and renames it, so `dst` is never half-written."""
    dst = check_destination(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        (tmp / "model_config.json").write_text(cfg.to_json())
        if tokenizer is not None:
            tokenizer.save(tmp)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", jax.tree.map(np.asarray, params))
        ckptr.wait_until_finished()
        (tmp / "jaxserve.json").write_text(json.dumps({"format": FORMAT, "version": 1, "dtype": dtype}))
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_orbax_config(path: Path) -> ModelConfig:
    try:
        info = json.loads((Path(path) / "jaxserve.json").read_text())
        if info.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a jaxserve checkpoint (format {info.get('format')!r})")
        return ModelConfig.from_json((Path(path) / "model_config.json").read_text())
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is a corrupt jaxserve checkpoint ({e})") from None


def restore_orbax(path: Path, abstract_params: dict) -> dict:
    """abstract_params: pytree of jax.ShapeDtypeStruct (with .sharding) -> restored jax arrays."""
    try:
        return ocp.StandardCheckpointer().restore(Path(path).absolute() / "params", abstract_params)
    except (FileNotFoundError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is a corrupt jaxserve checkpoint ({first_line})") from None
