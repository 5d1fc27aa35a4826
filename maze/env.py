"""The 41x41 maze of the DTM paper (section 4.2, App. D.1): the grid, the tokens, the reward.

Facts from the paper: a fixed, randomly generated 41x41 maze with "door fraction 0.4"; a prompt
`[s, g, SEP]`; a completion `c_1 ... c_n PAD ...` that is valid iff
  (1) c_1 = s,  (2) c_n = g,  (3) every c_i is a free (non-wall) cell,
  (4) consecutive cells are 4-neighbours (Manhattan distance 1);
reward "stay away from the centre" = min_i |c_i - (20, 20)|_1 / 20 for a valid path.

Our reading where the paper is silent (the authors' maze code is not public):
  - walls on even coordinates, 20x20 "rooms" on odd ones; a perfect maze by randomised depth-first
    search from a fixed seed, then a fraction 0.4 of the walls still standing between two adjacent
    rooms are opened as doors (so the maze has loops and many routes between two rooms);
  - one token per cell, `row * 41 + col`, then SEP, PAD, MASK;
  - an invalid completion gets reward -1;
  - training paths are shortest paths under randomly perturbed edge weights, so they are diverse
    (the tilt needs alternatives to choose from) but never wander;
  - the prompt set: pairs (s, g) on opposite sides of the centre, so that the short routes pass near
    it (low reward) and longer routes around it score higher.

    python -m maze.env          # draws the maze and a few training paths to figures/maze.png
"""
import heapq

import numpy as np

SIZE = 41                       # 41x41 cells, paper §4.2
CENTRE = (20, 20)               # the reward's centre
DOOR_FRACTION = 0.4             # paper §4.2; our reading: fraction of remaining room walls opened
N_CELLS = SIZE * SIZE           # cell tokens 0 .. 1680
SEP, PAD, MASK = N_CELLS, N_CELLS + 1, N_CELLS + 2
VOCAB = N_CELLS + 3
INVALID_REWARD = -1.0


def make_maze(seed=0, door_fraction=DOOR_FRACTION):
    """(41, 41) bool array, True = wall. Same seed, same maze."""
    rng = np.random.default_rng(seed)
    wall = np.ones((SIZE, SIZE), dtype=bool)
    rooms = SIZE // 2                                       # 20 rooms per side at odd coordinates
    seen = np.zeros((rooms, rooms), dtype=bool)
    stack = [(0, 0)]
    seen[0, 0] = True
    wall[1, 1] = False
    while stack:                                            # randomised depth-first search
        i, j = stack[-1]
        nbrs = [(i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))
                if 0 <= i + di < rooms and 0 <= j + dj < rooms and not seen[i + di, j + dj]]
        if not nbrs:
            stack.pop()
            continue
        ni, nj = nbrs[rng.integers(len(nbrs))]
        seen[ni, nj] = True
        wall[2 * ni + 1, 2 * nj + 1] = False                # the new room
        wall[i + ni + 1, j + nj + 1] = False                # the wall between the two rooms
        stack.append((ni, nj))
    # walls still standing between two horizontally or vertically adjacent rooms
    r, c = np.nonzero(wall)
    between = ((r % 2 == 1) & (c % 2 == 0) | (r % 2 == 0) & (c % 2 == 1)) \
        & (r > 0) & (c > 0) & (r < SIZE - 1) & (c < SIZE - 1)
    r, c = r[between], c[between]
    doors = rng.permutation(len(r))[: int(round(door_fraction * len(r)))]
    wall[r[doors], c[doors]] = False
    return wall


def cell(r, c):
    return r * SIZE + c


def rc(token):
    return divmod(int(token), SIZE)


def _neighbours(wall):
    """dict: free cell token -> list of free 4-neighbour tokens."""
    free = {cell(r, c) for r, c in zip(*np.nonzero(~wall))}
    return {v: [u for u in (v - SIZE, v + SIZE, v - 1, v + 1)
                if u in free and abs(u % SIZE - v % SIZE) + abs(u // SIZE - v // SIZE) == 1]
            for v in free}


def perturbed_shortest_paths(wall, s, g, n, rng, sigma=1.0):
    """n shortest s->g paths, each under fresh edge weights exp(sigma * N(0,1)) (Dijkstra).

    Returns a list of lists of cell tokens. Small sigma: near-shortest paths; large sigma: more diverse.
    """
    nbrs = _neighbours(wall)
    paths = []
    for _ in range(n):
        weight = {}
        dist, prev, heap = {s: 0.0}, {}, [(0.0, s)]
        while heap:
            d, v = heapq.heappop(heap)
            if v == g:
                break
            if d > dist[v]:
                continue
            for u in nbrs[v]:
                key = (min(u, v), max(u, v))                # one weight per undirected edge
                if key not in weight:
                    weight[key] = float(np.exp(sigma * rng.standard_normal()))
                nd = d + weight[key]
                if nd < dist.get(u, np.inf):
                    dist[u], prev[u] = nd, v
                    heapq.heappush(heap, (nd, u))
        path = [g]
        while path[-1] != s:
            path.append(prev[path[-1]])
        paths.append(path[::-1])
    return paths


def make_prompts(wall, n=8, radius=12, seed=0):
    """n prompts (s, g): free rooms at L1 distance ~radius from the centre, g roughly opposite s.

    Angles are spread evenly so the prompts cover the maze; the short route between s and g runs
    near the centre, which the reward penalises, while longer routes around it score up to radius/20.
    """
    rng = np.random.default_rng(seed)
    rooms = [(r, c) for r in range(1, SIZE, 2) for c in range(1, SIZE, 2)]
    prompts = []
    for k in range(n):
        theta = np.pi * k / n + rng.uniform(0, np.pi / n)
        pick = []
        for th in (theta, theta + np.pi):                   # the room nearest the target point
            tr = CENTRE[0] + radius * np.sin(th) / (abs(np.sin(th)) + abs(np.cos(th)))
            tc = CENTRE[1] + radius * np.cos(th) / (abs(np.sin(th)) + abs(np.cos(th)))
            r, c = min(rooms, key=lambda q: abs(q[0] - tr) + abs(q[1] - tc))
            pick.append(cell(r, c))
        prompts.append(tuple(pick))
    return prompts


def encode(prompt, path, length):
    """Prompt [s, g, SEP] and completion path + PAD... as one int64 array of 3 + length tokens."""
    s, g = prompt
    if len(path) > length:
        raise ValueError(f"path of {len(path)} cells does not fit in {length}")
    return np.array([s, g, SEP] + list(path) + [PAD] * (length - len(path)), dtype=np.int64)


def score(wall, completions, prompts):
    """Vectorised validity and reward of a batch.

    completions: (B, L) ints, c_1 ... c_n PAD ... PAD; prompts: (B, 2) ints (s, g).
    Returns (valid (B,) bool, reward (B,) float, length (B,) int).
    A completion is well formed when its cell tokens are followed by PADs only (n >= 1);
    anything else (SEP, MASK, a cell after a PAD, an empty path) is invalid.
    """
    x = np.asarray(completions, dtype=np.int64)
    s, g = np.asarray(prompts, dtype=np.int64).T
    B, L = x.shape
    is_cell = x < N_CELLS
    n = is_cell.cumprod(axis=1).sum(axis=1)                 # length of the leading run of cells
    pos = np.arange(L)
    body = pos[None, :] < n[:, None]
    well_formed = (n >= 1) & np.all(body | (x == PAD), axis=1)
    xc = np.where(is_cell, x, 0)
    r, c = xc // SIZE, xc % SIZE
    free = ~wall[r, c] | ~body                              # (3) no wall in the path
    step = np.abs(np.diff(r, axis=1)) + np.abs(np.diff(c, axis=1))
    adjacent = (step == 1) | ~body[:, 1:]                   # (4) 4-neighbours, inside the path only
    last = xc[np.arange(B), np.maximum(n - 1, 0)]
    valid = (well_formed & (xc[:, 0] == s) & (last == g)   # (1) c_1 = s, (2) c_n = g
             & free.all(axis=1) & adjacent.all(axis=1))
    d = np.abs(r - CENTRE[0]) + np.abs(c - CENTRE[1])
    dmin = np.where(body, d, 10 ** 6).min(axis=1)
    reward = np.where(valid, dmin / 20.0, INVALID_REWARD)
    return valid, reward, n


def is_valid(wall, path, s, g):
    """The paper's four conditions for one path (a list of cell tokens, no PAD)."""
    return bool(score(wall, [list(path)], [(s, g)])[0][0])


def reward(wall, path, s, g):
    return float(score(wall, [list(path)], [(s, g)])[1][0])


def diversity(completions, prompt_ids, valid, per_prompt=False):
    """Distinct valid paths per prompt and distinct cells they cover per prompt: both averaged over
    the prompts, or (per_prompt=True) as arrays with one entry per prompt."""
    x, prompt_ids, valid = np.asarray(completions), np.asarray(prompt_ids), np.asarray(valid)
    distinct, cells = [], []
    for p in np.unique(prompt_ids):
        rows = x[(prompt_ids == p) & valid]
        distinct.append(len({tuple(row) for row in rows.tolist()}))
        cells.append(len(np.unique(rows[rows < N_CELLS])))
    if per_prompt:
        return np.array(distinct, dtype=np.float64), np.array(cells, dtype=np.float64)
    return float(np.mean(distinct)), float(np.mean(cells))


def plot_rollouts(ax, wall, completions, prompt, valid=None, title=None, colour="tab:red", legend=False):
    """Draw the maze and the valid rollouts of one prompt over it (like the paper's Figure 2).

    The reward's centre is drawn in orange with its L1 distance contours (4, 8, 12 cells: rewards 0.2,
    0.4, 0.6 for a path that stays outside them); the start is a green dot, the goal a blue star."""
    ax.imshow(wall, cmap="Greys", interpolation="nearest")
    rr, cc = np.mgrid[:SIZE, :SIZE]
    ax.contour(cc, rr, np.abs(rr - CENTRE[0]) + np.abs(cc - CENTRE[1]), levels=[4, 8, 12],
               colors="tab:orange", linewidths=0.8, alpha=0.6)
    rng = np.random.default_rng(0)
    for k, row in enumerate(np.asarray(completions)):
        if valid is not None and not valid[k]:
            continue
        rr, cc = np.divmod(row[row < N_CELLS], SIZE)
        jitter = rng.uniform(-0.25, 0.25, size=2)          # so overlapping paths stay visible
        ax.plot(cc + jitter[1], rr + jitter[0], color=colour, alpha=0.35, lw=1.2)
    (sr, sc), (gr, gc) = rc(prompt[0]), rc(prompt[1])
    ax.plot([CENTRE[1]], [CENTRE[0]], "P", color="tab:orange", mec="k", ms=8, zorder=5, label="centre")
    ax.plot([sc], [sr], "o", color="tab:green", mec="k", ms=7, zorder=5, label="start s")
    ax.plot([gc], [gr], "*", color="tab:blue", mec="k", ms=11, zorder=5, label="goal g")
    if legend:
        ax.legend(loc="lower left", fontsize=6, framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wall = make_maze()
    prompts = make_prompts(wall)
    rng = np.random.default_rng(0)
    sigma = 1.25                                            # the training paths' sigma (maze.mdm.training_set)
    fig, axes = plt.subplots(2, 4, figsize=(12, 7))
    for k, (ax, (s, g)) in enumerate(zip(axes.flat, prompts)):
        paths = perturbed_shortest_paths(wall, s, g, 32, rng, sigma)
        x = np.stack([encode((s, g), p, max(map(len, paths)))[3:] for p in paths])
        plot_rollouts(ax, wall, x, (s, g), legend=k == 0,
                      title=f"prompt {k}: lengths {min(map(len, paths))}-{max(map(len, paths))}")
    fig.suptitle(f"The maze, the 8 prompts and 32 training paths each (perturbed shortest paths, sigma {sigma})")
    fig.tight_layout()
    fig.savefig("figures/maze.png", dpi=100)
    print(f"free cells {(~wall).sum()}, prompts {prompts}; wrote figures/maze.png")
