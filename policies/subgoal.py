"""Subgoals from a latent graph of the training data, for goals beyond the planning horizon.

An MPC planner minimizing the distance between predicted and goal latents is greedy beyond its
horizon: in a U-shaped maze it presses against the wall between two arms. `LatentGraph` is the
world model's memory of where the demonstrations went: nodes are latents of training frames
(encoded by the world model's own encoder), directed edges join each node to the next one of its
episode (so a path follows demonstrated motion in its direction, which matters when latents carry
velocities), and undirected shortcuts join nodes whose latents are as close as consecutive ones.
To plan toward a far goal, MPC aims at the node about `lookahead` typical steps along the shortest
path from the current latent to the goal's (the goal itself once it is that close). The graph
never touches a simulator: it holds latents only.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Latent = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GraphConfig:
    stride: int = 5  # one node every `stride` steps of each episode (the world model's frameskip)
    neighbors: int = 8  # shortcut candidates per node
    shortcut_quantile: float = 0.9  # shortcuts no longer than this quantile of consecutive-node distances
    lookahead: float = 2.0  # subgoal distance along the path, in typical consecutive-node steps
    goal_reach: float = 1.0  # aim at the goal itself when it lies within this many hops' distance

    def __post_init__(self) -> None:
        if self.stride < 1 or self.neighbors < 1 or not self.lookahead > 0:
            raise ValueError("stride and neighbors must be >= 1 and lookahead > 0")
        if not 0 < self.shortcut_quantile <= 1:
            raise ValueError(f"shortcut_quantile must be in (0, 1], got {self.shortcut_quantile}")


def latent_vectors(z: Latent, proprio_weight: float) -> torch.Tensor:
    """Flatten latents (N, ...) into vectors whose squared distance matches the planning cost:
    mean-squared visual difference plus `proprio_weight` times mean-squared proprio difference."""
    v = z["visual"].flatten(1) / z["visual"][0].numel() ** 0.5
    parts = [v]
    if "proprio" in z and proprio_weight:
        parts.append(z["proprio"] * (proprio_weight / z["proprio"].shape[-1]) ** 0.5)
    return torch.cat(parts, dim=1)


class LatentGraph:
    """Nodes: latents (N, ...) of training frames with their episode ids; edges: consecutive steps
    (directed, forward in time) and short shortcuts (both ways). `latents` keeps the full node
    latents, so a subgoal can be handed to a planner."""

    def __init__(self, latents: Latent, episode: np.ndarray, cfg: GraphConfig, proprio_weight: float) -> None:
        self.cfg = cfg
        self.latents = latents
        self.proprio_weight = proprio_weight
        self.vectors = latent_vectors(latents, proprio_weight).float()
        n = len(self.vectors)
        self.adj: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        same = episode[1:] == episode[:-1]
        step = (self.vectors[1:] - self.vectors[:-1]).norm(dim=1).numpy()
        consecutive = step[same]
        self.step_length = float(np.median(consecutive)) if len(consecutive) else 1.0
        for i in np.flatnonzero(same):  # forward in time only: a path follows demonstrated motion
            self.adj[int(i)].append((int(i) + 1, float(step[i])))
        limit = float(np.quantile(consecutive, cfg.shortcut_quantile)) if len(consecutive) else 0.0
        d = torch.cdist(self.vectors, self.vectors)  # (N, N)
        k = min(cfg.neighbors + 1, n)
        dist, idx = d.topk(k, largest=False)
        for i in range(n):
            for dj, j in zip(dist[i].tolist(), idx[i].tolist(), strict=True):
                if j != i and dj <= limit:
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

    def subgoal(self, current: Latent, goal: Latent) -> Latent | None:
        """The node latent to aim at next (leading dim removed), or None when the goal is within reach.
        `current` and `goal` are single latents without a leading batch dimension."""
        i = self.subgoal_index(
            *(
                latent_vectors({k: v[None] for k, v in z.items()}, self.proprio_weight)[0]
                for z in (current, goal)
            )
        )
        return None if i is None else {k: v[i] for k, v in self.latents.items()}

    def subgoal_index(self, current: torch.Tensor, goal: torch.Tensor) -> int | None:
        """Index of the node to aim at on the shortest path from `current` to `goal` (vectors), or None
        when the goal lies within reach. The walk starts at the path node closest to `current` (the
        path may begin at a node slightly behind) and takes the first later node at least `lookahead`
        typical steps away in latent distance. Distance, not hops: shortcut edges join near-duplicate
        nodes (the same place passed in several episodes), so hops alone say little about progress."""
        reach = self.cfg.lookahead * self.step_length
        if (current - goal).norm() <= self.cfg.goal_reach * reach:
            return None
        # More candidates at the goal: a resting goal state resembles episode starts, which no edge
        # enters; widen both candidate sets until some path connects them.
        found: list[int] = []
        for k in (self.cfg.neighbors, 4 * self.cfg.neighbors, 16 * self.cfg.neighbors):
            found = self.path(self.nearest(current, k), self.nearest(goal, 4 * k))
            if found:
                break
        if not found:
            return None
        path = torch.tensor(found)
        dist = (self.vectors[path] - current[None]).norm(dim=1)  # (len(path),)
        start = int(dist.argmin())
        ahead = torch.nonzero(dist[start:] >= reach).flatten()
        return None if len(ahead) == 0 else int(path[start + int(ahead[0])])


class SubgoalMPC:
    """MPC toward far goals: before each replan, every episode whose goal lies beyond `lookahead` hops
    of the latent graph aims at the node that many hops along the shortest path instead.

    Wraps an `MPC` (policies.mpc) and satisfies the same `Policy` protocol."""

    def __init__(self, mpc: Any, graph: LatentGraph) -> None:
        self.mpc = mpc
        self.graph = graph
        self._final: Latent | None = None
        self.subgoal_count = 0  # replans that aimed at a subgoal rather than the goal itself

    @property
    def plan_seconds(self) -> list[float]:
        return self.mpc.plan_seconds

    @property
    def last_result(self) -> Any:
        return self.mpc.last_result

    def set_goal(self, goal_obs: dict[str, torch.Tensor]) -> None:
        self.mpc.set_goal(goal_obs)
        self._final = self.mpc.goal_latent

    def reset(self) -> None:
        self.mpc.reset()

    def _retarget(self, obs: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            z = self.mpc.model.encode(obs)
        goal = {k: v.clone() for k, v in self._final.items()}
        for e in range(z["visual"].shape[0]):
            cur = {k: v[e, -1] for k, v in z.items() if k in ("visual", "proprio")}
            fin = {k: v[e, -1] for k, v in self._final.items() if k in ("visual", "proprio")}
            sub = self.graph.subgoal(cur, fin)
            if sub is not None:
                self.subgoal_count += 1
                for k, v in sub.items():
                    goal[k][e, -1] = v.to(goal[k])
        self.mpc.goal_latent = goal

    def predict_action_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._retarget(obs)
        return self.mpc.predict_action_chunk(obs)

    def select_action(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mpc.needs_replan:
            self._retarget(obs)
        return self.mpc.select_action(obs)
