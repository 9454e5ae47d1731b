"""Where the members live: the device mesh of a sharded ensemble and the contiguous block of members of each rank.

A sharded ensemble's mesh has a ``"member"`` dimension, whose ranks hold disjoint blocks of members, and optionally a
``"data"`` dimension, whose ranks hold copies of one block and split its batches (data parallelism inside a block).
``member_mesh`` lays the data dimension innermost: the copies of a block are neighbouring ranks (one node, where the
per-step gradient all-reduce of data parallelism runs on the fastest links), and the member blocks spread over the
nodes, which exchange only ``[B, K]`` statistics per forward.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MESH_DIMS", "member_blocks", "member_mesh", "mesh_groups"]

MESH_DIMS = ("member", "data")
"""The dimension names a sharded ensemble's mesh may have: ``"member"`` (required) and ``"data"`` (optional)."""


def member_blocks(num_members: int, parts: int) -> list[range]:
    """The members of each of ``parts`` ranks: contiguous blocks in rank order, the first ``num_members % parts``
    blocks one member larger (5 members over 2 ranks: 0-2 and 3-4; over 3 ranks: 0-1, 2-3 and 4)."""
    for name, value in (("num_members", num_members), ("parts", parts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if parts > num_members:
        raise ValueError(f"{num_members} members cannot be split over {parts} member ranks: every rank needs at least "
                         f"one member (use fewer member ranks, or a 'data' mesh dimension for the others)")
    size, larger = divmod(num_members, parts)
    blocks, start = [], 0
    for part in range(parts):
        stop = start + size + (part < larger)
        blocks.append(range(start, stop))
        start = stop
    return blocks


def member_mesh(members: int | None = None, data: int = 1, device_type: str | None = None,
                timeout: timedelta | None = None) -> DeviceMesh:
    """A mesh of every process of the default group: ``members`` member ranks (default: world size / ``data``) by
    ``data`` data ranks (a 1-D ``("member",)`` mesh when ``data`` is 1, else ``("member", "data")`` with the data
    dimension innermost). ``device_type``: ``"cuda"`` for an NCCL default group, else ``"cpu"`` unless given.

    ``timeout``: the collective timeout of the mesh's groups. The groups that torch creates for a 2-D mesh take
    torch's default timeout (30 minutes for gloo, 10 for NCCL), not the default group's: give one here so that a
    collective waiting for a failed rank fails in bounded time (``torch.distributed.set_timeout``; torch versions
    without it keep the default)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("member_mesh needs an initialized default process group: call "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)")
    world = dist.get_world_size()
    if isinstance(data, bool) or not isinstance(data, int) or data < 1:
        raise ValueError(f"data must be a positive int, got {data!r}")
    if members is None:
        members = world // data
    if members * data != world:
        raise ValueError(f"a mesh of {members} member ranks x {data} data ranks needs {members * data} processes, the "
                         f"default group has {world}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if data == 1:
        mesh = init_device_mesh(device_type, (members,), mesh_dim_names=("member",))
    else:
        mesh = init_device_mesh(device_type, (members, data), mesh_dim_names=MESH_DIMS)
    if timeout is not None and hasattr(dist, "set_timeout"):
        for group in mesh_groups(mesh).values():
            dist.set_timeout(timeout, group)
    return mesh


def mesh_groups(mesh: DeviceMesh) -> dict[str, dist.ProcessGroup]:
    """The process group of each dimension of a sharded ensemble's mesh, by name, after checking the names."""
    names = tuple(mesh.mesh_dim_names or ())
    if "member" not in names or any(name not in MESH_DIMS for name in names) or len(set(names)) != len(names):
        raise ValueError(f"a sharded ensemble's mesh has a 'member' dimension and optionally a 'data' one, got "
                         f"dimensions {names or 'without names'}")
    return {name: mesh.get_group(name) for name in names}
