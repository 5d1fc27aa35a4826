"""Discrete Tilt Matching (DTM) on the 41x41 maze: the loss, and the annealing loop around it.

A masked diffusion model cannot compute the likelihood of a sequence, so it cannot be fine-tuned
towards a reward r by policy gradients on log p(x). DTM instead anneals the tilted law
    p_a(x) ∝ p_0(x) exp(a r(x)),      a = 0, eta, 2 eta, ..., a_max                       (eq. 8)
and, in each phase, trains the unmasking posteriors p_theta(. | x_t, i) with a weighted
cross-entropy whose unique minimiser is the posterior of p_{a+eta}, using only rollouts of the
frozen model p_a (the "teacher") and their rewards. The control variate phi cuts its variance.

    python dtm.py --phi 1 --eta 0.1          # the main command: 10 phases, metrics + figures in runs/dtm
                                             # (417 s on 2 cores), next to the exact tilt of the base
    python dtm.py --phi 1 --eta 0.1 --control --out runs/control   # the same with no tilt
    python dtm.py --phi 1 --eta 0.1 --shuffle_rewards --out runs/shuffle   # the tilt's weights, no signal
    python dtm.py --phi 0 --eta 0.1          # reward-weighted ELBO (no control variate)
    python dtm.py --states path --lr 0.006   # train at the sampler's own states (exactly self-consistent)
    python dtm.py --bench                    # cost of one DTM step vs one ELBO step
    python dtm.py --sweep                    # phi in {0, 1} x eta in {0.5, 0.25, 0.1} + controls, equal compute,
                                             # and phi = 0 at the lr that matches its gradient to phi = 1's
    python dtm.py --help

The exact target: 2,048 rollouts per prompt of the base, drawn once and cached beside it
(`base_reference`), reweighted by e^{a r} per prompt (`tilted_means`); every row of metrics.json
gives the model's numbers, the exact tilt's, and the realised fraction of the gain.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from maze import env
from maze.figures import load_rollouts, plot_run, plot_sweep, rollouts_file
from maze.mdm import (PROMPT_LEN, CheckpointError, Config, Help, elbo_loss, evaluate, load, mask_along_path,
                      mask_completions, pretrain, save)

DEFAULT_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maze", "base.pt")
REFERENCE_SEED = 1234                 # the base's reference rollouts are a property of the base, not of a run


# ----------------------------------------------------------------------------- the loss
def group_log_mean_exp(x, group=None):
    """log((1/n_g) sum_{b in g} e^{x_b}) for the group g of each b, stably (log-sum-exp).
    x (B,); group (B,) ids, None: one group. With x = eta r it is log Z, Z = E_a[e^{eta r}]."""
    g = torch.zeros(len(x), dtype=torch.long, device=x.device) if group is None \
        else torch.unique(group, return_inverse=True)[1]
    G = int(g.max()) + 1
    m = torch.full((G,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, g, x, "amax")
    s = torch.zeros(G, dtype=x.dtype, device=x.device).index_add(0, g, torch.exp(x - m[g]))
    n = torch.bincount(g, minlength=G).to(x.dtype)
    return (m + s.log() - n.log())[g]


def dtm_loss(logits, teacher_logits, x1, mask, reward, time_weight, eta, phi, group=None,
             normalise=True, log_Z=None, centred=False):
    """phi-DTM loss (eq. 16) with the control-variate target of eq. 17.

    logits         (N, V) student logits at the N True entries of `mask`, row-major (= head(h[mask]))
    teacher_logits (N, V) the frozen p_a at the same positions; may be None when phi == 0
    x1             (B, T) clean sequences drawn from the teacher p_a
    mask           (B, T) bool, the masked positions that count
    reward         (B,)   r(x1)
    time_weight    (B,)   per-sequence weight, e.g. the hazard lambda(t) / L (the ELBO's form)
    group          (B,)   ids sharing one Z (e.g. the prompt); None: the whole batch
    normalise      divide by Z (the paper); False uses e^{eta r} raw (the authors' released code)
    log_Z          (B,)   log Z per sequence, estimated by the caller (e.g. over a whole replay
                          buffer); overrides group and normalise
    centred        scale the control variate by Z (below): NLL weights of mean 1 - phi
    Returns (1/B) * sum_b time_weight_b * sum_{i in mask_b} loss_i.

    Derivation (paper §3). Masking x1 -> x_t does not depend on the tilt, so for any F (eq. 11-12)
        E_{a+eta}[F] = E_a[e^{eta r(X1)} F] / E_a[e^{eta r(X1)}],
    and the tilted posterior at a masked position i is the ratio (eq. 13; Prop. 3.1, eq. 14)
        p_{a+eta}(v | x_t, i) = E_a[e^{eta r} 1{X1^i = v} | x_t] / E_a[e^{eta r} | x_t],
    the unique minimiser of the reward-weighted cross-entropy E_a[(e^{eta r} / Z) CE(1{x1^i}, p_theta)]
    (eq. 15, phi = 0). Replace the one-hot by the control-variate target (eq. 17)
        Y_phi(v) = 1{x1^i = v} - phi e^{-eta r} (1{x1^i = v} - p_a(v | x_t, i)):
    since E_a[1{X1^i = v} - p_a(v | x_t, i) | x_t] = 0, E_a[e^{eta r} Y_phi | x_t] is unchanged, so
    the weighted cross-entropy E_a[(e^{eta r} / Z) CE(Y_phi, p_theta)] (eq. 16) still has the tilted
    posterior as its unique minimiser (Prop. 3.2), for any phi. Written out per masked token:
        (e^{eta r} / Z) CE(Y_phi, p_theta)
          = (e^{eta r} - phi) / Z * (-log p_theta(x1^i))            reward-weighted NLL
          +           phi / Z * CE(p_a(. | x_t, i), p_theta)         distil the teacher
    phi = 0: reward-weighted ELBO.  phi = 1, eta -> 0: pure distillation of p_a, whose gradient at
    p_theta = p_a is zero, so the noise of the one-hot target cancels (Prop. 3.3: lower variance).
    With the hazard time weight lambda(t) / L, the excess loss bounds KL / L of the terminal laws
    (Prop. 3.4; tests/test_exact_tilt.py).
    Z = E_a[e^{eta r}] is estimated per group in the batch, in log space:
        log(1/Z_g) = log n_g - logsumexp_{b in g}(eta r_b)               (group_log_mean_exp)
    or passed in by the caller as log_Z (e.g. over the whole replay buffer of a prompt).
    The zero-mean step above needs p_a(. | x_t, i) to be the posterior of the teacher's own sampling
    law. For a network that is not self-consistent the minimiser is instead
        T(v) + phi (p_a(v | x_t, i) - post(v)) / E_a[e^{eta r} | x_t],
    T the tilted posterior of the sampling law and post its untilted posterior: phi = 1 keeps the
    teacher's offset p_a - post (README, "Why DTM realises only part of the tilt on the maze").
    At the sampler's own states (--states path, `mask_along_path`) p_a is that posterior exactly.
    Notes. Adding c to r leaves the minimiser alone only where p_a = post: the offset above becomes
    phi (p_a - post) / E_a[e^{eta (r + c)} | x_t], so phi acts as phi e^{-eta c}, and a larger c fits
    more of the teacher's own samples (tests/test_exact_tilt.py; README, "the reward offset"). Where
    e^{eta r} < phi the NLL weight is negative: a token seen once with p_a(x1^i) < 1 - e^{eta r} / phi
    then has a negative target, and the loss is unbounded below in its logit (tests/test_dtm_loss.py).
    dtm.py feeds r + c >= 0 (--r_offset c = -invalid_reward, as r >= invalid_reward); the released
    code clips r at 0 instead, which changes the reward.
    Centred (not in the paper; --centred). Over x1 ~ p_a the NLL weight above averages to 1 - phi / Z,
    so unless Z = 1 every phase also refits the teacher's own samples, with weight ~ eta (E[r] + c) at
    phi = 1. Scaling the control variate by Z, Y = 1{x1^i = v} - phi Z e^{-eta r} (1{x1^i = v} - p_a),
    keeps it zero-mean (the same minimiser for a self-consistent teacher) and gives
        (e^{eta r} / Z) CE(Y, p_theta) = (e^{eta r} / Z - phi) * NLL + phi * CE(p_a, p_theta),
    NLL weights of mean exactly 1 - phi, the same for r and r + c. A below-average rollout's NLL weight
    is then negative (the unbounded case above), and for an inconsistent teacher the minimiser
    T + phi Z (p_a - post) / E_a[e^{eta r} | x_t] need not be a distribution (tests/test_exact_tilt.py).
    """
    B = x1.shape[0]
    dt = torch.promote_types(logits.dtype, torch.float32)              # fp32 at least, fp64 if given
    er = eta * reward.to(dt)                                           # (B,)
    if log_Z is not None:                                              # Z estimated by the caller
        log_inv_Z = -log_Z.to(dt)
    elif normalise:
        log_inv_Z = -group_log_mean_exp(er, group)                     # (B,) log(1/Z) per sequence
    else:
        log_inv_Z = torch.zeros_like(er)
    cv = phi if centred else phi * torch.exp(log_inv_Z)                # phi Z / Z, or phi / Z
    w_nll = torch.exp(er + log_inv_Z) - cv                             # e^{eta r} / Z - phi, or (e^{eta r} - phi) / Z
    w_ce = cv * torch.ones_like(er)                                    # (B,)
    seq = mask.nonzero()[:, 0]                                         # (N,) sequence of each token
    logp = F.log_softmax(logits.to(dt), dim=-1)                       # (N, V)
    nll = -logp.gather(1, x1[mask][:, None])[:, 0]                     # (N,) -log p_theta(x1^i)
    loss = w_nll[seq] * nll                                            # the reward-weighted NLL
    if phi != 0:
        p_a = F.softmax(teacher_logits.to(dt), dim=-1)
        teacher_ce = -(p_a * logp).sum(-1)                              # (N,)
        loss = loss + w_ce[seq] * teacher_ce
    return (time_weight[seq] * loss).sum() / B


# ----------------------------------------------------------------------------- the replay buffer
def with_prompts(prompts, comp):
    """Whole sequences [s, g, SEP, c_1 .. c_L] (P, n, 3 + L) from completions comp (P, n, L) of the P prompts."""
    comp = torch.as_tensor(comp)
    P, n, _ = comp.shape
    pr = torch.as_tensor(np.asarray(prompts))[:, None, :].expand(P, n, 2)
    return torch.cat([pr, torch.full((P, n, 1), env.SEP), comp], 2)


def shuffled(r, generator):
    """--shuffle_rewards, a no-signal control: the rewards r (P, n) permuted among each prompt's n rollouts.
    A phase then tilts towards a random reweighting of the teacher's own samples, zero in expectation,
    with the weights of the real tilt (which --control's eta ~ 0 removes): their noise, and their mean,
    the refit of the teacher's samples that dtm_loss's "Centred" note describes."""
    r = torch.as_tensor(r)
    return r.gather(1, torch.rand(r.shape, generator=generator).argsort(1))


def stratified(P, n, batch, generator):
    """A minibatch stratified by prompt: indices (rows, j), each (P, batch // P), of batch // P draws
    (with replacement) from the n buffer entries of every one of the P prompts; index a (P, n, ...)
    buffer with [rows, j]. Drawn on the generator's device, returned on the CPU."""
    j = torch.randint(n, (P, batch // P), generator=generator, device=generator.device).cpu()
    return torch.arange(P)[:, None].expand_as(j), j


def rollouts(teacher, prompts, per_prompt, args, wall, gen, progress=False):
    """Teacher rollouts for every prompt, scored.

    Returns x1 (P, per_prompt, T) with the prompt in front, r (P, per_prompt), valid (P, per_prompt) and
    the sampler step that revealed each completion position (P, per_prompt, L).
    """
    P = len(prompts)
    _, comp, _, r, rank = evaluate(teacher.eval(), wall, prompts, per_prompt, args.temperature, args.order,
                                   args.sample_steps, generator=gen, progress=progress)   # grouped by prompt
    valid = r > env.INVALID_REWARD
    return (with_prompts(prompts, comp.reshape(P, per_prompt, -1)),
            torch.as_tensor(penalised(r, valid, args), dtype=torch.float32).view(P, per_prompt),
            torch.as_tensor(valid).view(P, per_prompt),
            torch.as_tensor(rank).view(P, per_prompt, -1))


def penalised(reward, valid, args):
    """The maze reward with --invalid_reward, not env's -1, for an invalid completion. A harsher penalty
    is a different reward, so a different tilt: p_0 e^{a r} / Z puts less mass on invalid paths."""
    return np.where(valid, reward, args.invalid_reward)


# ----------------------------------------------------------------------------- the exact target
def tilted_means(reward, valid, a):
    """Validity and mean reward under p e^{a r} / Z, estimated from rollouts of p with self-normalised
    importance weights w = e^{a r}, per prompt (each prompt is its own conditional law), then averaged
    over prompts. reward, valid: (P, n). a = 0 gives the plain means of the rollouts.
    Standard errors by the delta method, se_p^2 = sum_j w_j^2 (f_j - f_p)^2 / (sum_j w_j)^2, combined as
    sqrt(sum_p se_p^2) / P; ess is the effective sample size (sum w)^2 / sum w^2, summed over prompts."""
    r = np.asarray(reward, dtype=np.float64)
    logw = a * r
    w = np.exp(logw - logw.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    out = dict(ess=float((1.0 / (w ** 2).sum(1)).sum()))
    for name, f in (("validity", np.asarray(valid, dtype=np.float64)), ("reward", r)):
        mean = (w * f).sum(1)                                          # (P,)
        var = (w ** 2 * (f - mean[:, None]) ** 2).sum(1)
        out[name], out[name + "_se"] = float(mean.mean()), float(np.sqrt(var.sum()) / len(r))
    return out


def realised_fraction(now, exact, base):
    """(v_a - v_0) / (v*_a - v_0): how much of the exact tilt's gain the model realised, for validity
    and reward, with a first-order standard error (v_0 and v*_a come from the same reference rollouts;
    their covariance is ignored, which overstates the error). NaN where the exact tilt gains nothing."""
    out = {}
    for k in ("validity", "reward"):
        gain = exact[k] - base[k]
        if gain == 0:
            out[f"realised_{k}"] = out[f"realised_{k}_se"] = math.nan
            continue
        f = (now[k] - base[k]) / gain
        out[f"realised_{k}"] = f
        out[f"realised_{k}_se"] = math.hypot(now[f"{k}_se"], f * exact[f"{k}_se"]) / abs(gain)
    return out


def reference_path(ckpt, per_prompt, args):
    """Where base_reference caches the rollouts of checkpoint `ckpt`: named by a digest of its bytes
    and of the sampler's settings."""
    if not os.path.isfile(ckpt):
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    digest = hashlib.sha256()
    with open(ckpt, "rb") as f:
        digest.update(f.read())
    digest.update(f"{per_prompt} {args.temperature:g} {args.order} {args.sample_steps}".encode())
    return f"{os.path.splitext(ckpt)[0]}_reference_{digest.hexdigest()[:8]}.npz"


def base_reference(ckpt, wall, prompts, per_prompt, args):
    """per_prompt rollouts of the base checkpoint for every prompt: the base's law p_0, from which the
    exact tilt p_0 e^{a r} / Z of every a follows by importance weights (`tilted_means`). Drawn once
    (a fixed seed) and cached beside the checkpoint, in a file named by a digest of its bytes and of
    the sampler's settings. Returns completions (P, n, L), reward (P, n), valid (P, n) as numpy."""
    path = reference_path(ckpt, per_prompt, args)
    if not os.path.isfile(path):
        t0 = time.time()
        tqdm.write(f"drawing {per_prompt} rollouts per prompt of the base, once, for the exact tilt -> {path}")
        model = load(ckpt, args.device)[0]
        x1, r, valid, _ = rollouts(model, prompts, per_prompt, args, wall,
                                torch.Generator(args.device).manual_seed(REFERENCE_SEED), progress=True)
        tmp = path + ".part.npz"
        np.savez_compressed(tmp, completions=x1[:, :, PROMPT_LEN:].numpy().astype(np.int16),
                            reward=r.numpy(), valid=valid.numpy())
        os.replace(tmp, path)                                          # atomic: never half a file
        tqdm.write(f"  {len(prompts) * per_prompt} rollouts in {time.time() - t0:.0f} s")
    try:
        z = np.load(path)
        x, r, valid = z["completions"].astype(np.int64), z["reward"], z["valid"]
    except Exception as e:
        raise CheckpointError(f"cannot read reference rollouts {path} ({type(e).__name__}); delete it "
                              "and it is drawn again") from None
    return x, penalised(r, valid, args), valid                         # the cache keeps env's rewards


# ----------------------------------------------------------------------------- the loop
def make_optimizer(model, args):
    """SGD by default: at the teacher the phi = 1 gradient is O(eta), and SGD's steps shrink with it,
    so a phase moves the model as far as the tilt asks. Adam divides by the gradient's own scale:
    even at eta -> 0 (nothing to learn) it takes lr-sized steps along the noise (measured: validity
    0.578 -> 0.508 in 3 phases at eta = 1e-6, lr 3e-4)."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)


def gradient_norm(model, x1, reward, args, phi, gen, batches=16):
    """The size of the step SGD takes at the start of a phase: the mean norm, clipped at --clip as in
    training, of the DTM gradient at the teacher (the model itself), over `batches` minibatches of
    args.batch rows of x1 (P, n, T) with rewards (P, n), stratified by prompt and masked afresh.
    phi = 1's gradient there is O(eta) (its target is the teacher plus the tilt); phi = 0's is the
    gradient of the reward-weighted ELBO of one-hot samples, O(1) whatever eta. The ratio of the two
    matches phi = 0's learning rate to phi = 1's (`sweep`)."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    P, n, T = x1.shape
    norms = []
    for _ in range(batches):
        rows, j = stratified(P, n, args.batch, gen)
        x, r = x1[rows, j].flatten(0, 1).to(args.device), reward[rows, j].flatten().to(args.device)
        x_t, mask, hazard = mask_completions(x, gen)
        with torch.no_grad():
            teacher_logits = teacher(x_t, mask) if phi != 0 else None
        loss = dtm_loss(model(x_t, mask), teacher_logits, x, mask, r + args.r_offset, hazard / (T - PROMPT_LEN),
                        args.eta, phi, rows.flatten().to(args.device))
        model.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        norms.append(min(norm.item(), args.clip))
    model.zero_grad(set_to_none=True)
    return float(np.mean(norms))


def run(args):
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True                       # on a GPU, TF32 matmuls (as nanoGPT)
    np.random.seed(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)         # sampling and masking, on the device
    pick = torch.Generator().manual_seed(args.seed)                     # draws from the replay buffer (CPU)
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    P, M = len(prompts), args.rollouts_per_prompt
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.pt")
    if args.base == DEFAULT_BASE and not os.path.isfile(DEFAULT_BASE):
        print(f"no base checkpoint at {DEFAULT_BASE}: pretraining one ({args.pretrain_steps} steps)")
        pretrain(Config(), args.pretrain_steps, device=args.device, out=DEFAULT_BASE)
    ref_x, ref_r, ref_valid = base_reference(args.base, wall, prompts, args.reference_per_prompt, args)
    base = tilted_means(ref_r, ref_valid, 0.0)                          # v_0, over the reference
    L = ref_x.shape[-1]
    a_grid = [min(k * args.eta, args.a_max) for k in range(int(math.ceil(args.a_max / args.eta - 1e-9)) + 1)]

    def row(a, x1, r, valid, extra, rank=None):
        """A history row: the model's metrics at tilt a over its n rollouts per prompt, next to the
        exact tilt of the base at a and the realised fraction; diversity among the first M per prompt."""
        comp = x1[:, :, -L:]
        np.save(rollouts_file(args.out, a), comp.reshape(-1, L).astype(np.int16))
        if rank is not None:                                           # the paths, for --resume
            np.save(rollouts_file(args.out, a, "ranks"), rank.reshape(-1, L).astype(np.int16))
        now = tilted_means(r, valid, 0.0)
        exact = tilted_means(ref_r, ref_valid, a)
        distinct, cells = env.diversity(comp[:, :M].reshape(P * M, L), np.repeat(np.arange(P), M),
                                        valid[:, :M].reshape(-1))
        h = dict(a=round(a, 6), n=int(r.size), **{k: now[k] for k in ("validity", "validity_se", "reward", "reward_se")},
                 distinct_valid_per_prompt=distinct, cells_covered_per_prompt=cells,
                 **{f"exact_{k}": exact[k] for k in ("validity", "validity_se", "reward", "reward_se", "ess")})
        if a > 0:
            h.update(realised_fraction(now, exact, base))
        h.update(extra)
        history.append(h)
        phase = {k: f", phase target {h['teacher_target_' + k]:.3f}" if a > 0 else "" for k in ("validity", "reward")}
        line = (f"a={a:.2f}  n={h['n']}  validity {h['validity']:.3f}±{h['validity_se']:.3f} "
                f"(exact {h['exact_validity']:.3f}{phase['validity']})  reward {h['reward']:.3f}±"
                f"{h['reward_se']:.3f} (exact {h['exact_reward']:.3f}{phase['reward']})")
        if a > 0:
            line += (f"  realised {h['realised_validity']:.2f}±{h['realised_validity_se']:.2f} / "
                     f"{h['realised_reward']:.2f}±{h['realised_reward_se']:.2f}")
        tqdm.write(line + f"  distinct {distinct:.1f}  cells {cells:.1f}"
                   + (f"  loss {extra['loss']:.4f}  {extra['train_s']:.0f} s" if "loss" in extra else ""))

    if args.resume and os.path.isfile(state_path):
        model, ck = load(state_path, args.device)
        history, start = ck["history"], len(ck["history"]) - 1
        gen.manual_seed(args.seed + start)
        pick.manual_seed(args.seed + start)
        x, ids, _ = load_rollouts(rollouts_file(args.out, history[-1]["a"]), wall, prompts)
        x1_all = with_prompts(prompts, x.reshape(P, -1, L))
        valid, r_all = env.score(wall, x, np.asarray(prompts)[ids])[:2]
        r_all = penalised(r_all, valid, args).reshape(P, -1)
        rank_all = torch.from_numpy(np.load(rollouts_file(args.out, history[-1]["a"], "ranks")).astype(np.int64)
                                    ).view(P, -1, L) if args.states == "path" else None
        print(f"resumed from {state_path} after phase {start} (a = {history[-1]['a']:g})")
    else:
        model = load(args.base, args.device)[0]
        history, start = [], 0
        # a = 0: the model is the base, measured by the reference; the buffer is M of its rollouts
        row(0.0, ref_x, ref_r, ref_valid, {})
        x1_all, r_all, rank_all = with_prompts(prompts, ref_x), ref_r, None
        if args.states == "path":                                      # the reference keeps no paths
            x1_all, r_all, _, rank_all = rollouts(model, prompts, M, args, wall, gen)
    pick_m = (torch.arange(P)[:, None], torch.stack([torch.randperm(x1_all.shape[1], generator=pick)[:M]
                                                     for _ in range(P)]))     # M of them per prompt
    entering = (lambda r: shuffled(r, pick)) if args.shuffle_rewards else (lambda r: r)   # rewards into the buffer
    x1_buf, r_buf = x1_all[pick_m], entering(torch.as_tensor(r_all, dtype=torch.float32)[pick_m])
    rank_buf = rank_all[pick_m] if rank_all is not None else None
    for k in range(start + 1, len(a_grid)):
        a, eta = a_grid[k], a_grid[k] - a_grid[k - 1]
        eta_loss = 1e-6 if args.control else eta                       # --control: the same run, no tilt
        t0 = time.time()
        # the one-phase target: the teacher's own rollouts (the buffer) reweighted by e^{eta r}
        target = tilted_means(r_buf.numpy(), (r_buf > args.invalid_reward).numpy(), eta_loss)
        # 1. freeze the teacher p_a = the model at the start of the phase
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        # 2. the replay buffer (x1, r): M rollouts per prompt of p_a, the ones just measured
        # 3. a fresh optimiser per phase (the authors' code resets its state at each phase too)
        opt = make_optimizer(model, args)
        ema = [p.detach().clone() for p in model.parameters()] if args.ema else None   # the released EMA
        model.train()
        losses = []
        bar = tqdm(range(args.steps_per_phase), desc=f"phase {k}/{len(a_grid) - 1} a->{a:.2f}",
                   leave=False, disable=None)
        for step in bar:
            if args.lr_decay == "cosine":                              # anneal to 0 by the phase's end
                for group in opt.param_groups:
                    group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps_per_phase))
            if step and step % args.refresh_every == 0:                # refresh a fraction of the buffer
                n_new = max(1, round(args.refresh_fraction * M))
                slots = torch.randperm(M, generator=pick)[:n_new]
                x1_buf[:, slots], r_new, _, new_rank = rollouts(teacher, prompts, n_new, args, wall, gen)
                r_buf[:, slots] = entering(r_new)
                if rank_buf is not None:
                    rank_buf[:, slots] = new_rank
            # 4. a stratified minibatch: batch // P rollouts of every prompt, masked afresh
            rows, j = stratified(P, M, args.batch, pick)
            x1, r = x1_buf[rows, j].flatten(0, 1).to(args.device), r_buf[rows, j].flatten().to(args.device)
            group = rows.flatten().to(args.device)
            log_Z = None
            if args.states == "path":                                  # the sampler's own states, and
                rank = rank_buf[rows, j].flatten(0, 1).to(args.device)    # the tokens it drew from them
                x_t, mask, S = mask_along_path(x1, rank, gen)
                tw = S.float() / L                                     # S steps: the path's NLL / L
            else:
                x_t, mask, hazard = mask_completions(x1, gen)
                # time weight: the ELBO's hazard (Prop. 3.4), or the released code's 1/n over the masked tokens
                tw = hazard / L if args.weighting == "paper" else 1.0 / mask.sum(1).clamp_min(1).float()
            if args.weighting == "released":                           # their code: r clipped at 0, no Z
                r = r.clamp_min(0)
            else:
                r = r + args.r_offset                                  # >= 0: a bounded loss, same tilt
                if args.z == "buffer":                                 # Z per prompt over the whole buffer
                    log_Z = group_log_mean_exp(eta_loss * (r_buf + args.r_offset).flatten(),
                                               torch.arange(P).repeat_interleave(M))
                    log_Z = log_Z.view(P, M)[:, 0].to(args.device)[group]
            # 5. student logits, and the teacher's only where the loss needs them
            logits = model(x_t, mask)
            teacher_logits = None
            if args.phi != 0:
                with torch.no_grad():
                    teacher_logits = teacher(x_t, mask)
            loss = dtm_loss(logits, teacher_logits, x1, mask, r, tw, eta_loss, args.phi, group,
                            normalise=args.weighting != "released", log_Z=log_Z, centred=args.centred)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, q in zip(ema, model.parameters()):
                        e.lerp_(q, 1 - args.ema)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if ema is not None:                                            # the EMA is the next p_a
            with torch.no_grad():
                for e, q in zip(ema, model.parameters()):
                    q.copy_(e)
        train_s = time.time() - t0
        # 6. measure p_{a+eta}: n rollouts per prompt (more at the end); the first M are the next buffer
        n = args.end_rollouts_per_prompt if k == len(a_grid) - 1 else M
        x1_all, r_all, valid, rank_all = rollouts(model, prompts, max(n, M), args, wall, gen, progress=n > M)
        row(a, x1_all.numpy(), r_all.numpy(), valid.numpy(),
            dict(loss=float(np.mean(losses)), train_s=round(train_s, 1), eval_s=round(time.time() - t0 - train_s, 1),
                 **{f"teacher_target_{q}": target[q] for q in ("validity", "validity_se", "reward", "reward_se")}),
            rank_all.numpy() if args.states == "path" else None)
        x1_buf, r_buf = x1_all[:, :M].clone(), entering(r_all[:, :M].clone())
        rank_buf = rank_all[:, :M].clone() if args.states == "path" else None
        save(model, state_path, history=history, args=vars(args))      # atomic; --resume goes on here
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(history, f, indent=1)
    os.makedirs(args.figures, exist_ok=True)
    with open(os.path.join(args.figures, f"metrics_phi{args.phi:g}_eta{args.eta:g}.json"), "w") as f:
        json.dump(history, f, indent=1)                                # the copy the README cites
    plot_run(history, args.out, wall, prompts, args.rollouts_per_prompt, f"DTM phi={args.phi:g} eta={args.eta:g}",
             args.figures, f"phi{args.phi:g}_eta{args.eta:g}")
    return history


# ----------------------------------------------------------------------------- the phi x eta ablation
def sweep(args):
    """Paper Fig. 2/5: phi in {0, 1} x eta in --sweep_etas, at equal compute. Every run takes
    --sweep_steps optimiser steps in all, split evenly over its a_max / eta phases (so a smaller eta
    gets fewer steps per phase, as in the paper). Two control runs (--control: eta ~ 0 in the loss, on
    the smallest eta's schedule), one per phi, show what the training does without a tilt. phi = 0's
    gradient at the teacher is far larger than phi = 1's, so at one lr it also takes larger steps:
    two more runs (with and without the tilt, the smallest eta) give phi = 0 the lr that makes its
    first step as long as phi = 1's, lr * |g_1| / |g_0| (`gradient_norm`, at the base). Each run
    writes to OUT/phi*_eta*[_lr*][_control]/ (--resume goes on there); the sweep writes OUT/sweep.json,
    OUT/sweep.md (a table) and FIGURES/sweep.png. With --resume, the runs already in OUT/sweep.json
    are reused."""
    results, runs, done = [], [], {}
    if args.resume and os.path.isfile(os.path.join(args.out, "sweep.json")):
        with open(os.path.join(args.out, "sweep.json")) as f:
            done = {(r["phi"], r["eta"], r["steps_per_phase"], r["control"], r.get("lr", args.lr)): r
                    for r in json.load(f)}
    etas, eta0 = args.sweep_etas, min(args.sweep_etas)
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    ref_x, ref_r, _ = base_reference(args.base, wall, prompts, args.reference_per_prompt, args)
    base, gen = load(args.base, args.device)[0], torch.Generator(args.device).manual_seed(args.seed)
    at_eta0 = argparse.Namespace(**{**vars(args), "eta": eta0})
    g = {phi: gradient_norm(base, with_prompts(prompts, ref_x), torch.as_tensor(ref_r, dtype=torch.float32),
                            at_eta0, phi, gen) for phi in (0.0, 1.0)}
    lr0 = float(f"{args.lr * g[1.0] / g[0.0]:.2g}")
    tqdm.write(f"sweep: gradient norm at the base, eta = {eta0:g}: phi = 0 {g[0.0]:.4f}, phi = 1 {g[1.0]:.4f} "
               f"(clip {args.clip:g}); phi = 0's matched lr {lr0:g}")
    configs = ([(phi, eta, False, args.lr) for phi in (0.0, 1.0) for eta in etas]
               + [(phi, eta0, True, args.lr) for phi in (0.0, 1.0)] + [(0.0, eta0, c, lr0) for c in (False, True)])
    for phi, eta, control, lr in configs:
        sub = copy.copy(args)
        sub.phi, sub.eta, sub.control, sub.lr = phi, eta, control, lr
        sub.steps_per_phase = max(1, round(args.sweep_steps * eta / args.a_max))
        name = f"phi{phi:g}_eta{eta:g}" + (f"_lr{lr:g}" if lr != args.lr else "") + ("_control" if control else "")
        sub.out = sub.figures = os.path.join(args.out, name)
        key = (phi, eta, sub.steps_per_phase, control, lr)
        if key in done:
            results.append({**done[key], "lr": lr})
            runs.append((sub, args.a_max))
            continue
        t0 = time.time()
        h1 = run(sub)[-1]
        results.append(dict(phi=phi, eta=eta, control=control, lr=lr, steps_per_phase=sub.steps_per_phase,
                            seconds=round(time.time() - t0), rollouts=h1["n"],
                            **{k: h1[k] for k in ("validity", "validity_se", "reward", "reward_se",
                                                  "realised_validity", "realised_reward",
                                                  "distinct_valid_per_prompt")}))
        runs.append((sub, h1["a"]))
        tqdm.write(f"sweep: phi={phi:g} eta={eta:g} lr={lr:g}{' (control)' if control else ''} done in "
                   f"{results[-1]['seconds']} s")
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| phi | eta | lr | steps/phase | validity | mean reward | realised (validity / reward) | "
             "distinct valid / prompt | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['phi']:g} | {r['eta']:g}{' (control: no tilt)' if r['control'] else ''} | {r['lr']:g} | "
              f"{r['steps_per_phase']} | {r['validity']:.3f} ± {r['validity_se']:.3f} | "
              f"{r['reward']:.3f} ± {r['reward_se']:.3f} | {r['realised_validity']:.2f} / {r['realised_reward']:.2f} | "
              f"{r['distinct_valid_per_prompt']:.1f} | {r['seconds']} |" for r in results]
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    # rows: phi = 0, phi = 1, phi = 0 at its matched lr; columns: the base, each eta, the control
    cell = [(2 if r["lr"] != args.lr else int(r["phi"]), len(etas) + 1 if r["control"] else etas.index(r["eta"]) + 1)
            for r in results]
    panels = [(rollouts_file(sub.out, a), a, c, f"phi={r['phi']:g} eta={r['eta']:g} lr={r['lr']:g}"
               + (" control" if r["control"] else "")) for (sub, a), r, c in zip(runs, results, cell)]
    plot_sweep(panels, rollouts_file(runs[0][0].out, 0.0), wall, prompts, args.rollouts_per_prompt,
               f"DTM at a={args.a_max:g}, {args.sweep_steps} steps per run", os.path.join(args.figures, "sweep.png"))
    return results


# ----------------------------------------------------------------------------- benchmark
def bench(args, reps=20):
    """Seconds per optimiser step: ELBO vs DTM (phi = 1) on the same model and batch."""
    torch.manual_seed(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    model = load(args.base, args.device)[0]
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, args)
    wall = env.make_maze()
    x1 = rollouts(teacher, env.make_prompts(wall), args.batch // 8, args, wall, gen)[0].flatten(0, 1)
    x1 = x1.to(args.device)
    r = torch.rand(len(x1), device=args.device)
    group = torch.arange(len(x1), device=args.device) % 8
    L = model.cfg.gen_len

    def elbo_step(x_t, mask, hazard):
        return elbo_loss(model(x_t, mask), x1, mask, hazard)

    def dtm_step(x_t, mask, hazard):
        logits = model(x_t, mask)
        with torch.no_grad():
            teacher_logits = teacher(x_t, mask)
        return dtm_loss(logits, teacher_logits, x1, mask, r, hazard / L, args.eta, 1.0, group)

    times = {}
    for name, fn in (("elbo", elbo_step), ("dtm", dtm_step)) * 2:     # twice: the first is warm-up
        gen.manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(reps):
            loss = fn(*mask_completions(x1, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t0) / reps
    print(f"batch {len(x1)}: ELBO step {times['elbo'] * 1e3:.1f} ms, DTM step {times['dtm'] * 1e3:.1f} ms, "
          f"ratio {times['dtm'] / times['elbo']:.3f}")
    return times


def parse(argv=None):
    p = argparse.ArgumentParser(description="Discrete Tilt Matching on the 41x41 maze.", formatter_class=Help)
    p.add_argument("--phi", type=float, default=1.0, help="control-variate coefficient (eq. 17), in [0, 1]")
    p.add_argument("--eta", type=float, default=0.1, help="annealing step of the tilt a (eq. 8), > 0")
    p.add_argument("--a_max", type=float, default=1.0, help="final tilt a")
    p.add_argument("--steps_per_phase", type=int, default=50, help="optimiser steps per phase")
    p.add_argument("--batch", type=int, default=64, help="sequences per step (a multiple of the 8 prompts)")
    p.add_argument("--lr", type=float, default=0.02, help="learning rate (SGD, momentum 0.9)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: steps scale with the O(eta) gradient; adamw normalises them away (see README)")
    p.add_argument("--lr_decay", choices=["none", "cosine"], default="none",
                   help="cosine: the lr falls from --lr to 0 over each phase (the parameter noise of the last "
                        "steps shrinks with it)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--rollouts_per_prompt", type=int, default=16,
                   help="replay buffer size per prompt; also the rollouts measured after each phase")
    p.add_argument("--end_rollouts_per_prompt", type=int, default=256,
                   help="rollouts per prompt measured after the last phase (the before/after numbers)")
    p.add_argument("--reference_per_prompt", type=int, default=2048,
                   help="rollouts per prompt of the base for its exact tilt p_0 e^{a r}/Z (drawn once, "
                        "cached beside the base checkpoint)")
    p.add_argument("--refresh_every", type=int, default=25, help="steps between buffer refreshes")
    p.add_argument("--refresh_fraction", type=float, default=0.25, help="fraction of the buffer refreshed")
    p.add_argument("--invalid_reward", type=float, default=env.INVALID_REWARD,
                   help="reward of an invalid completion (< 0; valid ones score >= 0): a harsher penalty is "
                        "a different tilt, with less invalid mass (README)")
    p.add_argument("--r_offset", type=float, default=None,
                   help="added to r in the paper-weighted loss, so that r >= 0 and the loss is bounded; the "
                        "target tilt is unchanged, the fit is not: a larger offset weights the teacher's own "
                        "samples more (README; default: -invalid_reward)")
    p.add_argument("--z", choices=["batch", "buffer"], default="batch",
                   help="Z = E_a[e^{eta r}] per prompt over the minibatch or over the whole replay buffer")
    p.add_argument("--ema", type=float, default=0.0,
                   help="the authors' released Countdown teacher: an EMA of the model (this decay, every step) "
                        "becomes the model, and so the next teacher, at each phase end; 0: off")
    p.add_argument("--control", action="store_true",
                   help="a control run: the same schedule and steps with eta ~ 0 (1e-6) in the loss, "
                        "to see what training alone does to the model")
    p.add_argument("--shuffle_rewards", action="store_true",
                   help="a no-signal control: rewards permuted among each prompt's rollouts as they enter the "
                        "buffer, so every phase tilts towards a random reweighting of the teacher's samples: "
                        "the real tilt's weights (their noise and their mean refit of the teacher's own "
                        "samples, README), with no signal")
    p.add_argument("--centred", action="store_true",
                   help="the control variate scaled by Z: NLL weight e^{eta r}/Z - phi, mean 1 - phi, where the "
                        "paper's (e^{eta r} - phi)/Z has mean 1 - phi/Z, a refit of the teacher's own samples "
                        "that --r_offset sets (README); --r_offset then changes nothing")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (rollouts, eval)")
    p.add_argument("--order", choices=["random", "confidence"], default="random",
                   help="unmasking order: random is the CTMC; confidence is more valid, far less diverse")
    p.add_argument("--sample_steps", type=int, default=None, help="sampler steps (default: one per token)")
    p.add_argument("--states", choices=["forward", "path"], default="forward",
                   help="forward: x_t by masking x1 at random (the paper); path: the sampler's own states along "
                        "each rollout, the loss at the tokens it revealed next, time weight S / L whatever --weighting "
                        "says (README: self-consistency)")
    p.add_argument("--weighting", choices=["paper", "count", "released"], default="paper",
                   help="paper: hazard/L time weight and per-prompt Z; count: the paper's, with the released "
                        "1/n time weight instead of the hazard; released: mean over masked tokens, raw "
                        "e^{eta r}, r clipped at 0 (the authors' code)")
    p.add_argument("--base", default=DEFAULT_BASE,
                   help="base checkpoint (the committed one is pretrained first if it is missing)")
    p.add_argument("--pretrain_steps", type=int, default=2400, help="pretraining steps if the base is missing")
    p.add_argument("--out", default="runs/dtm", help="metrics.json, rollouts and state.pt go here")
    p.add_argument("--figures", default=None,
                   help="where the figures and metrics_<phi>_<eta>.json are written (default: --out); "
                        "the README's come from --figures figures")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt after its last phase")
    p.add_argument("--bench", action="store_true", help="only time a DTM step against an ELBO step")
    p.add_argument("--sweep", action="store_true",
                   help="the phi x eta ablation (paper Fig. 2/5) at equal compute, with no-tilt controls and "
                        "phi = 0 at its gradient-matched lr; --phi, --eta and --steps_per_phase are set per run")
    p.add_argument("--sweep_etas", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="etas of --sweep")
    p.add_argument("--sweep_steps", type=int, default=300, help="optimiser steps per --sweep run, in all")
    p.add_argument("--seed", type=int, default=0, help="seeds the rollouts, the masking and the minibatches")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (every random draw happens there)")
    args = p.parse_args(argv)
    args.figures = args.figures or args.out
    args.r_offset = -args.invalid_reward if args.r_offset is None else args.r_offset
    problems = []
    if not args.invalid_reward < 0:
        problems.append(f"--invalid_reward must be < 0, below every valid reward (got {args.invalid_reward})")
    if not args.eta > 0:
        problems.append(f"--eta must be > 0 (got {args.eta})")
    if not 0 <= args.phi <= 1:
        problems.append(f"--phi must be in [0, 1] (got {args.phi})")
    if not args.a_max > 0:
        problems.append(f"--a_max must be > 0 (got {args.a_max})")
    if min(args.steps_per_phase, args.rollouts_per_prompt, args.refresh_every, args.end_rollouts_per_prompt,
           args.reference_per_prompt) < 1:
        problems.append("--steps_per_phase, --refresh_every and the rollout counts must be >= 1")
    if args.batch < 8 or args.batch % 8:
        problems.append(f"--batch must be a positive multiple of the 8 prompts (got {args.batch})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here")
    if not 0 <= args.ema < 1:
        problems.append(f"--ema must be in [0, 1) (got {args.ema})")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None):
    args = parse(argv)
    try:
        if args.bench:
            return bench(args)
        if args.sweep:
            return sweep(args)
        t0 = time.time()
        history = run(args)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    h0, h1 = history[0], history[-1]
    print(f"done in {time.time() - t0:.0f} s; before: the base over {h0['n']} rollouts, after: {h1['n']} "
          f"rollouts at a = {h1['a']:g}: validity {h0['validity']:.3f} -> {h1['validity']:.3f} ± "
          f"{h1['validity_se']:.3f} (exact tilt {h1['exact_validity']:.3f}), reward {h0['reward']:.3f} -> "
          f"{h1['reward']:.3f} ± {h1['reward_se']:.3f} (exact tilt {h1['exact_reward']:.3f}); realised fraction "
          f"{h1['realised_validity']:.2f} ± {h1['realised_validity_se']:.2f} (validity), "
          f"{h1['realised_reward']:.2f} ± {h1['realised_reward_se']:.2f} (reward); metrics in "
          f"{args.out}/metrics.json, figures in {args.figures}/")
    return history


if __name__ == "__main__":
    main()
