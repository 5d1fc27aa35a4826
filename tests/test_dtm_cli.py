"""dtm.py and maze/mdm.py as a user runs them: a tiny end-to-end run, resume, and clear errors on bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dtm
from maze import env, exact, mdm
from maze.mdm import CheckpointError, load, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--a_max", "0.2", "--eta", "0.1", "--steps_per_phase", "3", "--batch", "16",
        "--rollouts_per_prompt", "2", "--refresh_every", "2",
        "--end_rollouts_per_prompt", "3", "--reference_per_prompt", "4", "--held_out_per_prompt", "2"]
FAST = ["--sample_steps", "4"]                 # lab/experiments.py's flag: 4 sampler steps, not 64


def parse(argv):
    """dtm.py's flags, with the sampler at 4 steps (a default of dtm.run's that only experiments sets)."""
    args = dtm.parse(argv)
    args.sample_steps = 4
    return args


def run_cli(*args, script="dtm.py"):
    return subprocess.run([sys.executable, *script.split(), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)


def test_the_phases_bound_reads_from_new_and_old_metrics():
    """Logged as phase_kl (the function's name); metrics written before call it max_gain, and still read."""
    from maze.figures import logged_phase_kl
    assert logged_phase_kl({"phase_kl": 0.25}) == 0.25 and logged_phase_kl({"max_gain": 0.5}) == 0.5
    old = json.load(open(os.path.join(os.path.dirname(__file__), "..", "figures", "metrics_phi1_eta0.1.json")))
    assert all(logged_phase_kl(h) > 0 for h in old[1:])                       # the committed run, as written


def test_smoke_run_writes_metrics_and_figures(tiny_base, tmp_path):
    out, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    history = dtm.run(parse(TINY + ["--base", tiny_base, "--out", out, "--figures", figs]))
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert json.dumps(saved) == json.dumps(history)                     # NaN == NaN as text
    assert [h["a"] for h in saved] == [0.0, 0.1, 0.2]
    for h in saved:
        assert 0 <= h["validity"] <= 1 and -1 <= h["reward"] <= 2 and h["validity_se"] >= 0
        assert 0 <= h["exact_validity"] <= 1 and h["exact_ess"] > 0
    assert all(k in saved[-1] for k in ("loss", "distinct_valid_per_prompt", "cells_covered_per_prompt",
                                        "realised_validity", "realised_reward_se", "teacher_target_reward"))
    assert [h["n"] for h in saved] == [4 * 8, 4 * 8, 3 * 8]             # reference, buffer + held out, end
    for name in ("rollouts_phi1_eta0.1.png", "curves_phi1_eta0.1.png", "rollouts_phi1_eta0.1.gif"):
        assert os.path.getsize(os.path.join(figs, name)) > 10_000
    with open(os.path.join(figs, "metrics_phi1_eta0.1.json")) as f:
        assert json.dumps(json.load(f)) == json.dumps(history)
    model, ck = load(os.path.join(out, "state.pt"))
    assert len(ck["history"]) == 3


def test_every_phase_reports_its_held_out_change_which_is_zero_when_the_model_does_not_move(tiny_base, tmp_path,
                                                                                          monkeypatch):
    """The health check: J(student) - J(teacher) on held-out teacher rollouts, with the most it can gain.
    At lr 0 the student is its teacher, so the change is exactly 0; at the default lr it is not. (The tiny
    base's rollouts are all invalid, so the rewards here are a made-up function of the completion.)"""
    rollouts = dtm.rollouts
    made_up = lambda x1, r, v, rank: (x1, (x1[..., 3:].sum(-1) % 97).float() / 100, v, rank)    # noqa: E731
    monkeypatch.setattr(dtm, "rollouts", lambda *a, **k: made_up(*rollouts(*a, **k)))
    for lr in ("0", "0.02"):
        history = dtm.run(parse(TINY + ["--base", tiny_base, "--out", str(tmp_path / lr), "--lr", lr]))
        for h in history[1:]:
            assert math.isfinite(h["held_out_change_se"]) and h["phase_kl"] >= 0
            assert (h["held_out_change"] == 0.0) == (lr == "0")


def test_figures_go_under_out_unless_asked_for(tiny_base, tmp_path):
    out = str(tmp_path / "run")
    dtm.run(parse(TINY + ["--base", tiny_base, "--out", out]))
    assert os.path.isfile(os.path.join(out, "curves_phi1_eta0.1.png"))


def test_reference_rollouts_are_drawn_once_and_keyed_by_the_checkpoint(tiny_base, tmp_path, monkeypatch):
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    args = parse(TINY)
    base = str(tmp_path / "base.pt")
    with open(tiny_base, "rb") as f, open(base, "wb") as g:
        g.write(f.read())
    x, r, valid = exact.base_reference(base, wall, prompts, 4, args)
    assert x.shape == (8, 4, 64) and r.shape == valid.shape == (8, 4)
    assert ((r > env.INVALID_REWARD) == valid).all()

    def no_sampling(*a, **k):
        raise AssertionError("the cached reference was drawn again")
    monkeypatch.setattr(mdm, "evaluate", no_sampling)
    x2, r2, _ = exact.base_reference(base, wall, prompts, 4, args)          # from the cache
    assert (x2 == x).all() and (r2 == r).all()
    with pytest.raises(AssertionError, match="drawn again"):                # other settings, other file
        exact.base_reference(base, wall, prompts, 5, args)


def test_tilted_means_are_self_normalised_importance_estimates():
    """Exact small case: two prompts, three rollouts each; a = 0 gives the plain means."""
    r = np.array([[-1.0, 0.5, 0.2], [0.0, 0.0, -1.0]])
    valid = r > -1
    plain = exact.tilted_means(r, valid, 0.0)
    assert plain["validity"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert plain["reward"] == pytest.approx((r[0].mean() + r[1].mean()) / 2)
    assert plain["ess"] == pytest.approx(6.0)
    a = 2.0
    w = np.exp(a * r)
    expected = ((w * valid).sum(1) / w.sum(1)).mean()
    assert exact.tilted_means(r, valid, a)["validity"] == pytest.approx(expected, rel=1e-12)
    se = np.sqrt(sum(((w[p] / w[p].sum()) ** 2 * (r[p] - (w[p] * r[p]).sum() / w[p].sum()) ** 2).sum()
                     for p in range(2))) / 2
    assert exact.tilted_means(r, valid, a)["reward_se"] == pytest.approx(se, rel=1e-12)


def test_tilted_means_recover_a_known_tilt_within_their_standard_error():
    """Rollouts of a known law per prompt: the estimate of p e^{a r}/Z lands within 4 SE of the exact value."""
    rng = np.random.default_rng(0)
    values, p = np.array([-1.0, 0.0, 0.3, 0.6]), np.array([0.4, 0.3, 0.2, 0.1])
    r = rng.choice(values, size=(8, 4096), p=p)
    for a in (0.5, 1.0, 3.0):
        q = p * np.exp(a * values) / (p * np.exp(a * values)).sum()
        est = exact.tilted_means(r, r > -1, a)
        assert abs(est["reward"] - (q * values).sum()) < 4 * est["reward_se"]
        assert abs(est["validity"] - q[1:].sum()) < 4 * est["validity_se"]
        assert 0 < est["validity_se"] < 0.01


def test_realised_fraction_of_the_exact_gain():
    base = dict(validity=0.5, validity_se=0.0, reward=-0.4, reward_se=0.0)
    tilt = dict(validity=0.8, validity_se=0.01, reward=0.0, reward_se=0.02)
    now = dict(validity=0.65, validity_se=0.03, reward=-0.1, reward_se=0.02)
    f = exact.realised_fraction(now, tilt, base)
    assert f["realised_validity"] == pytest.approx(0.5) and f["realised_reward"] == pytest.approx(0.75)
    assert f["realised_validity_se"] == pytest.approx(np.hypot(0.03, 0.5 * 0.01) / 0.3)


@pytest.mark.parametrize("args, message", [
    (["--eta", "0"], "--eta must be > 0"),
    (["--eta", "-1"], "--eta must be > 0"),
    (["--phi", "2"], "--phi must be in [0, 1]"),
    (["--base", "no/such/file.pt"], "checkpoint not found: no/such/file.pt"),
    (["--batch", "12"], "--batch must be a positive multiple of the 8 prompts"),
    (["-m", "lab.experiments", "run", "--invalid_reward", "0"], "--invalid_reward must be < 0"),
])
def test_bad_input_gives_one_line_error_not_traceback(args, message):
    res = run_cli(*args[3:], script=" ".join(args[:3])) if args[0] == "-m" else run_cli(*args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert message in res.stderr.strip().splitlines()[-1]


def test_a_missing_base_is_reported_before_the_out_folder_is_made(tmp_path):
    """dtm.py checks --base first, so that a mistyped path leaves nothing behind (the tests above run with
    the default --out, runs/dtm in the repository)."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match="error: checkpoint not found: no/such/file.pt"):
        dtm.main(["--base", "no/such/file.pt", "--out", str(out)])
    assert not out.exists()


@pytest.mark.slow
def test_resume_continues_after_the_last_finished_phase(tiny_base, tmp_path):
    out, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    more = ["--base", tiny_base, "--out", out, "--figures", figs]
    dtm.run(parse(TINY[:1] + ["0.3"] + TINY[2:] + more))
    history = dtm.run(parse(TINY[:1] + ["0.4"] + TINY[2:] + more + ["--resume"]))
    assert [h["a"] for h in history] == [0.0, 0.1, 0.2, 0.3, 0.4]   # phases 1-3 kept, no row twice


def test_resume_of_a_run_that_kept_no_rollouts_to_hold_out_says_so(tiny_base, tmp_path):
    """Extending a finished run (--resume with a larger --a_max) needs more of its last rollouts than the
    buffer holds: the rest are the next phase's held-out set. With --end_rollouts_per_prompt equal to the
    buffer there are none, and the run says so (main prints it as one line) instead of failing inside the
    health check."""
    out = str(tmp_path / "run")
    flags = TINY[2:] + ["--base", tiny_base, "--out", out, "--end_rollouts_per_prompt", "2"]
    dtm.run(parse(["--a_max", "0.1"] + flags))
    with pytest.raises(CheckpointError, match=f"{out}/state.pt: its last phase kept 2 rollouts per prompt, none"):
        dtm.run(parse(["--a_max", "0.2", "--resume"] + flags))


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_checkpoint_gives_a_one_line_error(tmp_path, tiny_base, kind):
    bad = tmp_path / "corrupt.pt"
    good = open(tiny_base, "rb").read()
    bad.write_bytes(good[:1000] if kind == "truncated" else bytes(range(256)) * 40)
    for script in ("dtm.py --base", "-m maze.mdm --eval"):
        res = run_cli(str(bad), script=script)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.strip().startswith(f"error: cannot read checkpoint {bad}")


def test_help_lists_the_main_flags():
    res = run_cli("--help")
    assert res.returncode == 0
    for flag in ("--phi", "--eta", "--a_max", "--steps_per_phase", "--seed", "--device", "--out", "--resume"):
        assert flag in res.stdout
    text = " ".join(res.stdout.split())
    assert "(default: None)" not in text and "(default: 0.1)" in text


def test_every_clis_help_shows_each_default_once_zero_included_and_never_none():
    """One help formatter (maze.mdm.Help) for dtm.py, maze/mdm.py, lab/experiments.py, llada_finetune.py, grpo.py."""
    import re

    import grpo
    import llada_finetune
    from lab import experiments
    from maze import mdm
    for name, p in (("dtm", dtm.parser()), ("mdm", mdm.parser()), ("experiments", experiments.parser()),
                    ("llada", llada_finetune.parser()), ("grpo", grpo.parser())):
        text = p.format_help()
        assert "(default: None)" not in text, name
        for entry in re.split(r"\n  (?=-)", text):                   # one flag's help each
            assert entry.count("(default") <= 1, (name, entry)
        seed = next(e for e in re.split(r"\n  (?=-)", text) if e.startswith("--seed"))
        assert "(default: 0)" in " ".join(seed.split()), name         # a default of 0 is shown
    llada_help = " ".join(llada_finetune.parser().format_help().split())
    assert "--eval_limit EVAL_LIMIT first N test items only (0: all) (default: 0)" in llada_help


def test_dtm_py_keeps_to_the_papers_flags():
    """At most 20 flags: the variants that only the findings use live in lab/experiments.py."""
    flags = [a for a in dtm.parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) <= 20
    assert not {"control", "shuffle_rewards", "centred", "states", "weighting", "ema"} & {a.dest for a in flags}


def test_sampler_is_seeded_and_reveals_every_token(tiny_base):
    model, _ = load(tiny_base)
    wall = env.make_maze()
    prompts = torch.tensor(env.make_prompts(wall))
    for order in ("confidence", "random"):
        a = sample(model, prompts, 8, 1.0, order, torch.Generator().manual_seed(3))
        b = sample(model, prompts, 8, 1.0, order, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == (8, model.cfg.gen_len)
        assert (a != env.MASK).all()                           # everything revealed after the last step


@pytest.mark.slow
def test_main_command_beats_a_same_seed_control_without_tilt(tmp_path):
    """`python dtm.py --phi 1 --eta 0.1` end to end, next to the same run with eta ~ 0 in the loss
    (`python -m lab.experiments run --control`): the tilt, not the training itself, must raise the reward. About 2 x 7 minutes
    (measured: reward -0.306 ± 0.012 against -0.364 ± 0.012)."""
    ends = {}
    for name, script in (("dtm", "dtm.py"), ("control", "-m lab.experiments run --control")):
        out = str(tmp_path / name)
        res = run_cli("--out", out, script=script)
        assert res.returncode == 0, res.stderr[-2000:]
        with open(os.path.join(out, "metrics.json")) as f:
            h = json.load(f)
        assert h[-1]["a"] == pytest.approx(1.0) and len(h) == 11 and h[-1]["n"] == 2048
        ends[name] = h[-1]
    dtm_end, control = ends["dtm"], ends["control"]
    se = np.hypot(dtm_end["reward_se"], control["reward_se"])
    assert dtm_end["reward"] - control["reward"] > 2 * se, (dtm_end["reward"], control["reward"], se)
    assert dtm_end["realised_reward"] > 2 * dtm_end["realised_reward_se"]
    assert abs(control["realised_reward"]) < 3 * control["realised_reward_se"] + 0.1
