"""diffu-GRPO (d1), the likelihood-based RL that DTM replaces, on the 41x41 maze beside dtm.py.

The KL-regularised objective  max_q E_q[r] - beta KL(q || p_ref)  has the optimum p_ref e^{r / beta} / Z:
at beta = 1 / a it is the tilt p_a that DTM anneals to. Policy gradients need log q(x), which a masked
diffusion model cannot compute. d1 (Zhao et al. 2025) replaces it by a one-step mean-field surrogate:
mask every completion token (and each prompt token with probability 0.15), one forward pass, and
log q(o_k) := log p_theta(o_k | that input) for each completion token k. GRPO then does the rest:
G rollouts per prompt, the advantage r - mean of the prompt's group, a clipped ratio to the policy that
drew the rollouts, mu updates per batch of rollouts, and d1's per-token KL estimator to the reference.

The maze sampler records the order it revealed the tokens in, and that order's law does not depend on
theta, so the exact log-likelihood of the sampled path, sum_k log p_theta(x^{i_k} | x_{t_k}, i_k), is
computable: `--logp path` puts it in place of the surrogate, an oracle that only the maze allows.

    python grpo.py                                 # d1 at beta 1 (the tilt at a = 1), runs/grpo
    python grpo.py --logp path --out runs/grpo_path  # the oracle: the sampled path's own log-likelihood
    python grpo.py --seconds 300                   # stop on time instead of rollouts (--help: all flags)

Kept from d1: G rollouts per prompt, the advantage not divided by the group's std (`--std` divides), the clip
eps 0.5, the gradient clip 0.2, AdamW (0.9, 0.99), p_mask_prompt 0.15. Changed for the comparison: the whole
network trains (d1: LoRA), without weight decay (it pulls towards 0, not towards p_ref) or warm-up, and the
reference is never re-synced (d1: every 64 steps), so that the optimum stays the tilt at a = 1 / beta.

The budget: `--rollouts` (default 1,600 = what `python dtm.py --phi 1 --eta 0.1` trains on: 16 + 4 per
prompt per phase, 10 phases). The measurement is dtm.py's: end rollouts against the exact tilt at
a = 1 / beta (maze/exact.py), the realised fraction and distinct valid paths.
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dtm import DEFAULT_BASE, rollouts
from maze import env
from maze.exact import base_reference, measure
from maze.mdm import PROMPT_LEN, CheckpointError, Help, load, mask_along_path, path_state, save

DIVERSITY_OF = 16                     # distinct valid paths among the first 16 rollouts per prompt, as dtm.py's


# ----------------------------------------------------------------------------- the pieces of d1's loss
def group_advantage(r, std=False):
    """A = r - mean(r over the prompt's G rollouts), r (P, G). d1's released code computes the group's
    std but does not divide by it; std=True does (GRPO as usually written; a constant group gets A = 0)."""
    A = r - r.mean(1, keepdim=True)
    return A / r.std(1, keepdim=True).clamp_min(1e-6) if std else A


def mean_field_states(x1, p_mask_prompt, generator):
    """d1's input for the surrogate log q: every completion token masked, each prompt token masked with
    probability p_mask_prompt. x1 (B, T) -> x_in (B, T), where (B, T) bool (the completion positions),
    weight (B,) = 1 / L: the loss per sequence is the mean over its L completion tokens."""
    B, T = x1.shape
    where = torch.zeros_like(x1, dtype=torch.bool)
    where[:, PROMPT_LEN:] = True
    prompt_masked = torch.rand(B, T, generator=generator, device=x1.device) < p_mask_prompt
    x_in = x1.masked_fill(where | prompt_masked, env.MASK)
    return x_in, where, torch.full((B,), 1.0 / (T - PROMPT_LEN), device=x1.device)


def path_states(x1, rank, m, generator):
    """The oracle's input: m states of each rollout's own path (`mask_along_path`: the state just before a
    uniformly drawn step k, and the positions revealed at k). x1 (B, T), rank (B, L) -> x_in (m B, T),
    where (m B, T), weight (m B,) = S / (m L): sum_{i in where} weight * f_i over the m copies is an
    unbiased estimate of (1/L) sum over all L tokens of f at the state that revealed it."""
    x_t, nxt, S = mask_along_path(x1.repeat(m, 1), rank.repeat(m, 1), generator)
    return x_t, nxt, S.float() / (m * rank.shape[1])


def all_path_states(x1, rank):
    """Every state of each rollout's path: for each sampler step k, x_t with the positions of rank >= k masked,
    and where = those of rank k. x1 (B, T), rank (B, L) -> x_in (S B, T), where (S B, T), weight (S B,) = 1 / L:
    the exact (1/L) sum over all L tokens, each at the state that revealed it (S = the sampler's steps)."""
    B, S = len(x1), int(rank.max()) + 1
    k = torch.arange(S, device=x1.device).repeat_interleave(B)          # copy k of every rollout: (S B,)
    x_in, where = path_state(x1.repeat(S, 1), rank.repeat(S, 1), k)
    return x_in, where, torch.full((S * B,), 1.0 / rank.shape[1], device=x1.device)


def token_logp(model, x_in, where, x1):
    """log p_theta(x1^i | x_in, i) at the N True entries of where (B, T), row-major: (N,)."""
    return F.log_softmax(model(x_in, where).float(), -1).gather(1, x1[where][:, None])[:, 0]


def grpo_loss(logp, logp_old, logp_ref, adv, seq, weight, eps, beta):
    """diffu-GRPO's loss over N completion tokens (all (N,); seq (N,) each token's sequence, adv (B,), weight (B,)):

        per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (e^{ref - logp} - (ref - logp) - 1),
        rho = e^{logp - logp_old}, the ratio to the policy that drew the rollout;
        per sequence: weight_b * sum of its tokens (weight 1 / L: the mean over the completion), then the mean.
    Returns the loss and, for the log, its KL term's value (an estimate of KL(q || p_ref) per token).

    The KL term is d1's (Schulman's k3) estimator of KL(q || p_ref) at q's own tokens: in value it is
    unbiased, but as a loss its gradient is E_q[(1 - p_ref / q) grad log q] = grad KL(p_ref || q), the
    other direction. On one token its fixed point is q = p_ref / (1 - (r - E_q r) / beta), which agrees
    with the tilt p_ref e^{r / beta} / Z only to first order in r / beta (tests/test_grpo.py).
    """
    B = len(adv)
    rho = torch.exp(logp - logp_old)
    A = adv[seq]
    policy = -torch.minimum(rho * A, rho.clamp(1 - eps, 1 + eps) * A)
    d = logp_ref - logp
    kl = torch.exp(d) - d - 1
    def per_sequence(f):                                              # weight_b * sum over b's tokens, mean over b
        return (weight * torch.zeros(B, dtype=f.dtype, device=f.device).index_add(0, seq, f)).sum() / B
    return per_sequence(policy + beta * kl), per_sequence(kl.detach())


def k3_fixed_point(r, beta, p=None):
    """Where d1's loss stops, given the exact likelihood of a one-token policy over n outcomes with rewards r
    (n,), reference probabilities p (n,) (None: n equally likely samples of the reference): its expected
    gradient vanishes at q = p / (1 - (r - E_q r) / beta) (`grpo_loss`), not at the tilt p e^{r / beta} / Z.
    E_q r = m is found by bisection on sum_v q_v = 1 over m in (max r - beta, max r]. Returns q (n,)."""
    r = np.asarray(r, dtype=np.float64)
    p = np.full(len(r), 1.0 / len(r)) if p is None else np.asarray(p, dtype=np.float64)
    lo, hi = r.max() - beta, r.max()
    for _ in range(200):
        m = (lo + hi) / 2
        lo, hi = (m, hi) if (p / (1 - (r - m) / beta)).sum() > 1 else (lo, m)
    q = p / (1 - (r - m) / beta)
    return q / q.sum()


# ----------------------------------------------------------------------------- the loop
def run(args):
    """GRPO from args.base with the base as the fixed reference; returns the history: one row per budget
    met (the measurement), and the per-iteration log."""
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(args.device).manual_seed(args.seed)          # rollouts and maskings
    wall, dev = env.make_maze(), args.device
    prompts = env.make_prompts(wall)
    P, G = len(prompts), args.G
    os.makedirs(args.out, exist_ok=True)
    _, ref_r, ref_valid = base_reference(args.base, wall, prompts, args.reference_per_prompt, args)
    model = load(args.base, dev)[0]
    ref = copy.deepcopy(model).eval().requires_grad_(False)           # p_ref: the base, never re-synced
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    budgets = {k: v for k, v in (("rollouts", args.rollouts), ("seconds", args.seconds)) if v}
    snapshots, log, n_rollouts, train_s = {}, [], 0, 0.0
    bar = tqdm(desc="grpo", total=args.rollouts or None, disable=None)
    try:
        while len(snapshots) < len(budgets):
            t0 = time.time()
            # 1. G rollouts per prompt of the current policy (it is also the "old" policy of the ratio)
            x1, r, valid, rank = (z.flatten(0, 1).to(dev) for z in rollouts(model, prompts, G, args, wall, gen))
            adv = group_advantage(r.view(P, G), args.std).flatten()
            # 2. mu inputs (d1: one prompt-masking seed per inner update), and the old and reference log q there,
            # all before the first update
            inputs = []
            for _ in range(args.mu):
                x_in, where, weight = (mean_field_states(x1, args.p_mask_prompt, gen) if args.logp == "mean_field"
                                       else path_states(x1, rank, args.path_states, gen))
                m = len(x_in) // len(x1)                                # copies of each rollout (path: m states)
                xr = x1.repeat(m, 1)
                with torch.no_grad():
                    old, lref = token_logp(model.eval(), x_in, where, xr), token_logp(ref, x_in, where, xr)
                inputs.append((x_in, where, weight, xr, adv.repeat(m), old, lref))
            # 3. mu clipped-ratio updates on this batch of rollouts
            model.train()
            for x_in, where, weight, xr, A, old, lref in inputs:
                loss, kl = grpo_loss(token_logp(model, x_in, where, xr), old, lref, A, where.nonzero()[:, 0], weight,
                                     args.eps, args.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
            n_rollouts += P * G
            train_s += time.time() - t0
            log.append(dict(rollouts=n_rollouts, seconds=round(train_s, 2), validity=valid.float().mean().item(),
                            reward=r.mean().item(), loss=loss.item(), kl=kl.item()))
            bar.update(P * G)
            bar.set_postfix(valid=f"{log[-1]['validity']:.2f}", kl=f"{kl.item():.3f}")
            for k, v in budgets.items():                                    # 4. keep the model at each budget
                if k not in snapshots and (n_rollouts if k == "rollouts" else train_s) >= v:
                    snapshots[k] = (copy.deepcopy(model.state_dict()), n_rollouts, train_s)
    except KeyboardInterrupt:                                          # Ctrl-C: measure what was trained
        snapshots.setdefault("interrupted", (copy.deepcopy(model.state_dict()), n_rollouts, train_s))
    bar.close()
    history = []
    for k, (state, n, s) in snapshots.items():                         # 5. measure each against the exact tilt
        model.load_state_dict(state)
        x1, r, valid, _ = rollouts(model, prompts, args.end_rollouts_per_prompt, args, wall, gen, progress=True)
        comp = x1[:, :, PROMPT_LEN:].numpy()
        np.save(os.path.join(args.out, f"rollouts_{k}.npy"), comp.reshape(-1, comp.shape[-1]).astype(np.int16))
        history.append(dict(budget=k, **measure(1.0 / args.beta, comp, r.numpy(), valid.numpy(),
                                                min(DIVERSITY_OF, comp.shape[1]), (ref_r, ref_valid),
                                                dict(rollouts=n, train_s=round(s, 1)))))
    save(model, os.path.join(args.out, "model.pt"), args=vars(args))   # the last budget's model
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(dict(history=history, log=log, args=vars(args)), f, indent=1)
    return history, log


def gradient_check(args, batches=4, chunk=512):
    """At the base (policy = reference: ratio 1, KL gradient 0) d1's gradient is the policy gradient of E[r]
    through its log q. On `batches` batches of G rollouts per prompt, compare the surrogate's gradient and the
    oracle's (--path_states states per rollout) with the exact path gradient (every state of every path):
    their cosines, and the exact gradient's cosine between batches (its own noise at this batch size)."""
    torch.manual_seed(args.seed)
    gen, wall = torch.Generator(args.device).manual_seed(args.seed), env.make_maze()
    prompts = env.make_prompts(wall)
    model = load(args.base, args.device)[0]

    def gradient(states, x1, adv):                                     # sum of chunks = the whole batch's
        x_in, where, weight = states
        m = len(x_in) // len(x1)
        xr, A = x1.repeat(m, 1), adv.repeat(m)
        model.zero_grad(set_to_none=True)
        for rows in torch.arange(len(x_in), device=x1.device).split(chunk):
            lp = token_logp(model, x_in[rows], where[rows], xr[rows])
            loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), A[rows], where[rows].nonzero()[:, 0], weight[rows],
                                args.eps, args.beta)
            (loss * len(rows) / len(x1)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    cos = lambda u, v: (u @ v / (u.norm() * v.norm())).item()         # noqa: E731
    exact, rows = [], []
    for _ in tqdm(range(batches), desc="gradients", disable=None):
        x1, r, _, rank = (z.flatten(0, 1).to(args.device) for z in rollouts(model, prompts, args.G, args, wall, gen))
        adv = group_advantage(r.view(len(prompts), args.G), args.std).flatten()
        exact.append(gradient(all_path_states(x1, rank), x1, adv))
        mf = gradient(mean_field_states(x1, args.p_mask_prompt, gen), x1, adv)
        path = gradient(path_states(x1, rank, args.path_states, gen), x1, adv)
        rows.append((cos(mf, exact[-1]), cos(path, exact[-1]), exact[-1].norm().item(), mf.norm().item(),
                     path.norm().item()))
    between = [cos(exact[i], exact[j]) for i in range(batches) for j in range(i + 1, batches)]
    m = np.mean(rows, 0)
    out = dict(cos_surrogate_exact=m[0], cos_oracle_exact=m[1], norm_exact=m[2], norm_surrogate=m[3],
               norm_oracle=m[4], cos_exact_between_batches=float(np.mean(between)) if between else float("nan"))
    print(f"at the base, {batches} batches of {args.G} rollouts per prompt: cos(surrogate, exact path) "
          f"{m[0]:.3f}, cos(oracle with {args.path_states} states, exact) {m[1]:.3f}, cos(exact, exact of another "
          f"batch) {out['cos_exact_between_batches']:.3f}; norms: exact {m[2]:.3g}, surrogate {m[3]:.3g}, oracle "
          f"{m[4]:.3g}")
    return out


# ----------------------------------------------------------------------------- the command line
def parser():
    p = argparse.ArgumentParser(description="diffu-GRPO (d1) on the maze at beta = 1 / a, against the exact tilt "
                                            "p_0 e^{r / beta} / Z.", formatter_class=Help)
    g = p.add_argument_group("d1 (diffu-GRPO; the released values where they carry over)")
    g.add_argument("--beta", type=float, default=1.0, help="KL coefficient; the optimum is the tilt at a = 1 / beta")
    g.add_argument("--logp", choices=["mean_field", "path"], default="mean_field",
                   help="d1's one-step surrogate, or the oracle: the sampled path's exact log-likelihood")
    g.add_argument("--G", type=int, default=8, help="rollouts per prompt (d1: 6; 8 x 8 prompts x 25 = 1,600)")
    g.add_argument("--mu", type=int, default=4, help="updates per batch of rollouts (d1's run.sh: 12)")
    g.add_argument("--eps", type=float, default=0.5, help="ratio clip (d1's train.yaml)")
    g.add_argument("--p_mask_prompt", type=float, default=0.15, help="prompt masking of the surrogate (d1)")
    g.add_argument("--std", action="store_true", help="divide the advantage by the group's std (d1 does not)")
    g.add_argument("--path_states", type=int, default=2, help="--logp path: states of each path per update")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW (0.9, 0.99), no weight decay; 1e-4: the best of "
                                                          "3e-4 and 1e-3 too, for both --logp (lab/FINDINGS_maze.md)")
    g.add_argument("--clip", type=float, default=0.2, help="gradient-norm clip (d1's max_grad_norm)")
    b = p.add_argument_group("budget, measurement and files")
    b.add_argument("--rollouts", type=int, default=1600, help="training rollouts (dtm.py's main command: 1,600)")
    b.add_argument("--seconds", type=float, default=None, help="also stop at this much training time; "
                                                                "each budget met is measured")
    b.add_argument("--end_rollouts_per_prompt", type=int, default=256, help="rollouts per prompt measured")
    b.add_argument("--reference_per_prompt", type=int, default=2048, help="the base's cached reference rollouts")
    b.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    b.add_argument("--base", default=DEFAULT_BASE, help="base checkpoint, also the reference p_ref")
    b.add_argument("--out", default="runs/grpo", help="metrics.json and model.pt go here")
    b.add_argument("--seed", type=int, default=0, help="seeds rollouts and maskings")
    b.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    b.add_argument("--gradient_check", type=int, default=0, metavar="N",
                   help="only compare, at the base on N batches, the surrogate's and the oracle's gradients with the "
                        "exact path gradient, and exit")
    p.set_defaults(order="random", sample_steps=None, invalid_reward=env.INVALID_REWARD)
    return p


def parse(argv=None):
    p = parser()
    a = p.parse_args(argv)
    problems = [m for bad, m in [
        (not a.beta > 0, f"--beta must be > 0 (got {a.beta})"),
        (min(a.G, a.mu, a.path_states, a.end_rollouts_per_prompt) < 1, "--G, --mu, --path_states and "
                                                                      "--end_rollouts_per_prompt must be >= 1"),
        (a.G < 2, "--G must be >= 2 (the advantage is relative to the group)"),
        (not (a.rollouts or a.seconds), "give a budget: --rollouts or --seconds"),
        (not 0 <= a.p_mask_prompt < 1, f"--p_mask_prompt must be in [0, 1) (got {a.p_mask_prompt})"),
        (a.device.startswith("cuda") and not torch.cuda.is_available(), f"--device {a.device}: no CUDA here")] if bad]
    if problems:
        p.error("; ".join(problems))
    return a


def main(argv=None):
    args = parse(argv)
    try:
        if args.gradient_check:
            return gradient_check(args, args.gradient_check)
        history, log = run(args)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    for h in history:
        print(f"{h['budget']}: {h['rollouts']} rollouts, {h['train_s']:.0f} s: validity {h['validity']:.3f} ± "
              f"{h['validity_se']:.3f} (exact {h['exact_validity']:.3f}), realised {h['realised_validity']:.2f} / "
              f"{h['realised_reward']:.2f}, distinct {h['distinct_valid_per_prompt']:.1f}; see {args.out}/")
    return history


if __name__ == "__main__":
    main()
