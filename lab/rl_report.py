"""DTM against diffu-GRPO (d1) on the maze: the table and the figure, from runs of dtm.py and grpo.py.

Each row is one method over its seeds (mean ± SE over seeds), measured as dtm.py measures: validity, reward,
the realised fraction of the exact tilt at a = 1 (= 1 / beta), distinct valid paths per prompt, training
rollouts and seconds. DTM's seconds are its whole run but the final measurement (its health check's rollouts
included); grpo.py's are its training loop. The figure: validity against training rollouts and seconds.

    python -m lab.rl_report --dtm runs/p24/dtm_s0 runs/p24/dtm_s1 runs/p24/dtm_s2 \\
        --grpo d1 runs/p24/mf_s0 runs/p24/mf_s1 runs/p24/mf_s2 --figure figures/rl_maze.png
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maze.mdm import Help                                                      # noqa: E402

COLUMNS = ("validity", "reward", "realised_validity", "realised_reward", "distinct_valid_per_prompt", "rollouts",
           "seconds")


def dtm_run(run):
    """A dtm.py run: its end row with the training rollouts and seconds, and its curve (rollouts, seconds,
    validity) over the phases."""
    history = json.load(open(os.path.join(run, "metrics.json")))
    a = torch.load(os.path.join(run, "state.pt"), weights_only=True)["args"]
    M = a["rollouts_per_prompt"]
    per_phase = 8 * (M + (a["steps_per_phase"] - 1) // a["refresh_every"] * max(1, round(a["refresh_fraction"] * M)))
    seconds = np.cumsum([0.0] + [h["train_s"] + h["eval_s"] for h in history[1:]])
    seconds[-1] -= history[-1]["eval_s"]                               # not the final measurement
    end = dict(history[-1], rollouts=per_phase * (len(history) - 1), seconds=float(seconds[-1]))
    curve = np.array([[per_phase * k, seconds[k], h["validity"]] for k, h in enumerate(history)])
    return end, curve


def grpo_run(run, budget):
    """A grpo.py run: its row at `budget` (rollouts or seconds) and its curve: the validity of each iteration's
    own rollouts (G per prompt, on policy) against rollouts and seconds."""
    m = json.load(open(os.path.join(run, "metrics.json")))
    row = next((h for h in m["history"] if h["budget"] == budget), None)
    end = None if row is None else dict(row, seconds=row["train_s"])
    curve = np.array([[r["rollouts"], r["seconds"], r["validity"]] for r in m["log"]])
    return end, curve


def mean_se(values):
    v = np.asarray(values, dtype=float)
    se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return v.mean(), se


def fmt(mean, se, digits):
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def table(rows):
    """rows: (name, [end rows of its seeds]) -> markdown lines."""
    lines = ["| method | seeds | validity | reward | realised fraction, validity / reward | distinct valid paths "
             "per prompt | training rollouts | seconds |", "|---|---|---|---|---|---|---|---|"]
    for name, ends in rows:
        c = {k: mean_se([e[k] for e in ends]) for k in COLUMNS}
        lines.append(f"| {name} | {len(ends)} | {fmt(*c['validity'], 3)} | {fmt(*c['reward'], 3)} | "
                     f"{fmt(*c['realised_validity'], 2)} / {fmt(*c['realised_reward'], 2)} | "
                     f"{fmt(*c['distinct_valid_per_prompt'], 1)} | {c['rollouts'][0]:.0f} | {c['seconds'][0]:.0f} |")
    return lines


def plot(curves, exact, base, png):
    """curves: (name, [curve (n, 3) of each seed], smooth) -> validity against rollouts and seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, seeds, smooth), colour in zip(curves, ["C0", "C3", "C2", "C1", "C4"]):
        n = min(len(c) for c in seeds)
        c = np.stack([s[:n] for s in seeds])                           # (seeds, n, 3)
        y = c[:, :, 2].mean(0)
        if smooth > 1:                                                 # on-policy batches: a running mean
            y = np.convolve(np.pad(y, (smooth - 1, 0), mode="edge"), np.ones(smooth) / smooth, mode="valid")
        for ax, j in zip(axes, (0, 1)):
            ax.plot(c[:, :, j].mean(0), y, color=colour, lw=2, marker="o" if smooth == 1 else None, ms=3,
                    label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    axes[0].axvline(curves[0][1][0][-1, 0], color="grey", lw=0.8)      # the first group's budget: equal rollouts
    for ax, xlabel in zip(axes, ("training rollouts", "training seconds (1 thread, 2 jobs on 2 cores)")):
        ax.axhline(exact, color="k", ls="--", lw=1, label=f"exact tilt at a = 1 ({exact:.3f})")
        ax.axhline(base, color="grey", ls=":", lw=1, label=f"base ({base:.3f})")
        ax.set(xlabel=xlabel, ylabel="validity")
    axes[0].legend(fontsize=8)
    axes[0].set_title("DTM's phases (measured) and GRPO's own rollouts (running mean of 5)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def reference_line(run_args):
    """The base of the runs, its exact tilt at a = 1 / beta and where d1's loss would stop with the exact
    likelihood of whole paths taken as one token (grpo.py: k3_fixed_point), per prompt on the base's cached
    reference rollouts (maze/exact.py: base_reference, with the runs' own settings): (base validity, exact
    validity, the line to print)."""
    from grpo import k3_fixed_point
    from maze import env
    from maze.exact import base_reference, tilted_means
    wall, a = env.make_maze(), argparse.Namespace(**run_args)
    beta = run_args.get("beta", 1.0)
    _, r, valid = base_reference(a.base, wall, env.make_prompts(wall), a.reference_per_prompt, a)
    base, exact = (tilted_means(r, valid, x)["validity"] for x in (0.0, 1.0 / beta))
    v = float(np.mean([(k3_fixed_point(rp, beta) * vp).sum() for rp, vp in zip(r, valid)]))
    share = f"{(v - base) / (exact - base):.2f}" if exact != base else "nan"
    return base, exact, (f"d1's loss at its fixed point with the exact likelihood of whole paths (one token; beta "
                         f"{beta:g}): validity {v:.3f}, {share} of the exact tilt's gain ({base:.3f} -> {exact:.3f})")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--dtm", nargs="+", action="append", default=[], metavar=("NAME", "RUN"),
                   help="a name, then dtm.py run directories (its seeds)")
    p.add_argument("--grpo", nargs="+", action="append", default=[], metavar=("NAME", "RUN"),
                   help="a name, then grpo.py run directories (its seeds)")
    p.add_argument("--figure", help="write the figure here")
    p.add_argument("--out", help="also write the table here (markdown)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not args.dtm and not args.grpo:
        p.error("give --dtm or --grpo runs")
    for _, *runs in args.dtm + args.grpo:
        if not runs:
            p.error("each group needs a name and at least one run")
        missing = [r for r in runs if not os.path.isfile(os.path.join(r, "metrics.json"))]
        if missing:
            p.error(f"no metrics.json in {missing[0]}")
    rows, curves = [], []
    for name, *runs in args.dtm:
        read = [dtm_run(r) for r in runs]
        rows.append((name, [e for e, _ in read]))
        curves.append((name, [c for _, c in read], 1))
    for name, *runs in args.grpo:
        for budget in ("rollouts", "seconds"):
            ends = [e for e in (grpo_run(r, budget)[0] for r in runs) if e is not None]
            if ends:
                rows.append((f"{name}, at equal {budget}", ends))
        curves.append((name, [grpo_run(r, "rollouts")[1] for r in runs], 5))
    first = args.grpo[0][1] if args.grpo else None                     # the base and beta of the runs
    run_args = json.load(open(os.path.join(first, "metrics.json")))["args"] if first else \
        torch.load(os.path.join(args.dtm[0][1], "state.pt"), weights_only=True)["args"]
    base, exact, line = reference_line(run_args)
    lines = table(rows) + ["", line]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.figure:
        plot(curves, exact, base, args.figure)


if __name__ == "__main__":
    main()
