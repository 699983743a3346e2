"""Subgoals from a latent graph of the training data, for goals far from the current state.

An MPC planner minimizing the distance between predicted and goal latents is greedy beyond its
horizon: in a U-shaped maze it presses against the wall between two arms. `LatentGraph` is the
world model's memory of where the demonstrations went: nodes are latents of training frames
(encoded by the world model's own encoder), directed edges join each node to the next one of its
episode (so a path follows demonstrated motion in its direction, which matters when latents carry
velocities), and undirected shortcuts join nodes whose latents are as close as consecutive ones.
To plan toward a far goal, MPC aims at the first node of the shortest path from the current latent to
the goal's that lies `lookahead` typical steps away from the current latent (latent distance, not
steps counted along the path; the goal itself once it is that close). The graph
never touches a simulator: it holds latents only.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from policies.base import Latent, MetricModel
from wm.options import check_numbers


@dataclass(frozen=True)
class GraphConfig:
    stride: int = 5  # one node every `stride` steps of each episode (the world model's frameskip)
    neighbors: int = 8  # shortcut candidates per node
    shortcut_quantile: float = 0.9  # shortcuts no longer than this quantile of consecutive-node distances
    lookahead: float = 2.0  # the first path node this far from the current latent, in typical node steps
    goal_reach: float = 1.0  # aim at the goal itself within goal_reach x lookahead typical node steps

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "graph")  # neighbors=2.5 was a TypeError in topk()
        if self.stride < 1 or self.neighbors < 1 or not 0 < self.lookahead < math.inf:
            raise ValueError(
                f"stride and neighbors must be >= 1 and lookahead finite and > 0, got stride {self.stride}, "
                f"neighbors {self.neighbors}, lookahead {self.lookahead}"
            )
        if not 0 <= self.goal_reach < math.inf:  # NaN or < 0: never the goal; inf: never a subgoal
            raise ValueError(f"goal_reach must be finite and >= 0, got {self.goal_reach}")
        if not 0 < self.shortcut_quantile <= 1:
            raise ValueError(f"shortcut_quantile must be in (0, 1], got {self.shortcut_quantile}")


class LatentGraph:
    """Nodes: states of training frames, as the world model's cost vectors (N, K) (`MetricModel`:
    squared distances between them are the planning cost) with their latents and episode ids;
    edges: consecutive steps (directed, forward in time) and short shortcuts between episodes (both
    ways). `latents` keeps the full node latents (leading (N, ...)), so a subgoal can be handed to a
    planner."""

    def __init__(self, vectors: torch.Tensor, latents: Latent, episode: np.ndarray, cfg: GraphConfig) -> None:
        n = len(vectors)
        if len(episode) != n or any(len(v) != n for v in latents.values()):
            raise ValueError(f"{n} node vectors but {len(episode)} episode ids / other latent counts")
        self.cfg = cfg
        self.latents = latents
        self.vectors = vectors.float()
        self.adj: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        same = episode[1:] == episode[:-1]
        step = (self.vectors[1:] - self.vectors[:-1]).norm(dim=1).numpy()
        consecutive = step[same]
        moving = consecutive[consecutive > 0]  # resting frames: a median of 0 made every node "far enough",
        # so the subgoal was the node at the current state itself and MPC stood still
        # no two nodes of one episode (a stride longer than the episodes): no step to measure reach by,
        # and no subgoals (1.0 was a made-up length, unrelated to the model's latent scale)
        self.step_length = float(np.median(consecutive)) if len(consecutive) else 0.0
        if self.step_length == 0:
            self.step_length = float(np.median(moving)) if len(moving) else 0.0
        for i in np.flatnonzero(same):  # forward in time only: a path follows demonstrated motion
            self.adj[int(i)].append((int(i) + 1, float(step[i])))
        limit = float(np.quantile(consecutive, cfg.shortcut_quantile)) if len(consecutive) else 0.0
        k = min(cfg.neighbors + 1, n)
        dist, idx = _nearest_rows(self.vectors, k)
        for i in range(n):
            for dj, j in zip(dist[i].tolist(), idx[i].tolist(), strict=True):
                # between episodes only: within one, its neighbours in time are nearest, and a shortcut
                # both ways gave every forward edge a twin back (a path ran the demonstration backwards)
                if episode[j] != episode[i] and dj <= limit:
                    self._edge(i, j, dj)

    def _edge(self, i: int, j: int, w: float) -> None:
        self.adj[i].append((j, w))
        self.adj[j].append((i, w))

    def nearest(self, v: torch.Tensor, k: int = 1) -> list[tuple[int, float]]:
        """The `k` nodes nearest to vector `v`, with their distances."""
        d = (self.vectors - v[None]).norm(dim=1)
        dist, idx = d.topk(min(k, len(d)), largest=False)
        return list(zip(idx.tolist(), dist.tolist(), strict=True))

    def path(self, sources: list[tuple[int, float]], targets: list[tuple[int, float]]) -> list[int]:
        """Shortest path (Dijkstra on summed latent distance) from any source to any target, where
        sources and targets are (node, distance to the query) pairs: starting at a source costs its
        distance, and so does finishing at a target. Empty when no target is reachable."""
        finish = dict(targets)
        dist = {u: d for u, d in sources}
        prev: dict[int, int] = {}
        heap = [(d, u) for u, d in sources]
        heapq.heapify(heap)
        best, best_end = np.inf, None
        while heap:
            d, u = heapq.heappop(heap)
            if d > dist.get(u, np.inf) or d >= best:
                continue
            if u in finish and d + finish[u] < best:
                best, best_end = d + finish[u], u
            for v, w in self.adj[u]:
                nd = d + w
                if nd < dist.get(v, np.inf):
                    dist[v], prev[v] = nd, u
                    heapq.heappush(heap, (nd, v))
        if best_end is None:
            return []
        out = [best_end]
        while out[-1] in prev:
            out.append(prev[out[-1]])
        return out[::-1]

    def subgoal_index(self, current: torch.Tensor, goal: torch.Tensor) -> int | None:
        """Index of the node to aim at on the shortest path from `current` to `goal` (vectors), or None
        when the goal lies within reach. The walk starts at the path node closest to `current` (the
        path may begin at a node slightly behind) and takes the first later node at least `lookahead`
        typical steps away in latent distance. Distance, not hops: shortcut edges join near-duplicate
        nodes (the same place passed in several episodes), so hops alone say little about progress."""
        reach = self.cfg.lookahead * self.step_length
        if reach <= 0:  # no demonstrated motion (constant positions): nothing to aim at but the goal
            return None
        if (current - goal).norm() <= self.cfg.goal_reach * reach:
            return None
        # More candidates at the goal: a resting goal state resembles episode starts, which no edge
        # enters; widen both candidate sets until some path connects them. A path ends at a node within
        # reach of the goal where there is one, and starts at none of its ends: ending anywhere, paying
        # the straight line to the goal, a start candidate among the goal's won by the triangle
        # inequality with a path of itself alone, and the robot was sent straight at the wall between.
        found: list[int] = []
        for k in (self.cfg.neighbors, 4 * self.cfg.neighbors, 16 * self.cfg.neighbors):
            near_goal = self.nearest(goal, 4 * k)
            targets = [(u, d) for u, d in near_goal if d <= self.cfg.goal_reach * reach] or near_goal
            ends = {u for u, _ in targets}
            near = self.nearest(current, k)  # starting within reach: a start further along cost its
            near = [(u, d) for u, d in near if d <= reach] or near  # straight line, which tied the walk
            sources = [(u, d) for u, d in near if u not in ends]
            found = self.path(sources, targets) if sources else []
            if found:
                break
        if not found:
            return None
        path = torch.tensor(found)
        dist = (self.vectors[path] - current[None]).norm(dim=1)  # (len(path),)
        start = int(dist.argmin())
        ahead = torch.nonzero(dist[start:] >= reach).flatten()
        return None if len(ahead) == 0 else int(path[start + int(ahead[0])])


class SubgoalSelector:
    """Aims each replan of MPC at a node of the latent graph when the goal lies beyond `lookahead`
    typical steps: MPC hands it the replan's own start latent (encoded once) and the final goal.
    Distances are the world model's own (`MetricModel.cost_vectors`). `count` counts the replans
    of all running episodes that aimed at a subgoal rather than at the goal itself."""

    def __init__(self, graph: LatentGraph, model: MetricModel) -> None:
        self.graph, self.model = graph, model
        self.count = 0

    @torch.no_grad()
    def select(self, z0: Latent, goal: Latent, active: np.ndarray | None = None) -> Latent:
        """z0 leading (E, ...), goal leading (E, ...) -> the goal latent with each far episode's entries
        replaced by its subgoal node's (every key the graph's latents share with the goal). Only the rows
        `active` (E,) bool (None: all) are searched and counted: a runner keeps finished episodes' rows
        in the batch, and their plans are not used."""
        current = self.model.cost_vectors(z0).float().cpu()  # (E, K)
        final = self.model.cost_vectors(goal).float().cpu()  # (E, K)
        out = {k: v.clone() for k, v in goal.items()}
        rows = range(len(current)) if active is None else np.flatnonzero(active)
        for e in rows:
            i = self.graph.subgoal_index(current[e], final[e])
            if i is None:
                continue
            self.count += 1
            for k, v in self.graph.latents.items():
                if k in out:
                    out[k][e] = v[i].to(out[k])
        return out


def _nearest_rows(vectors: torch.Tensor, k: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices) (N, k) of each row's `k` nearest rows of `vectors` (N, D), itself included,
    `block` rows at a time (the whole N x N distance matrix grew with the square of the store)."""
    parts = [
        torch.cdist(vectors[i : i + block], vectors).topk(k, largest=False)
        for i in range(0, max(len(vectors), 1), block)  # (no rows: one empty block)
    ]
    return torch.cat([d for d, _ in parts]), torch.cat([j for _, j in parts])
