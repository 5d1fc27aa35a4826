"""The exact target of a maze run, and how far a run got: the base's tilt p_0 e^{a r} / Z, known by
importance weights on its reference rollouts, and the realised fraction of its gain.

`base_reference` draws (once, cached beside the checkpoint) 2,048 rollouts per prompt of the base;
`tilted_means` reweights them by e^{a r} per prompt; `realised_fraction` compares a model's validity
and reward with that; `measure` makes dtm.py's history row of a phase (and prints it).
"""
import math

import numpy as np
from tqdm import tqdm

from maze import env
from maze.mdm import cached_rollouts

REFERENCE_SEED = 1234                 # the base's reference rollouts are a property of the base, not of a run


def tilted_means(reward, valid, a):
    """Validity and mean reward under p e^{a r} / Z from rollouts (P, n) of p, by self-normalised importance
    weights w = e^{a r} per prompt, averaged over prompts (a = 0: plain means). Delta-method standard errors,
    se_p^2 = sum_j w_j^2 (f_j - f_p)^2 / (sum_j w_j)^2, as sqrt(sum_p se_p^2) / P; ess = sum_p (sum w)^2 / sum w^2."""
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


def base_reference(ckpt, wall, prompts, per_prompt, args):
    """per_prompt rollouts of the base per prompt, its law p_0: every a's exact tilt p_0 e^{a r} / Z follows by
    importance weights (`tilted_means`). Drawn once with a fixed seed, cached beside the checkpoint
    (`maze.mdm.cached_rollouts`). Returns completions (P, n, L), reward (P, n), valid (P, n) as numpy."""
    x, r, valid = cached_rollouts(ckpt, wall, prompts, per_prompt, args.temperature, args.order, args.sample_steps,
                                  args.device, REFERENCE_SEED)
    return x, np.where(valid, r, args.invalid_reward), valid


def measure(a, comp, r, valid, M, reference, extra):
    """A history row: the numbers of rollouts comp (P, n, L) with r, valid (P, n) at tilt a, next to the exact
    tilt at a of the base's reference = (ref_r, ref_valid) and the realised fraction; diversity of the first M."""
    P, _, L = comp.shape
    now, exact = tilted_means(r, valid, 0.0), tilted_means(*reference, a)
    distinct, cells = env.diversity(comp[:, :M].reshape(P * M, L), np.repeat(np.arange(P), M),
                                    valid[:, :M].reshape(-1), per_prompt=True)
    h = dict(a=round(a, 6), n=int(r.size), **{k: now[k] for k in ("validity", "validity_se", "reward", "reward_se")},
             distinct_valid_per_prompt=float(distinct.mean()), cells_covered_per_prompt=float(cells.mean()),
             distinct_valid_per_prompt_se=float(distinct.std(ddof=1) / math.sqrt(P)) if P > 1 else math.nan,
             **{f"exact_{k}": exact[k] for k in ("validity", "validity_se", "reward", "reward_se", "ess")})
    h.update({**(realised_fraction(now, exact, tilted_means(*reference, 0.0)) if a > 0 else {}), **extra})
    line = (f"a={a:.2f}  n={h['n']}  validity {h['validity']:.3f}±{h['validity_se']:.3f} "
            f"(exact {h['exact_validity']:.3f})  reward {h['reward']:.3f}±{h['reward_se']:.3f} "
            f"(exact {h['exact_reward']:.3f})")
    line += f"  realised {h['realised_validity']:.2f} / {h['realised_reward']:.2f}" if a > 0 else ""
    line += f"  distinct {h['distinct_valid_per_prompt']:.1f}  cells {h['cells_covered_per_prompt']:.1f}"
    if "loss" in extra:
        line += (f"  loss {extra['loss']:.4f}  held-out change {extra['held_out_change']:.1e} ± "
                 f"{extra['held_out_change_se']:.1e} (most: -{extra['phase_kl']:.1e})  {extra['train_s']:.0f} s")
    tqdm.write(line)
    return h
