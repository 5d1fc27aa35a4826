"""dtm.py and maze/mdm.py as a user runs them: a tiny end-to-end run, resume, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dtm
from maze import env
from maze.mdm import load, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--a_max", "0.2", "--eta", "0.1", "--steps_per_phase", "3", "--batch", "16",
        "--rollouts_per_prompt", "2", "--refresh_every", "2", "--sample_steps", "4",
        "--end_rollouts_per_prompt", "3", "--reference_per_prompt", "4"]


def run_cli(*args, script="dtm.py"):
    return subprocess.run([sys.executable, *script.split(), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)


def test_smoke_run_writes_metrics_and_figures(tiny_base, tmp_path):
    out, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    history = dtm.run(dtm.parse(TINY + ["--base", tiny_base, "--out", out, "--figures", figs]))
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert json.dumps(saved) == json.dumps(history)                     # NaN == NaN as text
    assert [h["a"] for h in saved] == [0.0, 0.1, 0.2]
    for h in saved:
        assert 0 <= h["validity"] <= 1 and -1 <= h["reward"] <= 2 and h["validity_se"] >= 0
        assert 0 <= h["exact_validity"] <= 1 and h["exact_ess"] > 0
    assert all(k in saved[-1] for k in ("loss", "distinct_valid_per_prompt", "cells_covered_per_prompt",
                                        "realised_validity", "realised_reward_se", "teacher_target_reward"))
    assert [h["n"] for h in saved] == [4 * 8, 2 * 8, 3 * 8]             # reference, buffer, end rollouts
    for name in ("rollouts_phi1_eta0.1.png", "curves_phi1_eta0.1.png", "rollouts_phi1_eta0.1.gif"):
        assert os.path.getsize(os.path.join(figs, name)) > 10_000
    with open(os.path.join(figs, "metrics_phi1_eta0.1.json")) as f:
        assert json.dumps(json.load(f)) == json.dumps(history)
    model, ck = load(os.path.join(out, "state.pt"))
    assert len(ck["history"]) == 3


def test_invalid_reward_rescores_the_reference_and_the_rollouts_and_moves_the_offset(tiny_base, tmp_path):
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    base = str(tmp_path / "base.pt")
    with open(tiny_base, "rb") as f, open(base, "wb") as g:
        g.write(f.read())
    args1, args3 = dtm.parse(TINY), dtm.parse(TINY + ["--invalid_reward", "-3"])
    assert (args1.r_offset, args3.r_offset) == (1.0, 3.0)                  # r + offset >= 0 either way
    _, r1, valid = dtm.base_reference(base, wall, prompts, 4, args1)
    _, r3, valid3 = dtm.base_reference(base, wall, prompts, 4, args3)      # the same cached rollouts
    assert (valid3 == valid).all() and (r3 == np.where(valid, r1, -3.0)).all()
    model = load(tiny_base)[0]
    _, r, v, _ = dtm.rollouts(model, prompts, 2, args3, wall, torch.Generator().manual_seed(0))
    assert (~v).any() and (r[~v] == -3.0).all() and (r[v] >= 0).all()


def test_figures_go_under_out_unless_asked_for(tiny_base, tmp_path):
    out = str(tmp_path / "run")
    dtm.run(dtm.parse(TINY + ["--base", tiny_base, "--out", out]))
    assert os.path.isfile(os.path.join(out, "curves_phi1_eta0.1.png"))


def test_reference_rollouts_are_drawn_once_and_keyed_by_the_checkpoint(tiny_base, tmp_path, monkeypatch):
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    args = dtm.parse(TINY)
    base = str(tmp_path / "base.pt")
    with open(tiny_base, "rb") as f, open(base, "wb") as g:
        g.write(f.read())
    x, r, valid = dtm.base_reference(base, wall, prompts, 4, args)
    assert x.shape == (8, 4, 64) and r.shape == valid.shape == (8, 4)
    assert ((r > env.INVALID_REWARD) == valid).all()

    def no_sampling(*a, **k):
        raise AssertionError("the cached reference was drawn again")
    monkeypatch.setattr(dtm, "rollouts", no_sampling)
    x2, r2, _ = dtm.base_reference(base, wall, prompts, 4, args)          # from the cache
    assert (x2 == x).all() and (r2 == r).all()
    with pytest.raises(AssertionError, match="drawn again"):                # other settings, other file
        dtm.base_reference(base, wall, prompts, 5, args)


def test_tilted_means_are_self_normalised_importance_estimates():
    """Exact small case: two prompts, three rollouts each; a = 0 gives the plain means."""
    r = np.array([[-1.0, 0.5, 0.2], [0.0, 0.0, -1.0]])
    valid = r > -1
    plain = dtm.tilted_means(r, valid, 0.0)
    assert plain["validity"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert plain["reward"] == pytest.approx((r[0].mean() + r[1].mean()) / 2)
    assert plain["ess"] == pytest.approx(6.0)
    a = 2.0
    w = np.exp(a * r)
    expected = ((w * valid).sum(1) / w.sum(1)).mean()
    assert dtm.tilted_means(r, valid, a)["validity"] == pytest.approx(expected, rel=1e-12)
    se = np.sqrt(sum(((w[p] / w[p].sum()) ** 2 * (r[p] - (w[p] * r[p]).sum() / w[p].sum()) ** 2).sum()
                     for p in range(2))) / 2
    assert dtm.tilted_means(r, valid, a)["reward_se"] == pytest.approx(se, rel=1e-12)


def test_tilted_means_recover_a_known_tilt_within_their_standard_error():
    """Rollouts of a known law per prompt: the estimate of p e^{a r}/Z lands within 4 SE of the exact value."""
    rng = np.random.default_rng(0)
    values, p = np.array([-1.0, 0.0, 0.3, 0.6]), np.array([0.4, 0.3, 0.2, 0.1])
    r = rng.choice(values, size=(8, 4096), p=p)
    for a in (0.5, 1.0, 3.0):
        q = p * np.exp(a * values) / (p * np.exp(a * values)).sum()
        est = dtm.tilted_means(r, r > -1, a)
        assert abs(est["reward"] - (q * values).sum()) < 4 * est["reward_se"]
        assert abs(est["validity"] - q[1:].sum()) < 4 * est["validity_se"]
        assert 0 < est["validity_se"] < 0.01


def test_realised_fraction_of_the_exact_gain():
    base = dict(validity=0.5, validity_se=0.0, reward=-0.4, reward_se=0.0)
    exact = dict(validity=0.8, validity_se=0.01, reward=0.0, reward_se=0.02)
    now = dict(validity=0.65, validity_se=0.03, reward=-0.1, reward_se=0.02)
    f = dtm.realised_fraction(now, exact, base)
    assert f["realised_validity"] == pytest.approx(0.5) and f["realised_reward"] == pytest.approx(0.75)
    assert f["realised_validity_se"] == pytest.approx(np.hypot(0.03, 0.5 * 0.01) / 0.3)


def test_gradient_norm_at_the_teacher_is_order_eta_for_phi1_and_order_one_for_phi0(tiny_base):
    """At the teacher, phi = 1's gradient is the tilt's alone, (e^{eta r} - 1) / Z times the NLL
    gradient: linear in eta. phi = 0's is the whole ELBO gradient of one-hot samples, whatever eta."""
    model = load(tiny_base)[0]
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    comp = sample(model, np.repeat(np.asarray(prompts), 8, 0), steps=8, generator=torch.Generator().manual_seed(0))
    x1 = dtm.with_prompts(prompts, comp.view(8, 8, -1))
    r = torch.as_tensor(env.score(wall, comp.numpy(), np.repeat(np.asarray(prompts), 8, 0))[1],
                        dtype=torch.float32).view(8, 8) + torch.rand(8, 8, generator=torch.Generator().manual_seed(1))

    def norm(phi, eta):                                              # the same minibatches and maskings
        args = dtm.parse(["--eta", str(eta), "--batch", "16", "--clip", "1e9"])
        return dtm.gradient_norm(model, x1, r, args, phi, torch.Generator().manual_seed(2), batches=4)
    g1, g1_small, g0, g0_small = norm(1.0, 0.1), norm(1.0, 0.01), norm(0.0, 0.1), norm(0.0, 0.01)
    assert 0.08 < g1_small / g1 < 0.12                                 # O(eta)
    assert 0.9 < g0_small / g0 < 1.1 and g0 > 10 * g1                  # O(1)
    assert dtm.gradient_norm(model, x1, r, dtm.parse(["--batch", "16", "--clip", str(g0 / 2)]), 0.0,
                             torch.Generator().manual_seed(2), batches=4) == pytest.approx(g0 / 2)   # clipped


def test_sweep_runs_phi_by_eta_at_equal_compute_and_writes_table_and_grid(tiny_base, tmp_path):
    out, figs = str(tmp_path / "sweep"), str(tmp_path / "figs")
    args = TINY + ["--base", tiny_base, "--out", out, "--figures", figs, "--sweep", "--sweep_etas", "0.2", "0.1",
                   "--sweep_steps", "4"]
    results = dtm.main(args)
    assert [(r["phi"], r["eta"], r["control"]) for r in results] == [
        (0, 0.2, False), (0, 0.1, False), (1, 0.2, False), (1, 0.1, False), (0, 0.1, True), (1, 0.1, True),
        (0, 0.1, False), (0, 0.1, True)]                              # the last two at phi = 0's matched lr
    assert [r["steps_per_phase"] for r in results] == [4, 2, 4, 2, 2, 2, 2, 2]   # 4 in all: 1 x 4 or 2 x 2
    lr0 = results[-1]["lr"]
    assert [r["lr"] for r in results] == [0.02] * 6 + [lr0, lr0] and 0 < lr0 < 0.02
    for r in results:
        run_dir = (f"phi{r['phi']:g}_eta{r['eta']:g}" + (f"_lr{r['lr']:g}" if r["lr"] != 0.02 else "")
                   + ("_control" if r["control"] else ""))
        assert len(json.load(open(os.path.join(out, run_dir, "metrics.json")))) == round(0.2 / r["eta"]) + 1
    assert open(os.path.join(out, "sweep.md")).read().count("\n") == 2 + 8
    assert os.path.getsize(os.path.join(figs, "sweep.png")) > 10_000
    os.remove(os.path.join(out, "phi1_eta0.1", "state.pt"))         # a reused run is not run again
    assert json.dumps(dtm.main(args + ["--resume"])) == json.dumps(results)    # NaN == NaN as text


@pytest.mark.parametrize("states", ["forward", "path"])
def test_resume_continues_after_the_last_finished_phase(tiny_base, tmp_path, states):
    out, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    more = ["--base", tiny_base, "--out", out, "--figures", figs, "--states", states]
    dtm.run(dtm.parse(TINY[:1] + ["0.3"] + TINY[2:] + more))
    history = dtm.run(dtm.parse(TINY[:1] + ["0.4"] + TINY[2:] + more + ["--resume"]))
    assert [h["a"] for h in history] == [0.0, 0.1, 0.2, 0.3, 0.4]   # phases 1-3 kept, no row twice


def test_released_variants_run_and_change_the_trained_model(tiny_base, tmp_path):
    """--weighting count (1/n time weight), --weighting released, --ema and --states path each give another
    model than the default from the same seed; with --ema the model after a phase is the EMA of its iterates."""
    final = {}
    for name, extra in [("paper", []), ("count", ["--weighting", "count"]), ("released", ["--weighting", "released"]),
                        ("ema", ["--ema", "0.5"]), ("path", ["--states", "path"])]:
        out = str(tmp_path / name)
        dtm.run(dtm.parse(TINY + ["--base", tiny_base, "--out", out, "--a_max", "0.1", *extra]))
        final[name] = torch.cat([p.flatten() for p in load(os.path.join(out, "state.pt"))[0].parameters()])
    for name in ("count", "released", "ema", "path"):
        assert not torch.equal(final[name], final["paper"]), name
    base = torch.cat([p.flatten() for p in load(tiny_base)[0].parameters()])
    assert (final["ema"] - base).norm() < (final["paper"] - base).norm()    # the EMA lags the iterates


def test_shuffled_rewards_are_a_permutation_within_each_prompt():
    r = torch.arange(8 * 50, dtype=torch.float32).view(8, 50)
    s = dtm.shuffled(r, torch.Generator().manual_seed(0))
    assert torch.equal(s.sort(1).values, r)                             # each prompt keeps its own rewards
    assert (s != r).float().mean() > 0.9                                # ... on other rollouts
    assert torch.equal(s, dtm.shuffled(r, torch.Generator().manual_seed(0)))


def test_shuffle_rewards_trains_on_permuted_rewards_and_measures_the_true_ones(tiny_base, tmp_path, monkeypatch):
    """--shuffle_rewards (the no-signal control): in the loss, each prompt's rewards sit on other rollouts of
    that prompt; the measured rows still score every rollout by its own reward. Rewards here are a
    made-up function of the completion, so that every rollout's own reward is known."""
    own = lambda comp: (torch.as_tensor(comp).long().sum(-1) % 97).float() / 100              # noqa: E731
    rollouts = dtm.rollouts
    monkeypatch.setattr(dtm, "rollouts", lambda *a, **k: (lambda x1, r, v, rank: (x1, own(x1[..., 3:]), v, rank))(
        *rollouts(*a, **k)))
    seen, dtm_loss = [], dtm.dtm_loss
    monkeypatch.setattr(dtm, "dtm_loss", lambda *a, **k: seen.append((a[2], a[4])) or dtm_loss(*a, **k))
    for name, extra, share in (("default", [], 1.0), ("shuffled", ["--shuffle_rewards"], None)):
        out = str(tmp_path / name)
        seen.clear()
        history = dtm.run(dtm.parse(TINY + ["--base", tiny_base, "--out", out, "--rollouts_per_prompt", "8",
                                            "--reference_per_prompt", "8", "--refresh_every", "100", *extra]))
        last_phase = seen[-3:]                             # 3 steps; its buffer: the end rollouts of phase 1
        matches = torch.cat([(r - 1.0 - own(x1[:, 3:])).abs() < 1e-6 for x1, r in last_phase]).float().mean()
        if share is not None:
            assert matches == share                        # r + r_offset, on its own rollout
        else:
            assert matches < 0.5                           # a permutation of 8 keeps about 1 in place
        comp = np.load(os.path.join(out, "rollouts_a0.2.npy"))
        assert history[-1]["reward"] == pytest.approx(own(comp).mean().item(), abs=1e-6)


def test_lr_decay_cosine_anneals_every_phase_from_lr_to_zero(tiny_base, tmp_path, monkeypatch):
    """--lr_decay cosine: step k of n takes lr (1 + cos(pi k / n)) / 2, afresh in every phase."""
    seen, sgd_step = [], torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return sgd_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    dtm.run(dtm.parse(TINY + ["--base", tiny_base, "--out", str(tmp_path / "run"), "--lr_decay", "cosine"]))
    assert seen == pytest.approx([0.02, 0.015, 0.005] * 2)          # 3 steps per phase, 2 phases


@pytest.mark.parametrize("args, message", [
    (["--eta", "0"], "--eta must be > 0"),
    (["--eta", "-1"], "--eta must be > 0"),
    (["--phi", "2"], "--phi must be in [0, 1]"),
    (["--base", "no/such/file.pt"], "checkpoint not found: no/such/file.pt"),
    (["--batch", "12"], "--batch must be a positive multiple of the 8 prompts"),
    (["--invalid_reward", "0"], "--invalid_reward must be < 0"),
])
def test_bad_input_gives_one_line_error_not_traceback(args, message):
    res = run_cli(*args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert message in res.stderr.strip().splitlines()[-1]


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
    (--control): the tilt, not the training itself, must raise the reward. About 2 x 7 minutes
    (measured: reward -0.306 ± 0.012 against -0.364 ± 0.012)."""
    ends = {}
    for name, extra in (("dtm", []), ("control", ["--control"])):
        out = str(tmp_path / name)
        res = run_cli("--out", out, *extra)
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
