"""An enumerable masked diffusion model, so that DTM's claims can be checked exactly.

V clean tokens, sequences of length L, MASK = V. The unmasking posteriors p(. | x_t, i) are a free
table of logits with one row per (partially masked state x_t, position i), so a phase of DTM is a
convex problem with nothing to generalise. The model's terminal law is the random-order CTMC (reveal
one uniformly chosen masked position per step), computed exactly by averaging over the L! orders.

    python tests/tabular.py     # anneal a = 0 -> 1 with phi in {0, 1} and several eta; TV to the
                                # exact tilted law after each phase -> figures/exact_tilt.png

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


def terminal_law(table):
    """Exact law (V^L,) of the random-order sampler with posterior logits `table` (S, L, V).

    q(x) = (1/L!) sum_orders prod_k p(x^{o_k} | x revealed at o_1 .. o_{k-1}, o_k).
    """
    logp = F.log_softmax(table, -1)
    n, m = len(X), len(ORDERS)
    x = X[:, None, :].expand(n, m, L)
    x_t = torch.full((n, m, L), MASK)
    log_q = torch.zeros(n, m, dtype=table.dtype)
    for k in range(L):
        pos = ORDERS[:, k].expand(n, m)
        tok = x.gather(2, pos[..., None])[..., 0]
        log_q = log_q + logp[index(x_t), pos, tok]
        x_t = x_t.scatter(2, pos[..., None], tok[..., None])
    return log_q.exp().mean(1)


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


def expected_loss(student, teacher, p_a, r_of, eta, phi):
    """The DTM loss in exact expectation: x1 ~ p_a over all V^L sequences, every masking with its
    ELBO weight, and the exact Z = E_a[e^{eta r}] (eq. 16 with nothing sampled)."""
    x1r, mask, w, cells = masked_batch(X)
    P = len(PATTERNS)
    Z = (p_a * torch.exp(eta * r_of)).sum()
    loss = dtm_loss(student[cells], teacher[cells], x1r, mask, r_of.repeat_interleave(P),
                    w * p_a.repeat_interleave(P), eta, phi, normalise=False)
    return loss * len(x1r) / Z                                         # dtm_loss divides by the rows


def dtm_phase(teacher, r_of, n, eta, phi, generator=None, iters=60):
    """One DTM phase: n rollouts of the teacher, then minimise the loss over the free table."""
    x1 = sample(teacher, n, generator)
    x1r, mask, w, cells = masked_batch(x1)                             # fixed for the whole phase
    r, teacher_logits = r_of[seq_index(x1r)], teacher[cells]
    student = teacher.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([student], lr=1, max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = dtm_loss(student[cells], teacher_logits, x1r, mask, r, w, eta, phi)
        loss.backward()
        return loss
    opt.step(closure)
    return student.detach()


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
    g = torch.Generator().manual_seed(seed)
    table = posterior_table(p0)
    K = round(a_max / eta)
    out = [tv(terminal_law(table), p0)]
    for k in range(1, K + 1):
        table = dtm_phase(table, r, n, eta, phi, g)
        out.append(tv(terminal_law(table), tilted(p0, r, k * eta)))
    return out


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
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    bx.loglog(etas, ratio, "o-")
    bx.axhline(1.0, color="gray", lw=0.8)
    bx.set_xlabel("eta")
    bx.set_ylabel("Var[grad] phi=1 / phi=0")
    bx.set_title("control variate (Prop. 3.3), at the teacher")
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "figures", "exact_tilt.png")
    fig.savefig(out, dpi=100)
    print("wrote", out)
