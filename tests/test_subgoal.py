"""The latent subgoal graph on toy graphs whose shortest paths are known, and the subgoal selector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.subgoal import GraphConfig, LatentGraph, SubgoalSelector

# A U-shaped demonstration, one step between nodes: up the left arm (x = 0), across the top, down the
# right arm (x = 10). A path may start at any of the `neighbors` nodes nearest to the current state and
# end at any of the 4 x `neighbors` nearest to the goal, paying their straight-line distances: with 2
# neighbors and arms 20 long, no straight line across the gap is among them.
U_PATH = [(0, y) for y in range(20)] + [(x, 19) for x in range(1, 10)] + [(10, y) for y in range(19, -1, -1)]
CFG = GraphConfig(lookahead=2.0, neighbors=2)


def u_graph(cfg: GraphConfig = CFG) -> LatentGraph:
    vectors = torch.tensor(U_PATH, dtype=torch.float32)  # (N, 2)
    latents = {"state": vectors[:, None].clone()}  # (N, T=1, 2)
    return LatentGraph(vectors, latents, np.zeros(len(U_PATH), dtype=int), cfg)


def node(xy: tuple[int, int]) -> int:
    return U_PATH.index(xy)


def test_path_follows_the_u_not_the_straight_line():
    graph = u_graph()
    assert graph.step_length == pytest.approx(1.0)
    # From the bottom of the left arm to the bottom of the right one (10 apart in a straight line, no
    # edge across: the arms are further apart than any demonstrated step): all the way round.
    path = graph.path([(node((0, 0)), 0.0)], [(node((10, 0)), 0.0)])
    assert path == list(range(len(U_PATH)))
    # The subgoal is 2 steps along that path: up the left arm, away from the goal in a straight line.
    assert graph.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0])) == node((0, 2))
    # Half-way round, the subgoal is 2 steps further along the path.
    assert graph.subgoal_index(torch.tensor([5.0, 19.0]), torch.tensor([10.0, 0.0])) == node((7, 19))


def test_no_subgoal_when_the_goal_is_within_reach_or_unreachable():
    graph = u_graph()
    assert graph.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.5])) is None  # within reach
    far = LatentGraph(  # two separate episodes, 10 apart: no edge joins them
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]]),
        {"state": torch.zeros(4, 1, 2)},
        np.array([0, 0, 1, 1]),
        GraphConfig(lookahead=1.0, neighbors=2),
    )
    assert far.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([11.0, 0.0])) is None


def test_edges_follow_demonstrated_direction_and_shortcuts_join_near_nodes():
    graph = u_graph(GraphConfig(shortcut_quantile=0.5))
    forward = {(i, j) for i, adj in enumerate(graph.adj) for j, _ in adj}
    assert (node((0, 0)), node((0, 1))) in forward
    assert (node((0, 0)), node((10, 0))) not in forward and (node((10, 0)), node((0, 0))) not in forward
    with pytest.raises(ValueError, match="episode ids"):
        LatentGraph(torch.zeros(3, 2), {"state": torch.zeros(3, 1, 2)}, np.zeros(2, dtype=int), GraphConfig())


class StateMetric:
    """A MetricModel whose cost vectors are the state itself."""

    def cost_vectors(self, z):
        s = z["state"]
        return s[:, -1] if s.ndim == 3 else s


def test_selector_replaces_far_goals_per_episode_and_counts():
    graph = u_graph()
    selector = SubgoalSelector(graph, StateMetric())
    z0 = {"state": torch.tensor([[[0.0, 0.0]], [[10.0, 1.0]]])}  # (E=2, T=1, 2)
    goal = {"state": torch.tensor([[[10.0, 0.0]], [[10.0, 0.0]]])}
    out = selector.select(z0, goal)
    assert out["state"][0, 0].tolist() == [0.0, 2.0]  # episode 0: far, aims at its subgoal
    assert out["state"][1, 0].tolist() == [10.0, 0.0]  # episode 1: within reach, the goal itself
    assert goal["state"][0, 0].tolist() == [10.0, 0.0]  # the final goal is not modified
    assert selector.count == 1


def test_selector_leaves_finished_episodes_alone():
    """Rows not active (finished episodes a runner keeps in the batch) keep their goal and are not counted."""
    selector = SubgoalSelector(u_graph(), StateMetric())
    z0 = {"state": torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])}  # (E=2, T=1, 2): both far from the goal
    goal = {"state": torch.tensor([[[10.0, 0.0]], [[10.0, 0.0]]])}
    out = selector.select(z0, goal, active=np.array([False, True]))
    assert out["state"][0, 0].tolist() == [10.0, 0.0] and out["state"][1, 0].tolist() == [0.0, 2.0]
    assert selector.count == 1
