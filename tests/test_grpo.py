"""grpo.py, diffu-GRPO (d1) on the maze: the surrogate, the advantage, the loss, the oracle's path
log-likelihood, and where the KL-regularised objective and d1's loss have their optima."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import grpo
from maze import env, exact
from maze.mdm import MDM, PROMPT_LEN, Config, sample


def tiny_model(L=4):
    torch.manual_seed(0)
    return MDM(Config(gen_len=L, n_layer=1, n_head=2, d_model=32)).eval()


def test_mean_field_surrogate_equals_a_hand_computation():
    """d1's log q(o_k): the completion all masked, the prompt kept (p_mask_prompt = 0 here), one forward
    pass, log-softmax at each completion token's drawn value."""
    model = tiny_model()
    x1 = torch.tensor([[5, 9, env.SEP, 7, 8, 3, env.PAD], [1, 2, env.SEP, 4, 4, 6, 0]])
    x_in, where, weight = grpo.mean_field_states(x1, 0.0, torch.Generator().manual_seed(0))
    got = grpo.token_logp(model, x_in, where, x1).view(2, 4)
    for b in range(2):
        hand_in = torch.tensor([x1[b, :3].tolist() + [env.MASK] * 4])
        full = torch.zeros(1, 7, dtype=torch.bool)
        full[0, 3:] = True
        with torch.no_grad():
            logits = model(hand_in, full)                                  # (4, V)
        for k in range(4):
            z = logits[k]
            want = z[x1[b, 3 + k]] - torch.logsumexp(z, 0)
            assert got[b, k].item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.equal(weight, torch.full((2,), 0.25))


def test_mean_field_masks_every_completion_token_and_a_share_p_of_the_prompt():
    x1 = torch.zeros(20_000, PROMPT_LEN + 6, dtype=torch.long)
    x_in, where, _ = grpo.mean_field_states(x1, 0.15, torch.Generator().manual_seed(1))
    assert (x_in[:, PROMPT_LEN:] == env.MASK).all() and where[:, PROMPT_LEN:].all() and not where[:, :PROMPT_LEN].any()
    assert (x_in[:, :PROMPT_LEN] == env.MASK).float().mean().item() == pytest.approx(0.15, abs=0.005)


def test_group_advantage_has_mean_zero_per_group_and_std_one_when_divided():
    r = torch.tensor([[1.0, 0.0, -1.0, 0.5], [2.0, 2.0, 2.0, 2.0], [0.3, -1.0, 0.3, 0.1]])
    A = grpo.group_advantage(r)
    assert torch.allclose(A.mean(1), torch.zeros(3), atol=1e-7)
    assert torch.allclose(A, r - r.mean(1, keepdim=True))               # d1's: not divided by the std
    S = grpo.group_advantage(r, std=True)
    assert torch.allclose(S.mean(1), torch.zeros(3), atol=1e-7)
    assert torch.allclose(S[[0, 2]].std(1), torch.ones(2), atol=1e-6)
    assert torch.equal(S[1], torch.zeros(4))                             # a group with one reward: no signal


def test_grpo_loss_equals_a_hand_computation_with_the_clip_and_the_k3_estimator():
    """Two sequences of one token each: rho = 0.5 / 0.25 = 2, clipped to 1 + eps = 1.5.
    A = +1: -min(2, 1.5) = -1.5;  A = -1: -min(-2, -1.5) = 2.  k3 at ref = log 0.25, logp = log 0.5:
    d = log 0.5, e^d - d - 1 = 0.5 + log 2 - 1. Loss = mean of (policy + beta k3) with beta 0.1."""
    logp = torch.log(torch.tensor([0.5, 0.5], requires_grad=True))
    old = ref = torch.log(torch.tensor([0.25, 0.25]))
    loss, kl = grpo.grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), torch.tensor([0, 1]), torch.ones(2),
                              eps=0.5, beta=0.1)
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(((-1.5 + 0.1 * k3) + (2.0 + 0.1 * k3)) / 2, abs=1e-6)
    assert kl.item() == pytest.approx(k3, abs=1e-6)


def test_grpo_loss_at_ratio_one_is_minus_the_advantage_weighted_log_likelihood():
    """mu = 1: the ratio is 1 in value, and the gradient of the policy term is -A grad log q / L per token."""
    theta = torch.randn(6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    logp = F.log_softmax(theta, 0)[torch.tensor([0, 1, 2, 3])]
    A, seq, w = torch.tensor([0.7, -0.2]), torch.tensor([0, 0, 1, 1]), torch.full((2,), 0.5)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), logp.detach(), A, seq, w, eps=0.2, beta=0.0)
    (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
    want = -(w[seq] * A[seq] * logp).sum() / 2
    (g_want,) = torch.autograd.grad(want, theta)
    assert torch.allclose(g, g_want, atol=1e-7)


def test_path_states_are_the_sampled_paths_own_states_and_sum_to_its_log_likelihood():
    """The oracle: at each state it returns, the positions revealed next and their log p_theta are those of
    the sampler's path, so weight * sum, averaged over the states, estimates log p(path) / L without bias."""
    L = 4
    model = tiny_model(L)
    prompts = torch.tensor([[5, 9], [1, 2]])
    comp, rank = sample(model, prompts, steps=L, generator=torch.Generator().manual_seed(3), return_rank=True)
    x1 = torch.cat([prompts, torch.full((2, 1), env.SEP), comp], 1)
    exact = torch.zeros(2)                                                 # replay: sum_k log p(x^{i_k} | x_{t_k})
    for k in range(L):
        x_t = x1.clone()
        x_t[:, PROMPT_LEN:][rank >= k] = env.MASK
        nxt = torch.zeros_like(x1, dtype=torch.bool)
        nxt[:, PROMPT_LEN:] = rank == k
        with torch.no_grad():
            exact += grpo.token_logp(model, x_t, nxt, x1)
    x_in, where, weight = grpo.path_states(x1, rank, 200, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = grpo.token_logp(model, x_in, where, x1.repeat(200, 1))
    assert torch.equal(where.sum(1), torch.ones(400, dtype=torch.long))   # one token per step here
    assert torch.allclose(weight, torch.full((400,), L / (200 * L)))
    seen = set()
    for j in range(400):                                                   # each state is its path's own
        b, k = j % 2, int((x_in[j, PROMPT_LEN:] != env.MASK).sum())
        seen.add((b, k))
        x_t = x1[b].clone()
        x_t[PROMPT_LEN:][rank[b] >= k] = env.MASK
        assert torch.equal(x_in[j], x_t) and where[j, PROMPT_LEN:].nonzero().item() == (rank[b] == k).nonzero().item()
    assert len(seen) == 2 * L
    per_k = {}                                                             # the estimate over all k = the replay
    for j in range(400):
        per_k[(j % 2, int((x_in[j, PROMPT_LEN:] != env.MASK).sum()))] = lp[j].item()
    for b in range(2):
        assert sum(per_k[(b, k)] for k in range(L)) == pytest.approx(exact[b].item(), abs=1e-5)
    x_all, w_all, weight_all = grpo.all_path_states(x1, rank)             # every state at once: the replay
    with torch.no_grad():
        lp_all = grpo.token_logp(model, x_all, w_all, x1.repeat(L, 1))
    per_seq = torch.zeros(2 * L).index_add(0, w_all.nonzero()[:, 0], lp_all) * weight_all
    assert torch.allclose(per_seq.view(L, 2).sum(0), exact / L, atol=1e-6)


def bandit(beta=0.5):
    """One token, four values: log q is exact (L = 1, nothing to mask but the completion), so d1's
    surrogate is the likelihood and GRPO is exact policy-gradient RL."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    r = torch.tensor([0.0, 0.3, -0.2, 0.4], dtype=torch.float64)
    tilt = p * torch.exp(r / beta)
    return p, r, tilt / tilt.sum(), beta


def test_kl_regularised_optimum_with_the_exact_likelihood_is_the_tilt():
    """max_q E_q[r] - beta KL(q || p): gradient ascent on the exact objective from q = p ends at the tilt
    p e^{r / beta} / Z, whose gradient is zero: the target DTM anneals to at a = 1 / beta."""
    p, r, tilt, beta = bandit()
    theta = p.log().clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=0.5)
    for _ in range(3000):
        q = F.softmax(theta, 0)
        J = (q * r).sum() - beta * (q * (q.log() - p.log())).sum()
        opt.zero_grad()
        (-J).backward()
        opt.step()
    assert torch.allclose(F.softmax(theta, 0), tilt, atol=1e-8)
    # grpo.run measures d1 against maze/exact.py's tilt at a = 1 / beta: on 10 equal-weight samples that are p
    # exactly (4, 3, 2, 1 of each value), its tilted mean reward is the optimum's
    samples = torch.repeat_interleave(r, torch.tensor([4, 3, 2, 1]))[None].numpy()
    at = exact.tilted_means(samples, samples > -1, 1.0 / beta)
    assert at["reward"] == pytest.approx((F.softmax(theta, 0) * r).sum().item(), abs=1e-8)
    assert at["reward"] > (p * r).sum().item() + 0.02                       # ...and it is not the base's


def expected_grpo_gradient(theta, p, r, beta):
    """E_{x ~ q}[grad of d1's loss at x] on the bandit, enumerated: on-policy (mu = 1, ratio 1), the
    group mean taken over q (an infinite group), the reference p."""
    q = F.softmax(theta, 0).detach()
    logp = F.log_softmax(theta, 0)
    A = r - (q * r).sum()
    V = len(p)
    per, _ = grpo.grpo_loss(logp, logp.detach(), p.log(), A, torch.arange(V), q * V, eps=0.2, beta=beta)
    return torch.autograd.grad(per, theta)[0]                            # sum_x q(x) grad loss(x)


def test_d1_loss_with_the_exact_likelihood_has_its_fixed_point_off_the_tilt():
    """d1's KL term, e^{ref - logp} - (ref - logp) - 1 at q's own tokens, has the gradient of KL(p || q) as a loss.
    With the exact likelihood its fixed point solves q (r - E_q r) = beta (q - p), q = p / (1 - (r - E_q r) / beta),
    not the tilt: the two agree to first order in r / beta only."""
    p, r, tilt, beta = bandit()
    fixed = torch.as_tensor(grpo.k3_fixed_point(r.numpy(), beta, p.numpy()))
    m = (fixed * r).sum()
    assert torch.allclose(fixed, p / (1 - (r - m) / beta), atol=1e-12)   # self-consistent
    assert expected_grpo_gradient(fixed.log().clone().requires_grad_(True), p, r, beta).abs().max() < 1e-10
    assert expected_grpo_gradient(tilt.log().clone().requires_grad_(True), p, r, beta).abs().max() > 1e-3
    assert (fixed - tilt).abs().max() > 0.01                               # a different law: 1 / (1 - x) > e^x


def test_grpo_cli_measures_each_budget_against_the_exact_tilt(tiny_base, tmp_path):
    out = str(tmp_path / "g")
    args = grpo.parse(["--base", tiny_base, "--out", out, "--G", "2", "--rollouts", "16", "--seconds", "0.01",
                       "--mu", "2", "--end_rollouts_per_prompt", "3", "--reference_per_prompt", "4"])
    args.sample_steps = 4
    history, log = grpo.run(args)
    assert [h["budget"] for h in history] == ["rollouts", "seconds"] and log[-1]["rollouts"] == 16
    assert history[0]["rollouts"] == 16 and history[1]["rollouts"] == 16     # one iteration met both
    for h in history:
        assert h["a"] == 1.0 and h["n"] == 3 * 8 and 0 <= h["validity"] <= 1 and "realised_validity" in h
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["history"][0]["exact_validity"] == history[0]["exact_validity"]
    assert os.path.isfile(os.path.join(out, "model.pt"))


def test_grpo_oracle_runs_on_the_paths_states(tiny_base, tmp_path):
    args = grpo.parse(["--base", tiny_base, "--out", str(tmp_path / "p"), "--G", "2", "--rollouts", "16",
                       "--mu", "1", "--logp", "path", "--end_rollouts_per_prompt", "2", "--reference_per_prompt", "4"])
    args.sample_steps = 4
    history, log = grpo.run(args)
    assert len(log) == 1 and log[0]["kl"] == pytest.approx(0.0, abs=1e-12)   # ratio 1 and the policy = reference
    assert history[0]["n"] == 16


@pytest.mark.parametrize("argv, message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--G", "1"], "--G must be >= 2"),
    (["--rollouts", "0"], "give a budget"),
])
def test_grpo_bad_input_gives_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        grpo.parse(argv)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_rl_report_puts_dtm_and_grpo_runs_in_one_table_at_equal_rollouts_and_seconds(tiny_base, tmp_path, capsys):
    import dtm
    from lab import rl_report
    from test_dtm_cli import TINY, parse
    dtm.run(parse(TINY + ["--base", tiny_base, "--out", str(tmp_path / "d"), "--figures", str(tmp_path / "f")]))
    args = grpo.parse(["--base", tiny_base, "--out", str(tmp_path / "g"), "--G", "2", "--rollouts", "16", "--mu", "1",
                       "--seconds", "0.01", "--end_rollouts_per_prompt", "2", "--reference_per_prompt", "4"])
    args.sample_steps = 4
    grpo.run(args)
    png = str(tmp_path / "rl.png")
    rl_report.main(["--dtm", "DTM", str(tmp_path / "d"), "--grpo", "d1", str(tmp_path / "g"), "--figure", png])
    out = capsys.readouterr().out
    assert "| DTM | 1 |" in out and "| d1, at equal rollouts | 1 |" in out and "| d1, at equal seconds | 1 |" in out
    assert "| 16 |" in out                                   # grpo's training rollouts
    assert "fixed point" in out and os.path.getsize(png) > 10_000


def test_gradient_check_compares_the_surrogate_and_the_oracle_with_the_exact_path_gradient(tiny_base, monkeypatch):
    real = grpo.rollouts

    def varied(*a, **k):                                  # the random tiny base finds no valid path: vary r
        x1, r, valid, rank = real(*a, **k)
        return x1, torch.rand(r.shape, generator=torch.Generator().manual_seed(r.numel())), valid, rank
    monkeypatch.setattr(grpo, "rollouts", varied)
    args = grpo.parse(["--base", tiny_base, "--G", "2", "--gradient_check", "2"])
    args.sample_steps = 4
    out = grpo.gradient_check(args, 2)
    assert all(-1 <= out[k] <= 1 for k in ("cos_surrogate_exact", "cos_oracle_exact", "cos_exact_between_batches"))
    assert out["norm_exact"] > 0 and out["norm_surrogate"] > 0 and out["norm_oracle"] > 0
    # the oracle is an unbiased estimate of the exact path gradient (path_states' weight S / (m L)): with 64
    # states of each 4-step path it points where the exact one does and has its length (measured: cos 0.984,
    # norms 0.136 / 0.134), where 2 states do not yet (cos 0.619, norms 0.19 / 0.129)
    args.path_states = 64
    many = grpo.gradient_check(args, 2)
    assert many["cos_oracle_exact"] > 0.95 and many["cos_oracle_exact"] > out["cos_oracle_exact"]
    assert many["norm_oracle"] / many["norm_exact"] == pytest.approx(1.0, abs=0.1)
