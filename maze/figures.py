"""The figures of DTM runs on the maze, drawn from what a run saved (dtm.py writes, this file reads).

A run writes its rollouts at every measured tilt a to OUT/rollouts_a{a}.npy (`rollouts_file`) and its
history to OUT/metrics.json; from them:
  - `plot_run`:   rollouts_*.png (the first rollouts of 4 prompts before and after), rollouts_*.gif
                  (the same as a goes up) and curves_*.png (validity, reward and diversity against a,
                  next to the exact tilt of the base, with ±1 standard-error bands and bars, and each
                  phase's health check);
  - `plot_sweep`: sweep.png, the last rollouts of prompt 0 for every run of `python -m lab.experiments
                  sweep`, rows and columns labelled, with every prompt's valid share under each panel;
  - `plot_budget`: budget_eta*.png, the health check and realised fraction of `python -m lab.experiments
                  budget` against the compute of a phase.
"""
import os

import numpy as np

from maze import env


def logged_phase_kl(row):
    """A phase's bound, the most its health check can fall (dtm.py: phase_kl), from a metrics row: logged as
    `phase_kl`, or `max_gain` in metrics written before the name followed the function's."""
    return row["phase_kl"] if "phase_kl" in row else row["max_gain"]


def rollouts_file(out, a, what="rollouts"):
    """Where a run in `out` keeps its completions (what="rollouts") or reveal steps ("ranks") at tilt a."""
    return os.path.join(out, f"{what}_a{a:.4g}.npy")


def load_rollouts(path, wall, prompts):
    """Completions saved by a run, grouped by prompt: x (n, L), the prompt index of each, their validity."""
    x = np.load(path).astype(np.int64)
    ids = np.repeat(np.arange(len(prompts)), len(x) // len(prompts))
    return x, ids, env.score(wall, x, np.asarray(prompts)[ids])[0]


def draw_rollouts(axes, path, a, wall, prompts, per_prompt, colour, legend=True):
    """The first per_prompt rollouts in `path` (made at tilt a) of the first prompts, one panel each.
    Returns what it loaded: all the completions, their prompt index and their validity."""
    x, ids, valid = load_rollouts(path, wall, prompts)
    for p, ax in enumerate(axes):
        sel = np.nonzero(ids == p)[0][:per_prompt]
        env.plot_rollouts(ax, wall, x[sel], prompts[p], valid[sel], colour=colour, legend=legend and p == 0,
                          title=f"a={a:.1f}  prompt {p}: valid {valid[sel].sum()}/{len(sel)}")
    return x, ids, valid


def pyplot():
    import matplotlib
    matplotlib.use("Agg")                                              # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_run(history, out, wall, prompts, per_prompt, title, figures, tag):
    """The three figures of one run (its history rows and the rollouts in `out`) -> figures/*_{tag}.*"""
    plt = pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter
    os.makedirs(figures, exist_ok=True)
    show, M = min(4, len(prompts)), per_prompt
    fig, axes = plt.subplots(2, show, figsize=(3.3 * show, 7.6), squeeze=False)
    draw_rollouts(axes[0], rollouts_file(out, history[0]["a"]), history[0]["a"], wall, prompts, M, "tab:gray")
    draw_rollouts(axes[1], rollouts_file(out, history[-1]["a"]), history[-1]["a"], wall, prompts, M, "tab:red")
    fig.suptitle(f"{title}: {M} rollouts per prompt before (top) and after (bottom); valid ones drawn")
    fig.tight_layout()
    fig.savefig(os.path.join(figures, f"rollouts_{tag}.png"), dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, show, figsize=(3.3 * show, 3.9), squeeze=False)

    def frame(h):
        for ax in axes[0]:
            ax.clear()
        draw_rollouts(axes[0], rollouts_file(out, h["a"]), h["a"], wall, prompts, M, "tab:red")
        axes[0][0].legend(loc="lower left", fontsize=8, framealpha=0.9)
        fig.suptitle(f"{title}: a = {h['a']:.1f}, validity {h['validity']:.2f} (exact tilt {h['exact_validity']:.2f})"
                     f"; the valid ones of {M} rollouts per prompt drawn", fontsize=11)
        fig.tight_layout()
    FuncAnimation(fig, frame, frames=history).save(os.path.join(figures, f"rollouts_{tag}.gif"),
                                                   writer=PillowWriter(fps=2), dpi=110)
    plt.close(fig)
    a = np.array([h["a"] for h in history])
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    h0, h1 = history[0], history[-1]
    for ax, key, label in zip(axes[:2], ("validity", "reward"), ("validity", "mean reward")):
        for pre, name, colour in (("exact_", "exact tilt of the base", "k"), ("", "DTM", "tab:red")):
            y = np.array([h[pre + key] for h in history])
            se = np.array([h[pre + key + "_se"] for h in history])
            ax.plot(a, y, "o-" if pre == "" else "--", color=colour, ms=3, label=name)
            ax.fill_between(a, y - se, y + se, color=colour, alpha=0.15)
        ax.errorbar([h1["a"]], [h1[key]], yerr=[h1[key + "_se"]], fmt="s", color="tab:red", ms=6,
                    label=f"end ({h1['n']} rollouts)")
        t = [h["a"] for h in history[1:]]
        ax.plot(t, [h[f"teacher_target_{key}"] for h in history[1:]], "x", color="tab:blue", ms=5,
                label="one-phase target of the teacher")
        head = f"{label}: {h0[key]:.3f} -> {h1[key]:.3f} (exact {h1['exact_' + key]:.3f})"
        if "realised_" + key in h1:
            head += f"\nrealised {h1['realised_' + key]:.2f} ± {h1['realised_' + key + '_se']:.2f}"
        ax.set_title(head, fontsize=9)
        ax.set_xlabel("tilt a")
        ax.legend(fontsize=7)
    d = np.array([h["distinct_valid_per_prompt"] for h in history])
    d_se = np.array([h.get("distinct_valid_per_prompt_se", np.nan) for h in history])
    axes[2].errorbar(a, d, yerr=d_se, fmt="o-", color="tab:red", ms=3, capsize=2)
    axes[2].set_title(f"distinct valid paths among {M} rollouts / prompt\n(bars: ±1 SE over the 8 prompts)",
                      fontsize=9)
    axes[2].set_xlabel("tilt a")
    checked = [h for h in history[1:] if "held_out_change" in h]
    if checked:                                                        # each phase's health check
        t = [h["a"] for h in checked]
        axes[3].errorbar(t, [h["held_out_change"] for h in checked], yerr=[h["held_out_change_se"] for h in checked],
                         fmt="o", color="tab:red", ms=3, capsize=2, label="held-out change, student - teacher")
        axes[3].plot(t, [-logged_phase_kl(h) for h in checked], "_", color="k", ms=12, mew=2,
                     label="the most a phase can gain")
        axes[3].axhline(0, color="k", lw=0.8)
        axes[3].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        axes[3].legend(fontsize=7)
    axes[3].set_title("each phase's own loss on held-out rollouts\n(below 0: it learned; above: it fitted noise)",
                      fontsize=9)
    axes[3].set_xlabel("tilt a at the phase's end")
    fig.suptitle(f"{title} (bands: ±1 standard error)")
    fig.tight_layout()
    fig.savefig(os.path.join(figures, f"curves_{tag}.png"), dpi=90)
    plt.close(fig)


def plot_sweep(panels, base_path, wall, prompts, per_prompt, rows, cols, title, png):
    """A grid of prompt 0's rollouts: the base's (in base_path) top left, then one panel per run,
    panels = [(path of its last rollouts, their tilt a, (row, column), label)]; rows and cols are the
    grid's labels. Under each panel, the valid share of every prompt's rollouts; empty cells blank."""
    plt = pyplot()
    R, C = len(rows), len(cols)
    fig, axes = plt.subplots(R, C, figsize=(3.2 * C, 4.0 * R), squeeze=False)
    used = {(0, 0)} | {cell for _, _, cell, _ in panels}
    for (i, j), ax in np.ndenumerate(axes):
        if (i, j) not in used:
            ax.axis("off")
    for path, a, (i, j), label in [(base_path, 0.0, (0, 0), "")] + panels:
        _, ids, valid = draw_rollouts([axes[i, j]], path, a, wall, prompts, per_prompt,
                                      "tab:gray" if j == 0 else "tab:red", legend=(i, j) == (0, 0))
        share = " ".join(f"{valid[ids == p].mean():.2f}" for p in range(len(prompts)))
        axes[i, j].set_title(f"{label}\nprompt 0, a = {a:g}: {valid[ids == 0][:per_prompt].sum()}/"
                             f"{min(per_prompt, (ids == 0).sum())} valid drawn".strip(), fontsize=8)
        axes[i, j].set_xlabel(f"valid share, prompts 0-{len(prompts) - 1}:\n{share}", fontsize=6.5)
    for j, c in enumerate(cols):
        axes[0, j].annotate(c, (0.5, 1.28), xycoords="axes fraction", ha="center", fontsize=10, weight="bold")
    for i, r in enumerate(rows):                                      # on the row's first cell, drawn or not
        axes[i, 0].annotate(r, (-0.08, 0.5), xycoords="axes fraction", ha="right", va="center", rotation=90,
                            fontsize=10, weight="bold")
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_budget(rows, title, png):
    """`python -m lab.experiments budget`: each seed's held-out change over the most a phase can gain
    (left) and realised fraction of validity (right) against the phase's compute, one colour per buffer size,
    hollow markers for several maskings per rollout."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    buffers = sorted({r["buffer"] for r in rows})
    kinds = {(False, False): ("x", "last iterate"), (True, False): ("o", "mean of the last half's iterates"),
             (False, True): ("^", "several maskings per rollout"), (True, True): ("s", "several maskings, mean")}
    for r in rows:
        c, kind = f"C{buffers.index(r['buffer'])}", ("avg" in r["name"], r.get("maskings", 1) > 1)
        x = r["compute"] * (1.06 if kind[0] else 0.94) * (1.12 if kind[1] else 1)   # averaged, maskings: right
        for ax, y, se in ((axes[0], r["relative"], r["relative_se"]),
                          (axes[1], r["realised_validity"], r["realised_validity_se"])):
            ax.errorbar(x, y, se, fmt=kinds[kind][0], color=c, capsize=2, mfc="none" if kind[1] else c)
    for ax, ylabel in zip(axes, ["held-out change / most it can gain", "realised fraction (validity)"]):
        ax.set_xscale("log")
        ticks = sorted({r["compute"] for r in rows})
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("sequences trained per phase, over the default's 64 x 50")
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="k", lw=0.8)
    axes[0].axhline(-1, color="k", ls="--", lw=0.8)
    axes[0].text(0.02, 0.04, "-1: the phase's minimiser; above 0: it fitted noise", transform=axes[0].transAxes,
                 fontsize=8)
    handles = [plt.Line2D([], [], color=f"C{i}", lw=4, label=f"buffer {b} / prompt")
               for i, b in enumerate(buffers)]
    seen = {("avg" in r["name"], r.get("maskings", 1) > 1) for r in rows}
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", mfc="none" if key[1] else "k", label=lab)
                for key, (m, lab) in kinds.items() if key in seen]
    axes[1].legend(handles=handles, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
