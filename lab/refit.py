"""Can the maze network hold a law it is trained on? ELBO fine-tuning of the committed base on data
drawn in several ways, then the validity of its own rollouts (lab/FINDINGS_maze.md, "Can the network
hold a law?").

  a = 0:    the base's reference rollouts (maze/exact.py: base_reference) resampled with weights e^{0 r}:
            its own law, so a model that could hold its law would not move;
  a = 0.5:  the same resampled with e^{0.5 r}: the exact tilt p_0 e^{0.5 r} / Z, the target of DTM;
  paths:    fresh training paths (all valid), as in pretraining;
  valid1.0: the a = 1.0 resample with its invalid rollouts dropped (any a after "valid").

    python -m lab.refit 400 1e-4 0 0.5 paths       # steps, AdamW lr, then the data sets (~4 min each)
    python -m lab.refit 1000 5e-4 1.0 --cosine     # lr decayed to 0 by a cosine, as in pretraining

The reference is the committed base's at dtm.py's defaults (maze/base_reference_32ab4574.npz, the file
maze.mdm.reference_path names); --reference reads another.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)
import dtm                                                                             # noqa: E402
from maze import env, exact                                                            # noqa: E402
from maze.mdm import (PROMPT_LEN, Help, elbo_loss, load, mask_completions, reference_path,  # noqa: E402
                      training_set)


def resampled(comp, r, prompts, a, rng):
    """Per prompt, n draws with replacement from its n reference rollouts, with weights e^{a r}."""
    P, n, _ = comp.shape
    w = np.exp(a * r)                                                                # (P, n)
    idx = np.stack([rng.choice(n, size=n, p=w[p] / w[p].sum()) for p in range(P)])
    return dtm.with_prompts(prompts, comp[np.arange(P)[:, None], idx]).flatten(0, 1)


BASE = os.path.join(ROOT, "maze", "base.pt")


def main(steps, lr, names, rollouts_per_prompt=128, cosine=False, reference=None):
    """Fine-tune the committed base on each data set of `names`; reference: the .npz of the base's reference
    rollouts (default: the committed base's at dtm.py's defaults, 2,048 per prompt)."""
    ref = np.load(reference or reference_path(BASE, dtm.parser().get_default("reference_per_prompt")))
    comp, r = ref["completions"].astype(np.int64), ref["reward"]
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    results = []
    for name in names:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        data = (training_set(wall, prompts, 1000, comp.shape[-1], seed=7) if name == "paths"
                else resampled(comp, r, prompts, float(name.removeprefix("valid")), rng))
        if name.startswith("valid"):                                    # its valid rollouts alone
            data = data[env.score(wall, data[:, PROMPT_LEN:].numpy(), data[:, :2].numpy())[0]]
        model, _ = load(BASE)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        t0 = time.time()
        model.train()
        for step in range(steps):
            if cosine:
                opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            x1 = data[torch.randint(len(data), (128,))]
            x_t, mask, hazard = mask_completions(x1)
            loss = elbo_loss(model(x_t, mask), x1, mask, hazard)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        _, rr, valid, _ = dtm.rollouts(model, prompts, rollouts_per_prompt, dtm.parse([]), wall,
                                       torch.Generator().manual_seed(1))
        m = exact.tilted_means(rr.numpy(), valid.numpy(), 0.0)
        data_valid = env.score(wall, data[:, PROMPT_LEN:].numpy(), data[:, :2].numpy())[0].mean()
        print(f"{name}: {steps} steps AdamW lr {lr}{' cosine' if cosine else ''}: data validity {data_valid:.3f}; model validity "
              f"{m['validity']:.3f}±{m['validity_se']:.3f} reward {m['reward']:.3f}±{m['reward_se']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
        results.append(m)
    return results


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("steps", type=int, help="AdamW steps of the ELBO, batch 128")
    p.add_argument("lr", type=float, help="AdamW learning rate")
    p.add_argument("names", nargs="+", help="data sets: a tilt a (resampled reference), paths, or valid<a>")
    p.add_argument("--cosine", action="store_true", help="decay the lr to 0 by a cosine")
    p.add_argument("--reference", help="the base's reference rollouts, a .npz of maze.mdm.cached_rollouts "
                                       "(default: the committed maze/base.pt's at dtm.py's defaults)")
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    main(a.steps, a.lr, a.names, cosine=a.cosine, reference=a.reference)
