"""The block solver: the core Jacobi kernel run per spatial block with boundary sync.

Only each block's graph rows stay on a worker (local column ids: the block's spots, then
its halo spots). Everything else that grows with the spots lives in the run group of the
store, so a worker's memory follows the block size, not the data size: the projection
``H`` (written by pass 2), the abundances of the last two rounds (``beta_checkpoint``,
slot ``round % 2``) and each block's exported boundary rows (``halo_exports/<slot>/<block>``:
the rows any neighbour has in its halo).

A round task reads its block's ``H`` and previous abundances, its halo from its
neighbours' exports of the previous round, runs ``inner_sweeps`` steps of
:func:`dflashdeconv.core.solver.sweep` with the halo frozen, writes its new abundances and
exports into the other slot and returns two numbers. A round depends on no earlier task's
data, only on the slot the previous round completed: a task rerun after a lost worker
writes the same values, and the result depends on neither the number of workers nor the
scheduling. With ``inner_sweeps=1`` a round is exactly one step of the in-memory solver
(same arithmetic, same summation order): the result is the in-memory result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..core.solver import sweep
from .blocks import BlockGraph
from .cluster import worker_task
from .elements import array_element, dict_group
from .stop import check as check_stop
from .store import open_zarr

#: Run-group folder of the blocks' exported boundary rows, per slot and block.
EXPORTS = "halo_exports"


@dataclass
class BlockProblem:
    """One block's graph rows (lives on a worker)."""

    row_start: int
    indptr: np.ndarray  # (n_b + 1,)
    local_columns: np.ndarray  # into [block spots | halo spots]
    halo_rows: np.ndarray  # global rows of the halo spots, ascending

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.indptr.size - 1)


def make_problem(graph: BlockGraph) -> BlockProblem:
    n = graph.indptr.size - 1
    start, stop = graph.row_start, graph.row_start + n
    inside = (graph.columns >= start) & (graph.columns < stop)
    halo_rows = np.unique(graph.columns[~inside])
    local = np.where(inside, graph.columns - start,
                     n + np.searchsorted(halo_rows, graph.columns))
    index = np.int32 if n + halo_rows.size < 2**31 else np.int64  # half the bytes per edge
    return BlockProblem(start, graph.indptr, local.astype(index), halo_rows)


def halo_rows_of(problem: BlockProblem) -> np.ndarray:
    return problem.halo_rows


@dataclass(frozen=True)
class BlockLinks:
    """Where a block's halo comes from: the rows it exports to its neighbours, the blocks
    its halo spots belong to and their positions in those blocks' exports (halo order)."""

    block: int
    export_rows: np.ndarray
    sources: tuple[int, ...]
    positions: tuple[np.ndarray, ...]


def read_current(run, problem: BlockProblem, links: BlockLinks, slot: int | None,
                 n_types: int) -> np.ndarray:
    """The block's abundances then its halo's at ``slot`` (uniform before round 1)."""
    n_halo = problem.halo_rows.size
    if slot is None:
        return np.full((problem.indptr.size - 1 + n_halo, n_types), 1.0 / n_types)
    beta = np.asarray(run["beta_checkpoint"][slot, problem.rows])
    halo = [np.asarray(run[f"{EXPORTS}/{slot}/{source}"][...])[positions]
            for source, positions in zip(links.sources, links.positions)]
    return np.concatenate([beta, *halo]) if halo else beta


def read_beta(run, slot: int | None, start: int, stop: int, n_types: int):
    """A block's abundances at ``slot`` of the run group ``run`` (uniform before round 1)."""
    if slot is None:
        return np.full((stop - start, n_types), 1.0 / n_types)
    return np.asarray(run["beta_checkpoint"][slot, start:stop])


@worker_task
def block_round(problem: BlockProblem, links: BlockLinks, run_path: str, gram, lam, rho,
                inner_sweeps, tol, source: int | None, target: int) -> tuple[float, float]:
    """One round of one block, from slot ``source`` into slot ``target``.

    Runs up to ``inner_sweeps`` steps with the halo frozen at the neighbours' exports;
    returns the largest change and largest old value of the first step, the one that sees
    the neighbours' latest values (the global stopping statistic).
    """
    run = open_zarr(run_path, "r+")
    n, K = problem.indptr.size - 1, gram.shape[0]
    H = np.asarray(run["H"][problem.rows])
    current = read_current(run, problem, links, source, K)
    out = np.empty((n, K))
    change, size = np.zeros(n), np.zeros(n)
    first = None
    for _ in range(inner_sweeps):
        sweep(H, gram, current, out, problem.indptr, problem.local_columns, lam, rho,
              change, size)
        current[:n] = out
        step = (float(change.max()) if n else 0.0, float(size.max()) if n else 0.0)
        first = first or step
        if step[0] < tol * step[1]:
            break
    beta = current[:n]
    run["beta_checkpoint"][target, problem.rows] = beta
    if links.export_rows.size:
        run[f"{EXPORTS}/{target}/{links.block}"][...] = beta[links.export_rows]
    return first


@worker_task
def block_objective(problem: BlockProblem, links: BlockLinks, run_path: str, slot, gram, lam,
                    rho) -> float:
    """This block's share of the objective (its spots' fidelity, L1 and half of each edge)."""
    run = open_zarr(run_path, "r")
    n = problem.indptr.size - 1
    full = read_current(run, problem, links, slot, gram.shape[0])
    beta = full[:n]
    H = np.asarray(run["H"][problem.rows])
    ysq = np.asarray(run["ysq"][problem.rows])
    rows = np.repeat(np.arange(n), np.diff(problem.indptr))
    diff = beta[rows] - full[problem.local_columns]
    fidelity = 0.5 * (ysq.sum() - 2 * np.sum(beta * H) + np.sum((beta.T @ beta) * gram))
    return float(fidelity + 0.25 * lam * np.sum(diff**2) + rho * beta.sum())


@dataclass
class BlockSolution:
    """Where the abundances are (``beta_checkpoint`` slot; None: the uniform start) and the
    convergence record."""

    slot: int | None
    converged: bool
    n_rounds: int
    changes: list


class BlockSolver:
    """Drives the rounds from the client: only two numbers per block come back per round.

    Each block exports, every round, the rows that any neighbour has in its halo; a block
    reads its halo from its neighbours' exports.
    """

    def __init__(self, client, problems: list, row_ranges: list[tuple[int, int]],
                 run_path: str, n_types: int):
        self.client = client
        self.problems = problems
        self.run_path = run_path
        self.halos = halos = client.gather(client.map(halo_rows_of, problems))
        starts = np.array([r[0] for r in row_ranges])
        n = len(problems)
        owners = [np.searchsorted(starts, halo, side="right") - 1 for halo in halos]
        export_sets = [[] for _ in range(n)]
        for halo, owner in zip(halos, owners):
            for c in np.unique(owner):
                export_sets[c].append(halo[owner == c] - starts[c])
        export_rows = [np.unique(np.concatenate(e)) if e else np.empty(0, np.int64)
                       for e in export_sets]
        self.links = []
        for b, (halo, owner) in enumerate(zip(halos, owners)):
            sources = tuple(int(c) for c in np.unique(owner))
            positions = tuple(np.searchsorted(export_rows[c], halo[owner == c] - starts[c])
                              for c in sources)
            self.links.append(BlockLinks(b, export_rows[b], sources, positions))
        self._create_exports(n_types)

    def _create_exports(self, n_types: int) -> None:
        """The export arrays of both slots (kept when a resumed run already has them)."""
        run = open_zarr(self.run_path, "r+")
        if run.attrs.get("exports_ready"):
            return
        group = dict_group(run, EXPORTS)
        for slot in (0, 1):
            folder = dict_group(group, str(slot))
            for links in self.links:
                m = links.export_rows.size
                array_element(folder, str(links.block), (m, n_types), np.float64,
                              (max(m, 1), n_types))
        run.attrs["exports_ready"] = True

    def _round(self, args: tuple, max_failures: int, failures: int, round_: int):
        """Run one round over every block; a block whose task was lost with its worker
        (cancelled, or killed workers) runs again. Returns (statistics, failures)."""
        from distributed import wait
        from distributed.scheduler import KilledWorker

        client = self.client
        pending = {b: client.submit(block_round, self.problems[b], self.links[b], *args,
                                    pure=False) for b in range(len(self.problems))}
        stats = {}
        while pending:
            wait(list(pending.values()))
            lost = {}
            for b, future in pending.items():
                if future.status == "finished":
                    stats[b] = future.result()
                    continue
                error = future.exception() if future.status == "error" else None
                failures += 1
                if failures > max_failures or (error is not None
                                               and not isinstance(error, KilledWorker)):
                    future.result()  # raises the task's error
                lost[b] = client.submit(block_round, self.problems[b], self.links[b], *args,
                                        pure=False)
            if lost:
                warnings.warn(f"solver round {round_}: {len(lost)} block(s) lost with their "
                              "worker; running them again", RuntimeWarning, stacklevel=3)
            pending = lost
        return [stats[b] for b in range(len(self.problems))], failures

    def solve(self, gram, lam, rho, *, max_iter=1000, tol=1e-4, inner_sweeps=1,
              resume_from: dict | None = None, max_failures: int = 5,
              on_round=None) -> BlockSolution:
        """Rounds until the largest first-step change is below ``tol`` x the largest value.

        ``on_round`` receives ``(round, change, checkpoint)`` once all blocks have written
        the round; the caller records the checkpoint. ``resume_from`` (a recorded
        checkpoint) continues an interrupted run from that round's slot.
        """
        gram = np.ascontiguousarray(gram)
        checkpoint = resume_from
        rounds = checkpoint["round"] if checkpoint else 0
        changes = list(checkpoint["changes"]) if checkpoint else []
        slot = checkpoint["slot"] if checkpoint else None
        converged = bool(changes) and changes[-1] < tol
        failures = 0
        while not converged and rounds < max_iter:
            check_stop()  # between rounds: the last checkpoint is complete
            target = (rounds + 1) % 2
            args = (self.run_path, gram, float(lam), float(rho), int(inner_sweeps), float(tol),
                    slot, target)
            stats, failures = self._round(args, max_failures, failures, rounds + 1)
            rounds, slot = rounds + 1, target
            changes.append(max(s[0] for s in stats) / (max(s[1] for s in stats) + 1e-10))
            if on_round is not None:
                on_round(rounds, changes[-1], {"round": rounds, "slot": slot,
                                               "changes": list(changes)})
            converged = changes[-1] < tol
        return BlockSolution(slot, converged, rounds, changes)

    def objective(self, slot: int | None, gram, lam, rho) -> float:
        parts = [self.client.submit(block_objective, self.problems[b], self.links[b],
                                    self.run_path, slot, np.ascontiguousarray(gram), float(lam),
                                    float(rho), pure=False)
                 for b in range(len(self.problems))]
        return float(sum(self.client.gather(parts)))
