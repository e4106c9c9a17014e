"""Device meshes from `--mesh tp=N[,ep=E][,dp=M]`, parsed once into a MeshSpec.

tp: tensor parallelism inside one engine (weights, KV heads and FFN split over tp devices).
ep: expert parallelism inside one engine (an MoE model's experts split over ep groups of tp devices;
    attention and the KV pages are not split over ep, only over tp, so ep adds no KV capacity).
dp: independent engine replicas (as vLLM's data-parallel serving), each over its own ep x tp devices.
A deployment is one device mesh with named axes (dp, ep, tp); each replica's engine runs on its
row, a sub-mesh with axes (ep, tp) — just (tp,) when ep is 1. Where arrays go on either is decided
by the logical-axis table (rules.py); an axis the table does not map (dp) replicates them.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

TP, EP, DP = "tp", "ep", "dp"
MESH_AXES = (TP, EP, DP)       # what --mesh accepts, in the order help and errors list them
DEVICE_ORDER = (DP, EP, TP)    # axis order of the device mesh: a replica's devices are consecutive


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    tp: int = 1
    dp: int = 1
    ep: int = 1

    @property
    def num_devices(self) -> int:
        return self.tp * self.ep * self.dp

    @property
    def engine_devices(self) -> int:
        """Devices of one engine (replica)."""
        return self.tp * self.ep

    def __str__(self) -> str:
        return f"tp={self.tp}" + (f",ep={self.ep}" if self.ep > 1 else "") + f",dp={self.dp}"


def _parse_size(axis: str, value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"--mesh: {axis} must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"--mesh: {axis} must be a positive integer, got {size}")
    return size


def parse_mesh(text: str | None) -> MeshSpec:
    """"tp=2", "tp=2,dp=2", "ep=4", "tp=2,ep=2"; "" or None -> one device. Raises ValueError naming the problem."""
    if text is None or not text.strip():
        return MeshSpec()
    sizes: dict[str, int] = {}
    for item in text.split(","):
        axis, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not axis or not value:
            raise ValueError(f"--mesh: expected axis=size, got {item.strip()!r} (e.g. tp=2,dp=2)")
        if axis not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {axis!r} (known: {', '.join(MESH_AXES)})")
        if axis in sizes:
            raise ValueError(f"--mesh: axis {axis!r} given twice")
        sizes[axis] = _parse_size(axis, value)
    return MeshSpec(**sizes)


@dataclasses.dataclass(frozen=True)
class DisaggMeshSpec:
    """Prefill and decode engines on disjoint devices of one process: prefill on the first
    prefill.num_devices devices, decode on the next decode.num_devices."""
    prefill: MeshSpec
    decode: MeshSpec

    @property
    def num_devices(self) -> int:
        return self.prefill.num_devices + self.decode.num_devices

    def __str__(self) -> str:
        return f"prefill:{self.prefill} decode:{self.decode}"


ROLES = ("prefill", "decode")


def parse_deployment(text: str | None) -> MeshSpec | DisaggMeshSpec:
    """A --mesh text: "tp=2,dp=2" (colocated) or "prefill:tp=2 decode:tp=4,dp=2" (each side's
    axes after its role, sides separated by a space or ';'). Raises ValueError naming the problem."""
    if text is None or ":" not in text:
        return parse_mesh(text)
    sides: dict[str, MeshSpec] = {}
    for part in text.replace(";", " ").split():
        role, sep, axes = part.partition(":")
        if not sep or role not in ROLES:
            raise ValueError(f"--mesh: expected prefill:AXES decode:AXES, got {part!r} "
                             "(e.g. \"prefill:tp=2 decode:tp=2,dp=2\")")
        if role in sides:
            raise ValueError(f"--mesh: {role} given twice")
        sides[role] = parse_mesh(axes)
    missing = [r for r in ROLES if r not in sides]
    if missing:
        raise ValueError(f"--mesh: a disaggregated mesh needs both sides; {missing[0]} is missing")
    return DisaggMeshSpec(sides["prefill"], sides["decode"])


def as_mesh_spec(mesh: MeshSpec | str | None) -> MeshSpec:
    return mesh if isinstance(mesh, MeshSpec) else parse_mesh(mesh)


def device_mesh(spec: MeshSpec, devices=None) -> Mesh:
    """The deployment's mesh: axes (dp, ep, tp), replica i on devices [i*n, (i+1)*n) with n = ep x tp
    (consecutive devices are the closest ones on GPU hosts and TPU slices), tp innermost."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < spec.num_devices:
        raise ValueError(f"--mesh {spec}: needs {spec.num_devices} devices (tp x ep x dp), "
                         f"but only {len(devices)} are available")
    grid = np.asarray(devices[:spec.num_devices], dtype=object).reshape(spec.dp, spec.ep, spec.tp)
    return Mesh(grid, DEVICE_ORDER)


def replica_meshes(spec: MeshSpec | Mesh, devices=None) -> list[Mesh]:
    """The dp rows of the device mesh, each an engine's mesh: axes (ep, tp), or (tp,) when ep is 1."""
    mesh = spec if isinstance(spec, Mesh) else device_mesh(spec, devices)
    if mesh.shape.get(EP, 1) > 1:
        return [Mesh(row, (EP, TP)) for row in mesh.devices]
    return [Mesh(row.reshape(-1), (TP,)) for row in mesh.devices]


def check_engine_mesh(mesh: Mesh, cfg=None):
    """An engine runs on a mesh of named axes (see MESH_AXES); replicas (dp) are separate engines;
    ep splits experts only, so a model without experts (cfg.num_experts 0) is refused on it."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"an engine mesh has axes among {MESH_AXES}, got {tuple(mesh.axis_names)}")
    if mesh.shape.get(DP, 1) > 1:
        raise ValueError(f"an engine runs on one replica; got dp={mesh.shape[DP]} "
                         "(see jaxserve.parallel.replica_meshes)")
    if cfg is not None and not cfg.num_experts and mesh.shape.get(EP, 1) > 1:
        raise ValueError(f"--mesh ep={mesh.shape[EP]} splits a mixture-of-experts model's experts; this "
                         f"{cfg.architecture} model has none (use tp for one engine, dp for replicas)")


def single_engine_mesh(mesh: Mesh | MeshSpec | str | None) -> Mesh | None:
    """A Mesh, MeshSpec or "tp=N[,ep=E]" text -> the mesh of one engine (None: one device, no mesh).
    dp > 1 means several engines (an EnginePool), so it is refused here."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    spec = as_mesh_spec(mesh)
    if spec.dp > 1:
        raise ValueError(f"mesh {spec}: one engine runs on one replica; dp > 1 (several replicas) "
                         "needs an engine pool (jaxserve serve --mesh, jaxserve.engine.load_engines)")
    return None if spec.engine_devices == 1 else replica_meshes(spec)[0]
