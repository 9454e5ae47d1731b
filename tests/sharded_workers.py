"""What the sharded-ensemble tests share: gloo process groups started by the tests, tiny seeded members, and the
workers that run in each rank.

``run_ranks(worker, world, *args)`` starts ``world`` processes (torch.multiprocessing, spawn), each in a gloo group
with a short collective timeout, runs ``worker(rank, world, *args)`` and waits a bounded time for all of them. A
worker that wants to report several checks writes ``{check: "ok" or the failure}`` to a JSON file per rank
(``record``), so that one failing check neither stops the others nor leaves ranks waiting in a collective.
"""

from __future__ import annotations

import datetime
import json
import math
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fused_ensemble import (
    REDUCTIONS,
    FusedEnsemble,
    ensemble_reduce,
    ensemble_stats,
    member_batches,
    optim,
    shared,
)
from fused_ensemble.cli.workloads import randomize_state
from fused_ensemble.distributed import (
    CollectiveLog,
    FailTogether,
    ShardedEnsemble,
    load,
    load_extra,
    load_state,
    member_blocks,
    member_mesh,
    save,
    train_epoch,
)
from fused_ensemble.distributed import member_batches as member_batches_of
from fused_ensemble.training.loop import train_step

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
CLASSES = 7


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker: Callable, args: tuple, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable, world: int, *args, limit_s: float = 300, backend: str = "gloo") -> None:
    """Runs ``worker(rank, world, *args)`` in ``world`` processes of a ``backend`` group (NCCL: rank r on GPU r);
    raises if one fails or they take longer than ``limit_s`` (then they are terminated)."""
    context = mp.start_processes(_entry, args=(world, free_port(), worker, args, backend), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"the {world} ranks did not finish within {limit_s} s")


def record(folder: str, rank: int, checks: dict[str, Callable[[], None]]) -> None:
    """Runs each check and writes ``{name: "ok" or its traceback}`` to ``folder/rank<rank>.json``."""
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (every failure is reported to the test)
            results[name] = traceback.format_exc()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))


def recorded(folder, world: int) -> dict[str, list[str]]:
    """Check name -> the outcome on each rank."""
    outcomes: dict[str, list[str]] = {}
    for rank in range(world):
        for name, outcome in json.loads(Path(folder, f"rank{rank}.json").read_text()).items():
            outcomes.setdefault(name, []).append(outcome)
    return outcomes


# ---- members ---------------------------------------------------------------------------------------------------------

def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(12, CLASSES))


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(25, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def build_cnn(index: int) -> nn.Module:
    """Member ``index``: seeded by its index alone, random BatchNorm state, eval mode."""
    torch.manual_seed(100 + index)
    return randomize_state(tiny_cnn(), torch.Generator().manual_seed(200 + index)).eval()


def build_training_cnn(index: int) -> nn.Module:
    torch.manual_seed(300 + index)
    return tiny_cnn().train()


def build_mlp(index: int) -> nn.Module:
    torch.manual_seed(400 + index)
    return tiny_mlp().train()


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, 1, 5, 5, generator=torch.Generator().manual_seed(seed))


def dataset(examples: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(examples, 1, 5, 5, generator=generator),
            torch.randint(0, CLASSES, (examples,), generator=generator))


def awkward_logits() -> torch.Tensor:
    """Logits ``[5, 11, 4]`` of 5 members with the rows the reductions' contract singles out: a member with no softmax
    (a NaN, a ``+inf``, ``-inf`` in every class, ``+inf`` in every class), a class no member gives any probability,
    ``+inf`` and ``-inf`` in one class, members whose own argmax is a tie, vote counts that tie across ranks, members
    that agree exactly, and ordinary rows."""
    logits = torch.randn(5, 11, 4, generator=torch.Generator().manual_seed(11)) * 3
    inf = math.inf
    logits[1, 0, 2] = math.nan
    logits[4, 1, 0] = inf
    logits[3, 2, :] = -inf
    logits[:, 3, 1] = -inf
    logits[0, 4, :] = inf
    logits[2, 5, 0], logits[3, 5, 0] = -inf, inf
    logits[:, 6, :] = 1.0
    logits[:, 7, :] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # each member's argmax: class 2 (first of the tie)
    logits[:2, 8, :] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # class 3 twice, class 2 twice, class 1 once: class 2
    logits[2:4, 8, :] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    logits[4, 8, :] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    logits[:, 9, :] = logits[0, 9, :].clone()
    return logits


class PairMember(nn.Module):
    """A member of two inputs: a pair of images (per member) and an offset of the logits (shared)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(25, CLASSES)

    def forward(self, pair, offset):
        first, second = pair
        return self.linear((first + second).flatten(1)) + offset


def build_pair_member(index: int) -> nn.Module:
    torch.manual_seed(500 + index)
    return PairMember()


def identity_member(index: int) -> nn.Module:
    """A member that returns its input: with ``member_inputs=True`` the inputs are the members' logits."""
    return nn.Identity()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# ---- what the training tests compare with: all members trained in one process -----------------------------------

OPTIMIZERS = {
    "sgd": (optim.SGD, dict(lr=[0.1, 0.05, 0.02, 0.08, 0.03], momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adamw": (optim.AdamW, dict(lr=[1e-2, 3e-3, 5e-3, 2e-3, 8e-3], betas=(0.9, [0.99, 0.999, 0.995, 0.98, 0.9]),
                                weight_decay=[0.0, 0.01, 0.02, 0.0, 0.05])),
}
TRAIN_MEMBERS = 5
BATCH = 4
EPOCHS = 2


def train_in_one_process(build: Callable[[int], nn.Module], optimizer_name: str, members: int = TRAIN_MEMBERS
                         ) -> FusedEnsemble:
    """``members`` members trained together in this process, as the sharded tests train them."""
    optimizer_class, hyperparameters = OPTIMIZERS[optimizer_name]
    fused = FusedEnsemble([build(i) for i in range(members)], reduction="none", member_inputs=True).train()
    optimizer = optimizer_class(fused.parameters(), **hyperparameters)
    x, y = dataset()
    generator = torch.Generator().manual_seed(5)
    for _ in range(EPOCHS):
        for xb, yb in member_batches(x, y, members, BATCH, "shuffle", generator):
            train_step(fused, optimizer, xb, yb)
    return fused


def reference_outputs(build: Callable[[int], nn.Module], members: int, x: torch.Tensor, reduction: str,
                      member_inputs: bool = False) -> torch.Tensor:
    fused = FusedEnsemble([build(i) for i in range(members)], reduction=reduction, member_inputs=member_inputs)
    with torch.no_grad():
        return fused(x)


def reference_stats(build: Callable[[int], nn.Module], members: int, x: torch.Tensor):
    with torch.no_grad():
        return ensemble_stats(reference_outputs(build, members, x, "none"))


# ---- workers ---------------------------------------------------------------------------------------------------------

def _forward_checks(world: int) -> dict[str, Callable[[], None]]:
    """Every reduction, stats and "none" of N in (4, 5, 8) members over the ranks, against one process."""
    x = images(6)
    checks = {}
    for n in (4, 5, 8):
        for reduction in (*REDUCTIONS, "none"):
            def check(n=n, reduction=reduction):
                sharded = ShardedEnsemble(build_cnn, n, reduction=reduction)
                assert list(sharded.member_indices) == list(member_blocks(n, world)[dist.get_rank()])
                assert_close(sharded(x), reference_outputs(build_cnn, n, x, reduction))
            checks[f"forward N={n} {reduction}"] = check

        def stats(n=n):
            got, expected = ShardedEnsemble(build_cnn, n).stats(x), reference_stats(build_cnn, n, x)
            for field in expected._fields:
                if field == "prediction":
                    assert torch.equal(got.prediction, expected.prediction)
                else:
                    assert_close(getattr(got, field), getattr(expected, field))
        checks[f"stats N={n}"] = stats

    for reduction in REDUCTIONS:
        def awkward(reduction=reduction):
            logits = awkward_logits()
            got = ShardedEnsemble(identity_member, logits.shape[0], reduction=reduction, member_inputs=True)(logits)
            want = ensemble_reduce(logits, reduction)
            assert torch.equal(got.isnan(), want.isnan())
            if reduction == "vote":
                assert torch.equal(got.nan_to_num(), want.nan_to_num())
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
        checks[f"non-finite and ties {reduction}"] = awkward

    def awkward_stats():
        logits = awkward_logits()
        got = ShardedEnsemble(identity_member, logits.shape[0], member_inputs=True).stats(logits)
        want = ensemble_stats(logits)
        assert torch.equal(got.prediction, want.prediction)
        for field in want._fields:
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6,
                                       equal_nan=True)
    checks["non-finite stats"] = awkward_stats

    def member_inputs():
        xs = images(5, 6, seed=3)
        sharded = ShardedEnsemble(build_cnn, 5, reduction="log_mean_probs", member_inputs=True)
        expected = reference_outputs(build_cnn, 5, xs, "log_mean_probs", member_inputs=True)
        assert_close(sharded(xs), expected)
        block = sharded.member_indices
        assert_close(sharded(xs[block.start:block.stop]), expected)
    checks["member_inputs"] = member_inputs

    def tuple_and_shared_inputs():
        pair = (images(5, 6, seed=4), images(5, 6, seed=5))
        offset = torch.randn(CLASSES, generator=torch.Generator().manual_seed(6))
        sharded = ShardedEnsemble(build_pair_member, 5, reduction="mean_probs", member_inputs=True)
        fused = FusedEnsemble([build_pair_member(i) for i in range(5)], reduction="mean_probs", member_inputs=True)
        with torch.no_grad():
            expected = fused(pair, shared(offset))
        assert_close(sharded(pair, shared(offset)), expected)
        block = sharded.member_indices
        assert_close(sharded(tuple(x[block.start:block.stop] for x in pair), offset=shared(offset)), expected)
    checks["tuple and shared inputs"] = tuple_and_shared_inputs

    def bytes_sent():
        batch = x.shape[0]
        largest = max(len(block) for block in member_blocks(5, world))
        for reduction, payload in (("mean_probs", batch * CLASSES * 4), ("log_mean_probs", 2 * batch * CLASSES * 4),
                                   ("none", largest * batch * CLASSES * 4)):
            sharded = ShardedEnsemble(build_cnn, 5, reduction=reduction)
            with CollectiveLog() as log:
                sharded(x)
            assert log.payload_bytes == payload, (reduction, log.records)
        with CollectiveLog() as log:
            sharded.stats(x)
        assert log.payload_bytes == batch * (2 * CLASSES + 1) * 4, log.records
    checks["bytes sent"] = bytes_sent
    return checks


def _training_check(build: Callable[[int], nn.Module], optimizer_name: str, mesh=None) -> Callable[[], None]:
    def check():
        optimizer_class, hyperparameters = OPTIMIZERS[optimizer_name]
        sharded = ShardedEnsemble(build, TRAIN_MEMBERS, mesh=mesh, member_inputs=True)
        optimizer = sharded.optimizer(optimizer_class, **hyperparameters)
        x, y = dataset()
        generator = torch.Generator().manual_seed(5)
        guard = FailTogether(timeout=COLLECTIVE_TIMEOUT)
        for _ in range(EPOCHS):
            train_epoch(sharded, optimizer, x, y, BATCH, "shuffle", generator, fail_together=guard)
        expected = train_in_one_process(build, optimizer_name)
        block = sharded.member_indices
        for name, tensor in expected.state_dict().items():
            assert_close(sharded.local.state_dict()[name], tensor[block.start:block.stop])
        assert not torch.equal(sharded.local.state_dict()["stacked.1.weight"],
                               ShardedEnsemble(build, TRAIN_MEMBERS, mesh=mesh).local.state_dict()["stacked.1.weight"])
    return check


def _member_state(sharded: ShardedEnsemble, optimizer) -> dict[str, torch.Tensor]:
    """Every local member's tensors and optimizer state under ``"<index>/<name>"``, as separate copies."""
    state = {}
    for position, index in enumerate(sharded.member_indices):
        for name, tensor in sharded.local.stacked.state_dict().items():
            state[f"{index}/{name}"] = tensor[position].clone()
        for name, parameter in sharded.local.stacked.named_parameters():
            for key, value in optimizer.state[parameter].items():
                state[f"{index}/optimizer/{name}/{key}"] = value[position].clone()
    return state


CHECKPOINT_SGD = dict(lr=[0.1, 0.2, 0.3, 0.4, 0.5], momentum=0.9)


def forward_and_save_worker(rank: int, world: int, results: str, checkpoint: str) -> None:
    """2 ranks: the forward checks, training, and a checkpoint of 5 trained members with their optimizer state
    (and the members' values, for the readers to compare with, in ``checkpoint/../truth-rank<r>.pt``)."""
    checks = _forward_checks(world)
    checks["train sgd"] = _training_check(build_training_cnn, "sgd")
    checks["train adamw"] = _training_check(build_training_cnn, "adamw")

    def save_checkpoint():
        sharded = ShardedEnsemble(build_training_cnn, 5, reduction="mean", member_inputs=True)
        optimizer = sharded.optimizer(optim.SGD, **CHECKPOINT_SGD)
        x, y = dataset()
        batches = member_batches_of(sharded, x, y, BATCH, "shuffle", torch.Generator().manual_seed(2))
        for xb, yb in list(batches)[:2]:
            train_step(sharded.local, optimizer, xb, yb)
        save(sharded, checkpoint, optimizer=optimizer, extra={f"rank{rank}": torch.tensor([rank, 7])})
        torch.save(_member_state(sharded, optimizer), Path(checkpoint).parent / f"truth-rank{rank}.pt")
    checks["save"] = save_checkpoint
    record(results, rank, checks)


def truth(checkpoint: str) -> dict[str, torch.Tensor]:
    """The values of the members the 2 ranks saved, by ``"<index>/<name>"``."""
    found = {}
    for path in sorted(Path(checkpoint).parent.glob("truth-rank*.pt")):
        found.update(torch.load(path, weights_only=True))
    return found


def forward_and_load_worker(rank: int, world: int, results: str, checkpoint: str) -> None:
    """3 ranks: the forward checks, and the checkpoint that 2 ranks wrote read back, bit for bit."""
    checks = _forward_checks(world)

    def load_checkpoint():
        sharded = load(checkpoint, build_training_cnn)
        assert isinstance(sharded, ShardedEnsemble) and sharded.num_members == 5
        assert sharded.reduction == "mean" and sharded.member_inputs
        assert list(sharded.member_indices) == list(member_blocks(5, 3)[rank])
        optimizer = sharded.optimizer(optim.SGD, **CHECKPOINT_SGD)
        load_state(checkpoint, sharded, optimizer)
        expected = truth(checkpoint)
        got = _member_state(sharded, optimizer)
        assert set(got) == {key for key in expected if int(key.split("/")[0]) in sharded.member_indices}
        for key, tensor in got.items():
            assert torch.equal(tensor, expected[key]) and tensor.dtype == expected[key].dtype, key
        extra = load_extra(checkpoint, ["rank0", "rank1"])
        assert extra["rank0"].tolist() == [0, 7] and extra["rank1"].tolist() == [1, 7]
    checks["load"] = load_checkpoint
    record(results, rank, checks)


def data_parallel_worker(rank: int, world: int, results: str) -> None:
    """2 member ranks x 2 data ranks: training equals one process's, and each data rank reduces its own inputs."""
    mesh = member_mesh(members=2, data=2, timeout=COLLECTIVE_TIMEOUT)
    checks = {"train sgd": _training_check(build_mlp, "sgd", mesh),
              "train adamw": _training_check(build_mlp, "adamw", mesh)}

    def forward():
        sharded = ShardedEnsemble(build_cnn, 5, mesh=mesh, reduction="softmax_of_mean")
        assert sharded.data_ranks == 2 and sharded.data_rank == rank % 2
        assert list(sharded.member_indices) == list(member_blocks(5, 2)[rank // 2])
        x = images(6, seed=10 + sharded.data_rank)
        assert_close(sharded(x), reference_outputs(build_cnn, 5, x, "softmax_of_mean"))
    checks["forward"] = forward
    record(results, rank, checks)


def failing_worker(rank: int, world: int, results: str, inside_collective: bool) -> None:
    """Rank 1 raises at its third step; the others must stop with a PeerFailure naming it. With
    ``inside_collective`` rank 0 is then waiting in a forward's all-reduce (a 5 s timeout) when rank 1 fails."""
    sharded = ShardedEnsemble(build_cnn, 4, reduction="mean_probs")
    if hasattr(dist, "set_timeout"):
        dist.set_timeout(datetime.timedelta(seconds=5))
    guard = FailTogether(timeout=COLLECTIVE_TIMEOUT)
    x = images(2)
    outcome = {"rank": rank}
    start = time.monotonic()
    try:
        for step in range(10):
            with guard:
                if rank == 1 and step == 2:
                    raise ValueError("boom in step 2")
                if inside_collective or step != 2:
                    sharded(x)
        outcome["error"] = None
    except Exception as error:  # noqa: BLE001  (the test looks at what each rank raised)
        outcome.update(error=type(error).__name__, message=str(error), ranks=getattr(error, "ranks", None))
    outcome["seconds"] = time.monotonic() - start
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcome))


def nccl_worker(rank: int, world: int, results: str, checkpoint: str) -> None:
    """NCCL, members on this rank's GPU: every reduction and the statistics against one process's FusedEnsemble on
    the GPU, and a checkpoint of CUDA tensors read back in a plain process."""
    device = torch.device("cuda", rank)
    x = images(6).to(device)
    checks = {}
    for reduction in (*REDUCTIONS, "none"):
        def check(reduction=reduction):
            sharded = ShardedEnsemble(build_cnn, 5, reduction=reduction).to(device)
            fused = FusedEnsemble([build_cnn(i) for i in range(5)], reduction=reduction).to(device)
            with torch.no_grad():
                assert_close(sharded(x), fused(x))
        checks[f"forward {reduction}"] = check

    def stats():
        got = ShardedEnsemble(build_cnn, 5).to(device).stats(x)
        with torch.no_grad():
            logits = FusedEnsemble([build_cnn(i) for i in range(5)], reduction="none").to(device)(x)
        expected = ensemble_stats(logits)
        for field in expected._fields:
            assert_close(getattr(got, field), getattr(expected, field))
    checks["stats"] = stats
    checks["save"] = lambda: save(ShardedEnsemble(build_cnn, 5).to(device), checkpoint)
    record(results, rank, checks)
