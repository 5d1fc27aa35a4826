"""Is the maze network's parameterisation what limits DTM? The main command with fewer trainable
parameters, or with more from the same law (lab/FINDINGS_maze.md, "Capacity").

A DTM phase is a fit: its minimiser over a free table is the tilted posterior (eq. 17), over a network
it is the nearest set of conditionals the network can reach (lab/tabular.py: anneal_subspace). Which
parameters carry what the main command realises, and whether more of them help, is measured here; the
findings' capacity table has the commands and numbers.

  train:  only the parameters whose names start with one of the prefixes are trained (the rest stay
          at the base); the base, its law and its exact tilt are the committed ones.
  widen:  every block's MLP grows from 4 to R times d_model; the new units' output weights start at
          zero, so the network computes the same function (its law is the base's, and the committed
          reference rollouts are its exact tilt, copied beside the new checkpoint). Only the new
          units' output weights have a gradient at the start; their input weights follow.

    python -m lab.capacity train blocks.3 ln_f -- --out runs/last_block   # then run's flags
    python -m lab.capacity widen 12 -- --out runs/wide12
"""
import dataclasses
import os
import shutil
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dtm                                                                    # noqa: E402
from lab import experiments                                                  # noqa: E402
from maze.mdm import MDM, load, n_params, reference_path, save                  # noqa: E402


def widened(model, ratio, generator=None):
    """The same function with every block's MLP ratio * d_model wide: the old units copied, the new
    ones with fresh input weights (the base's init, std 0.02), zero input bias and zero output weights."""
    wide = MDM(dataclasses.replace(model.cfg, mlp_ratio=ratio))
    state = model.state_dict()
    new = wide.state_dict()
    for k, v in state.items():
        if v.shape == new[k].shape:
            new[k] = v.clone()
        elif k.endswith("mlp.0.weight"):                               # (hidden, d): rows are units
            new[k] = torch.cat([v, 0.02 * torch.randn(new[k].shape[0] - v.shape[0], v.shape[1],
                                                      generator=generator)])
        elif k.endswith("mlp.0.bias"):
            new[k] = torch.cat([v, v.new_zeros(new[k].shape[0] - v.shape[0])])
        elif k.endswith("mlp.2.weight"):                               # (d, hidden): columns are units
            new[k] = torch.cat([v, v.new_zeros(v.shape[0], new[k].shape[1] - v.shape[1])], 1)
        else:
            raise ValueError(f"cannot widen {k}: {tuple(v.shape)} -> {tuple(new[k].shape)}")
    wide.load_state_dict(new)
    return wide


def parse(argv):
    """MODE NAMES... [-- flags of python -m lab.experiments run] -> (mode, names, args)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    if not argv or argv[0] not in ("train", "widen") or (argv[0] == "widen" and cut != 2):
        sys.exit("usage: python -m lab.capacity train PREFIX... [-- run flags] | widen RATIO [-- run flags]")
    return argv[0], argv[1:cut], experiments.parse(["run"] + argv[cut + 1:])


def main(argv):
    mode, rest, args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    if mode == "widen":
        base, _ = load(args.base)
        wide = widened(base, int(rest[0]), torch.Generator().manual_seed(args.seed))
        path = os.path.join(args.out, f"base_mlp{rest[0]}.pt")
        save(wide, path)
        ref = reference_path(args.base, args.reference_per_prompt, args.temperature, args.order, args.sample_steps)
        if not os.path.isfile(ref):
            sys.exit(f"draw the base's reference first (python dtm.py once): {ref} is missing")
        shutil.copyfile(ref, reference_path(path, args.reference_per_prompt, args.temperature, args.order,
                                            args.sample_steps))
        print(f"widened: {n_params(base):,} -> {n_params(wide):,} parameters, {path}")
        args.base = path
    elif mode == "train":
        load_base = dtm.load

        def load_frozen(path, device="cpu"):
            model, ck = load_base(path, device)
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(tuple(rest)))
            print(f"training {sum(p.numel() for p in model.parameters() if p.requires_grad):,} of "
                  f"{n_params(model):,} parameters: {' '.join(rest)}")
            return model, ck
        dtm.load = load_frozen                                         # run() loads the base with it
        try:
            return experiments.run(args)
        finally:
            dtm.load = load_base
    return experiments.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
