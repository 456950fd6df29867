"""The block solver: the core Jacobi kernel run per spatial block with boundary sync.

Every block holds its rows of ``H``, its graph rows (local column ids: the block's spots,
then its halo spots) and its ``beta`` on a worker. Each round, a block runs
``inner_sweeps`` steps of :func:`dflashdeconv.core.solver.sweep` with the halo frozen at
the previous round's values, then the blocks exchange the boundary rows their neighbours
need (small futures; the blocks' data stay on the workers). Rounds are pure functions of
the previous round, so the result depends on neither the number of workers nor the
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
from .stop import check as check_stop
from .store import open_zarr


@dataclass
class BlockProblem:
    """One block's share of the problem (lives on a worker)."""

    row_start: int
    H: np.ndarray  # (n_b, K)
    indptr: np.ndarray  # (n_b + 1,)
    local_columns: np.ndarray  # into [block spots | halo spots]
    halo_rows: np.ndarray  # global rows of the halo spots, ascending


def make_problem(graph: BlockGraph, projection) -> BlockProblem:
    H = np.ascontiguousarray(projection[0])
    n = H.shape[0]
    start, stop = graph.row_start, graph.row_start + n
    inside = (graph.columns >= start) & (graph.columns < stop)
    halo_rows = np.unique(graph.columns[~inside])
    local = np.where(inside, graph.columns - start,
                     n + np.searchsorted(halo_rows, graph.columns))
    return BlockProblem(start, H, graph.indptr, local.astype(np.int64), halo_rows)


def halo_rows_of(problem: BlockProblem) -> np.ndarray:
    return problem.halo_rows


def initial_state(problem: BlockProblem, n_types: int, export_rows: np.ndarray):
    """Round-0 state: uniform abundances and the boundary rows neighbours will read."""
    beta = np.full((problem.H.shape[0], n_types), 1.0 / n_types)
    return beta, (beta[export_rows], 0.0, 0.0)


def _halo(exports, halo_positions, K):
    parts = [export[0][positions] for export, positions in zip(exports, halo_positions)]
    return np.concatenate(parts) if parts else np.empty((0, K))


@worker_task
def block_round(problem: BlockProblem, state, gram, lam, rho, inner_sweeps, tol, export_rows,
                halo_positions, checkpoint, *neighbour_exports):
    """Next state ``(beta, (exported rows, change, size))`` of one block.

    Runs up to ``inner_sweeps`` steps with the halo frozen at the neighbours' exported
    values; ``change``/``size`` are the largest change and largest old value of the first
    step, the one that sees the neighbours' latest values (the global stopping statistic).
    ``checkpoint = (run_path, slot)`` also writes the block's new beta into that slot.
    """
    beta = state[0]
    n, K = problem.H.shape
    current = np.concatenate([beta, _halo(neighbour_exports, halo_positions, K)])
    out = np.empty((n, K))
    change, size = np.zeros(n), np.zeros(n)
    first = None
    for _ in range(inner_sweeps):
        sweep(problem.H, gram, current, out, problem.indptr, problem.local_columns, lam, rho,
              change, size)
        current[:n] = out
        step = (float(change.max()) if n else 0.0, float(size.max()) if n else 0.0)
        first = first or step
        if step[0] < tol * step[1]:
            break
    beta = current[:n].copy()
    if checkpoint is not None:
        run_path, slot = checkpoint
        open_zarr(run_path, "r+")["beta_checkpoint"][slot, problem.row_start:problem.row_start + n] = beta
    return beta, (beta[export_rows], first[0], first[1])


def load_state(problem: BlockProblem, run_path: str, slot: int, export_rows: np.ndarray):
    """A block's state from a checkpoint slot (resume, or recovery from a lost worker)."""
    n = problem.H.shape[0]
    beta = np.asarray(open_zarr(run_path, "r")["beta_checkpoint"][slot, problem.row_start:
                                                                  problem.row_start + n])
    return beta, (beta[export_rows], 0.0, 0.0)


def exports_of(state):
    return state[1]


def beta_of(state):
    return state[0]


@worker_task
def block_objective(problem: BlockProblem, state, gram, ysq, lam, rho, halo_positions,
                    *neighbour_exports) -> float:
    """This block's share of the objective (its spots' fidelity, L1 and half of each edge)."""
    beta = state[0]
    full = np.concatenate([beta, _halo(neighbour_exports, halo_positions, beta.shape[1])])
    rows = np.repeat(np.arange(beta.shape[0]), np.diff(problem.indptr))
    diff = beta[rows] - full[problem.local_columns]
    fidelity = 0.5 * (ysq.sum() - 2 * np.sum(beta * problem.H) + np.sum((beta.T @ beta) * gram))
    return float(fidelity + 0.25 * lam * np.sum(diff**2) + rho * beta.sum())


@dataclass
class BlockSolution:
    """Futures of the per-block states (``beta_of`` gives the abundances) and the record."""

    states: list
    converged: bool
    n_rounds: int
    changes: list


class BlockSolver:
    """Drives the rounds from the client: only boundary rows and statistics come back.

    Each block exports, every round, the rows that any neighbour has in its halo; a block
    reads its halo from its neighbours' exports. Per round and block there are two tasks
    (the round and the export accessor).
    """

    def __init__(self, client, problems: list, row_ranges: list[tuple[int, int]]):
        self.client = client
        self.problems = problems
        self.halos = halos = client.gather(client.map(halo_rows_of, problems))
        starts = np.array([r[0] for r in row_ranges])
        n = len(problems)
        owners = [np.searchsorted(starts, halo, side="right") - 1 for halo in halos]
        export_sets = [[] for _ in range(n)]
        for halo, owner in zip(halos, owners):
            for c in np.unique(owner):
                export_sets[c].append(halo[owner == c] - starts[c])
        self.export_rows = [np.unique(np.concatenate(e)) if e else np.empty(0, np.int64)
                            for e in export_sets]
        # per block: its halo's source blocks and positions in their exports, in halo order
        self.sources, self.positions = [], []
        for halo, owner in zip(halos, owners):
            blocks = [int(c) for c in np.unique(owner)]
            self.sources.append(blocks)
            self.positions.append([np.searchsorted(self.export_rows[c], halo[owner == c] - starts[c])
                                   for c in blocks])

    def _restore(self, n_types: int, run_path: str | None, checkpoint: dict | None) -> list:
        """Block states from the last complete checkpoint, or the initial ones."""
        n = len(self.problems)
        if checkpoint is None:
            return self.client.map(initial_state, self.problems, [n_types] * n,
                                   self.export_rows, pure=False)
        return self.client.map(load_state, self.problems, [run_path] * n,
                               [checkpoint["slot"]] * n, self.export_rows, pure=False)

    def solve(self, gram, lam, rho, *, n_types, max_iter=1000, tol=1e-4, inner_sweeps=1,
              run_path: str | None = None, resume_from: dict | None = None,
              max_failures: int = 5, on_round=None) -> BlockSolution:
        """Rounds until the largest first-step change is below ``tol`` x the largest value.

        With ``run_path``, every round's beta is checkpointed into alternating slots and
        ``on_round`` receives ``(round, change, checkpoint)`` once all blocks have written,
        the caller records it. A round that fails because a worker was lost is restarted
        from the last complete checkpoint (rounds are pure functions of beta, so the result
        is unchanged); ``resume_from`` (a recorded checkpoint) continues an interrupted run.
        """
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        client = self.client
        n = len(self.problems)
        gram = np.ascontiguousarray(gram)
        checkpoint = resume_from
        rounds = checkpoint["round"] if checkpoint else 0
        changes = list(checkpoint["changes"]) if checkpoint else []
        states = self._restore(n_types, run_path, checkpoint)
        exports = client.map(exports_of, states, pure=False)
        converged = bool(changes) and changes[-1] < tol
        failures = 0
        while not converged and rounds < max_iter:
            check_stop()  # between rounds: the last checkpoint is complete
            slot = (rounds + 1) % 2
            target = (run_path, slot) if run_path else None
            try:
                new_states = [client.submit(block_round, self.problems[b], states[b], gram,
                                            float(lam), float(rho), int(inner_sweeps),
                                            float(tol), self.export_rows[b], self.positions[b],
                                            target, *[exports[c] for c in self.sources[b]],
                                            pure=False) for b in range(n)]
                new_exports = client.map(exports_of, new_states, pure=False)
                stats = [(e[1], e[2]) for e in client.gather(new_exports)]
            except (FutureCancelledError, KilledWorker, OSError) as error:
                failures += 1
                if failures > max_failures:
                    raise
                warnings.warn(f"solver round {rounds + 1} lost its data ({type(error).__name__}); "
                              f"restarting from round {checkpoint['round'] if checkpoint else 0}",
                              RuntimeWarning, stacklevel=2)
                rounds = checkpoint["round"] if checkpoint else 0
                changes = list(checkpoint["changes"]) if checkpoint else []
                states = self._restore(n_types, run_path, checkpoint)
                exports = client.map(exports_of, states, pure=False)
                continue
            states, exports = new_states, new_exports
            rounds += 1
            changes.append(max(s[0] for s in stats) / (max(s[1] for s in stats) + 1e-10))
            if run_path:
                checkpoint = {"round": rounds, "slot": slot, "changes": list(changes)}
            if on_round is not None:
                on_round(rounds, changes[-1], checkpoint)
            converged = changes[-1] < tol
        self._exports = exports
        return BlockSolution(states, converged, rounds, changes)

    def objective(self, states: list, ysq: list, gram, lam, rho) -> float:
        exports = self._exports
        parts = [self.client.submit(block_objective, self.problems[b], states[b], gram, ysq[b],
                                    float(lam), float(rho), self.positions[b],
                                    *[exports[c] for c in self.sources[b]], pure=False)
                 for b in range(len(self.problems))]
        return float(sum(self.client.gather(parts)))
