"""dtm.py and maze/mdm.py as a user runs them: a tiny end-to-end run, resume, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import dtm
from maze import env
from maze.mdm import MDM, Config, load, sample, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--a_max", "0.2", "--eta", "0.1", "--steps_per_phase", "3", "--batch", "16",
        "--rollouts_per_prompt", "2", "--refresh_every", "2", "--sample_steps", "4",
        "--end_rollouts_per_prompt", "3"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "tiny.pt")
    save(MDM(Config(n_layer=1, n_head=2, d_model=32)), path)
    return path


def run_cli(*args, script="dtm.py"):
    return subprocess.run([sys.executable, *script.split(), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)


def test_smoke_run_writes_metrics_and_figures(tiny_base, tmp_path):
    out, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    history = dtm.run(dtm.parse(TINY + ["--base", tiny_base, "--out", out, "--figures", figs]))
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved == history
    assert [h["a"] for h in saved] == [0.0, 0.1, 0.2]
    for h in saved:
        assert 0 <= h["validity"] <= 1 and -1 <= h["reward"] <= 2
    assert all(k in saved[-1] for k in ("loss", "distinct_valid_per_prompt", "cells_covered_per_prompt"))
    assert saved[0]["end_rollouts"] == saved[-1]["end_rollouts"] == 3 * 8 and "end_rollouts" not in saved[1]
    for name in ("rollouts_phi1_eta0.1.png", "curves_phi1_eta0.1.png", "rollouts_phi1_eta0.1.gif"):
        assert os.path.getsize(os.path.join(figs, name)) > 10_000
    model, ck = load(os.path.join(out, "state.pt"))
    assert len(ck["history"]) == 3


def test_sweep_runs_phi_by_eta_at_equal_compute_and_writes_table_and_grid(tiny_base, tmp_path):
    out, figs = str(tmp_path / "sweep"), str(tmp_path / "figs")
    args = TINY + ["--base", tiny_base, "--out", out, "--figures", figs, "--sweep", "--sweep_etas", "0.2", "0.1",
                   "--sweep_steps", "4"]
    results = dtm.main(args)
    assert [(r["phi"], r["eta"]) for r in results] == [(0, 0.2), (0, 0.1), (1, 0.2), (1, 0.1)]
    assert [r["steps_per_phase"] for r in results] == [4, 2, 4, 2]   # 4 steps in all: 1 x 4 or 2 x 2
    for r in results:
        assert len(json.load(open(os.path.join(out, f"phi{r['phi']:g}_eta{r['eta']:g}", "metrics.json")))) \
            == round(0.2 / r["eta"]) + 1
    assert open(os.path.join(out, "sweep.md")).read().count("\n") == 2 + 4
    assert os.path.getsize(os.path.join(figs, "sweep.png")) > 10_000
    os.remove(os.path.join(out, "phi1_eta0.1", "state.pt"))         # a reused run is not run again
    assert dtm.main(args + ["--resume"]) == results


def test_resume_continues_after_the_last_finished_phase(tiny_base, tmp_path):
    out, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    dtm.run(dtm.parse(TINY[:1] + ["0.1"] + TINY[2:] + ["--base", tiny_base, "--out", out, "--figures", figs]))
    history = dtm.run(dtm.parse(TINY + ["--base", tiny_base, "--out", out, "--figures", figs, "--resume"]))
    assert [h["a"] for h in history] == [0.0, 0.1, 0.2]      # phase 1 kept, only phase 2 run


@pytest.mark.parametrize("args, message", [
    (["--eta", "0"], "--eta must be > 0"),
    (["--eta", "-1"], "--eta must be > 0"),
    (["--phi", "2"], "--phi must be in [0, 1]"),
    (["--base", "no/such/file.pt"], "checkpoint not found: no/such/file.pt"),
])
def test_bad_input_gives_one_line_error_not_traceback(args, message):
    res = run_cli(*args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert message in res.stderr.strip().splitlines()[-1]


def test_corrupt_checkpoint_gives_clear_error(tmp_path, tiny_base):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(open(tiny_base, "rb").read()[:1000])      # truncated
    for script in ("dtm.py --base", "-m maze.mdm --eval"):
        res = run_cli(str(bad), script=script)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith(f"error: cannot read checkpoint {bad}")


def test_help_lists_the_main_flags():
    res = run_cli("--help")
    assert res.returncode == 0
    for flag in ("--phi", "--eta", "--a_max", "--steps_per_phase", "--seed", "--device", "--out", "--resume"):
        assert flag in res.stdout


def test_sampler_is_seeded_and_reveals_every_token(tiny_base):
    model, _ = load(tiny_base)
    wall = env.make_maze()
    prompts = torch.tensor(env.make_prompts(wall))
    for order in ("confidence", "random"):
        a = sample(model, prompts, 8, 1.0, order, torch.Generator().manual_seed(3))
        b = sample(model, prompts, 8, 1.0, order, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == (8, model.cfg.gen_len)
        assert (a != env.MASK).all()                           # everything revealed after the last step


class Spy(torch.nn.Module):
    """Wraps the model and records how many positions are still masked at each sampler call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.masked = model, model.cfg, []

    def forward(self, x, where):
        self.masked.append(where.sum(1).tolist())
        return self.model(x, where)


@pytest.mark.parametrize("steps, counts", [(4, [8, 8, 8, 8]), (5, [7, 7, 6, 6, 6]), (32, [1] * 32)])
def test_sampler_reveals_an_even_share_per_step_remainder_first(tiny_base, steps, counts):
    model, _ = load(tiny_base)
    model.cfg.gen_len = 32                                      # the tiny model was built for 64
    spy = Spy(model)
    prompts = torch.tensor(env.make_prompts(env.make_maze())[:3])
    sample(spy, prompts, steps, 1.0, "random", torch.Generator().manual_seed(0))
    left = [32 - sum(counts[:k]) for k in range(steps)]        # masked before each step
    assert spy.masked == [[n] * 3 for n in left]


@pytest.mark.slow
def test_main_command_on_the_committed_base_improves_reward_and_validity(tmp_path):
    """`python dtm.py --phi 1 --eta 0.1` end to end (592 s measured): the done-criteria."""
    out = str(tmp_path / "run")
    res = run_cli("--out", out, "--figures", str(tmp_path / "figs"))
    assert res.returncode == 0, res.stderr[-2000:]
    with open(os.path.join(out, "metrics.json")) as f:
        h = json.load(f)
    base, final = h[0], h[-1]                                 # 512 rollouts each: the end_ metrics
    assert final["a"] == pytest.approx(1.0) and len(h) == 11 and final["end_rollouts"] == 512
    assert final["end_reward"] > base["end_reward"] and final["end_validity"] > base["end_validity"]
    assert final["end_distinct_valid_per_prompt"] >= 0.5 * base["end_distinct_valid_per_prompt"]
