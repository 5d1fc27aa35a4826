"""lab/capacity.py: the widened network computes the same function, and the freeze trains only what it names."""
import os

import numpy as np
import torch

import dtm
from maze import env, exact
from lab import capacity
from maze.mdm import MDM, Config, load, mask_completions, save
from test_dtm_cli import FAST, TINY, parse


def test_widening_the_mlp_keeps_the_function_and_only_the_new_output_weights_have_a_gradient():
    torch.manual_seed(0)
    model = MDM(Config(n_layer=2, n_head=2, d_model=32))
    wide = capacity.widened(model, 12, torch.Generator().manual_seed(1))
    assert wide.blocks[0].mlp[0].weight.shape == (12 * 32, 32)
    x1 = torch.randint(0, env.N_CELLS, (8, 2 + model.cfg.gen_len))
    x_t, mask, _ = mask_completions(x1)
    torch.testing.assert_close(wide(x_t, mask), model(x_t, mask), rtol=0, atol=1e-6)
    wide(x_t, mask).logsumexp(-1).sum().backward()
    mlp = wide.blocks[1].mlp
    assert mlp[0].weight.grad[4 * 32:].abs().max() == 0                # new units' inputs: no gradient yet
    assert mlp[2].weight.grad[:, 4 * 32:].abs().max() > 0              # their outputs: a gradient


def test_train_mode_moves_only_the_named_parameters(tiny_base, tmp_path):
    out = str(tmp_path / "run")
    capacity.main(["train", "blocks.0.mlp", "--", *TINY, *FAST, "--base", tiny_base, "--out", out])
    assert dtm.load is capacity.load                                   # the patch is undone
    base, trained = load(tiny_base)[0].state_dict(), load(os.path.join(out, "state.pt"))[0].state_dict()
    moved = {k for k in base if not torch.equal(base[k], trained[k])}
    assert moved and all(k.startswith("blocks.0.mlp") for k in moved), moved


def test_widen_mode_reuses_the_bases_reference_as_its_exact_tilt(tiny_base, tmp_path):
    base = str(tmp_path / "base.pt")
    save(load(tiny_base)[0], base)
    args = parse(TINY + ["--base", base])
    wall = env.make_maze()
    ref = exact.base_reference(base, wall, env.make_prompts(wall), args.reference_per_prompt, args)
    out = str(tmp_path / "wide")
    history = capacity.main(["widen", "8", "--", *TINY, *FAST, "--base", base, "--out", out])
    assert load(os.path.join(out, "base_mlp8.pt"))[0].cfg.mlp_ratio == 8
    assert history[0]["validity"] == np.mean(ref[2])                   # a = 0 is the base's reference
