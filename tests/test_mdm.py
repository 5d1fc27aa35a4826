"""The tiny maze MDM's forward process and diagnostics (maze/mdm.py), against their closed forms."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from maze import env
from maze.mdm import (MDM, PROMPT_LEN, Config, elbo_loss, mask_along_path, mask_completions, sample,
                      self_consistency_gap)


def test_mask_completions_masks_half_the_completion_on_average_and_never_the_prompt():
    """t ~ U(0, 1) and each completion token is masked with probability 1 - t: E[mask rate] = 1/2."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.zeros(100_000, PROMPT_LEN + 8, dtype=torch.long)
    x_t, mask, hazard = mask_completions(x1, g)
    assert not mask[:, :PROMPT_LEN].any()
    assert mask[:, PROMPT_LEN:].float().mean().item() == pytest.approx(0.5, abs=0.002)
    assert ((x_t == env.MASK) == mask).all()
    t = 1 - 1 / hazard                                                  # hazard = 1 / (1 - t)
    assert t.min() >= 0 and t.max() < 1
    assert torch.sort(t).values[:: 10_000].tolist() == pytest.approx([k / 10 for k in range(10)], abs=1e-3)


@pytest.mark.parametrize("n", range(3, 9))
def test_hazard_weight_given_n_masks_averages_L_plus_1_over_n(n):
    """Given n of L tokens masked, 1 - t ~ Beta(n + 1, L - n + 1), so E[1 / (1 - t) | n] = (L + 1) / n:
    the ELBO's hazard weight lambda(t) / L has the mean (L + 1) / (L n) of the released code's 1/n
    form. (n = 1, 2 have a heavy-tailed 1 / (1 - t), not checked by sampling.)"""
    L = 8
    g = torch.Generator().manual_seed(n)
    x1 = torch.zeros(400_000, PROMPT_LEN + L, dtype=torch.long)
    _, mask, hazard = mask_completions(x1, g)
    h = hazard[mask.sum(1) == n].double()
    assert len(h) > 20_000
    assert h.mean().item() == pytest.approx((L + 1) / n, rel=4 * h.std().item() / math.sqrt(len(h)) / ((L + 1) / n) + 1e-3)


def test_self_consistency_gap_is_cross_entropy_minus_entropy_at_the_masked_tokens():
    torch.manual_seed(0)
    model = MDM(Config(n_layer=1, n_head=2, d_model=32)).eval()
    prompts = torch.tensor(env.make_prompts(env.make_maze())).repeat(4, 1)
    x1 = torch.cat([prompts, torch.full((32, 1), env.SEP), torch.randint(env.N_CELLS, (32, 64))], 1)
    got = self_consistency_gap(model, x1, torch.Generator().manual_seed(5))
    x_t, mask, _ = mask_completions(x1, torch.Generator().manual_seed(5))    # the same masking
    with torch.no_grad():
        logp = F.log_softmax(model(x_t, mask), -1)
    ce = -logp.gather(1, x1[mask][:, None]).mean().item()
    ent = -(logp.exp() * logp).sum(-1).mean().item()
    assert got["ce"] == pytest.approx(ce, rel=1e-5) and got["entropy"] == pytest.approx(ent, rel=1e-5)
    assert got["gap"] == pytest.approx(ce - ent, rel=1e-4) and got["gap_se"] > 0


class Recorder(torch.nn.Module):
    """Wraps a model and records the state x and the positions it is asked for, at each sampler call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, x, where):
        self.calls.append((x.clone(), where.clone()))
        return self.model(x, where)


@pytest.mark.parametrize("steps, counts", [(4, [8, 8, 8, 8]), (5, [7, 7, 6, 6, 6]), (32, [1] * 32)])
def test_sampler_reveals_an_even_share_per_step_remainder_first(steps, counts):
    spy = Recorder(MDM(Config(n_layer=1, n_head=2, d_model=32, gen_len=32)))
    prompts = torch.tensor(env.make_prompts(env.make_maze())[:3])
    sample(spy, prompts, steps, 1.0, "random", torch.Generator().manual_seed(0))
    left = [32 - sum(counts[:k]) for k in range(steps)]        # masked before each step
    assert [(x == env.MASK).sum(1).tolist() for x, _ in spy.calls] == [[n] * 3 for n in left]


@pytest.mark.parametrize("steps", [16, 5])
def test_mask_along_path_rebuilds_the_samplers_own_states(steps):
    """x_t and `next` from a rollout's reveal steps are exactly the state the sampler was in before
    step k and the positions it revealed from there, for every k."""
    torch.manual_seed(0)
    spy = Recorder(MDM(Config(n_layer=1, n_head=2, d_model=32, gen_len=16)).eval())
    prompts = torch.tensor(env.make_prompts(env.make_maze())[:3])
    x, rank = sample(spy, prompts, steps, 1.0, "random", torch.Generator().manual_seed(1), return_rank=True)
    assert len(spy.calls) == steps and sorted(set(rank.flatten().tolist())) == list(range(steps))
    x1 = torch.cat([prompts, torch.full((3, 1), env.SEP), x], 1)
    g, seen = torch.Generator().manual_seed(2), set()
    for _ in range(200):
        x_t, nxt, S = mask_along_path(x1, rank, g)
        assert (S == steps).all()
        for b in range(3):
            k = int(rank[b][nxt[b, PROMPT_LEN:]].unique())             # the step this state is before
            state, where = spy.calls[k]
            assert torch.equal(x_t[b], state[b]) and torch.equal(nxt[b], where[b])
            seen.add(k)
    assert seen == set(range(steps))


def test_a_models_conditionals_are_its_own_posteriors_at_the_samplers_states_not_at_random_masks():
    """A random network with sharp conditionals is far from self-consistent: on its own rollouts,
    re-masked at random, the rollout's token is much more surprising than its conditional's entropy
    (gap 7.2 nats measured). At the states its sampler passed through, the revealed token was drawn
    from that very conditional, so the gap is 0 in expectation, whatever the model."""
    torch.manual_seed(0)
    model = MDM(Config(n_layer=1, n_head=2, d_model=32, gen_len=16)).eval()
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() > 1:
                w.mul_(30)                                             # sharp, inconsistent conditionals
    prompts = torch.tensor(env.make_prompts(env.make_maze())).repeat(256, 1)
    x, rank = sample(model, prompts, None, 1.0, "random", torch.Generator().manual_seed(1), return_rank=True)
    x1 = torch.cat([prompts, torch.full((len(x), 1), env.SEP), x], 1)
    forward = self_consistency_gap(model, x1, torch.Generator().manual_seed(2))
    path = self_consistency_gap(model, x1, torch.Generator().manual_seed(2), rank=rank)
    assert forward["gap"] > 20 * forward["gap_se"] and forward["gap"] > 1.0
    assert abs(path["gap"]) < 4 * path["gap_se"] and path["gap_se"] < 0.1


def test_refit_script_still_fine_tunes_and_scores_the_base():
    """lab/refit.py (the findings' refit table) against the current API: one ELBO step on the base's
    own resampled rollouts, then one rollout per prompt, scored (8 prompts, equal weights: ESS 8). It reads
    the reference file it names (the committed base's at dtm.py's defaults), not whichever a glob finds first."""
    from lab import refit
    assert os.path.basename(refit.reference_path(refit.BASE, 2048)) == "base_reference_32ab4574.npz"
    (m,) = refit.main(1, 1e-4, ["0"], rollouts_per_prompt=1)
    assert m["ess"] == pytest.approx(8.0) and 0 <= m["validity"] <= 1 and -1 <= m["reward"] <= 1


def test_elbo_loss_is_the_hazard_weighted_masked_nll_per_completion_token():
    """Eq. 5 by hand: (1 / (B L)) sum_b lambda_b sum_{i masked in b} -log p(x1^i | x_t, i)."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 4, 6
    x1 = torch.randint(V, (B, PROMPT_LEN + L), generator=g)
    mask = torch.zeros(B, PROMPT_LEN + L, dtype=torch.bool)
    mask[0, PROMPT_LEN] = mask[1, PROMPT_LEN:] = mask[2, -2:] = True
    logits = torch.randn(int(mask.sum()), V, generator=g, dtype=torch.float64)
    hazard = torch.tensor([1.5, 4.0, 2.0], dtype=torch.float64)
    logp, k, hand = torch.log_softmax(logits, -1), 0, 0.0
    for b in range(B):
        for i in mask[b].nonzero()[:, 0].tolist():
            hand += hazard[b] * -logp[k, x1[b, i]]
            k += 1
    torch.testing.assert_close(elbo_loss(logits, x1, mask, hazard), hand / (B * L), rtol=1e-12, atol=0)
