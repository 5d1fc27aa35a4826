"""An enumerable masked diffusion model, so that DTM's claims can be checked exactly.

V clean tokens, sequences of length L, MASK = V. The unmasking posteriors p(. | x_t, i) are a free
table of logits with one row per (partially masked state x_t, position i), so a phase of DTM is a
convex problem with nothing to generalise. The model's terminal law is the random-order CTMC (reveal
one uniformly chosen masked position per step), computed exactly by averaging over the L! orders.

    python lab/tabular.py     # anneal a = 0 -> 1 with phi in {0, 1} and several eta; TV to the
                                # exact tilted law after each phase; the control variate's variance;
                                # the same from bases that are not self-consistent; a model restricted
                                # to k directions -> figures/exact_tilt.png

The tests that use it are tests/test_exact_tilt.py.
"""
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dtm import dtm_loss

V, L = 3, 4
MASK = V
N_STATES = (V + 1) ** L
X = torch.tensor(list(itertools.product(range(V), repeat=L)))          # (V^L, L) every clean sequence
ORDERS = torch.tensor(list(itertools.permutations(range(L))))          # (L!, L) every unmasking order
PLACE = (V + 1) ** torch.arange(L - 1, -1, -1)                         # a state's index in base V + 1
STATES = torch.stack([(torch.arange(N_STATES) // p) % (V + 1) for p in PLACE], 1)   # (S, L)


def index(x_t):
    """Row of the table for each partially masked sequence x_t (..., L)."""
    return (x_t * PLACE).sum(-1)


def sampler_paths():
    """Every path of the random-order sampler, one row per (x, order, step k), flattened in that
    order: the table cell (state before step k, position o_k) it reads, and x."""
    x = X[:, None, :].expand(len(X), len(ORDERS), L)
    x_t, states, positions = torch.full_like(x, MASK), [], []
    for k in range(L):
        pos = ORDERS[:, k].expand(len(X), len(ORDERS))
        states.append(index(x_t))
        positions.append(pos)
        x_t = x_t.scatter(2, pos[..., None], x.gather(2, pos[..., None]))
    cells = (torch.stack(states, -1).flatten(), torch.stack(positions, -1).flatten())
    return cells, x[:, :, None, :].expand(-1, -1, L, -1).reshape(-1, L)


PATH_CELLS, PATH_X1 = sampler_paths()                                  # (V^L * L! * L,) rows
PATH_MASK = F.one_hot(PATH_CELLS[1], L).bool()                         # the one position revealed
PATH_SEQ = torch.arange(len(X)).repeat_interleave(len(ORDERS) * L)     # the row's x in X


def path_law(table):
    """(V^L, L!): the probability of each path (x, order) of the sampler with posterior logits `table`,
    (1/L!) prod_k p(x^{o_k} | x revealed at o_1 .. o_{k-1}, o_k)."""
    logp = F.log_softmax(table, -1)[PATH_CELLS + (PATH_X1[PATH_MASK],)]
    return logp.view(len(X), len(ORDERS), L).sum(-1).exp() / len(ORDERS)


def terminal_law(table):
    """Exact law (V^L,) of the random-order sampler with posterior logits `table` (S, L, V): the sum
    of path_law over the L! orders."""
    return path_law(table).sum(1)


def posterior_table(p):
    """The logits of the exact unmasking posteriors of a law p (V^L,): the model whose law is p."""
    revealed = STATES != MASK                                            # (S, L)
    consistent = ((STATES[:, None, :] == X[None]) | ~revealed[:, None, :]).all(-1)    # (S, V^L)
    onehot = F.one_hot(X, V).double()                                    # (V^L, L, V)
    num = torch.einsum("sx,x,xiv->siv", consistent.double(), p, onehot)
    return num.clamp_min(1e-300).log()


def sample(table, n, generator=None):
    """n draws of the random-order CTMC with posterior logits `table`: (n, L) clean sequences."""
    x = torch.full((n, L), MASK)
    rows = torch.arange(n)
    for _ in range(L):
        pos = torch.where(x == MASK, torch.rand(n, L, generator=generator), -1.0).argmax(1)
        probs = F.softmax(table[index(x), pos], -1)
        x[rows, pos] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return x


# every non-empty mask pattern, and its ELBO weight: the chance that, in a random order, the revealed
# set is exactly the complement and position i comes next, (k-1)! (L-k)! / L! for k masked positions
PATTERNS = torch.tensor(list(itertools.product([False, True], repeat=L)))[1:]        # (2^L - 1, L)
ELBO_WEIGHT = torch.tensor([math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L)
                            for k in PATTERNS.sum(1).tolist()], dtype=torch.float64)


def masked_batch(x1):
    """Every masking of every x1 (n, L): x1 repeated, the mask, the ELBO weight per row, and the
    table cells (state, position) of the masked tokens in row-major order (student[cells] are the logits)."""
    n, P = len(x1), len(PATTERNS)
    mask = PATTERNS.repeat(n, 1)
    x1r = x1.repeat_interleave(P, 0)
    state = index(torch.where(mask, MASK, x1r))
    cells = (state[:, None].expand_as(mask)[mask], torch.arange(L).expand_as(mask)[mask])
    return x1r, mask, ELBO_WEIGHT.repeat(n), cells


def expected_loss(student, teacher, p_a, r_of, eta, phi, centred=False):
    """The DTM loss in exact expectation: x1 ~ p_a over all V^L sequences, every masking with its
    ELBO weight, and the exact Z = E_a[e^{eta r}] (eq. 16 with nothing sampled)."""
    x1r, mask, w, cells = masked_batch(X)
    P = len(PATTERNS)
    log_Z = (p_a * torch.exp(eta * r_of)).sum().log().expand(len(x1r))
    phi = phi * log_Z.exp() if centred else phi                       # --centred: eq. 17's coefficient phi Z
    loss = dtm_loss(student[cells], teacher[cells], x1r, mask, r_of.repeat_interleave(P),
                    w * p_a.repeat_interleave(P), eta, phi, log_Z=log_Z)
    return loss * len(x1r)                                             # dtm_loss divides by the rows


def lbfgs(theta, loss_of, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15):
    """argmin over theta of the scalar loss_of(theta), by LBFGS from theta."""
    theta = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change)

    def closure():
        opt.zero_grad()
        loss = loss_of(theta)
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach()


def dtm_phase(teacher, r_of, n, eta, phi, generator=None, iters=60):
    """One DTM phase: n rollouts of the teacher, then minimise the loss over the free table."""
    x1 = sample(teacher, n, generator)
    x1r, mask, w, cells = masked_batch(x1)                             # fixed for the whole phase
    r, teacher_logits = r_of[seq_index(x1r)], teacher[cells]
    return lbfgs(teacher, lambda student: dtm_loss(student[cells], teacher_logits, x1r, mask, r, w, eta, phi),
                 max_iter=iters, tolerance_change=1e-14)


def seq_index(x):
    """Index of each clean sequence x (..., L) in X."""
    return (x * V ** torch.arange(L - 1, -1, -1)).sum(-1)


def gradient_variance(table, r_of, eta, phi, n, generator=None):
    """Variance of the per-rollout gradient of dtm_loss at student == teacher, over n rollouts.

    Each rollout's gradient (w.r.t. the whole table, all its maskings) is one sample; returns
    mean_n |g_n - mean g|^2. Same rollouts and states for every (eta, phi) given the same generator.
    """
    x1 = sample(table, n, generator)
    x1r, mask, w, (s, pos) = masked_batch(x1)
    logits = table[s, pos].clone().requires_grad_(True)
    loss = dtm_loss(logits, table[s, pos], x1r, mask, r_of[seq_index(x1r)], w, eta, phi)
    (g,) = torch.autograd.grad(loss * n, logits)                       # (tokens, V), one rollout's share each
    rollout = mask.nonzero()[:, 0] // len(PATTERNS)
    G = torch.zeros(n, N_STATES * L, V, dtype=g.dtype).index_put_((rollout, s * L + pos), g, accumulate=True)
    G = G.flatten(1)
    return (G - G.mean(0)).pow(2).sum(1).mean().item()


def tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


def tilted(p0, r, a):
    w = p0 * torch.exp(a * r)
    return w / w.sum()


def anneal(p0, r, eta, phi, n, a_max=1.0, seed=0):
    """DTM from a = 0 to a_max; the TV between the model's exact law and p0 e^{a r} / Z per phase."""
    return anneal_from(posterior_table(p0), r, eta, phi, n, a_max, seed)[0]


def anneal_from(table, r, eta, phi, n, a_max=1.0, seed=0):
    """DTM from any table (its own law q0 is the base): the TV to q0 e^{a r} / Z after each phase, and
    the realised fraction of the exact tilt's reward gain at a_max, (E_q[r] - E_q0[r]) / (E_tilt[r] - E_q0[r])."""
    g = torch.Generator().manual_seed(seed)
    q0 = terminal_law(table)
    K = round(a_max / eta)
    out = [0.0]
    for k in range(1, K + 1):
        table = dtm_phase(table, r, n, eta, phi, g)
        out.append(tv(terminal_law(table), tilted(q0, r, k * eta)))
    gain = ((tilted(q0, r, a_max) - q0) * r).sum()
    return out, (((terminal_law(table) - q0) * r).sum() / gain).item()


# ----------------------------------------------------------------------------- a restricted model
# A network cannot set each conditional on its own: a phase moves its table only along the directions
# its parameters span. The model below is the plainest such family: table = posterior_table(p0) +
# (Phi theta).view(table), Phi a fixed (cells, k) Gaussian, theta in R^k, every loss in exact expectation.

def subspace(p0, k, seed=0):
    """(base, table): the base table and the model, table(theta) = base + (Phi @ theta).view(base.shape)."""
    g = torch.Generator().manual_seed(seed)
    base = posterior_table(p0)
    Phi = torch.randn(base.numel(), k, generator=g, dtype=base.dtype) / math.sqrt(k)
    return base, lambda theta: base + (Phi @ theta).view(base.shape)


def expected_path_loss(student, teacher, r_of, eta, phi):
    """The DTM loss at the sampler's own states (lab/experiments.py --states path) in exact expectation: every
    path (x, order) with its probability under the teacher, every step of it, the token revealed."""
    path_p = path_law(teacher)
    Z = (path_p.sum(1) * torch.exp(eta * r_of)).sum()
    loss = dtm_loss(student[PATH_CELLS], teacher[PATH_CELLS], PATH_X1, PATH_MASK, r_of[PATH_SEQ],
                    path_p[..., None].expand(-1, -1, L).flatten(), eta, phi, log_Z=torch.zeros(len(PATH_X1)))
    return loss * len(PATH_X1) / Z


def anneal_subspace(p0, r, k, eta, phi=1.0, a_max=1.0, states="forward", seed=0):
    """DTM from p0 with the k-direction model, each phase's loss minimised exactly over theta (no
    rollouts): its minimiser is the point nearest the tilted posteriors that the k directions reach.
    states: "forward" masking (the paper) or "path", the sampler's own states. Returns the realised
    fraction of the exact tilt's gain in E[r] at a_max, and the TV to p0 e^{a_max r} / Z."""
    base, table = subspace(p0, k, seed)
    theta = torch.zeros(k, dtype=base.dtype)
    for _ in range(round(a_max / eta)):
        teacher = table(theta)
        p_a = terminal_law(teacher)
        if states == "path":
            theta = lbfgs(theta, lambda th: expected_path_loss(table(th), teacher, r, eta, phi))
        else:
            theta = lbfgs(theta, lambda th: expected_loss(table(th), teacher, p_a, r, eta, phi))
    return realised(terminal_law(table(theta)), p0, r, a_max)


def fit_subspace(p0, r, k, how, a=1.0, seed=0):
    """The k-direction model fitted in one go to the exact tilt p0 e^{a r} / Z. how = "law": the
    nearest law, min KL(tilt || q_theta) (needs the model's likelihood, which an MDM does not have);
    "elbo": the ELBO fit of exact samples of the tilt (supervised fine-tuning on perfect data).
    Returns (realised fraction, TV) as anneal_subspace does."""
    base, table = subspace(p0, k, seed)
    target = tilted(p0, r, a)
    if how == "law":
        loss_of = lambda th: -(target * terminal_law(table(th)).log()).sum()      # noqa: E731
    else:
        zero = torch.zeros_like(r)                                     # phi = 0, eta = 0: the ELBO
        loss_of = lambda th: expected_loss(table(th), base, target, zero, 0.0, 0.0)  # noqa: E731
    theta = lbfgs(torch.zeros(k, dtype=base.dtype), loss_of, max_iter=1000)
    return realised(terminal_law(table(theta)), p0, r, a)


def realised(q, p0, r, a):
    """(E_q[r] - E_p0[r]) / (E_tilt[r] - E_p0[r]) for the tilt p0 e^{a r} / Z, and TV(q, tilt)."""
    target = tilted(p0, r, a)
    return (((q - p0) * r).sum() / ((target - p0) * r).sum()).item(), tv(q, target)


def noisy_table(p0, noise, seed=0):
    """The exact posterior table of p0 plus N(0, noise^2) on every logit: a model whose rows are not
    the posteriors of its own sampling law (not self-consistent), like a trained network."""
    g = torch.Generator().manual_seed(seed)
    table = posterior_table(p0)
    return table + noise * torch.randn(table.shape, generator=g, dtype=table.dtype)


def cell_weights(q):
    """The table cells that x1 ~ q visits under the forward masking, with their ELBO weights."""
    x1r, mask, w, cells = masked_batch(X)
    weight = (w * q.repeat_interleave(len(PATTERNS)))[mask.nonzero()[:, 0]]     # per masked token
    return cells, weight / weight.sum()


def inconsistency(table):
    """Mean TV between the table's rows and the posteriors of its own law q = terminal_law(table),
    over the cells x1 ~ q visits (ELBO-weighted): 0 exactly when the model is self-consistent."""
    q = terminal_law(table)
    cells, weight = cell_weights(q)
    rows = F.softmax(table[cells], -1)
    post = F.softmax(posterior_table(q)[cells], -1)
    return (weight * 0.5 * (rows - post).abs().sum(-1)).sum().item()


def self_consistency_gap(table):
    """The maze's cheap diagnostic (maze.mdm.self_consistency_gap) in exact expectation: the mean
    cross-entropy of x1^i under the row minus the row's entropy, over x1 ~ q and its maskings."""
    q = terminal_law(table)
    cells, weight = cell_weights(q)
    x1r, mask, _, _ = masked_batch(X)
    logp = F.log_softmax(table[cells], -1)
    ce = -logp.gather(1, x1r[mask][:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return (weight * (ce - ent)).sum().item()


def inconsistent_minimiser(teacher, r, eta, phi):
    """The pointwise minimiser of the expected DTM loss when x1 ~ q, the teacher's own law, but the
    teacher's rows p_a are not q's posteriors post: T + phi (p_a - post) / E_q[e^{eta r} | x_t],
    T = E_q[e^{eta r} 1{X1^i = v} | x_t] / E_q[e^{eta r} | x_t]. Per visited cell, (N, V)."""
    q = terminal_law(teacher)
    cells, _ = cell_weights(q)
    tilt = q * torch.exp(eta * r)
    T = F.softmax(posterior_table(tilt)[cells], -1)
    post = F.softmax(posterior_table(q)[cells], -1)
    E = posterior_table(tilt)[cells].logsumexp(-1).exp() / posterior_table(q)[cells].logsumexp(-1).exp()
    return cells, T + phi * (F.softmax(teacher[cells], -1) - post) / E[:, None]


def problem(seed=0):
    """A base law p0 with full support and a reward in [0, 1], from a seed."""
    g = torch.Generator().manual_seed(seed)
    p0 = F.softmax(1.5 * torch.randn(len(X), generator=g, dtype=torch.float64), 0)
    r = torch.rand(len(X), generator=g, dtype=torch.float64)
    return p0, r


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p0, r = problem()
    print(f"TV(p0, exact tilt at a=1) = {tv(p0, tilted(p0, r, 1.0)):.3f}")
    fig, (ax, bx, cx, dx) = plt.subplots(1, 4, figsize=(20, 3.8))
    for phi, style in ((1.0, "-"), (0.0, "--")):
        for eta in (0.5, 0.25, 0.1):
            d = anneal(p0, r, eta, phi, n=2000)
            print(f"phi={phi:g} eta={eta:g}: TV after each phase", " ".join(f"{v:.3f}" for v in d))
            ax.plot([k * eta for k in range(len(d))], d, style, marker="o", ms=3, label=f"phi={phi:g} eta={eta:g}")
    grid = [k / 20 for k in range(21)]
    ax.plot(grid, [tv(p0, tilted(p0, r, a)) for a in grid], "k:", label="untrained p0")
    ax.set_xlabel("tilt a")
    ax.set_ylabel("TV(model law, p0 e^{a r}/Z)")
    ax.set_title("DTM lands on the exact tilted law (phi = 1)")
    ax.legend(fontsize=7)
    etas = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    table = posterior_table(p0)
    ratio = [gradient_variance(table, r, eta, 1.0, 4000, torch.Generator().manual_seed(1))
             / gradient_variance(table, r, eta, 0.0, 4000, torch.Generator().manual_seed(1)) for eta in etas]
    print("gradient variance phi=1 / phi=0:", " ".join(f"eta={e:g}: {v:.4f}" for e, v in zip(etas, ratio)))
    bx.loglog(etas, ratio, "o-", label="measured")
    bx.loglog(etas, [e ** 2 for e in etas], "k:", label="eta^2")
    bx.axhline(1.0, color="gray", lw=0.8)
    bx.set_xlabel("eta")
    bx.set_ylabel("Var[grad] phi=1 / phi=0")
    bx.set_title("control variate (Prop. 3.3), at the teacher")
    bx.legend(fontsize=7)
    # a base that is not self-consistent: the exact posterior table of p0 plus noise on its logits
    noises = (0.0, 0.25, 0.5, 1.0, 2.0)
    inc = [inconsistency(noisy_table(p0, s)) for s in noises]
    gap = [self_consistency_gap(noisy_table(p0, s)) for s in noises]
    for phi, style in ((1.0, "o-"), (0.0, "s--")):
        runs = [anneal_from(noisy_table(p0, s), r, 0.1, phi, 4000) for s in noises]
        for s, i, gp, (d, f) in zip(noises, inc, gap, runs):
            q0 = terminal_law(noisy_table(p0, s))
            print(f"noise {s:g}: inconsistency {i:.3f}, CE - H gap {gp:.3f}; phi={phi:g} eta=0.1: TV at a=1 "
                  f"{d[-1]:.3f} (untrained {tv(q0, tilted(q0, r, 1.0)):.3f}), realised reward fraction {f:.3f}")
        cx.plot(inc, [d[-1] for d, _ in runs], style, color="tab:red", label=f"TV at a=1, phi={phi:g}")
        cx.plot(inc, [f for _, f in runs], style, color="tab:blue", label=f"realised reward fraction, phi={phi:g}")
    cx.plot(inc, [tv(terminal_law(noisy_table(p0, s)), tilted(terminal_law(noisy_table(p0, s)), r, 1.0))
                  for s in noises], "k:", label="TV at a=1, untrained")
    cx.set_xlabel("inconsistency: mean TV(rows, posteriors of own law)")
    cx.set_title("from a base that is not self-consistent (eta 0.1)")
    cx.legend(fontsize=7)
    # a model that moves its table only along k random directions, every loss in exact expectation
    ks = (4, 16, 64, 256, 1024)
    curves = {f"DTM eta={eta:g} ({round(1 / eta)} phases)": (lambda k, eta=eta: anneal_subspace(p0, r, k, eta))
              for eta in (0.5, 0.25, 0.1)}
    curves["DTM eta=0.25, the sampler's states"] = lambda k: anneal_subspace(p0, r, k, 0.25, states="path")
    curves["ELBO fit of exact tilt samples"] = lambda k: fit_subspace(p0, r, k, "elbo")
    curves["nearest law, KL (what the model can hold)"] = lambda k: fit_subspace(p0, r, k, "law")
    for (name, f), style in zip(curves.items(), ("o-", "s-", "^-", "v--", "x:", "k*-")):
        v = [f(k)[0] for k in ks]
        print(f"{name}: realised reward fraction at a=1 " + " ".join(f"k={k}: {x:.3f}" for k, x in zip(ks, v)))
        dx.semilogx(ks, v, style, label=name)
    dx.set_xlabel(f"k, directions the model moves in (free table: {posterior_table(p0).numel()})")
    dx.set_ylabel("realised fraction of the gain in E[r], a = 1")
    dx.set_title("k directions: DTM fits conditionals, not the law")
    dx.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "figures", "exact_tilt.png")
    fig.savefig(out, dpi=100)
    print("wrote", out)
