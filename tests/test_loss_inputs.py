"""What reaches dtm_loss from the training loops: the rewards and their offset, the groups that share a Z, log Z,
the tilted draw's weights and the control's shuffle, checked against what the loops' docstrings promise.

The tiny random bases draw only invalid rollouts, so their rewards are constant and Z and the offsets cannot
show. Here the rewards are a made-up function of each completion that varies within and across prompts, and
a spy records every call of the loss; the checks rebuild each input from the batch itself (its tokens, the
buffer), not from the code under test.
"""

import numpy as np
import pytest
import torch

import dtm
import llada_finetune as lf
from lab import experiments
from maze import env
from maze.mdm import PROMPT_LEN
from test_dtm_cli import FAST, TINY
from test_llada_finetune import train_args

ETA = 0.1                                                      # TINY's eta: a = 0, 0.1, 0.2


# ----------------------------------------------------------------------------- the maze: dtm.run and its variants
def made_up_reward(completions):
    """A reward in {-1, -0.75, ..., 1} of each completion (..., L): -1 (env's invalid reward) for some."""
    c = torch.as_tensor(np.asarray(completions))
    return ((c.sum(-1) % 9).double() / 4 - 1).float()


class MazeSpy:
    """Patches dtm (and lab.experiments) so that rollouts score with `made_up_reward`, records every call of
    dtm_loss (its arguments, the buffer at that moment), and passes it on to the real loss."""

    def __init__(self, monkeypatch):
        self.calls, self.buffer = [], None
        real_rollouts, real_reference, real_split = dtm.rollouts, dtm.base_reference, dtm.split_buffer

        def rollouts(*a, **k):
            x1, _, _, revealed_at = real_rollouts(*a, **k)
            r = made_up_reward(x1[..., PROMPT_LEN:])
            return x1, r, r > env.INVALID_REWARD, revealed_at

        def base_reference(*a, **k):
            x, _, _ = real_reference(*a, **k)
            r = made_up_reward(x).numpy()
            return x, r, r > env.INVALID_REWARD

        def split_buffer(*a, **k):                                # the buffer the next steps draw from
            self.buffer, held = real_split(*a, **k)
            return self.buffer, held

        def loss(logits, teacher_logits, x1, mask, reward, time_weight, eta, phi, group=None, log_Z=None,
                 per_sequence=False):
            self.calls.append(dict(x1=x1, mask=mask, r=reward, tw=time_weight, eta=eta, phi=phi, group=group,
                                   log_Z=log_Z, per_sequence=per_sequence, buf_x1=self.buffer["x1"].clone(),
                                   buf_r=self.buffer["r"].clone()))
            return real_loss(logits, teacher_logits, x1, mask, reward, time_weight, eta, phi, group, log_Z,
                             per_sequence)
        real_loss = dtm.dtm_loss
        monkeypatch.setattr(dtm, "rollouts", rollouts)
        monkeypatch.setattr(dtm, "base_reference", base_reference)
        monkeypatch.setattr(dtm, "split_buffer", split_buffer)
        monkeypatch.setattr(dtm, "dtm_loss", loss)
        monkeypatch.setattr(experiments, "dtm_loss", loss)        # the variants' own reference to it

    def steps(self):
        return [c for c in self.calls if not c["per_sequence"]]

    def checks(self):
        return [c for c in self.calls if c["per_sequence"]]


def prompt_ids(x1):
    """The prompt of each row, read off its tokens: its index in env.make_prompts."""
    index = {tuple(p): k for k, p in enumerate(env.make_prompts(env.make_maze()))}
    return torch.tensor([index[tuple(row)] for row in x1[:, :2].tolist()])


def log_mean_exp_by(x, ids):
    """log mean_{b': ids_b' = ids_b} e^{x_b'} for every b, one group at a time (the slow, plain way)."""
    out = torch.empty(len(x), dtype=torch.float64)
    for g in ids.unique():
        rows = ids == g
        out[rows] = torch.log(torch.exp(x[rows].double()).mean())
    return out


def effective_log_Z(call):
    """The log Z the loss used: the caller's, or its own from the groups (dtm_loss's docstring)."""
    er = call["eta"] * call["r"].double()
    return call["log_Z"].double() if call["log_Z"] is not None else dtm.group_log_mean_exp(er, call["group"])


def run_maze(tiny_base, tmp_path, monkeypatch, flags=()):
    spy = MazeSpy(monkeypatch)
    argv = TINY + ["--base", tiny_base, "--out", str(tmp_path / "run"), *flags]
    if flags:                                                     # a lab variant: lab/experiments.py's parser
        args = experiments.parse(["run"] + argv + FAST)
        dtm.run(args, experiments.Variant(args))
    else:
        args = dtm.parse(argv)
        args.sample_steps = 4
        dtm.run(args)
    steps = spy.steps()
    assert len(steps) == 2 * 3                                   # 2 phases of 3 steps
    rewards = torch.cat([c["r"] for c in steps])
    assert len(rewards.unique()) > 3                              # the rewards do vary
    return spy, steps


def test_the_maze_loop_gives_the_loss_r_plus_offset_and_one_z_per_prompt(tiny_base, tmp_path, monkeypatch):
    """dtm.run (the paper's recipe): the rewards of the rollouts themselves plus r_offset = 1, so r >= 0;
    the group of each row is its prompt; the Z the loss uses is the mean of e^{eta r} over the minibatch's
    rows of that prompt; eta is the phase's step and phi the flag. The health check gets the same rewards
    and a Z per prompt over its whole held-out set."""
    spy, steps = run_maze(tiny_base, tmp_path, monkeypatch)
    for c in steps:
        ids = prompt_ids(c["x1"])
        assert torch.equal(c["r"], made_up_reward(c["x1"][:, PROMPT_LEN:]) + 1.0) and c["r"].min() >= 0
        assert c["group"] is not None and torch.equal(c["group"].cpu(), ids)
        per_prompt = log_mean_exp_by(c["eta"] * c["r"].double(), ids)
        torch.testing.assert_close(effective_log_Z(c), per_prompt, rtol=0, atol=1e-12)
        assert c["eta"] == pytest.approx(ETA) and c["phi"] == 1.0
        assert (torch.bincount(ids, minlength=8) == 2).all()      # stratified: batch 16 = 2 rows of each prompt
    some = [c for c in steps if len(c["r"][prompt_ids(c["x1"]) == 0].unique()) > 1]
    assert some                                                   # a prompt whose rows differ: Z can show
    checks = spy.checks()
    assert len(checks) == 2 * 2                                  # teacher and student, each phase
    for c in checks:
        ids = prompt_ids(c["x1"])
        assert torch.equal(c["r"], made_up_reward(c["x1"][:, PROMPT_LEN:]) + 1.0)
        torch.testing.assert_close(c["log_Z"].double(), log_mean_exp_by(c["eta"] * c["r"].double(), ids), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("variant", ["--control", "--shuffle_rewards", "--z buffer", "--centred",
                                     "--weighting released", "--weighting count", "--maskings 2"])
def test_each_maze_variant_gives_the_loss_what_its_flag_says(tiny_base, tmp_path, monkeypatch, variant):
    """lab/experiments.py's Variant, one flag at a time, against the flag's help text; what a flag does not
    change stays as dtm.run gives it (r + 1, the prompt as the group, Z per prompt over the minibatch)."""
    spy, steps = run_maze(tiny_base, tmp_path, monkeypatch, variant.split())
    for c in steps:
        x1, r, ids = c["x1"], c["r"], prompt_ids(c["x1"])
        scored = made_up_reward(x1[:, PROMPT_LEN:])
        n = c["mask"].sum(1).clamp_min(1).double()
        # the rewards
        if variant == "--weighting released":                    # r clipped at 0, no offset
            assert torch.equal(r, scored.clamp_min(0))
        elif variant == "--shuffle_rewards":                     # each prompt's buffer rewards, permuted
            buf_scored = made_up_reward(c["buf_x1"][..., PROMPT_LEN:])
            assert torch.equal(c["buf_r"].sort(1).values, buf_scored.sort(1).values)
            assert all((r[b] - 1.0) in c["buf_r"][ids[b]] for b in range(len(r)))
        else:
            assert torch.equal(r, scored + 1.0)
        # the groups and Z
        if variant == "--weighting released":                    # raw e^{eta r}: log Z = 0
            assert torch.equal(c["log_Z"], torch.zeros_like(r))
        else:
            assert torch.equal(c["group"].cpu(), ids)
            if variant == "--z buffer":                          # Z per prompt over the whole buffer
                buf_log_Z = torch.log(torch.exp(c["eta"] * (c["buf_r"].double() + 1.0)).mean(1))   # (P,)
                torch.testing.assert_close(effective_log_Z(c), buf_log_Z[ids], rtol=0, atol=1e-6)  # float32 there
            else:
                per_prompt = log_mean_exp_by(c["eta"] * r.double(), ids)
                atol = 1e-6 if variant == "--centred" else 1e-12                  # --centred: float32 there
                torch.testing.assert_close(effective_log_Z(c), per_prompt, rtol=0, atol=atol)
        # what the flag changes besides
        assert c["eta"] == (1e-6 if variant == "--control" else pytest.approx(ETA))   # --control: eta ~ 0, no tilt
        if variant == "--centred":                               # phi Z: a coefficient per prompt
            torch.testing.assert_close(c["phi"].double(), torch.exp(effective_log_Z(c)), rtol=1e-6, atol=0)
        if variant in ("--weighting released", "--weighting count"):                   # 1/n, not hazard / L
            torch.testing.assert_close(c["tw"].double(), 1 / n)
        if variant == "--maskings 2":                            # each rollout twice, masked afresh
            B = len(x1) // 2
            assert len(x1) == 32 and torch.equal(x1[:B], x1[B:]) and not torch.equal(c["mask"][:B], c["mask"][B:])
    if variant == "--shuffle_rewards":                           # ...and the permutation moved some
        assert any(not torch.equal(c["r"], made_up_reward(c["x1"][:, PROMPT_LEN:]) + 1.0) for c in steps)


# ----------------------------------------------------------------------------- LLaDA: Trainer.train_step and its flags
def llada_trainer(tiny, tmp_path, monkeypatch, flags):
    """The DTM trainer on the tiny LLaDA with a reward that varies within and across prompts (and is negative for
    some rollouts, so that the shift by the buffer's minimum shows), spies on Trainer.loss and on dtm_loss."""
    monkeypatch.setitem(lf.PROTOCOLS["ours"]["rewards"], "countdown", lambda text, item: float(len(text) % 7) - 2.5)
    (tmp_path / "run").mkdir()                                    # Trainer.run makes it; start_phase logs there
    args = lf.parse(train_args(tiny[0], str(tmp_path / "run"), "--buffer_prompts", "4", "--completions", "3",
                               "--held_out_prompts", "3", *flags))
    t = lf.make_trainer(args)
    seen = dict(steps=[], losses=[], multinomial=[])
    loss, real_loss, real_multinomial = t.loss, t.dtm_loss, torch.multinomial

    def spy_step(rows, eta, log_Z, r):
        seen["steps"].append(dict(rows=rows, eta=eta, log_Z=log_Z, r=r, buf_r=t.buffer["r"].clone(),
                                  idx=t.buffer["idx"].clone()))
        return loss(rows, eta, log_Z, r)

    def spy_loss(logits, teacher_logits, x1, mask, reward, time_weight, eta, phi, group=None, log_Z=None,
                 per_sequence=False):
        seen["losses"].append(dict(r=reward, log_Z=log_Z, tw=time_weight, mask=mask, per_sequence=per_sequence))
        return real_loss(logits, teacher_logits, x1, mask, reward, time_weight, eta, phi, group, log_Z, per_sequence)

    def spy_multinomial(weights, *a, **k):
        seen["multinomial"].append(weights.clone())
        return real_multinomial(weights, *a, **k)
    t.loss, t.dtm_loss = spy_step, spy_loss
    monkeypatch.setattr(torch, "multinomial", spy_multinomial)
    return t, seen


@pytest.mark.parametrize("flags", [[], ["--z", "buffer"], ["--weighting", "released"], ["--minibatch", "tilted"],
                                   ["--control"]], ids=lambda f: " ".join(f) or "--z prompt")
def test_the_llada_trainer_gives_the_loss_what_its_flags_say(tiny, tmp_path, monkeypatch, flags):
    """llada/trainer.py: Trainer.train_step's r and log Z, rebuilt from the buffer (its rewards and prompt ids):
    paper weighting: r - min(r) >= 0 over the buffer, Z per prompt (--z prompt) or pooled (--z buffer) over the
    whole buffer; released: r clipped at 0, log Z = 0; --minibatch tilted: rows drawn with weights e^{eta r} / Z
    per prompt, each given log Z = eta r; --control: the shifted rewards permuted over the buffer, and Z taken
    after. Each microbatch's dtm_loss gets exactly the rows' r and log Z. The health check's r and log Z likewise."""
    t, seen = llada_trainer(tiny, tmp_path, monkeypatch, flags)
    eta = t.a_grid[1] - t.a_grid[0]
    t.start_phase(eta)
    check = seen["losses"][:]                                     # the teacher's objective on the held-out set
    held_r = t.held["r"] - t.held["r"].min()
    assert torch.equal(torch.cat([c["r"] for c in check]), held_r) and held_r.min() == 0
    groups = torch.zeros_like(t.held["idx"]) if flags == ["--z", "buffer"] else t.held["idx"]   # as --z
    torch.testing.assert_close(torch.cat([c["log_Z"] for c in check]),
                               log_mean_exp_by(eta * held_r.double(), groups), rtol=0, atol=1e-12)
    seen["losses"].clear()
    for _ in range(2):
        t.train_step(eta)
    assert len(seen["steps"]) == len(seen["losses"]) == 2 * 2     # 2 steps of 2 microbatches
    for s, c in zip(seen["steps"], seen["losses"]):
        buf_r, idx, r, log_Z = s["buf_r"], s["idx"], s["r"], s["log_Z"]
        assert len(buf_r.unique()) > 2 and buf_r.min() < 0       # rewards that vary, some below 0
        shifted = buf_r - buf_r.min()
        if flags == ["--weighting", "released"]:
            assert torch.equal(r, buf_r.clamp_min(0)) and torch.equal(log_Z, torch.zeros_like(log_Z))
            torch.testing.assert_close(c["tw"], 1.0 / c["mask"].sum(1).clamp_min(1).float())
        elif flags == ["--control"]:
            assert torch.equal(r.sort().values, shifted.sort().values) and not torch.equal(r, shifted)
            torch.testing.assert_close(log_Z, log_mean_exp_by(eta * r.double(), idx), rtol=0, atol=1e-12)
        else:
            assert torch.equal(r, shifted) and r.min() == 0
            per_prompt = log_mean_exp_by(eta * r.double(), idx)
            if flags == ["--z", "buffer"]:
                pooled = torch.log(torch.exp(eta * r.double()).mean())
                torch.testing.assert_close(log_Z, pooled.expand(len(r)), rtol=0, atol=1e-12)
            elif flags == ["--minibatch", "tilted"]:
                torch.testing.assert_close(log_Z, eta * r.double(), rtol=0, atol=0)
            else:
                torch.testing.assert_close(log_Z, per_prompt, rtol=0, atol=1e-12)
            assert len(idx.unique()) > 1 and (per_prompt - per_prompt[0]).abs().max() > 1e-3   # pooled != per prompt
        assert torch.equal(c["r"], r[s["rows"]]) and torch.equal(c["log_Z"], log_Z[s["rows"]])
    if flags == ["--minibatch", "tilted"]:
        r = seen["steps"][0]["r"]
        want = torch.exp(eta * r.double() - log_mean_exp_by(eta * r.double(), seen["steps"][0]["idx"]))
        assert len(seen["multinomial"]) == 4
        torch.testing.assert_close(seen["multinomial"][0], want, rtol=1e-12, atol=0)
        assert seen["multinomial"][0].mean().item() == pytest.approx(1.0)   # e^{eta r} / Z averages to 1
