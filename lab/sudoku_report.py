"""The small Sudoku LLaDA's results, read from the runs of `llada_finetune.py --phase_eval` (their
metrics.jsonl): a table of test accuracy at the start and end of each group of runs, with the spread
over seeds, the teacher's buffer reward per phase, the phases whose health check says they learned,
and a figure of test accuracy per phase. --buffer_tilt adds how far each run's last phase moved its own
buffer towards the tilt (from its state_rank0.pt).

    python -m lab.sudoku_report --group DTM runs/tiny/dtm_s0 runs/tiny/dtm_s1 \\
        --group control runs/tiny/ctl_s0 runs/tiny/ctl_s1 --figure figures/tiny_sudoku.png
    python -m lab.sudoku_report --group DTM runs/p24/ll_dtm_s0 --group d1 runs/p24/ll_grpo_s0 \\
        --cost_figure figures/rl_sudoku.png      # against rollouts and seconds, beside d1 (--method grpo)
"""
import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maze.mdm import Help                                                      # noqa: E402


def read_run(run):
    """Of one run: {a: test summary} (a = 0: the base; a --method grpo run: {iteration: summary}), the teacher's
    buffer reward at each phase start, and each phase's health check (held-out change, its SE)."""
    test, buffer, check = {}, [], []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if "test" in row:
                test[row["a"] if "a" in row else row.get("iteration", row.get("step"))] = row["test"]
            elif "rollout_s" in row:
                buffer.append(row["buffer_reward"])
            elif "held_out_change" in row:
                check.append((row["held_out_change"], row["held_out_change_se"]))
    return test, buffer, check


@torch.no_grad()
def buffer_tilt(run, maskings=4):
    """How far a run's last phase moved its own replay buffer towards the tilt. Per rollout x of the
    buffer, the tilt asks log p_{a+eta}(x) - log p_a(x) = eta r(x) - log Z. We estimate log p by the SAR
    ELBO, G * sum over the counted tokens of tw * log p (the mean of `maskings` fixed maskings), for the
    student (the phase's end) and the teacher (its start), and regress the change on eta r, both centred
    per Z group (per prompt, or the buffer). Returns (slope, correlation): the tilt is slope 1, corr 1;
    nan when no group has a reward spread."""
    import llada_finetune as lf
    from llada.lora import teacher_mode
    s = torch.load(os.path.join(run, "state_rank0.pt"), map_location="cpu", weights_only=True)
    args = argparse.Namespace(**dict(s["args"], resume=True, device="cpu", out=run))
    t = lf.make_trainer(args)
    t.load()
    b, g, G = t.buffer, torch.Generator().manual_seed(0), args.gen_length
    d = torch.zeros(len(b["r"]), dtype=torch.float64)
    t.model.eval()
    for _ in range(maskings):
        c_t, counted, tw, _ = t.mask(b["comp"], g)
        data = dict(b, c_t=c_t, counted=counted, tw=tw)
        for rows in torch.arange(len(d)).split(256):
            x1, x_t, am, where, w = t.inputs(data, rows)
            seq = where.nonzero()[:, 0]
            for sign, teacher in ((1, False), (-1, True)):
                with teacher_mode(t.model) if teacher else contextlib.nullcontext():
                    logp = t.model(x_t, am, where).double().log_softmax(-1).gather(1, x1[where][:, None])[:, 0]
                d[rows] += sign * G * torch.zeros(len(rows), dtype=torch.float64).index_add(0, seq, w[seq] * logp) \
                    / maskings
    eta = t.a_grid[t.phase - 1] - t.a_grid[t.phase - 2]
    er = eta * b["r"].double()
    group = torch.unique(b["idx"], return_inverse=True)[1] if args.z == "prompt" else torch.zeros_like(b["idx"])
    centre = lambda v: v - (torch.zeros(int(group.max()) + 1, dtype=v.dtype).index_add(0, group, v)  # noqa: E731
                            / torch.bincount(group).to(v.dtype))[group]
    x, y = centre(er), centre(d)
    if not x.any():                                     # no reward spread in a group: nothing to tilt
        return math.nan, math.nan
    return (x * y).sum().item() / (x * x).sum().item(), ((x * y).sum() / (x.norm() * y.norm())).item()


def spread(values):
    """'mean ± SE over seeds' (one seed: its value, labelled)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.3f} (1 seed)"
    return f"{v.mean():.3f} ± {v.std(ddof=1) / len(v) ** 0.5:.3f}"


def table(groups, tilt=False):
    """Markdown rows: group, seeds, base and final test cell accuracy / whole puzzles, the teacher's buffer
    reward per phase (mean over seeds), and the phases whose health check says they learned."""
    lines = ["| runs | seeds | cell accuracy, start -> end | whole puzzles, end | teacher's buffer reward per "
             "phase | phases below 0 on the held-out check |" + (" last phase's buffer tilt: slope, corr (1, 1: "
             "the tilt) |" if tilt else ""), "|---|---|---|---|---|---|" + ("---|" if tilt else "")]
    for name, runs in groups.items():
        read = [read_run(r) for r in runs]
        ends = [t[max(t)] for t, _, _ in read]
        starts = [t[min(t)] for t, _, _ in read]
        n = min(len(b) for _, b, _ in read)
        reward = " / ".join(f"{np.mean([b[k] for _, b, _ in read]):.2f}" for k in range(n))
        learned = sum(x < -se for _, _, c in read for x, se in c)
        lines.append(f"| {name} | {len(runs)} | {spread([s['acc'] for s in starts])} -> "
                     f"{spread([e['acc'] for e in ends])} | {spread([e['whole'] for e in ends])} | {reward} | "
                     f"{learned} of {sum(len(c) for _, _, c in read)} |" +
                     (" " + ", ".join(f"{m:.2f}" for m in np.mean([buffer_tilt(r) for r in runs], 0)) + " |"
                      if tilt else ""))
    return lines


def plot(groups, png, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    base = None
    for (name, runs), colour in zip(groups.items(), ["C0", "C3", "C2", "C1", "C4"]):
        read = [read_run(r)[0] for r in runs]
        a = sorted(set.intersection(*(set(t) for t in read)))
        acc = np.array([[t[x]["acc"] for x in a] for t in read])                         # (seeds, phases)
        for row in acc:
            ax.plot(a, row, color=colour, alpha=0.25, lw=1)
        ax.errorbar(a, acc.mean(0), yerr=acc.std(0, ddof=1) / len(acc) ** 0.5 if len(acc) > 1 else None,
                    color=colour, lw=2, capsize=3, label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        base = acc[:, 0].mean() if base is None else base
    ax.axhline(base, color="k", ls="--", lw=1, label="base")
    ax.set(xlabel="tilt a at the end of the phase", ylabel="test cell accuracy (256 puzzles, greedy)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def cost_curve(run):
    """(rollouts, seconds, cell accuracy, whole puzzles) at each test evaluation of a run that logged its cost."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "test" in r and "rollouts" in r]
    return np.array([[r["rollouts"], r["seconds"], r["test"]["acc"], r["test"]["whole"]] for r in rows])


def last_within(c, budget, x):
    """The row of cost curve c at its last evaluation within budget on column x (0: rollouts, 1: seconds)."""
    return c[np.searchsorted(c[:, x], budget + 0.5) - 1]


def cost_table(groups):
    """Markdown rows: each group at the end of its runs, and at the first group's end seconds (its last
    evaluation within them), test cell accuracy and whole puzzles with their spread over seeds."""
    curves = {name: [cost_curve(r) for r in runs] for name, runs in groups.items()}
    budget = np.mean([c[-1, 1] for c in next(iter(curves.values()))])
    lines = ["| runs | seeds | at | training rollouts | seconds | test cell accuracy | whole puzzles |",
             "|---|---|---|---|---|---|---|"]
    for g, (name, cs) in enumerate(curves.items()):
        for at, pick in (("the end", lambda c: c[-1]),
                         (f"{budget:.0f} s", lambda c: last_within(c, budget, 1)))[:1 + (g > 0)]:
            rows = np.array([pick(c) for c in cs])
            lines.append(f"| {name} | {len(cs)} | {at} | {rows[:, 0].mean():.0f} | {rows[:, 1].mean():.0f} | "
                         f"{spread(rows[:, 2])} | {spread(rows[:, 3])} |")
    return lines


def at_table(groups, budgets, seconds=False):
    """Markdown rows: each group's test cell accuracy at each budget of rollouts (or of training seconds): its
    last evaluation within it, mean ± SE over seeds, and its difference from the first group's run of the same
    seed (paired by order: give the seeds in the same order), mean ± SE over the pairs."""
    curves = {name: [cost_curve(r) for r in runs] for name, runs in groups.items()}
    first = next(iter(curves.values()))
    x = 1 if seconds else 0
    pick = lambda c, R: last_within(c, R, x)[2]                                   # noqa: E731
    unit = (lambda R: f"{R:,} s") if seconds else (lambda R: f"{R:,} rollouts")      # noqa: E731
    lines = ["| runs | seeds | " + " | ".join(unit(R) for R in budgets) + " | " +
             " | ".join(f"paired, {unit(R)}" for R in budgets) + " |", "|---|---|" + "---|" * 2 * len(budgets)]
    for name, cs in curves.items():
        acc = [spread([pick(c, R) for c in cs]) for R in budgets]
        pairs = [[pick(c, R) - pick(f, R) for c, f in zip(cs, first)] for R in budgets]
        diff = ["-" if cs is first else f"{np.mean(d):+.3f} ± {np.std(d, ddof=1) / len(d) ** 0.5:.3f}"
                if len(d) > 1 else f"{d[0]:+.3f} (1 seed)" for d in pairs]
        lines.append(f"| {name} | {len(cs)} | " + " | ".join(acc) + " | " + " | ".join(diff) + " |")
    return lines


def run_record(run):
    """The seed of a run, and of its end (`python -m lab.modes`) the temperature-1 true-solution share and
    the realised fraction of the base's tilt of the mean reward with its SE, from the files the scripts leave:
    args.json (llada_finetune.py, lab.rft) or sft.json (llada.sft), and modes.json in the run or its model/
    (None where it was not measured)."""
    seed = None
    for name in ("args.json", "sft.json"):
        if os.path.isfile(os.path.join(run, name)):
            with open(os.path.join(run, name)) as f:
                seed = json.load(f).get("seed")
            break
    modes = {}
    for path in (os.path.join(run, "modes.json"), os.path.join(run, "model", "modes.json")):
        if os.path.isfile(path):
            with open(path) as f:
                modes = json.load(f)
            break
    got = modes.get("realised", {}).get("reward", {})
    return seed, modes.get("t1", {}).get("true"), got.get("fraction"), got.get("se")


def ceiling(path):
    """The tilt's ceiling in whole puzzles: the base's pass@n (the share of test puzzles that any of its n
    temperature-1 samples solves), from `python -m lab.modes --samples n` (its modes.json)."""
    with open(path) as f:
        t1 = json.load(f)["t1"]
    return t1["solved"], t1["pass_at"]


def results(groups, ceiling_whole=None):
    """One row per run for figures/elicit.json: method (the group's name), seed, base and final test cell
    accuracy and whole puzzles, the end's true-solution share at temperature 1, rollouts (every one drawn),
    training seconds, the curve ({rollouts, seconds, acc, whole} at each evaluation, from the base on) and the
    tilt's ceiling in whole puzzles (the base's pass@n, `ceiling`)."""
    rows = []
    for name, runs in groups.items():
        for run in runs:
            c, (seed, true, realised, realised_se) = cost_curve(run), run_record(run)
            rows.append(dict(method=name, seed=seed, base_acc=c[0, 2], final_acc=c[-1, 2], base_whole=c[0, 3],
                             final_whole=c[-1, 3], true_share=true, rollouts=int(c[-1, 0]), seconds=c[-1, 1],
                             realised=realised, realised_se=realised_se, run=run, ceiling_whole=ceiling_whole,
                             curve=[dict(rollouts=int(x[0]), seconds=float(x[1]), acc=float(x[2]), whole=float(x[3]))
                                    for x in c]))
    return rows


def results_table(rows):
    """Markdown rows of results(): per method, the end over its seeds (mean ± SE over seeds), as the README
    shows them (tests/test_docs.py checks that it does)."""
    lines = ["| method | seeds | rollouts | seconds | test cell accuracy, base -> end | whole puzzles, "
             "base -> end | whole puzzles / the tilt's ceiling | true solutions at temperature 1 | realised fraction "
             "of the tilt (reward) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        col = lambda k: [r[k] for r in rs]                                            # noqa: E731
        opt = lambda k: spread(col(k)) if None not in col(k) else "-"                 # noqa: E731
        of_ceiling = (spread([r["final_whole"] / r["ceiling_whole"] for r in rs])
                      if all(r.get("ceiling_whole") for r in rs) else "-")
        lines.append(f"| {m} | {len(rs)} | {np.mean(col('rollouts')):.0f} | {np.mean(col('seconds')):.0f} | "
                     f"{np.mean(col('base_acc')):.3f} -> {spread(col('final_acc'))} | "
                     f"{np.mean(col('base_whole')):.3f} -> {spread(col('final_whole'))} | {of_ceiling} | "
                     f"{opt('true_share')} | {opt('realised')} |")
    return lines


def shared_curves(runs):
    """The cost curves of a group's seeds at the numbers of rollouts that every seed evaluated (a seed may
    have evaluated more often): (seeds, shared, 4) of (rollouts, seconds, cell accuracy, whole puzzles)."""
    curves = [cost_curve(r) for r in runs]
    shared = sorted(set.intersection(*(set(c[:, 0].tolist()) for c in curves)))
    return np.stack([c[np.isin(c[:, 0], shared)] for c in curves])


def plot_cost(groups, png, title, ceiling_whole=None):
    """Test cell accuracy (top) and whole puzzles (bottom, with the tilt's ceiling) against rollouts and
    against training seconds, mean ± SE over seeds at each number of rollouts that every seed evaluated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for (name, runs), colour in zip(groups.items(), ["C0", "C3", "C2", "C1", "C4", "C5", "C6"]):
        c = shared_curves(runs)
        for row, y in enumerate((2, 3)):
            se = c[:, :, y].std(0, ddof=1) / len(c) ** 0.5 if len(c) > 1 else None
            for ax, x in zip(axes[row], (0, 1)):
                ax.errorbar(c[:, :, x].mean(0), c[:, :, y].mean(0), yerr=se, color=colour, lw=2, capsize=3,
                            marker="o", ms=3, label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    if ceiling_whole is not None:
        for ax in axes[1]:
            line = ax.axhline(ceiling_whole, color="k", ls="--", lw=1, label="the tilt's ceiling (the base's pass@64)")
    for row, ylabel in enumerate(("test cell accuracy (256 puzzles, greedy)", "whole puzzles solved (greedy)")):
        for ax, xlabel in zip(axes[row], ("rollouts (every one drawn)", "training seconds (1 thread, 2 jobs on 2 "
                                                                         "cores)")):
            ax.set(xlabel=xlabel, ylabel=ylabel if ax is axes[row][0] else None)
    axes[0][0].legend(fontsize=8)
    if ceiling_whole is not None:
        axes[1][0].legend(fontsize=8, handles=[line])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                   help="a name, then the run directories of its seeds")
    p.add_argument("--figure", help="write the figure of test accuracy per phase here")
    p.add_argument("--cost_figure", help="write the figure of test accuracy against training rollouts and seconds "
                                         "here, and print each group at its end and at the first group's end "
                                         "seconds (runs that logged them: DTM and --method grpo)")
    p.add_argument("--json", help="write one row per run here (results: method, seed, base and final accuracy "
                                  "and whole puzzles, true share, rollouts, seconds, the curve; e.g. "
                                  "figures/elicit.json)")
    p.add_argument("--at", type=int, nargs="+", metavar="ROLLOUTS",
                   help="print each group's test accuracy at these rollouts, and its difference from the first "
                        "group's run of the same seed (give the seeds in the same order)")
    p.add_argument("--at_seconds", type=int, nargs="+", metavar="SECONDS",
                   help="the same at these training seconds")
    p.add_argument("--ceiling", help="the base's modes.json of python -m lab.modes --samples 64: its pass@64, the "
                                     "tilt's ceiling in whole puzzles, goes into --json and the figure")
    p.add_argument("--buffer_tilt", action="store_true", help="add how far each run's last phase moved its own "
                                                               "buffer towards the tilt (mean over seeds)")
    p.add_argument("--title", default="small LLaDA, 4x4 Sudoku: DTM against its control", help="figure title")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    groups = {g[0]: g[1:] for g in args.group}
    missing = [r for runs in groups.values() for r in runs if not os.path.isfile(os.path.join(r, "metrics.jsonl"))]
    if missing or any(not runs for runs in groups.values()):
        p.error(f"no metrics.jsonl in {missing[0]}" if missing else "each --group needs at least one run")
    print("\n".join(table(groups, args.buffer_tilt)))
    if args.at:
        print("\n".join(at_table(groups, args.at)))
    if args.at_seconds:
        print("\n".join(at_table(groups, args.at_seconds, seconds=True)))
    if args.figure:
        plot(groups, args.figure, args.title)
    ceiling_whole = ceiling(args.ceiling)[0] if args.ceiling else None
    if args.cost_figure:
        print("\n".join(cost_table(groups)))
        plot_cost(groups, args.cost_figure, args.title, ceiling_whole)
    if args.json:
        rows = results(groups, ceiling_whole)
        print("\n".join(results_table(rows)))
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
