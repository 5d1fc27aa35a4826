"""lab/experiments.py: the variants of dtm.py's loop that the findings use, the sweep, and the controls."""
import json
import os

import numpy as np
import pytest
import torch

import dtm
from maze import env, exact
from lab import experiments, noise
from maze.mdm import load, mask_completions, sample
from test_dtm_cli import FAST, TINY


def parse(argv):
    return experiments.parse(["run"] + argv + FAST)


def test_invalid_reward_rescores_the_reference_and_the_rollouts_and_moves_the_offset(tiny_base, tmp_path):
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    base = str(tmp_path / "base.pt")
    with open(tiny_base, "rb") as f, open(base, "wb") as g:
        g.write(f.read())
    args1, args3 = parse(TINY), parse(TINY + ["--invalid_reward", "-3"])
    assert (args1.r_offset, args3.r_offset) == (1.0, 3.0)                  # r + offset >= 0 either way
    _, r1, valid = exact.base_reference(base, wall, prompts, 4, args1)
    _, r3, valid3 = exact.base_reference(base, wall, prompts, 4, args3)      # the same cached rollouts
    assert (valid3 == valid).all() and (r3 == np.where(valid, r1, -3.0)).all()
    model = load(tiny_base)[0]
    _, r, v, _ = dtm.rollouts(model, prompts, 2, args3, wall, torch.Generator().manual_seed(0))
    assert (~v).any() and (r[~v] == -3.0).all() and (r[v] >= 0).all()



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
        return experiments.gradient_norm(model, x1, r, args, phi, torch.Generator().manual_seed(2), batches=4)
    g1, g1_small, g0, g0_small = norm(1.0, 0.1), norm(1.0, 0.01), norm(0.0, 0.1), norm(0.0, 0.01)
    assert 0.08 < g1_small / g1 < 0.12                                 # O(eta)
    assert 0.9 < g0_small / g0 < 1.1 and g0 > 10 * g1                  # O(1)
    assert experiments.gradient_norm(model, x1, r, dtm.parse(["--batch", "16", "--clip", str(g0 / 2)]), 0.0,
                             torch.Generator().manual_seed(2), batches=4) == pytest.approx(g0 / 2)   # clipped


@pytest.mark.slow
def test_sweep_runs_phi_by_eta_at_equal_compute_and_writes_table_and_grid(tiny_base, tmp_path):
    out, figs = str(tmp_path / "sweep"), str(tmp_path / "figs")
    args = ["sweep"] + TINY + FAST + ["--base", tiny_base, "--out", out, "--figures", figs, "--sweep_etas", "0.2", "0.1",
                   "--sweep_steps", "4"]
    results = experiments.main(args)
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
    assert json.dumps(experiments.main(args + ["--resume"])) == json.dumps(results)    # NaN == NaN as text



@pytest.mark.slow
def test_resume_at_the_samplers_own_states_continues_after_the_last_finished_phase(tiny_base, tmp_path):
    out, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    more = ["--base", tiny_base, "--out", out, "--figures", figs, "--states", "path"]
    experiments.run(parse(TINY[:1] + ["0.3"] + TINY[2:] + more))
    history = experiments.run(parse(TINY[:1] + ["0.4"] + TINY[2:] + more + ["--resume"]))
    assert [h["a"] for h in history] == [0.0, 0.1, 0.2, 0.3, 0.4]   # phases 1-3 kept, no row twice


@pytest.mark.slow
def test_released_variants_run_and_change_the_trained_model(tiny_base, tmp_path):
    """--weighting count (1/n time weight), --weighting released, --ema and --states path each give another
    model than the default from the same seed; with --ema the model after a phase is the EMA of its iterates."""
    final = {}
    for name, extra in [("paper", []), ("count", ["--weighting", "count"]), ("released", ["--weighting", "released"]),
                        ("ema", ["--ema", "0.5"]), ("path", ["--states", "path"])]:
        out = str(tmp_path / name)
        experiments.run(parse(TINY + ["--base", tiny_base, "--out", out, "--a_max", "0.1", *extra]))
        final[name] = torch.cat([p.flatten() for p in load(os.path.join(out, "state.pt"))[0].parameters()])
    for name in ("count", "released", "ema", "path"):
        assert not torch.equal(final[name], final["paper"]), name
    base = torch.cat([p.flatten() for p in load(tiny_base)[0].parameters()])
    assert (final["ema"] - base).norm() < (final["paper"] - base).norm()    # the EMA lags the iterates


def test_shuffled_rewards_are_a_permutation_within_each_prompt():
    r = torch.arange(8 * 50, dtype=torch.float32).view(8, 50)
    s = experiments.shuffled(r, torch.Generator().manual_seed(0))
    assert torch.equal(s.sort(1).values, r)                             # each prompt keeps its own rewards
    assert (s != r).float().mean() > 0.9                                # ... on other rollouts
    assert torch.equal(s, experiments.shuffled(r, torch.Generator().manual_seed(0)))


@pytest.mark.slow
def test_shuffle_rewards_trains_on_permuted_rewards_and_measures_the_true_ones(tiny_base, tmp_path, monkeypatch):
    """--shuffle_rewards (the no-signal control): in the loss, each prompt's rewards sit on other rollouts of
    that prompt; the measured rows still score every rollout by its own reward. Rewards here are a
    made-up function of the completion, so that every rollout's own reward is known."""
    own = lambda comp: (torch.as_tensor(comp).long().sum(-1) % 97).float() / 100              # noqa: E731
    rollouts = dtm.rollouts
    monkeypatch.setattr(dtm, "rollouts", lambda *a, **k: (lambda x1, r, v, rank: (x1, own(x1[..., 3:]), v, rank))(
        *rollouts(*a, **k)))
    seen, dtm_loss = [], experiments.dtm_loss
    monkeypatch.setattr(experiments, "dtm_loss", lambda *a, **k: seen.append((a[2], a[4])) or dtm_loss(*a, **k))
    for name, extra, share in (("default", [], 1.0), ("shuffled", ["--shuffle_rewards"], None)):
        out = str(tmp_path / name)
        seen.clear()
        history = experiments.run(parse(TINY + ["--base", tiny_base, "--out", out, "--rollouts_per_prompt", "8",
                                            "--reference_per_prompt", "10", "--refresh_every", "100", *extra]))
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
    experiments.run(parse(TINY + ["--base", tiny_base, "--out", str(tmp_path / "run"), "--lr_decay", "cosine"]))
    assert seen == pytest.approx([0.02, 0.015, 0.005] * 2)          # 3 steps per phase, 2 phases




@pytest.mark.slow
def test_run_with_no_variant_flag_is_dtm_py_itself(tiny_base, tmp_path):
    """lab/experiments.py overrides dtm.Recipe's methods only where a flag asks: with none set, its run
    trains the very same model as dtm.py's, bit for bit."""
    from test_dtm_cli import parse as dtm_parse
    final = {}
    for name, runner, args in (("dtm", dtm.run, dtm_parse), ("experiments", experiments.run, parse)):
        out = str(tmp_path / name)
        runner(args(TINY + ["--base", tiny_base, "--out", out]))
        final[name] = load(os.path.join(out, "state.pt"))[0].state_dict()
    assert all(torch.equal(final["dtm"][k], final["experiments"][k]) for k in final["dtm"])


def test_iterate_averaging_makes_the_mean_of_the_last_iterates_the_model(tiny_base, tmp_path, monkeypatch):
    """--average 0.5 over a 4-step phase: the model after the phase is the mean of the iterates after steps
    3 and 4 (what the last iterate would have been is recorded at each step)."""
    seen = []
    after_step = experiments.Variant.after_step

    def recording(self, model, opt, step):
        seen.append([q.detach().clone() for q in model.parameters()])
        return after_step(self, model, opt, step)
    monkeypatch.setattr(experiments.Variant, "after_step", recording)
    out = str(tmp_path / "avg")
    experiments.run(parse(TINY + ["--base", tiny_base, "--out", out, "--a_max", "0.1", "--steps_per_phase", "4",
                                  "--average", "0.5", "--r_offset", "0.5"]))      # c = 0.5: non-zero gradients
    final = list(load(os.path.join(out, "state.pt"))[0].parameters())
    for q, a, b in zip(final, seen[2], seen[3]):
        torch.testing.assert_close(q, (a + b) / 2)
    assert any(not torch.equal(a, b) for a, b in zip(seen[2], seen[3]))     # the two iterates differ


@pytest.mark.slow
def test_budget_runs_one_phase_per_config_and_seed_and_reuses_finished_runs(tiny_base, tmp_path):
    out = str(tmp_path / "budget")
    argv = ["budget"] + TINY + FAST + ["--base", tiny_base, "--out", out, "--budget", "c1", "c1avg", "--seeds", "0"]
    rows = experiments.main(argv)
    assert [(r["name"], r["seed"], r["compute"]) for r in rows] == [("c1", 0, 16 * 3 / (64 * 50)),
                                                                     ("c1avg", 0, 16 * 3 / (64 * 50))]
    assert os.path.isfile(os.path.join(out, "budget_eta0.1.png")) and os.path.isfile(os.path.join(out, "budget.md"))
    assert json.load(open(os.path.join(out, "c1_s0", "metrics.json")))[1]["a"] == 0.1   # one phase
    assert json.dumps(experiments.main(argv)) == json.dumps(rows)           # reused, not run again (NaN as text)


@pytest.mark.slow
def test_the_health_check_does_not_change_the_training(tiny_base, tmp_path):
    """Its rollouts and maskings come from a generator of their own: the same seed trains the same
    model whatever the number of held-out rollouts, and it does move (the first test's runs)."""
    final = []
    for h in ("2", "3"):
        out = str(tmp_path / h)
        experiments.run(parse(TINY + ["--base", tiny_base, "--out", out, "--held_out_per_prompt", h,
                                      "--r_offset", "0.5"]))             # c = 0.5: it moves
        final.append(load(os.path.join(out, "state.pt"))[0].state_dict())
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_maskings_mask_each_rollout_k_times_and_train_on_every_copy(tiny_base):
    """--maskings 3: a step's rollouts are masked 3 times each, independently, and the loss is the mean over
    the copies (dtm_loss of the rollouts repeated); c4k4 is c4's compute as 4 maskings of 64 rollouts."""
    args = parse(["--maskings", "3", "--base", tiny_base])
    v = experiments.Variant(args)
    comp = torch.randint(5, (2, 2, 64), generator=torch.Generator().manual_seed(1))
    x1 = dtm.with_prompts(env.make_prompts(env.make_maze())[:2], comp).flatten(0, 1)
    x_t, mask, tw = v.masked_states(x1, None, torch.Generator().manual_seed(0), 64)
    assert x_t.shape == (12, 67) and torch.equal(torch.where(mask, x1.repeat(3, 1), x_t), x1.repeat(3, 1))
    assert not torch.equal(mask[:4], mask[4:8])                               # masked afresh each time
    g = torch.Generator().manual_seed(2)
    logits, teacher = torch.randn(int(mask.sum()), 9, generator=g), torch.randn(int(mask.sum()), 9, generator=g)
    r, group = torch.tensor([0.0, 1.0, 0.5, 2.0]), torch.tensor([0, 0, 1, 1])
    loss = v.loss(logits, teacher, x1, mask, r, tw, 0.1, group, None)
    assert loss == dtm.dtm_loss(logits, teacher, x1.repeat(3, 1), mask, r.repeat(3) + args.r_offset, tw, 0.1, 1.0,
                                group.repeat(3))
    c4, c4k4 = dict(experiments.BUDGET)["c4"], dict(experiments.BUDGET)["c4k4"]
    assert c4["batch"] == c4k4["maskings"] * args.batch and c4["rollouts_per_prompt"] == c4k4["rollouts_per_prompt"]


@pytest.mark.parametrize("flags, message", [(["--maskings", "0"], "--maskings must be >= 1"),
                                           (["--maskings", "2", "--states", "path"], "--maskings must be >= 1"),
                                           (["--noise_batches", "1"], "--noise_batches must be >= 2")])
def test_maskings_and_the_noise_study_refuse_bad_counts_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse(flags)
    assert message in capsys.readouterr().err


def test_complete_fills_every_masked_position_and_keeps_every_revealed_one(tiny_base):
    model, prompts = load(tiny_base)[0], env.make_prompts(env.make_maze())[:2]
    x1 = dtm.with_prompts(prompts, sample(model, prompts, steps=4)[:, None])[:, 0]       # (2, 67) rollouts
    x_t, mask, _ = mask_completions(x1.repeat(3, 1), torch.Generator().manual_seed(1))
    x = noise.complete(model, x_t, generator=torch.Generator().manual_seed(2))
    assert not (x == env.MASK).any() and torch.equal(x[~mask], x_t[~mask])
    assert torch.equal(noise.complete(model, x1), x1)                   # nothing masked: nothing to do


def test_the_per_position_coefficient_is_the_u_squared_weighted_mean_of_e_to_the_eta_r():
    """One masked position, p_a = (0.75, 0.25), two completions with tokens 0 and 1 and e = 1 and 2:
    |u|^2 = 0.125 and 1.125, so phi_i = (1 * 0.125 + 2 * 1.125) / 1.25 = 1.9; the state baseline is 1.5."""
    mask = torch.tensor([[False, True]])
    x1k = torch.tensor([[[1, 0]], [[1, 1]]])                                  # (K = 2, B = 1, T = 2)
    phi, phi_i = noise.state_coefficients(torch.tensor([[0.75, 0.25]], dtype=torch.float64), mask, x1k,
                                                torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    torch.testing.assert_close(phi, torch.tensor([1.5], dtype=torch.float64))
    torch.testing.assert_close(phi_i, torch.tensor([[1.0, 1.9]], dtype=torch.float64))


def test_noise_with_equal_rewards_the_state_coefficients_cancel_the_gradient_at_the_teacher(tiny_base, tmp_path):
    """Every rollout of the random tiny base is invalid, so r + c = -0.5 for all (c = 0.5): the state
    coefficients are e^{-0.05} exactly, the NLL weights (e^{eta (r + c)} - phi) / Z vanish, and at the teacher
    the distillation gradient is 0 (to float32 round-off); phi = 1 leaves the NLL weight e^{-0.05} - 1, a gradient
    that varies, and the halfway blends half of it, so a quarter of its noise."""
    rows = experiments.main(["noise"] + TINY + FAST + ["--base", tiny_base, "--out", str(tmp_path), "--r_offset", "0.5",
                                                    "--noise_batches", "3", "--completions", "2"])
    of = {r["coefficient"]: r["noise"] for r in rows}
    one = of["phi = 1 (the paper's)"]
    assert one > 1e-4
    assert of["phi = E_a[e^{eta r} | x_t]"] < 1e-12 and of["phi_i(x_t), per position"] < 1e-12
    for blend in ("phi = (1 + E_a[e^{eta r} | x_t]) / 2", "phi = (1 + phi_i(x_t)) / 2"):
        assert of[blend] == pytest.approx(one / 4, rel=1e-4)
    assert os.path.isfile(os.path.join(tmp_path, "noise.md"))
