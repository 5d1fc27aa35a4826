"""The maze experiments of lab/FINDINGS_maze.md: variants of dtm.py's loop, controls, the phi x eta sweep, a benchmark.

Not the paper's algorithm (that is dtm.py), but what the findings needed to test it. Each variant
overrides one method of `dtm.Recipe`, the set of points where dtm.run lets a caller change the loop;
the loop itself is not copied here.

    python -m lab.experiments run --control --out runs/control        # the main command, no tilt
    python -m lab.experiments run --shuffle_rewards --out runs/shuffle # the tilt's weights, no signal
    python -m lab.experiments run --r_offset 0.5 --out runs/off05      # another constant added to r
    python -m lab.experiments run --states path --out runs/path        # the sampler's own states
    python -m lab.experiments sweep --a_max 2 --out runs/sweep --figures figures   # paper Fig. 2/5
    python -m lab.experiments budget --out runs/budget --end_rollouts_per_prompt 16 --held_out_per_prompt 64
    python -m lab.experiments noise --out runs/noise                    # eq. 17's coefficients' noise (lab/noise.py)
    python -m lab.experiments bench                                     # a DTM step against an ELBO step
    python -m lab.experiments run --help                                # every flag (dtm.py's too)
"""
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dtm                                                                                     # noqa: E402
from dtm import dtm_loss, group_log_mean_exp                                                   # noqa: E402
from maze import env, exact                                                                    # noqa: E402
from maze.figures import logged_phase_kl, plot_budget, plot_sweep, rollouts_file               # noqa: E402
from maze.mdm import PROMPT_LEN, CheckpointError, elbo_loss, load, mask_along_path, mask_completions  # noqa: E402
from lab.noise import noise                                                                   # noqa: E402

NAMES = ("run", "sweep", "budget", "noise", "bench")


def shuffled(r, generator):
    """--shuffle_rewards, a no-signal control: the buffer's rewards r (P, n) permuted among each prompt's n
    rollouts, afresh whenever the buffer changes (dtm.run calls it on the whole buffer). A phase then tilts
    towards a random reweighting of the teacher's own samples, with the weights of the real tilt: their
    noise, and their mean refit of the teacher's own samples (lab/FINDINGS_maze.md, "the refit"). A rollout
    keeps its own reward with probability 1/n, so 1/n of the signal stays (1/16 at dtm.py's buffer)."""
    r = torch.as_tensor(r)
    return r.gather(1, torch.rand(r.shape, generator=generator).argsort(1))


class Variant(dtm.Recipe):
    """dtm.Recipe with the flags of this file: each one changes one method."""

    def __init__(self, args):
        super().__init__(args)
        self.keeps_paths = args.states == "path"
        self.ema = self.mean = None

    def optimizer(self, model):
        a = self.args
        if a.ema:                                                      # the released EMA, from the teacher
            self.ema = [q.detach().clone() for q in model.parameters()]
        if a.optimizer == "adamw":                                     # normalises the O(eta) steps away
            return torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
        return super().optimizer(model)

    def buffer_rewards(self, r, generator):
        return shuffled(r, generator) if self.args.shuffle_rewards else r

    def loss_eta(self, eta):
        return 1e-6 if self.args.control else eta                     # --control: the same run, no tilt

    def masked_states(self, x1, revealed_at, gen, L):
        a = self.args
        x1 = x1.repeat(a.maskings, 1)                                  # --maskings: each rollout k times
        if a.states == "path":                                         # the sampler's own states, and the
            x_t, mask, S = mask_along_path(x1, revealed_at, gen)       # tokens it drew from them
            return x_t, mask, S.float() / L                            # S steps: the path's NLL / L
        x_t, mask, time_weight = super().masked_states(x1, revealed_at, gen, L)   # forward, hazard / L
        if a.weighting == "paper":
            return x_t, mask, time_weight
        return x_t, mask, 1.0 / mask.sum(1).clamp_min(1).float()      # the released code's 1/n

    def loss(self, logits, teacher_logits, x1, mask, r, time_weight, eta, group, r_buf):
        a = self.args
        x1, r, group = x1.repeat(a.maskings, 1), r.repeat(a.maskings), group.repeat(a.maskings)   # as masked_states()
        if a.weighting == "released":                                  # their code: r clipped at 0, no Z
            return dtm_loss(logits, teacher_logits, x1, mask, r.clamp_min(0), time_weight, eta, a.phi,
                            log_Z=torch.zeros_like(r))
        r, log_Z, phi = r + a.r_offset, None, a.phi
        if a.z == "buffer":                                            # Z per prompt over the whole buffer
            P, M = r_buf.shape
            log_Z = group_log_mean_exp(eta * (r_buf + a.r_offset).flatten(), torch.arange(P).repeat_interleave(M))
            log_Z = log_Z.view(P, M)[:, 0].to(r.device)[group]
        if a.centred:                  # eq. 17's coefficient phi Z: a function of the prompt, so of x_t
            log_Z = group_log_mean_exp(eta * r, group) if log_Z is None else log_Z
            phi = a.phi * torch.exp(log_Z)                             # NLL weights e^{eta r} / Z - phi
        return dtm_loss(logits, teacher_logits, x1, mask, r, time_weight, eta, phi, group, log_Z)

    def after_step(self, model, opt, step):
        a = self.args
        if a.lr_decay == "cosine":                                     # the lr of the next step: 0 at the end
            for g in opt.param_groups:
                g["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / a.steps_per_phase))
        if self.ema is not None:
            with torch.no_grad():
                for e, q in zip(self.ema, model.parameters()):
                    e.lerp_(q, 1 - a.ema)
        start = a.steps_per_phase - max(1, round(a.average * a.steps_per_phase))
        if a.average and step >= start:                                # Polyak-Ruppert: the running mean of
            with torch.no_grad():                                      # the last iterates of the phase
                if step == start:
                    self.mean = [q.detach().clone() for q in model.parameters()]
                for m, q in zip(self.mean, model.parameters()):
                    m.lerp_(q, 1 / (step - start + 1))

    def end_phase(self, model):
        if self.mean is not None:                                      # the mean is the next p_a
            with torch.no_grad():
                for m, q in zip(self.mean, model.parameters()):
                    q.copy_(m)
            self.mean = None
        if self.ema is not None:                                       # the EMA is the next p_a
            with torch.no_grad():
                for e, q in zip(self.ema, model.parameters()):
                    q.copy_(e)
            self.ema = None


def run(args):
    return dtm.run(args, Variant(args))


def save_table(out, stem, rows, lines):
    """A study's results: its rows as OUT/stem.json, its markdown table (lines) as OUT/stem.md, and printed."""
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- the phi x eta sweep
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
        rows, j = dtm.stratified(P, n, args.batch, gen)
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


def sweep(args):
    """Paper Fig. 2/5: phi in {0, 1} x eta in --sweep_etas, at equal compute. Every run takes
    --sweep_steps optimiser steps in all, split evenly over its a_max / eta phases (so a smaller eta
    gets fewer steps per phase, as in the paper). Two control runs (eta ~ 0 in the loss, on the
    smallest eta's schedule), one per phi, show what the training does without a tilt. phi = 0's
    gradient at the teacher is far larger than phi = 1's, so at one lr it also takes larger steps:
    two more runs (with and without the tilt, the smallest eta) give phi = 0 the lr that makes its
    first step as long as phi = 1's, lr * |g_1| / |g_0| (`gradient_norm`, at the base). Each run
    writes to OUT/phi*_eta*[_lr*][_control]/ (--resume goes on there); the sweep writes OUT/sweep.json,
    OUT/sweep.md (a table) and FIGURES/sweep.png. With --resume, the runs already in OUT/sweep.json
    are reused."""
    results, runs, done = [], [], {}
    if args.resume and os.path.isfile(os.path.join(args.out, "sweep.json")):
        with open(os.path.join(args.out, "sweep.json")) as f:
            done = {(r["phi"], r["eta"], r["steps_per_phase"], r["control"], r["lr"]): r for r in json.load(f)}
    etas, eta0 = args.sweep_etas, min(args.sweep_etas)
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    ref_x, ref_r, _ = exact.base_reference(args.base, wall, prompts, args.reference_per_prompt, args)
    base, gen = load(args.base, args.device)[0], torch.Generator(args.device).manual_seed(args.seed)
    at_eta0 = copy.copy(args)
    at_eta0.eta = eta0
    g = {phi: gradient_norm(base, dtm.with_prompts(prompts, ref_x), torch.as_tensor(ref_r, dtype=torch.float32),
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
            results.append(done[key])
            runs.append(sub)
            continue
        t0 = time.time()
        h1 = run(sub)[-1]
        results.append(dict(phi=phi, eta=eta, control=control, lr=lr, steps_per_phase=sub.steps_per_phase,
                            seconds=round(time.time() - t0), rollouts=h1["n"], a=h1["a"],
                            **{k: h1[k] for k in ("validity", "validity_se", "reward", "reward_se",
                                                  "realised_validity", "realised_reward",
                                                  "distinct_valid_per_prompt")}))
        runs.append(sub)
        tqdm.write(f"sweep: phi={phi:g} eta={eta:g} lr={lr:g}{' (control)' if control else ''} done in "
                   f"{results[-1]['seconds']} s")
    lines = ["| phi | eta | lr | steps/phase | validity | mean reward | realised (validity / reward) | "
             "distinct valid / prompt | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['phi']:g} | {r['eta']:g}{' (control: no tilt)' if r['control'] else ''} | {r['lr']:g} | "
              f"{r['steps_per_phase']} | {r['validity']:.3f} ± {r['validity_se']:.3f} | "
              f"{r['reward']:.3f} ± {r['reward_se']:.3f} | {r['realised_validity']:.2f} / {r['realised_reward']:.2f} | "
              f"{r['distinct_valid_per_prompt']:.1f} | {r['seconds']} |" for r in results]
    save_table(args.out, "sweep", results, lines)
    rows = ["phi = 0", "phi = 1", f"phi = 0, lr {lr0:g}\n(phi = 1's first step)"]
    cols = ["the base (a = 0)"] + [f"eta = {e:g}" for e in etas] + [f"control: eta ~ 0\n(schedule of eta = {eta0:g})"]
    cell = [(2 if r["lr"] != args.lr else int(r["phi"]), len(etas) + 1 if r["control"] else etas.index(r["eta"]) + 1)
            for r in results]
    panels = [(rollouts_file(sub.out, r["a"]), r["a"], c, f"{r['validity']:.2f} valid, realised "
               f"{r['realised_validity']:.2f}") for sub, r, c in zip(runs, results, cell)]
    plot_sweep(panels, rollouts_file(runs[0].out, 0.0), wall, prompts, args.rollouts_per_prompt, rows, cols,
               f"DTM to a = {args.a_max:g}, {args.sweep_steps} optimiser steps per run (equal compute)",
               os.path.join(args.figures, "sweep.png"))
    return results


# ----------------------------------------------------------------------------- the per-phase budget
# One phase from the base, a = 0 -> eta, at more compute per phase: (name, flags over the main command's).
# Its buffer comes from the base's reference rollouts, which phase 1 has for free (no refresh needed).
BUDGET = [("c1", {}), ("c1avg", dict(average=0.5)),
          ("c4", dict(batch=256, rollouts_per_prompt=64, refresh_every=10 ** 6)),
          ("c4avg", dict(batch=256, rollouts_per_prompt=64, refresh_every=10 ** 6, average=0.5)),
          ("c4k4", dict(maskings=4, rollouts_per_prompt=64, refresh_every=10 ** 6)),   # c4's compute and buffer, 64
          # rollouts x 4 maskings per step instead of 256 x 1 (--maskings); c16avg_k4 the same for c16avg
          ("c16avg", dict(batch=256, steps_per_phase=200, rollouts_per_prompt=256, refresh_every=10 ** 6, average=0.5)),
          ("c16avg_k4", dict(maskings=4, steps_per_phase=200, rollouts_per_prompt=256, refresh_every=10 ** 6,
                             average=0.5)),
          ("c16avg_m64", dict(batch=256, steps_per_phase=200, rollouts_per_prompt=64, refresh_every=10 ** 6,
                              average=0.5)),
          ("c16avg_m1024", dict(batch=256, steps_per_phase=200, rollouts_per_prompt=1024, refresh_every=10 ** 6,
                                average=0.5))]


def budget(args):
    """The health check against per-phase compute: each BUDGET config (--budget: which) for every --seeds,
    one phase of size --eta from the base, in OUT/{name}_s{seed}/ (kept: a finished run is reused). Compute
    is sequences trained per phase (batch x steps) over the default's 64 x 50, and the buffer's rollouts.
    Writes OUT/budget.json, OUT/budget.md and FIGURES/budget_eta{eta}.png: the held-out change over the most
    a phase can gain (-1: the phase reached its minimiser; > 0: it fitted noise), and the realised fraction."""
    rows = []
    for name, flags in [c for c in BUDGET if c[0] in args.budget]:
        for seed in args.seeds:
            sub = copy.copy(args)
            sub.a_max, sub.seed, sub.out = args.eta, seed, os.path.join(args.out, f"{name}_s{seed}")
            sub.figures = sub.out
            for k, val in flags.items():
                setattr(sub, k, val)
            done, history = os.path.join(sub.out, "metrics.json"), []
            if os.path.isfile(done):
                with open(done) as f:
                    history = json.load(f)
            h = history[1] if len(history) == 2 else run(sub)[1]
            most = logged_phase_kl(h) or math.nan                          # 0: every reward equal, no tilt
            rows.append(dict(name=name, seed=seed, compute=sub.batch * sub.maskings * sub.steps_per_phase / (64 * 50),
                             relative=h["held_out_change"] / most, relative_se=h["held_out_change_se"] / most,
                             buffer=sub.rollouts_per_prompt, maskings=sub.maskings, **{k: h[k] for k in (
                                 "held_out_change", "held_out_change_se", "realised_validity",
                                 "realised_validity_se", "realised_reward", "train_s")}, phase_kl=logged_phase_kl(h)))
            tqdm.write(f"budget: {name} seed {seed}: held-out change {h['held_out_change']:.2e} ± "
                       f"{h['held_out_change_se']:.1e}, most -{logged_phase_kl(h):.1e}")
    lines = ["| config | compute | buffer / prompt | maskings | seeds | held-out change (mean ± SE over seeds) | "
             "over the most | realised validity | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in rows):
        g = [r for r in rows if r["name"] == name]
        d = np.array([r["held_out_change"] for r in g])
        se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else g[0]["held_out_change_se"]
        lines.append(f"| {name} | {g[0]['compute']:g}x | {g[0]['buffer']} | {g[0]['maskings']} | {len(g)} | "
                     f"{d.mean():.2e} ± {se:.1e} | "
                     f"{np.mean([r['relative'] for r in g]):+.2f} | "
                     f"{np.mean([r['realised_validity'] for r in g]):.2f} | {np.mean([r['train_s'] for r in g]):.0f} |")
    save_table(args.out, "budget", rows, lines)
    plot_budget(rows, f"one phase from the base, eta = {args.eta:g} (each point a seed)",
                os.path.join(args.figures, f"budget_eta{args.eta:g}.png"))
    return rows


# ----------------------------------------------------------------------------- benchmark
def bench(args, reps=20):
    """Seconds per optimiser step, ELBO against DTM (phi = 1), on the same model and batch: the mean of
    `reps` steps after a first pass of `reps` warm-up steps of each."""
    torch.manual_seed(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    model = load(args.base, args.device)[0]
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = Variant(args).optimizer(model)
    wall = env.make_maze()
    x1 = dtm.rollouts(teacher, env.make_prompts(wall), args.batch // 8, args, wall, gen)[0].flatten(0, 1)
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
    print(f"batch {len(x1)}, mean of {reps} steps after {reps} warm-up steps each: ELBO step "
          f"{times['elbo'] * 1e3:.1f} ms, DTM step {times['dtm'] * 1e3:.1f} ms, ratio {times['dtm'] / times['elbo']:.3f}")
    return times


# ----------------------------------------------------------------------------- the command line
def parser():
    p = dtm.parser()
    p.prog = "python -m lab.experiments"
    p.description = ("lab/FINDINGS_maze.md's experiments: NAME is run (dtm.py's loop with the variants below), sweep "
                     "(paper Fig. 2/5), budget (a phase's health check against its compute), noise (eq. 17's "
                     "coefficients'\ngradient noise at the teacher) or bench. Every dtm.py flag works here too.")
    p.add_argument("name", choices=NAMES, help="what to run")
    g = p.add_argument_group("variants of the loop (lab/FINDINGS_maze.md)")
    g.add_argument("--control", action="store_true", help="eta ~ 0 (1e-6) in the loss: the same run, no tilt")
    g.add_argument("--shuffle_rewards", action="store_true", help="the buffer's rewards permuted among each "
                                                                  "prompt's rollouts whenever it changes: no signal")
    g.add_argument("--r_offset", type=float, help="the constant c added to r in the loss (default: "
                                                  "-invalid_reward, so that r + c >= 0)")
    g.add_argument("--invalid_reward", type=float, default=env.INVALID_REWARD,
                   help="reward of an invalid completion, < 0: another reward, so another tilt")
    g.add_argument("--centred", action="store_true", help="eq. 17's coefficient phi Z: NLL weights "
                                                          "e^{eta r}/Z - phi, of mean 1 - phi")
    g.add_argument("--z", choices=["batch", "buffer"], default="batch", help="Z per prompt over the minibatch "
                                                                             "or the whole buffer")
    g.add_argument("--weighting", choices=["paper", "count", "released"], default="paper",
                   help="paper: hazard / L and Z; count: 1/n time weight; released: 1/n, raw e^{eta r}, r >= 0")
    g.add_argument("--states", choices=["forward", "path"], default="forward",
                   help="forward: x_t by random masking (the paper); path: the sampler's own states")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="adamw normalises the O(eta) "
                                                                                "steps away")
    g.add_argument("--lr_decay", choices=["none", "cosine"], default="none", help="cosine: the lr falls to 0 "
                                                                                  "over every phase")
    g.add_argument("--ema", type=float, default=0.0, help="the released teacher: an EMA of the model (this "
                                                          "decay) becomes the model at each phase end; 0: off")
    g.add_argument("--average", type=float, default=0.0, help="iterate averaging: the mean of the iterates of "
                                                               "this last fraction of each phase becomes the "
                                                               "model; 0: off")
    g.add_argument("--maskings", type=int, default=1, help="masks of each of a step's --batch rollouts: "
                                                           "k x the sequences per step, the same rollouts")
    g.add_argument("--order", choices=["random", "confidence"], default="random",
                   help="unmasking order: random is the CTMC; confidence is more valid, far less diverse")
    g.add_argument("--sample_steps", type=int, help="sampler steps (default: one per token)")
    g = p.add_argument_group("budget")
    g.add_argument("--budget", nargs="+", choices=[c[0] for c in BUDGET], default=[c[0] for c in BUDGET],
                   help="configs (lab.experiments.BUDGET)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="a run of each config per seed")
    g = p.add_argument_group("noise")
    g.add_argument("--noise_batches", type=int, default=16, help="minibatches at the teacher, each coefficient")
    g.add_argument("--completions", type=int, default=8, help="teacher completions of each state for phi(x_t)")
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep_etas", type=float, nargs="+", default=[2.0, 1.0, 0.5, 0.25, 0.1], help="etas")
    g.add_argument("--sweep_steps", type=int, default=300, help="optimiser steps per run, in all")
    return p


def parse(argv=None):
    p = parser()
    args = dtm.parse(argv, p)
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1) (got {args.ema})")
    if args.maskings < 1 or (args.maskings > 1 and args.states == "path"):
        p.error(f"--maskings must be >= 1, and 1 with --states path (got {args.maskings})")
    if args.noise_batches < 2 or args.completions < 1:
        p.error(f"--noise_batches must be >= 2 and --completions >= 1 (got {args.noise_batches}, {args.completions})")
    if not 0 <= args.average <= 1 or (args.average and args.ema):
        p.error(f"--average must be in [0, 1], and not with --ema (got {args.average})")
    return args


def main(argv=None):
    args = parse(argv)
    t0 = time.time()
    try:
        if args.name == "bench":
            return bench(args)
        if args.name == "sweep":
            return sweep(args)
        if args.name == "budget":
            return budget(args)
        if args.name == "noise":
            rows, lines = noise(args)
            os.makedirs(args.out, exist_ok=True)
            save_table(args.out, "noise", rows, lines)
            return rows
        history = run(args)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    dtm.report(history, args, time.time() - t0)
    return history


if __name__ == "__main__":
    main()
