"""Discrete Tilt Matching (DTM) on the 41x41 maze: the loss, and the annealing loop around it.

A masked diffusion model cannot compute the likelihood of a sequence, so it cannot be fine-tuned
towards a reward r by policy gradients on log p(x). DTM instead anneals the tilted law
    p_a(x) ∝ p_0(x) exp(a r(x)),      a = 0, eta, 2 eta, ..., a_max                       (eq. 8)
and, in each phase, trains the unmasking posteriors p_theta(. | x_t, i) with a weighted
cross-entropy whose unique minimiser is the posterior of p_{a+eta}, using only rollouts of the
frozen model p_a (the "teacher") and their rewards. The control variate phi cuts its variance.

    python dtm.py --phi 1 --eta 0.1          # the main command: 10 phases, metrics + figures (592 s)
    python dtm.py --phi 0 --eta 0.1          # reward-weighted ELBO (no control variate)
    python dtm.py --bench                    # cost of one DTM step vs one ELBO step
    python dtm.py --sweep                    # phi in {0, 1} x eta in {0.5, 0.25, 0.1}, equal compute
    python dtm.py --help
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
from maze.mdm import (PROMPT_LEN, CheckpointError, Config, elbo_loss, evaluate, load,
                      mask_completions, pretrain, rollout_metrics, save)

DEFAULT_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maze", "base.pt")


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
             normalise=True, log_Z=None):
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
    Returns (1/B) * sum_b time_weight_b * sum_{i in mask_b} loss_i.

    Derivation (SPEC §3). Masking x1 -> x_t does not depend on the tilt, so for any F (eq. 11-13)
        E_{a+eta}[F] = E_a[e^{eta r(X1)} F] / E_a[e^{eta r(X1)}],
    and the tilted posterior at a masked position i is (Prop. 3.1)
        p_{a+eta}(v | x_t, i) = E_a[e^{eta r} 1{X1^i = v} | x_t] / E_a[e^{eta r} | x_t].
    Replace the one-hot by the control-variate target (eq. 17)
        Y_phi(v) = 1{x1^i = v} - phi e^{-eta r} (1{x1^i = v} - p_a(v | x_t, i)):
    since E_a[1{X1^i = v} - p_a(v | x_t, i) | x_t] = 0, E_a[e^{eta r} Y_phi | x_t] is unchanged, so
    the weighted cross-entropy E_a[(e^{eta r} / Z) CE(Y_phi, p_theta)] still has the tilted
    posterior as its unique minimiser (Prop. 3.2), for any phi. Written out per masked token:
        (e^{eta r} / Z) CE(Y_phi, p_theta)
          = (e^{eta r} - phi) / Z * (-log p_theta(x1^i))            reward-weighted NLL
          +           phi / Z * CE(p_a(. | x_t, i), p_theta)         distil the teacher
    phi = 0: reward-weighted ELBO.  phi = 1, eta -> 0: pure distillation of p_a, whose gradient at
    p_theta = p_a is zero, so the noise of the one-hot target cancels (Prop. 3.3: lower variance).
    Z = E_a[e^{eta r}] is estimated per group in the batch, in log space:
        log(1/Z_g) = log n_g - logsumexp_{b in g}(eta r_b)               (group_log_mean_exp)
    Notes. The distillation weight phi / Z is not invariant to adding c to r (Z scales by e^{eta c}),
    though the minimiser is. Where e^{eta r} < phi the NLL weight is negative: a token seen once with
    p_a(x1^i) < 1 - e^{eta r} / phi then has a negative target, and the loss is unbounded below in its
    logit (tests/test_dtm_loss.py). Feed r - min r >= 0 (dtm.py does, via --r_offset); the released
    code clips r at 0 instead, which changes the reward.
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
    w_nll = torch.exp(er + log_inv_Z) - phi * torch.exp(log_inv_Z)     # (e^{eta r} - phi) / Z
    w_ce = phi * torch.exp(log_inv_Z)                                  # phi / Z
    seq = mask.nonzero()[:, 0]                                         # (N,) sequence of each token
    logp = F.log_softmax(logits.to(dt), dim=-1)                       # (N, V)
    reward_weighted_nll = -logp.gather(1, x1[mask][:, None])[:, 0]     # (N,)
    loss = w_nll[seq] * reward_weighted_nll
    if phi != 0:
        p_a = F.softmax(teacher_logits.to(dt), dim=-1)
        teacher_ce = -(p_a * logp).sum(-1)                              # (N,)
        loss = loss + w_ce[seq] * teacher_ce
    return (time_weight[seq] * loss).sum() / B


# ----------------------------------------------------------------------------- the replay buffer
def rollouts(teacher, prompts, per_prompt, args, wall, gen):
    """Teacher rollouts for every prompt, scored.

    Returns x1 (P, per_prompt, T) with the prompt in front, r (P, per_prompt), and the metrics dict.
    """
    P = len(prompts)
    metrics, comp, ids, r = evaluate(teacher.eval(), wall, prompts, per_prompt, args.temperature,
                                     args.order, args.sample_steps, generator=gen)
    pr = torch.as_tensor(prompts)[torch.as_tensor(ids)]
    x1 = torch.cat([pr, torch.full((len(pr), 1), env.SEP), torch.as_tensor(comp)], 1)
    return x1.view(P, per_prompt, -1), torch.as_tensor(r, dtype=torch.float32).view(P, per_prompt), metrics


# ----------------------------------------------------------------------------- the loop
def make_optimizer(model, args):
    """SGD by default: at the teacher the phi = 1 gradient is O(eta), and SGD's steps shrink with it,
    so a phase moves the model as far as the tilt asks. Adam divides by the gradient's own scale:
    even at eta -> 0 (nothing to learn) it takes lr-sized steps along the noise (measured: validity
    0.578 -> 0.508 in 3 phases at eta = 1e-6, lr 3e-4)."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)


def run(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    P, M = len(prompts), args.rollouts_per_prompt
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.pt")
    if args.resume and os.path.isfile(state_path):
        model, ck = load(state_path, args.device)
        history, start = ck["history"], len(ck["history"]) - 1
        gen.manual_seed(args.seed + start)
        print(f"resumed from {state_path} after phase {start}")
    else:
        if args.base is None and not os.path.isfile(DEFAULT_BASE):
            print(f"no base checkpoint at {DEFAULT_BASE}: pretraining one ({args.pretrain_steps} steps)")
            model, _ = pretrain(Config(), args.pretrain_steps, device=args.device, out=DEFAULT_BASE)
        else:
            model, _ = load(args.base or DEFAULT_BASE, args.device)
        history, start = [], 0
    L = model.cfg.gen_len
    a_grid = [min(k * args.eta, args.a_max) for k in range(int(math.ceil(args.a_max / args.eta - 1e-9)) + 1)]

    def measure(a, extra, n=M):
        """n rollouts per prompt of the current model: its metrics now; the first M of them are the
        next phase's replay buffer (the first and last measurements use more, for tighter numbers)."""
        t0 = time.time()
        x1, r, m_all = rollouts(model, prompts, n, args, wall, gen)
        np.save(os.path.join(args.out, f"rollouts_a{a:.2f}.npy"), x1[:, :, PROMPT_LEN:].flatten(0, 1).numpy())
        # metrics of the first M per prompt, comparable across phases; of all n as well at the ends
        m = m_all
        if n > M:
            m = rollout_metrics(wall, prompts, x1[:, :M, PROMPT_LEN:].flatten(0, 1).numpy(),
                                np.repeat(np.arange(P), M))[0]
            m.update({f"end_{k}": v for k, v in m_all.items()}, end_rollouts=n * P)
        if not (history and history[-1]["a"] == a):                   # a resumed run re-samples only
            history.append(dict(a=round(a, 6), **m, eval_s=round(time.time() - t0, 1), **extra))
            tqdm.write(f"a={a:.2f}  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
        return x1[:, :M].clone(), r[:, :M].clone()

    ends = max(M, args.end_rollouts_per_prompt)
    x1_buf, r_buf = measure(a_grid[start], {}, ends if start == 0 else M)
    for k in range(start + 1, len(a_grid)):
        a, eta = a_grid[k], a_grid[k] - a_grid[k - 1]
        t0 = time.time()
        # 1. freeze the teacher p_a = the model at the start of the phase
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        # 2. the replay buffer (x1, r): M rollouts per prompt of p_a, the ones just measured
        # 3. a fresh optimiser per phase (the authors' code resets its state at each phase too)
        opt = make_optimizer(model, args)
        model.train()
        losses = []
        bar = tqdm(range(args.steps_per_phase), desc=f"phase {k}/{len(a_grid) - 1} a->{a:.2f}",
                   leave=False)
        for step in bar:
            if step and step % args.refresh_every == 0:                # refresh a fraction of the buffer
                n_new = max(1, round(args.refresh_fraction * M))
                slots = torch.randperm(M, generator=gen)[:n_new]
                x1_buf[:, slots], r_buf[:, slots], _ = rollouts(teacher, prompts, n_new, args, wall, gen)
            # 4. a stratified minibatch: batch // P rollouts of every prompt, masked afresh
            j = torch.randint(M, (P, args.batch // P), generator=gen)
            rows = torch.arange(P)[:, None].expand_as(j)
            x1, r = x1_buf[rows, j].flatten(0, 1).to(args.device), r_buf[rows, j].flatten().to(args.device)
            group = rows.flatten().to(args.device)
            x_t, mask, hazard = mask_completions(x1, None)
            if args.weighting == "released":                           # their code: mean over masked
                tw = 1.0 / mask.sum(1).clamp_min(1).float()            # tokens, r clipped at 0, no Z
                r = r.clamp_min(0)
            else:                                                      # the paper's ELBO form (Prop. 3.4)
                tw = hazard / L
                r = r + args.r_offset                                  # >= 0: a bounded loss, same tilt
            # 5. student logits, and the teacher's only where the loss needs them
            logits = model(x_t, mask)
            teacher_logits = None
            if args.phi != 0:
                with torch.no_grad():
                    teacher_logits = teacher(x_t, mask)
            loss = dtm_loss(logits, teacher_logits, x1, mask, r, tw, eta, args.phi, group,
                            normalise=args.weighting == "paper")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_s = round(time.time() - t0, 1)
        x1_buf, r_buf = measure(a, dict(loss=float(np.mean(losses)), train_s=train_s),
                                ends if k == len(a_grid) - 1 else M)
        save(model, state_path, history=history, args=vars(args))      # atomic; --resume goes on here
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(history, f, indent=1)
    plot(history, wall, prompts, args)
    return history


# ----------------------------------------------------------------------------- figures
def end_metric(h, k):
    """A history row's metric k over the larger end-of-run sample (end_k) when it was drawn."""
    return h.get(f"end_{k}", h[k])


def load_rollouts(out, a, wall, prompts):
    """The completions saved at tilt a: x (n, L), the prompt index of each, and their validity."""
    x = np.load(os.path.join(out, f"rollouts_a{a:.2f}.npy"))
    ids = np.repeat(np.arange(len(prompts)), len(x) // len(prompts))
    return x, ids, env.score(wall, x, np.asarray(prompts)[ids])[0]


def plot(history, wall, prompts, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    os.makedirs(args.figures, exist_ok=True)
    tag = f"phi{args.phi:g}_eta{args.eta:g}"
    show = list(range(min(4, len(prompts))))

    def draw(axes, a, colour):
        """The valid rollouts at tilt a of the first prompts, one panel each."""
        x, ids, valid = load_rollouts(args.out, a, wall, prompts)
        for ax, p in zip(axes, show):
            sel = ids == p
            env.plot_rollouts(ax, wall, x[sel], prompts[p], valid[sel], colour=colour,
                              title=f"a={a:.1f}  valid {valid[sel].mean():.2f}")

    fig, axes = plt.subplots(2, len(show), figsize=(3.2 * len(show), 6.6), squeeze=False)
    draw(axes[0], history[0]["a"], "tab:gray")
    draw(axes[1], history[-1]["a"], "tab:red")
    fig.suptitle(f"DTM phi={args.phi:g} eta={args.eta:g}: rollouts before (top) and after (bottom)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.figures, f"rollouts_{tag}.png"), dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(show), figsize=(3.2 * len(show), 3.5), squeeze=False)

    def frame(h):
        for ax in axes[0]:
            ax.clear()
        draw(axes[0], h["a"], "tab:red")
        fig.suptitle(f"DTM phi={args.phi:g} eta={args.eta:g}: a = {h['a']:.1f}")
    FuncAnimation(fig, frame, frames=history).save(os.path.join(args.figures, f"rollouts_{tag}.gif"),
                                                   writer=PillowWriter(fps=2), dpi=60)
    plt.close(fig)
    a = [h["a"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ("reward", "validity", "distinct_valid_per_prompt"),
                              ("mean reward", "validity", "distinct valid paths / prompt")):
        ax.plot(a, [h[key] for h in history], "o-")
        ax.set_xlabel("tilt a")
        ax.set_title(label)
    fig.suptitle(f"DTM phi={args.phi:g} eta={args.eta:g}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.figures, f"curves_{tag}.png"), dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- the phi x eta ablation
def sweep(args):
    """Paper Fig. 2/5: phi in {0, 1} x eta in --sweep_etas, at equal compute. Every run takes
    --sweep_steps optimiser steps in all, split evenly over its a_max / eta phases (so a smaller eta
    gets fewer steps per phase, as in the paper). Each run writes to OUT/phi*_eta*/ (--resume goes on
    there); the sweep writes OUT/sweep.json, OUT/sweep.md (a table) and FIGURES/sweep.png.
    With --resume, the runs already in OUT/sweep.json are reused as they are."""
    results, runs, done = [], [], {}
    if args.resume and os.path.isfile(os.path.join(args.out, "sweep.json")):
        with open(os.path.join(args.out, "sweep.json")) as f:
            done = {(r["phi"], r["eta"], r["steps_per_phase"]): r for r in json.load(f)}
    for phi in (0.0, 1.0):
        for eta in args.sweep_etas:
            sub = copy.copy(args)
            sub.phi, sub.eta = phi, eta
            sub.steps_per_phase = max(1, round(args.sweep_steps * eta / args.a_max))
            sub.out = sub.figures = os.path.join(args.out, f"phi{phi:g}_eta{eta:g}")
            if (phi, eta, sub.steps_per_phase) in done:
                results.append(done[phi, eta, sub.steps_per_phase])
                runs.append((sub, args.a_max))
                continue
            t0 = time.time()
            history = run(sub)
            h0, h1 = history[0], history[-1]
            results.append(dict(phi=phi, eta=eta, steps_per_phase=sub.steps_per_phase,
                                seconds=round(time.time() - t0), rollouts=h1.get("end_rollouts"),
                                **{k: end_metric(h1, k) for k in ("validity", "reward", "distinct_valid_per_prompt")},
                                base_validity=end_metric(h0, "validity")))
            runs.append((sub, h1["a"]))
            tqdm.write(f"sweep: phi={phi:g} eta={eta:g} done in {results[-1]['seconds']} s")
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| phi | eta | steps/phase | validity | mean reward | distinct valid / prompt | wall s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['phi']:g} | {r['eta']:g} | {r['steps_per_phase']} | {r['validity']:.3f} | "
              f"{r['reward']:.3f} | {r['distinct_valid_per_prompt']:.1f} | {r['seconds']} |" for r in results]
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib.pyplot as plt
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    etas = args.sweep_etas
    fig, axes = plt.subplots(2, len(etas), figsize=(3.4 * len(etas), 7.6), squeeze=False)
    for (sub, a), r in zip(runs, results):                           # final rollouts of the first prompt
        x, ids, valid = load_rollouts(sub.out, a, wall, prompts)
        ax = axes[int(r["phi"]), etas.index(r["eta"])]
        env.plot_rollouts(ax, wall, x[ids == 0], prompts[0], valid[ids == 0], colour="tab:red",
                          title=f"phi={r['phi']:g} eta={r['eta']:g}: valid {r['validity']:.2f}")
    fig.suptitle(f"DTM at a={args.a_max:g}, {args.sweep_steps} steps per run: rollouts of prompt 0")
    fig.tight_layout()
    os.makedirs(args.figures, exist_ok=True)
    fig.savefig(os.path.join(args.figures, "sweep.png"), dpi=90)
    plt.close(fig)
    return results


# ----------------------------------------------------------------------------- benchmark
def bench(args, reps=20):
    """Seconds per optimiser step: ELBO vs DTM (phi = 1) on the same model and batch."""
    torch.manual_seed(args.seed)
    model = load(args.base or DEFAULT_BASE, args.device)[0]
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, args)
    wall = env.make_maze()
    x1 = rollouts(teacher, env.make_prompts(wall), args.batch // 8, args, wall, None)[0].flatten(0, 1)
    r = torch.rand(len(x1))
    group = torch.arange(len(x1)) % 8
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
        torch.manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(reps):
            loss = fn(*mask_completions(x1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times[name] = (time.perf_counter() - t0) / reps
    print(f"batch {len(x1)}: ELBO step {times['elbo'] * 1e3:.1f} ms, DTM step {times['dtm'] * 1e3:.1f} ms, "
          f"ratio {times['dtm'] / times['elbo']:.3f}")
    return times


def parse(argv=None):
    p = argparse.ArgumentParser(description="Discrete Tilt Matching on the 41x41 maze.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--phi", type=float, default=1.0, help="control-variate coefficient (eq. 17), in [0, 1]")
    p.add_argument("--eta", type=float, default=0.1, help="annealing step of the tilt a (eq. 8), > 0")
    p.add_argument("--a_max", type=float, default=1.0, help="final tilt a")
    p.add_argument("--steps_per_phase", type=int, default=100, help="optimiser steps per phase")
    p.add_argument("--batch", type=int, default=64, help="sequences per step (a multiple of the 8 prompts)")
    p.add_argument("--lr", type=float, default=0.02, help="learning rate (SGD, momentum 0.9)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: steps scale with the O(eta) gradient; adamw normalises them away (see README)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--rollouts_per_prompt", type=int, default=16,
                   help="replay buffer size per prompt; also the rollouts measured after each phase")
    p.add_argument("--end_rollouts_per_prompt", type=int, default=64,
                   help="rollouts per prompt measured at the first and the last a (before/after numbers)")
    p.add_argument("--refresh_every", type=int, default=25, help="steps between buffer refreshes")
    p.add_argument("--refresh_fraction", type=float, default=0.25, help="fraction of the buffer refreshed")
    p.add_argument("--r_offset", type=float, default=-env.INVALID_REWARD,
                   help="added to r in the paper-weighted loss, so that r >= 0 and the loss is bounded; "
                        "the tilt is unchanged")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (rollouts, eval)")
    p.add_argument("--order", choices=["random", "confidence"], default="random",
                   help="unmasking order: random is the CTMC; confidence is more valid, far less diverse")
    p.add_argument("--sample_steps", type=int, default=None, help="sampler steps (default: one per token)")
    p.add_argument("--weighting", choices=["paper", "released"], default="paper",
                   help="paper: hazard/L time weight and per-prompt Z; released: mean over masked "
                        "tokens, raw e^{eta r}, r clipped at 0 (the authors' code)")
    p.add_argument("--base", default=None,
                   help=f"base checkpoint; default {DEFAULT_BASE}, pretrained first if it is missing")
    p.add_argument("--pretrain_steps", type=int, default=2400, help="pretraining steps if the base is missing")
    p.add_argument("--out", default="runs/dtm", help="metrics.json, rollouts and state.pt go here")
    p.add_argument("--figures", default="figures", help="where the figures are written")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt after its last phase")
    p.add_argument("--bench", action="store_true", help="only time a DTM step against an ELBO step")
    p.add_argument("--sweep", action="store_true",
                   help="the phi x eta ablation (paper Fig. 2/5) at equal compute; --phi, --eta and "
                        "--steps_per_phase are set per run")
    p.add_argument("--sweep_etas", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="etas of --sweep")
    p.add_argument("--sweep_steps", type=int, default=300, help="optimiser steps per --sweep run, in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    problems = []
    if not args.eta > 0:
        problems.append(f"--eta must be > 0 (got {args.eta})")
    if not 0 <= args.phi <= 1:
        problems.append(f"--phi must be in [0, 1] (got {args.phi})")
    if not args.a_max > 0:
        problems.append(f"--a_max must be > 0 (got {args.a_max})")
    if args.steps_per_phase < 1 or args.batch < 8 or args.rollouts_per_prompt < 1 or args.refresh_every < 1:
        problems.append("--steps_per_phase, --refresh_every, --rollouts_per_prompt must be >= 1, --batch >= 8")
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
    before, after = (tuple(end_metric(h, k) for k in ("reward", "validity", "distinct_valid_per_prompt"))
                     for h in (history[0], history[-1]))
    print(f"done in {time.time() - t0:.0f}s, over {history[-1].get('end_rollouts', 'the')} rollouts: "
          f"reward {before[0]:.3f} -> {after[0]:.3f}, validity {before[1]:.3f} -> {after[1]:.3f}, "
          f"distinct valid paths/prompt {before[2]:.1f} -> {after[2]:.1f}; "
          f"metrics in {args.out}/metrics.json, figures in {args.figures}/")


if __name__ == "__main__":
    main()
