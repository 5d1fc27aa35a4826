"""The maze environment: the paper's four validity conditions, the reward, determinism, the path generator."""
import numpy as np
import pytest

from maze import env


@pytest.fixture(scope="module")
def wall():
    return env.make_maze(0)


def free_path(wall, n=5):
    """A hand-made valid path: walk along free cells from room (1, 1)."""
    path, seen = [env.cell(1, 1)], {env.cell(1, 1)}
    nbrs = env._neighbours(wall)
    while len(path) < n:
        nxt = [u for u in nbrs[path[-1]] if u not in seen][0]
        path.append(nxt)
        seen.add(nxt)
    return path


def test_maze_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert np.array_equal(env.make_maze(0), env.make_maze(0))
    assert not np.array_equal(env.make_maze(0), env.make_maze(1))


def test_maze_shape_rooms_pillars_and_door_fraction(wall):
    assert wall.shape == (41, 41)
    assert wall[0].all() and wall[-1].all() and wall[:, 0].all() and wall[:, -1].all()
    assert not wall[1::2, 1::2].any()                     # every room is free
    assert wall[::2, ::2].all()                           # every pillar is a wall
    # a spanning tree opens 399 of the 760 inner room walls; 40% of the other 361 become doors
    opened = (~wall[1:-1:2, 2:-1:2]).sum() + (~wall[2:-1:2, 1:-1:2]).sum()
    assert opened == 399 + round(0.4 * 361)


def test_valid_path_passes(wall):
    p = free_path(wall)
    assert env.is_valid(wall, p, p[0], p[-1])


def test_each_of_the_four_failure_modes(wall):
    p = free_path(wall)
    s, g = p[0], p[-1]
    assert not env.is_valid(wall, p[1:], s, g)            # (1) does not start at s
    assert not env.is_valid(wall, p[:-1], s, g)           # (2) does not end at g
    walled = env.cell(0, 1)                               # a border wall next to (1, 1)
    assert wall[0, 1]
    assert not env.is_valid(wall, [s, walled, s], s, s)   # (3) steps onto a wall (adjacent, ends right)
    jump = [s, p[2], p[3], p[4]]                          # (4) skips a cell: Manhattan distance 2
    assert not env.is_valid(wall, jump, s, g)


def test_malformed_completions_are_invalid(wall):
    p = free_path(wall)
    s, g = p[0], p[-1]
    L = 10
    good = env.encode((s, g), p, L)[3:]
    after_pad = good.copy()
    after_pad[-1] = g                                     # a cell after the PADs
    with_mask = good.copy()
    with_mask[2] = env.MASK
    empty = np.full(L, env.PAD)
    valid, reward, n = env.score(wall, np.stack([good, after_pad, with_mask, empty]), [(s, g)] * 4)
    assert valid.tolist() == [True, False, False, False]
    assert reward[1:].tolist() == [env.INVALID_REWARD] * 3
    assert n.tolist() == [len(p), len(p), 2, 0]


def test_reward_on_hand_made_paths(wall):
    # path along the top-left corridor: cells (1,1) (1,2) (1,3) if free, else (1,1) (2,1) (3,1)
    p = free_path(wall, 3)
    d = [abs(r - 20) + abs(c - 20) for r, c in map(env.rc, p)]
    assert env.reward(wall, p, p[0], p[-1]) == pytest.approx(min(d) / 20)
    assert env.reward(wall, p, p[0], p[-1]) == pytest.approx((38 - 2) / 20)   # corner: 38 - two steps
    # a single-cell path s = g right next to the centre: (19, 19) is a room, distance 2
    assert env.reward(wall, [env.cell(19, 19)], env.cell(19, 19), env.cell(19, 19)) == pytest.approx(0.1)
    assert env.reward(wall, p[::-1], p[0], p[-1]) == env.INVALID_REWARD       # reversed: wrong ends


def test_generator_paths_are_valid_and_diverse(wall):
    prompts = env.make_prompts(wall)
    rng = np.random.default_rng(0)
    for s, g in prompts[:3]:
        paths = env.perturbed_shortest_paths(wall, s, g, 30, rng)
        assert all(env.is_valid(wall, p, s, g) for p in paths)
        assert len({tuple(p) for p in paths}) >= 10


def test_prompts_are_rooms_on_opposite_sides_of_the_centre(wall):
    prompts = env.make_prompts(wall)
    assert len(set(prompts)) == 8
    for s, g in prompts:
        (sr, sc), (gr, gc) = env.rc(s), env.rc(g)
        assert not wall[sr, sc] and not wall[gr, gc]
        assert (sr - 20) * (gr - 20) + (sc - 20) * (gc - 20) < 0     # opposite sides


def test_diversity_counts_distinct_valid_paths_and_cells():
    x = np.array([[0, 1, env.PAD], [0, 1, env.PAD], [0, 2, env.PAD], [5, 6, 7]])
    ids = np.array([0, 0, 0, 1])
    valid = np.array([True, True, True, False])
    distinct, cells = env.diversity(x, ids, valid)
    assert distinct == pytest.approx((2 + 0) / 2)
    assert cells == pytest.approx((3 + 0) / 2)
