"""The latent subgoal graph on toy graphs whose shortest paths are known, and the subgoal selector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange

from policies.base import expand_latent
from policies.mpc import MPC, MPCConfig
from policies.planners import CEMConfig, build_planner
from policies.subgoal import GraphConfig, LatentGraph, SubgoalSelector
from wm.spec import IOSpec

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


def test_the_default_graph_routes_round_the_u_too():
    """With the default 8 neighbours a start candidate was among the goal's 32: a path of itself alone
    won (the triangle inequality), no subgoal was given, and MPC went straight at the wall."""
    graph = u_graph(GraphConfig(lookahead=2.0))
    assert graph.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0])) == node((0, 2))
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
    # shortcuts join episodes: within one, they gave every forward edge a twin back
    assert not any((j, i) in forward for i, j in forward if abs(i - j) == 1)
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


@pytest.mark.parametrize(
    "kw",
    [dict(goal_reach=float("nan")), dict(goal_reach=-1.0), dict(lookahead=float("inf")), dict(lookahead=0.0)],
)
def test_graph_config_refuses_values_that_silently_disable_the_goal_or_the_subgoals(kw):
    """goal_reach NaN or < 0 never aims at the goal itself; lookahead inf never at a subgoal."""
    with pytest.raises(ValueError, match=f"{next(iter(kw))}.* finite"):
        GraphConfig(**kw)


class PointModel:
    """A point moved by the raw actions; obs {"state": (E, To, 2)}, latent {"state": (E, 1, 2)}."""

    action_dim = 2
    io_spec = IOSpec(image_keys=(), image_size=(1, 1), proprio_key="state", proprio_dim=2, action_dim=2,
                     history=2)  # fmt: skip

    def encode(self, obs):
        return {"state": obs["state"][:, -1:]}

    def rollout(self, z0, actions):  # actions (E, N, H, 2) -> leading (E, N, H)
        start = expand_latent(z0, actions.shape[1])["state"]  # (E, N, 1, 2)
        return {"state": rearrange(start + actions.cumsum(2), "e n h d -> e n h 1 d")}

    def cost(self, pred, goal):
        return ((pred["state"][:, :, -1, -1] - goal["state"][:, None, -1]) ** 2).sum(-1)  # (E, N)

    def cost_vectors(self, z):
        return StateMetric().cost_vectors(z)


def test_mpc_with_subgoals_checks_the_active_rows_and_keeps_no_refused_step():
    """Active flags for another number of episodes are one clear error (not a row silently left out of the
    subgoal search, nor an IndexError); a call refused for want of a goal records no observation."""
    model = PointModel()
    selector = SubgoalSelector(u_graph(), model)
    planner = build_planner(
        CEMConfig(horizon=2, samples=16, elites=4, iterations=2, low=-1.0, high=1.0), model
    )
    mpc = MPC(model, planner, MPCConfig(), subgoals=selector)
    far = {"state": np.zeros((2, 2), np.float32)}  # both at (0, 0), the goal down the other arm
    with pytest.raises(RuntimeError, match="no goal"):
        mpc.select_action(far)
    assert len(mpc.history) == 0
    mpc.set_goal({"state": np.array([[10.0, 0.0], [10.0, 0.0]], np.float32)})
    for flags in ([True], [True, True, True]):
        mpc.reset()
        mpc.set_active(np.array(flags))
        with pytest.raises(ValueError, match=f"set_active got {len(flags)} rows' flags for 2 episodes"):
            mpc.select_action(far)
    mpc.reset()
    mpc.set_active(np.array([True, False]))
    assert mpc.select_action(far).shape == (2, 2)
    assert selector.count == 1  # the active, far episode aimed at a subgoal; the finished one was skipped


def line_graph(points: list[tuple[int, int]]) -> LatentGraph:
    vectors = torch.tensor(points, dtype=torch.float32)  # (N, 2)
    return LatentGraph(vectors, {"state": vectors[:, None].clone()}, np.zeros(len(points), dtype=int), CFG)


def test_a_demonstration_mostly_at_rest_still_gives_subgoals_ahead():
    """Resting frames made the median step 0: every node was "far enough", so the subgoal was the node
    at the current state itself and MPC aimed at where it already stood."""
    graph = line_graph([(0, 0)] * 10 + [(0, y) for y in range(1, 6)] + [(0, 5)] * 10)
    assert graph.step_length == pytest.approx(1.0)  # the typical step of the frames that move
    i = graph.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 5.0]))
    assert i is not None and graph.vectors[i].tolist() == [0.0, 2.0]  # lookahead 2 steps along the way


def test_demonstrations_that_never_move_give_no_subgoal():
    """Constant positions: the only node was aimed at instead of the goal, however far the goal."""
    graph = line_graph([(1, 1)] * 6)
    assert graph.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0])) is None


def test_a_graph_without_two_nodes_in_one_episode_gives_no_subgoal():
    """A stride longer than the episodes: no step between nodes to measure reach by, and a made-up
    length of 1.0 (unrelated to the latent scale) still picked lone nodes as subgoals."""
    vectors = torch.tensor([(0.0, 0.0), (0.0, 3.0), (3.0, 3.0), (5.0, 5.0)])
    graph = LatentGraph(
        vectors, {"state": vectors[:, None].clone()}, np.arange(4), GraphConfig(lookahead=0.5)
    )
    assert graph.step_length == 0.0
    assert graph.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0])) is None


@pytest.mark.parametrize("points", [[], [(0, 0)]])
def test_a_graph_of_no_or_one_node_gives_no_subgoal(points):
    graph = (
        line_graph(points)
        if points
        else LatentGraph(torch.zeros(0, 2), {"state": torch.zeros(0, 1, 2)}, np.zeros(0, dtype=int), CFG)
    )
    assert graph.subgoal_index(torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0])) is None
