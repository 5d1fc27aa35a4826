"""Discrete Tilt Matching (DTM) on the 41x41 maze: the loss, a phase's health check, and the annealing loop.

A masked diffusion model cannot compute the likelihood of a sequence, so it cannot be fine-tuned
towards a reward r by policy gradients on log p(x). DTM instead anneals the tilted law
    p_a(x) ∝ p_0(x) exp(a r(x)),      a = 0, eta, 2 eta, ..., a_max                       (eq. 8)
and, in each phase, trains the unmasking posteriors p_theta(. | x_t, i) with a weighted
cross-entropy whose unique minimiser is the posterior of p_{a+eta}, using only rollouts of the
frozen model p_a (the "teacher") and their rewards. The control variate phi cuts its variance.

    python dtm.py --phi 1 --eta 0.1          # the main command: 10 phases, metrics and figures in runs/dtm
    python dtm.py --phi 0 --eta 0.1          # the reward-weighted ELBO (no control variate)
    python dtm.py --resume                   # go on after the last finished phase of runs/dtm (--help: all flags)

The exact target (maze/exact.py): 2,048 cached rollouts per prompt of the base (`base_reference`)
reweighted by e^{a r} (`tilted_means`). Each phase's health check: its own loss on held-out teacher
rollouts, student minus teacher, against the most it can gain (`phase_objective`, `phase_kl`); a phase
that does not lower it has fitted noise. The variants that only the findings use are in lab/experiments.py.
"""
import argparse
import copy
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
from maze.figures import plot_run, rollouts_file
from maze.exact import base_reference, measure, tilted_means
from maze.mdm import (CheckpointError, Config, Help, evaluate, load, mask_completions, pretrain, save, with_prompts,
                      parser as mdm_parser)

DEFAULT_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maze", "base.pt")
HELD_OUT_MASKINGS = 4                 # fixed maskings of each held-out rollout (the phase's health check)


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


def dtm_loss(logits, teacher_logits, x1, mask, reward, time_weight, eta, phi, group=None, log_Z=None,
             per_sequence=False):
    """phi-DTM loss (eq. 16) with the control-variate target Y_phi of eq. 17.

    logits         (N, V) student logits at the N True entries of `mask`, row-major (= head(h[mask]))
    teacher_logits (N, V) the frozen p_a at the same positions; None when phi == 0
    x1 (B, T) clean sequences drawn from p_a;  mask (B, T) bool, the masked positions that count
    reward (B,) r(x1);  time_weight (B,) e.g. the hazard lambda(t) / L (the ELBO's form)
    phi            a float, (B,), or (B, T) one per position: eq. 17 allows any function of x_t (and i)
    group (B,)     ids that share one Z (the prompt); None: the whole batch.  log_Z (B,): the
                   caller's log Z (e.g. over a whole replay buffer), used instead of the batch's
    Returns (1/B) sum_b time_weight_b sum_{i in mask_b} loss_i, or per_sequence: the (B,) terms (their mean).

    What it needs of its inputs: the NLL weight (e^{eta r} - phi) / Z stays >= 0 only where
    e^{eta r} >= phi, i.e. r >= 0 for phi = 1 at any eta > 0 (shift r, or take phi <= e^{eta min r}).
    Where e^{eta r} < phi the loss still has the tilted posterior as its minimiser in expectation (eq. 15
    holds for any phi), but a batch's loss can then be unbounded below in p_theta(x1^i), and a finite
    step can run away. No check is made here: the callers pass a reward that meets it (the maze's r is
    at least its invalid-path reward, -1, so dtm.py passes r + r_offset with r_offset = 1; LLaDA's rewards
    are >= 0 and its phi <= 1).

    Derivation (paper §3). Masking x1 -> x_t does not depend on the tilt, so (eq. 11-12)
        E_{a+eta}[F] = E_a[e^{eta r(X1)} F] / E_a[e^{eta r(X1)}],
    and the tilted posterior at a masked position i is the ratio (eq. 13)
        p_{a+eta}(v | x_t, i) = E_a[e^{eta r} 1{X1^i = v} | x_t] / E_a[e^{eta r} | x_t].
    Prop. 3.1 (eq. 14): it is therefore the unique minimiser over q of the reward-weighted
    cross-entropy E_a[(e^{eta r} / Z) CE(1{X1^i}, q) | x_t]. Any target Y with the same weighted mean,
        E_a[e^{eta r} (Y(v) - 1{X1^i = v}) | x_t] = 0                                       (eq. 15),
    keeps that minimiser in E_a[(e^{eta r} / Z) CE(Y, p_theta)] (eq. 16; Prop. 3.2). Eq. 17's
        Y_phi(v) = 1{x1^i = v} - phi e^{-eta r} (1{x1^i = v} - p_a(v | x_t, i))
    is one, since E_a[1{X1^i = v} - p_a(v | x_t, i) | x_t] = 0. Written out per masked token:
        (e^{eta r} / Z) CE(Y_phi, p_theta)
          = (e^{eta r} - phi) / Z * (-log p_theta(x1^i))            reward-weighted NLL  (w_nll)
          +           phi / Z * CE(p_a(. | x_t, i), p_theta)         distil the teacher   (w_ce)
    phi = 0: the reward-weighted ELBO. phi = 1, eta -> 0: distillation of p_a, whose gradient at
    p_theta = p_a is zero, so the one-hot target's noise cancels (Prop. 3.3). With the hazard time
    weight lambda(t) / L the excess loss bounds KL / L of the terminal laws (Prop. 3.4).
    Z = E_a[e^{eta r}] per group, in log space: log(1/Z_g) = log n_g - logsumexp_{b in g}(eta r_b).
    The zero-mean step needs p_a(. | x_t, i) to be the posterior of the teacher's own sampling law;
    for a teacher that is not, and for a constant added to r, see lab/FINDINGS_maze.md.
    """
    B = x1.shape[0]
    dt = torch.promote_types(logits.dtype, torch.float32)              # fp32 at least, fp64 if given
    er = eta * reward.to(dt)                                           # (B,)
    log_inv_Z = -log_Z.to(dt) if log_Z is not None else -group_log_mean_exp(er, group)   # (B,) log(1/Z)
    seq = mask.nonzero()[:, 0]                                         # (N,) sequence of each token
    phi = torch.as_tensor(phi, dtype=dt, device=x1.device)
    phi = phi[mask] if phi.dim() == 2 else phi[seq] if phi.dim() == 1 else phi   # each token's coefficient
    w_ce = phi * torch.exp(log_inv_Z)[seq]                             # phi / Z
    w_nll = torch.exp(er + log_inv_Z)[seq] - w_ce                      # (e^{eta r} - phi) / Z
    logp = F.log_softmax(logits.to(dt), dim=-1)                       # (N, V)
    nll = -logp.gather(1, x1[mask][:, None])[:, 0]                     # (N,) -log p_theta(x1^i)
    loss = w_nll * nll                                                 # the reward-weighted NLL
    if teacher_logits is not None:
        p_a = F.softmax(teacher_logits.to(dt), dim=-1)
        teacher_ce = -(p_a * logp).sum(-1)                              # (N,) CE(p_a, p_theta)
        loss = loss + w_ce * teacher_ce
    if per_sequence:
        return torch.zeros(B, dtype=dt, device=x1.device).index_add(0, seq, time_weight[seq] * loss)
    return (time_weight[seq] * loss).sum() / B


# ----------------------------------------------------------------------------- rollouts
def rollouts(teacher, prompts, per_prompt, args, wall, gen, progress=False):
    """Teacher rollouts, scored: x1 (P, n, T) with the prompt in front, r (P, n) (invalid: args.invalid_reward,
    env's -1 unless a variant changes it), valid (P, n), the step that revealed each position (P, n, L)."""
    P = len(prompts)
    _, comp, _, r, rank = evaluate(teacher.eval(), wall, prompts, per_prompt, args.temperature, args.order,
                                   args.sample_steps, generator=gen, progress=progress)   # grouped by prompt
    valid = r > env.INVALID_REWARD
    return (with_prompts(prompts, comp.reshape(P, per_prompt, -1)),
            torch.as_tensor(np.where(valid, r, args.invalid_reward), dtype=torch.float32).view(P, per_prompt),
            torch.as_tensor(valid).view(P, per_prompt),
            torch.as_tensor(rank).view(P, per_prompt, -1))


def stratified(P, n, batch, generator):
    """A minibatch stratified by prompt: indices (rows, j), each (P, batch // P), of batch // P draws
    (with replacement) from the n buffer entries of every prompt; index a (P, n, ...) buffer with [rows, j]."""
    j = torch.randint(n, (P, batch // P), generator=generator, device=generator.device).cpu()
    return torch.arange(P)[:, None].expand_as(j), j


# ----------------------------------------------------------------------------- the health check of a phase
def held_out_set(x1, r, maskings, gen, L):
    """Teacher rollouts x1 (P, h, T) with rewards r (P, h) that the phase never trains on, each masked
    `maskings` times, once for the whole phase (forward masking, time weight hazard / L as in training):
    the fixed sample on which `phase_objective` compares the student with its teacher."""
    P, h, T = x1.shape
    x1 = x1.reshape(P * h, T).repeat(maskings, 1)                     # (maskings * P * h, T)
    x_t, mask, hazard = mask_completions(x1, gen)
    group = torch.arange(P, device=x1.device).repeat_interleave(h).repeat(maskings)
    return dict(x1=x1, x_t=x_t, mask=mask, tw=hazard / L, r=r.flatten(), group=group, maskings=maskings)


@torch.no_grad()
def phase_objective(model, teacher, held, eta, phi, chunk=256):
    """The phase's own objective J(theta) = E_a[(e^{eta r} / Z) sum_i tw CE(Y_phi, p_theta)] (eq. 16) on the
    held-out set, with the set's own Z per prompt: one value per rollout (the mean of its maskings).
    J(student) - J(teacher) < 0 by more than its SE: the phase moved towards its minimiser, which for a
    self-consistent teacher is the posterior of p_{a+eta} whatever phi (eq. 15); >= 0: it fitted noise."""
    n = len(held["r"])
    r = held["r"].repeat(held["maskings"])
    log_Z = group_log_mean_exp(eta * r.double(), held["group"])
    out = []
    for s in range(0, len(r), chunk):
        x1, x_t, mask = (held[k][s:s + chunk] for k in ("x1", "x_t", "mask"))
        t_logits = teacher(x_t, mask)
        logits = t_logits if model is teacher else model(x_t, mask)
        out.append(dtm_loss(logits, t_logits, x1, mask, r[s:s + chunk], held["tw"][s:s + chunk], eta, phi,
                            log_Z=log_Z[s:s + chunk], per_sequence=True))
    return torch.cat(out).view(held["maskings"], n).mean(0)


def phase_kl(r, eta, L):
    """The most a phase can lower J: KL(p_{a+eta} || p_a) / L (Prop. 3.4, with equality for a teacher whose
    posteriors are its own law's), from rollouts r (P, h) of p_a: per prompt E_{a+eta}[eta r] - log E_a[e^{eta r}]
    by self-normalised weights e^{eta r}, averaged over the prompts. Logged as `phase_kl` (`max_gain` in
    metrics written before; `maze.figures.logged_phase_kl` reads both)."""
    er = eta * np.asarray(r, dtype=np.float64)
    w = np.exp(er - er.max(1, keepdims=True))
    log_Z = np.log(w.mean(1)) + er.max(1)
    return float(((w * er).sum(1) / w.sum(1) - log_Z).mean() / L)


# ----------------------------------------------------------------------------- the annealing loop
class Recipe:
    """The paper's choice at each point of `run` that a variant may change (lab/experiments.py overrides
    these methods); run() calls nothing else that a variant could want to change."""
    keeps_paths = False                # True: the buffer keeps the sampler's paths (drawn afresh at a = 0)

    def __init__(self, args):
        self.args = args

    def optimizer(self, model):        # SGD: its steps shrink with the O(eta) gradient, as far as the tilt asks
        return torch.optim.SGD(model.parameters(), lr=self.args.lr, momentum=0.9)

    def masked_states(self, x1, revealed_at, gen, L):   # x1 -> (x_t, mask, time weight): forward masking
        x_t, mask, hazard = mask_completions(x1, gen)   # (kappa(t) = t), the ELBO's hazard / L
        return x_t, mask, hazard / L

    def loss(self, logits, teacher_logits, x1, mask, r, time_weight, eta, group, r_buf):   # eq. 16, Z per prompt
        return dtm_loss(logits, teacher_logits, x1, mask, r + self.args.r_offset, time_weight, eta, self.args.phi,
                        group)

    def buffer_rewards(self, r, generator):   # the rewards (P, M) the loss sees, from the buffer's rollouts'
        return r                              # own r; called whenever the buffer changes

    def loss_eta(self, eta):           # the eta the loss tilts by (a control: ~0)
        return eta

    def after_step(self, model, opt, step):
        pass

    def end_phase(self, model):
        pass


def run(args, recipe=None):
    """Anneal a = 0 -> a_max in steps eta from args.base; returns the history (one row per phase)."""
    recipe = recipe or Recipe(args)
    gens = gen, held_gen, buffer_gen = generators(args)
    wall, prompts, ref, a_grid = setup(args)
    P, M, L, dev = len(prompts), args.rollouts_per_prompt, ref[0].shape[-1], args.device
    model, history, start, rollouts_k = start_or_resume(args, recipe, wall, prompts, ref, gens)
    buf, held = split_buffer(rollouts_k, M, args.held_out_per_prompt, recipe, buffer_gen, first=True)
    for k in range(start + 1, len(a_grid)):
        a, eta = a_grid[k], a_grid[k] - a_grid[k - 1]
        eta_loss = recipe.loss_eta(eta)                                   # the loss's eta: eta, unless a control
        t0, target = time.time(), target_row(buf["r"], args, eta_loss)   # the one-phase target
        # 1. freeze the teacher p_a: the model at the start of the phase, and its objective on held-out rollouts
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        held_set = held_out_set(held["x1"].to(dev), held["r"].to(dev) + args.r_offset, HELD_OUT_MASKINGS, held_gen, L)
        j_teacher = phase_objective(teacher, teacher, held_set, eta, args.phi)
        # 2. the buffer `buf`: M rollouts per prompt of p_a with their rewards, drawn when p_a was measured (step
        # 8 of the phase before, or before the first phase)
        # 3. a fresh optimiser (as the authors')
        opt, losses = recipe.optimizer(model), []
        model.train()
        for step in tqdm(range(args.steps_per_phase), desc=f"phase {k}/{len(a_grid) - 1} a->{a:.2f}",
                         leave=False, disable=None):
            # 4. every refresh_every steps, replace a fraction of the buffer by new teacher rollouts
            if step and step % args.refresh_every == 0:
                refresh(buf, teacher, prompts, args, wall, recipe, gen, buffer_gen)
            # 5. a minibatch stratified by prompt (one Z per prompt), masked afresh: x1 -> x_t
            rows, j = stratified(P, M, args.batch, buffer_gen)
            x1, r = buf["x1"][rows, j].flatten(0, 1).to(dev), buf["r"][rows, j].flatten().to(dev)
            revealed_at = buf["revealed_at"][rows, j].flatten(0, 1).to(dev) if buf["revealed_at"] is not None else None
            x_t, mask, time_weight = recipe.masked_states(x1, revealed_at, gen, L)
            # 6. student logits, and the teacher's, only at the masked positions the loss counts
            logits = model(x_t, mask)
            with torch.no_grad():
                teacher_logits = teacher(x_t, mask) if args.phi != 0 else None
            # 7. the phi-DTM loss (eq. 16-17) and one clipped optimiser step
            loss = recipe.loss(logits, teacher_logits, x1, mask, r, time_weight, eta_loss, rows.flatten().to(dev),
                               buf["r"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            recipe.after_step(model, opt, step)
            losses.append(loss.item())
        recipe.end_phase(model)
        train_s = time.time() - t0
        # 8. the health check: the change of the phase's objective on its held-out rollouts, against the most
        # it can gain; then measure p_{a+eta}: its first M rollouts per prompt are the next buffer, H held out
        d = (phase_objective(model.eval(), teacher, held_set, eta, args.phi) - j_teacher).double()
        health = dict(held_out_change=d.mean().item(), held_out_change_se=(d.std() / math.sqrt(len(d))).item(),
                      phase_kl=phase_kl(held["r"].numpy(), eta, L))
        rollouts_k = measure_next(model, prompts, args, wall, gen, held_gen, last=k == len(a_grid) - 1)
        history.append(measure_phase(args, a, rollouts_k, ref, dict(
            loss=float(np.mean(losses)), train_s=round(train_s, 1), eval_s=round(time.time() - t0 - train_s, 1),
            **health, **target)))
        buf, held = split_buffer(rollouts_k, M, args.held_out_per_prompt, recipe, buffer_gen)
        save_phase(model, args, history, rollouts_k)
    return finish(args, history, wall, prompts)


# ----------------------------------------------------------------------------- the loop's bookkeeping
def generators(args):
    """Seed torch and numpy; three generators: sampling and masking (on the device); the health check's own
    draws, so that it does not change the training (the same seed trains the same model whatever
    --held_out_per_prompt); draws from the replay buffer (CPU)."""
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True                       # on a GPU, TF32 matmuls (as nanoGPT)
    np.random.seed(args.seed)
    return (torch.Generator(args.device).manual_seed(args.seed),
            torch.Generator(args.device).manual_seed(args.seed + 10 ** 6), torch.Generator().manual_seed(args.seed))


def setup(args):
    """The maze, its prompts, the base's reference rollouts (x, r, valid; cached: maze/exact.py) and the grid
    of a; pretrains the default base first if it is missing."""
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    if args.base == DEFAULT_BASE and not os.path.isfile(DEFAULT_BASE):
        steps = mdm_parser().get_default("steps")                      # as python -m maze.mdm does
        print(f"no base checkpoint at {DEFAULT_BASE}: pretraining one ({steps} steps)")
        pretrain(Config(), steps, device=args.device, out=DEFAULT_BASE)
    ref = base_reference(args.base, wall, prompts, args.reference_per_prompt, args)   # checks --base first
    os.makedirs(args.out, exist_ok=True)
    a_grid = [min(k * args.eta, args.a_max) for k in range(int(math.ceil(args.a_max / args.eta - 1e-9)) + 1)]
    return wall, prompts, ref, a_grid


def start_or_resume(args, recipe, wall, prompts, ref, gens):
    """(model, history, last phase done, its rollouts (x1, r, valid, revealed_at)): from OUT/state.pt with
    --resume (the generators re-seeded for the next phase; valid not kept), else the base at a = 0, measured
    by its reference."""
    gen, held_gen, buffer_gen = gens
    state_path = os.path.join(args.out, "state.pt")
    if args.resume and os.path.isfile(state_path):
        model, ck = load(state_path, args.device)
        history, start = ck["history"], len(ck["history"]) - 1
        gen.manual_seed(args.seed + start)
        buffer_gen.manual_seed(args.seed + start)
        held_gen.manual_seed(args.seed + 10 ** 6 + start)
        print(f"resumed from {state_path} after phase {start} (a = {history[-1]['a']:g})")
        x1, r, revealed_at = ck["rollouts"]
        if x1.shape[1] <= args.rollouts_per_prompt:                   # a finished run, extended by --a_max
            raise CheckpointError(f"{state_path}: its last phase kept {x1.shape[1]} rollouts per prompt, none to "
                                  f"hold out beside a buffer of {args.rollouts_per_prompt}; rerun it with "
                                  f"--end_rollouts_per_prompt above --rollouts_per_prompt")
        return model, history, start, (x1, r, None, revealed_at)
    model, history = load(args.base, args.device)[0], []
    ref_x, ref_r, ref_valid = ref
    history.append(measure_phase(args, 0.0, (ref_x, ref_r, ref_valid), ref, {}))
    if recipe.keeps_paths:                                             # the reference keeps no paths
        return model, history, 0, rollouts(model, prompts, args.rollouts_per_prompt + args.held_out_per_prompt,
                                           args, wall, gen)
    return model, history, 0, (with_prompts(prompts, ref_x), ref_r, ref_valid, None)


def split_buffer(rollouts_k, M, H, recipe, buffer_gen, first=False):
    """The buffer (M rollouts per prompt: x1, their own rewards `scores`, r = recipe.buffer_rewards(scores),
    revealed_at) and the H held out of training (x1, r). At the start of run (first): M + H of each prompt's
    rollouts drawn by buffer_gen (the base's reference holds 2,048; a resumed run's, what its last phase kept);
    after a phase: the first M and the next H, as measure_next drew them."""
    x1, r, _, revealed_at = rollouts_k
    r = torch.as_tensor(r, dtype=torch.float32)
    if first:
        P = len(x1)
        perm = torch.stack([torch.randperm(x1.shape[1], generator=buffer_gen)[:M + H] for _ in range(P)])
        keep, out = (torch.arange(P)[:, None], perm[:, :M]), (torch.arange(P)[:, None], perm[:, M:])
    else:
        keep, out = (slice(None), slice(None, M)), (slice(None), slice(M, M + H))
    buf = dict(x1=x1[keep].clone(), scores=r[keep].clone(),
               revealed_at=revealed_at[keep].clone() if revealed_at is not None else None)
    buf["r"] = recipe.buffer_rewards(buf["scores"], buffer_gen)
    return buf, dict(x1=x1[out].clone(), r=r[out].clone())


def refresh(buf, teacher, prompts, args, wall, recipe, gen, buffer_gen):
    """Replace refresh_fraction of each prompt's buffer slots by new teacher rollouts (§4.1), in place."""
    M = buf["x1"].shape[1]
    slots = torch.randperm(M, generator=buffer_gen)[:max(1, round(args.refresh_fraction * M))]
    buf["x1"][:, slots], buf["scores"][:, slots], _, revealed_new = rollouts(teacher, prompts, len(slots), args,
                                                                           wall, gen)
    buf["r"] = recipe.buffer_rewards(buf["scores"], buffer_gen)     # over the whole buffer, new and old
    if buf["revealed_at"] is not None:
        buf["revealed_at"][:, slots] = revealed_new


def measure_next(model, prompts, args, wall, gen, held_gen, last):
    """Rollouts of p_{a+eta} (x1, r, valid, revealed_at), (P, n, ...): M per prompt for the next buffer, then H
    drawn by held_gen for its health check; after the last phase, end_rollouts_per_prompt (at least M)."""
    M = args.rollouts_per_prompt
    x1, r, valid, revealed_at = rollouts(model, prompts, max(args.end_rollouts_per_prompt, M) if last else M,
                                         args, wall, gen, progress=last)
    if not last:
        x1, r, valid, revealed_at = (torch.cat(z, 1) for z in zip(
            (x1, r, valid, revealed_at), rollouts(model, prompts, args.held_out_per_prompt, args, wall, held_gen)))
    return x1, r, valid, revealed_at


def measure_phase(args, a, rollouts_k, ref, extra):
    """The history row of p_a (maze/exact.py: measure, against the base's reference ref); its completions go
    to OUT/rollouts_a*.npy (the figures read them)."""
    x1, r, valid = (np.asarray(z) for z in rollouts_k[:3])
    L = ref[0].shape[-1]
    np.save(rollouts_file(args.out, a), x1[:, :, -L:].reshape(-1, L).astype(np.int16))
    return measure(a, x1[:, :, -L:], r, valid, args.rollouts_per_prompt, (ref[1], ref[2]), extra)


def target_row(r_buf, args, eta):
    """The one-phase target: the teacher's own rollouts (the buffer) reweighted by e^{eta r}."""
    target = tilted_means(r_buf.numpy(), (r_buf > args.invalid_reward).numpy(), eta)
    return {f"teacher_target_{q}": target[q] for q in ("validity", "validity_se", "reward", "reward_se")}


def save_phase(model, args, history, rollouts_k):
    """OUT/state.pt (atomic: what --resume reads) and OUT/metrics.json, after every phase."""
    x1, r, _, revealed_at = rollouts_k
    save(model, os.path.join(args.out, "state.pt"), history=history, args=vars(args), rollouts=(x1, r, revealed_at))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1)


def finish(args, history, wall, prompts):
    """The run's figures and metrics_phi*_eta*.json (the copy the README cites) in args.figures."""
    plot_run(history, args.out, wall, prompts, args.rollouts_per_prompt, f"DTM phi={args.phi:g} eta={args.eta:g}",
             args.figures, f"phi{args.phi:g}_eta{args.eta:g}")       # makes args.figures
    with open(os.path.join(args.figures, f"metrics_phi{args.phi:g}_eta{args.eta:g}.json"), "w") as f:
        json.dump(history, f, indent=1)
    return history


# ----------------------------------------------------------------------------- the command line
# The paper's flags: (name, default, why the default is what it is), one group each; --help prints them.
FLAGS = {
    "DTM (paper §3: eq. 8, 16-17)": [
        ("phi", 1.0, "control-variate coefficient in [0, 1]; 1 in all the paper's runs, 0: the reward-weighted ELBO"),
        ("eta", 0.1, "annealing step of the tilt a (0.05 realised no more)"),
        ("a_max", 1.0, "final tilt a (the base's exact tilt there: 0.79 valid, against 0.56)")],
    "training (these defaults run the main command in ~7 minutes on 2 CPU cores)": [
        ("steps_per_phase", 50, "optimiser steps per phase (100 realised no more)"),
        ("batch", 64, "sequences per step, a multiple of the 8 prompts (8 of each: one Z per prompt)"),
        ("lr", 0.02, "SGD learning rate, momentum 0.9 (0.005 with 4x the steps realised no more)"),
        ("clip", 1.0, "gradient-norm clip, a guard (phi = 1's gradient norm at the base is ~0.03)"),
        ("rollouts_per_prompt", 16, "replay buffer per prompt, also the rollouts measured after each phase"),
        ("refresh_every", 25, "steps between refreshes of the buffer (§4.1)"),
        ("refresh_fraction", 0.25, "fraction of the buffer refreshed"),
        ("temperature", 1.0, "rollout temperature; 1 samples p_a itself, as eq. 11-13 assume")],
    "measurement and files": [
        ("end_rollouts_per_prompt", 256, "rollouts per prompt after the last phase (validity SE ~0.01)"),
        ("reference_per_prompt", 2048, "rollouts per prompt of the base for its exact tilt, drawn once, cached"),
        ("held_out_per_prompt", 16, "teacher rollouts per prompt held out of each phase for its health check "
                                    "(SE ~1.5e-5 at eta 0.1; 64: ~0.8e-5)"),
        ("base", DEFAULT_BASE, "base checkpoint (default: maze/base.pt, pretrained first if missing)"),
        ("out", "runs/dtm", "metrics.json, rollouts and state.pt go here"),
        ("figures", None, "figures and metrics_phi*_eta*.json (default: --out; the README's: figures)"),
        ("resume", False, "continue from OUT/state.pt after its last phase"),
        ("seed", 0, "seeds the rollouts, the masking and the minibatches"),
        ("device", "cpu", "cpu, cuda, cuda:1, ... (every random draw happens there)")]}


def parser():
    """The paper's flags. lab/experiments.py adds its own to this parser; those of them that run()
    reads have their defaults here (the sampler's order and steps, the reward's penalty and offset)."""
    p = argparse.ArgumentParser(description="Discrete Tilt Matching on the 41x41 maze: python dtm.py --phi 1 --eta "
                                            "0.1.\nThe variants and controls: python -m lab.experiments run --help.\n"
                                            "Each phase prints its health check: the change of its objective on "
                                            "held-out teacher rollouts, which must be negative by more than its "
                                            "SE;\na phase that does not lower it has fitted noise.",
                                formatter_class=Help)
    for title, flags in FLAGS.items():
        g = p.add_argument_group(title)
        for name, default, why in flags:
            kind = dict(action="store_true") if default is False else dict(type=type("" if default is None else default))
            g.add_argument(f"--{name}", default=default, help=why, **kind)
    p.set_defaults(order="random", sample_steps=None, invalid_reward=env.INVALID_REWARD, r_offset=None)
    return p


def parse(argv=None, p=None):
    """Parse and check the flags of `p` (default: this file's parser); one line of error on bad input."""
    p = p or parser()
    args = p.parse_args(argv)
    args.figures = args.figures or args.out
    args.r_offset = -args.invalid_reward if args.r_offset is None else args.r_offset   # r + offset >= 0
    problems = [m for bad, m in [
        (not args.invalid_reward < 0, f"--invalid_reward must be < 0, below every valid reward (got "
                                      f"{args.invalid_reward})"),
        (not args.eta > 0, f"--eta must be > 0 (got {args.eta})"),
        (not 0 <= args.phi <= 1, f"--phi must be in [0, 1] (got {args.phi})"),
        (not args.a_max > 0, f"--a_max must be > 0 (got {args.a_max})"),
        (min(args.steps_per_phase, args.rollouts_per_prompt, args.refresh_every, args.end_rollouts_per_prompt,
             args.held_out_per_prompt) < 1, "--steps_per_phase, --refresh_every and the rollout counts must be >= 1"),
        (args.reference_per_prompt <= args.rollouts_per_prompt, "--reference_per_prompt must exceed "
                                                                "--rollouts_per_prompt (phase 1 holds out the rest)"),
        (args.batch < 8 or args.batch % 8, f"--batch must be a positive multiple of the 8 prompts (got {args.batch})"),
        (args.device.startswith("cuda") and not torch.cuda.is_available(),
         f"--device {args.device}: CUDA is not available here")] if bad]
    if problems:
        p.error("; ".join(problems))
    return args


def report(history, args, seconds):
    h0, h = history[0], history[-1]
    print(f"done in {seconds:.0f} s; a = 0 -> {h['a']:g}: validity {h0['validity']:.3f} -> {h['validity']:.3f} ± "
          f"{h['validity_se']:.3f} (exact {h['exact_validity']:.3f}), reward {h0['reward']:.3f} -> {h['reward']:.3f} ± "
          f"{h['reward_se']:.3f} (exact {h['exact_reward']:.3f}); realised {h['realised_validity']:.2f} ± "
          f"{h['realised_validity_se']:.2f} / {h['realised_reward']:.2f} ± {h['realised_reward_se']:.2f}; see {args.out}/")


def main(argv=None):
    args = parse(argv)
    t0 = time.time()
    try:
        history = run(args)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    report(history, args, time.time() - t0)
    return history


if __name__ == "__main__":
    main()
