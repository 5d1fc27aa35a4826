"""The DTM loss against exact answers: a tabular p_a over all V^L sequences, every masked state enumerated.

Notation as in dtm.py and the paper §3: x1 ~ p_a, x_t = x1 with a subset of positions masked, i a masked position.
"""
import itertools
import math

import pytest
import torch

from dtm import dtm_loss, group_log_mean_exp, phase_kl
from maze.mdm import PROMPT_LEN, elbo_loss

V, L = 3, 3
MASK = V                                         # the mask token of the toy problem


def toy(seed=0):
    """p_a over the 27 sequences of V^L, a reward, and every (x1, mask pattern) pair."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))          # (27, L)
    p_a = torch.rand(len(seqs), generator=g, dtype=torch.float64) + 0.1
    p_a /= p_a.sum()
    r = torch.rand(len(seqs), generator=g, dtype=torch.float64) * 2 - 0.5    # some rewards < 0
    patterns = torch.tensor(list(itertools.product([False, True], repeat=L)))  # (8, L)
    return seqs, p_a, r, patterns


def posterior(seqs, weight, x_t, i):
    """sum_{x1 consistent with x_t} weight(x1) 1{x1^i = v} / sum weight, for v = 0..V-1."""
    keep = ((x_t == MASK) | (seqs == x_t)).all(1)
    num = torch.zeros(V, dtype=torch.float64).index_add(0, seqs[keep, i], weight[keep])
    return num / weight[keep].sum()


@pytest.mark.parametrize("phi", [0.0, 0.37, 1.0])
def test_weighted_mean_of_Y_phi_is_the_tilted_posterior(phi):
    """Prop. 3.1 + eq. 17: E_a[e^{eta r} Y_phi(v) | x_t] / E_a[e^{eta r} | x_t] = p_{a+eta}(v | x_t, i)."""
    seqs, p_a, r, patterns = toy()
    eta = 0.8
    tilt = torch.exp(eta * r)
    checked = 0
    for m in patterns:
        for x1 in seqs:
            x_t = torch.where(m, MASK, x1)
            keep = ((x_t == MASK) | (seqs == x_t)).all(1)                  # X1 consistent with x_t
            for i in torch.nonzero(m)[:, 0].tolist():
                p_a_post = posterior(seqs, p_a, x_t, i)
                onehot = torch.nn.functional.one_hot(seqs[keep, i], V).double()
                Y = onehot - phi * torch.exp(-eta * r[keep])[:, None] * (onehot - p_a_post)
                w = p_a[keep] * tilt[keep]
                mean_Y = (w[:, None] * Y).sum(0) / w.sum()
                exact = posterior(seqs, p_a * tilt, x_t, i)                # p_{a+eta} ∝ p_a e^{eta r}
                torch.testing.assert_close(mean_Y, exact, rtol=0, atol=1e-12)
                checked += 1
    assert checked == 27 * 12                    # 27 sequences x 12 (pattern, masked position) pairs


def batch_of_all_states(seqs, p_a, patterns):
    """Every (x1, mask pattern) as one batch; time_weight carries p_a(x1) * P(pattern) * B."""
    x1 = seqs.repeat_interleave(len(patterns), 0)
    mask = patterns.repeat(len(seqs), 1)
    prob = p_a.repeat_interleave(len(patterns)) / len(patterns)
    x_t = torch.where(mask, MASK, x1)
    state = (x_t * (V + 1) ** torch.arange(L)).sum(1)                      # id of x_t
    return x1, mask, x_t, state, prob * len(x1)


@pytest.mark.parametrize("phi", [0.0, 0.37, 1.0])
def test_the_gradient_of_dtm_loss_at_each_state_points_from_the_tilted_posterior(phi):
    """Prop. 3.1 through the code: with free student logits q per (x_t, i) and the batch of every (x1, mask)
    weighted by p_a, the gradient of dtm_loss at (x_t, i) is C (softmax(q) - E_w[Y_phi]), C = (1/B) sum_b
    tw_b e^{eta r_b} over the rows at x_t (the CE gradient, sum_v Y_phi(v) = 1). So softmax(q) - grad / C is the
    weighted mean of Y_phi, and by Prop. 3.1 it is the tilted posterior p_{a+eta}(. | x_t, i), exactly."""
    seqs, p_a, r, patterns = toy()
    eta = 0.8
    x1, mask, x_t, state, tw = batch_of_all_states(seqs, p_a, patterns)
    r_b = r.repeat_interleave(len(patterns))
    where = mask.nonzero()
    b_of, i_of = where[:, 0], where[:, 1]
    teacher = torch.stack([posterior(seqs, p_a, x_t[b], i).log() for b, i in where.tolist()])
    exact = torch.stack([posterior(seqs, p_a * torch.exp(eta * r), x_t[b], i) for b, i in where.tolist()])
    q = torch.randn((V + 1) ** L, L, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q.requires_grad_(True)
    loss = dtm_loss(q[state[b_of], i_of], teacher, x1, mask, r_b, tw, eta, phi, log_Z=torch.zeros_like(r_b))
    (grad,) = torch.autograd.grad(loss, q)
    C = torch.zeros((V + 1) ** L, dtype=torch.float64).index_add(0, state, tw * torch.exp(eta * r_b)) / len(x1)
    recovered = torch.softmax(q.detach(), -1)[state[b_of], i_of] - grad[state[b_of], i_of] / C[state[b_of], None]
    torch.testing.assert_close(recovered, exact, rtol=0, atol=1e-12)
    assert (exact - teacher.exp()).abs().max() > 0.05                     # ...not the teacher's posterior
    assert grad.abs().max() > 1e-3                                         # q is not the minimiser: a real gradient


@pytest.mark.parametrize("phi", [0.0, 1.0, "per position"])
def test_minimising_expected_dtm_loss_over_free_logits_recovers_tilted_posterior(phi):
    """Prop. 3.2: free logits per (x_t, i) that minimise E_a[dtm_loss] are log p_{a+eta}(. | x_t, i);
    "per position": also with a coefficient phi_i(x_t) of its own at every (x_t, i), in (0, 1.5) (eq. 15)."""
    seqs, p_a, r, patterns = toy(1)
    eta = 1.0
    x1, mask, x_t, state, tw = batch_of_all_states(seqs, p_a, patterns)
    if phi == "per position":                    # a function of x_t and i only: the same for every x1 behind x_t
        phi = (torch.rand((V + 1) ** L, L, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
               * 1.5)[state]
    r_b = r.repeat_interleave(len(patterns))
    n_states = (V + 1) ** L
    # the teacher's exact posterior at every masked position of every x_t, as logits
    teacher = torch.zeros(n_states, L, V, dtype=torch.float64)
    target = torch.zeros(n_states, L, V, dtype=torch.float64)
    for b in range(len(x1)):
        for i in torch.nonzero(mask[b])[:, 0].tolist():
            teacher[state[b], i] = posterior(seqs, p_a, x_t[b], i).log()
            target[state[b], i] = posterior(seqs, p_a * torch.exp(eta * r), x_t[b], i)
    where = mask.nonzero()
    teacher_logits = teacher[state[where[:, 0]], where[:, 1]]
    table = torch.zeros(n_states, L, V, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([table], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = table[state[where[:, 0]], where[:, 1]]
        # log Z = 0: Z is one constant here, and E_a needs the p_a-weighted mean, not the batch's
        loss = dtm_loss(logits, teacher_logits, x1, mask, r_b, tw, eta, phi, log_Z=torch.zeros_like(r_b))
        loss.backward()
        return loss

    opt.step(closure)
    learned = torch.softmax(table.detach()[state[where[:, 0]], where[:, 1]], -1)
    exact = target[state[where[:, 0]], where[:, 1]]
    torch.testing.assert_close(learned, exact, rtol=0, atol=1e-6)
    assert (exact - torch.softmax(teacher_logits, -1)).abs().max() > 0.05  # the tilt moved it


def test_the_most_a_phase_can_lower_its_objective_is_the_kl_of_the_tilt_per_token():
    """Prop. 3.4 with equality: with exact posteriors (a self-consistent teacher) and the ELBO's hazard time
    weight, the phase objective falls from the teacher to the tilted posteriors by exactly
    KL(p_{a+eta} || p_a) / L, the bound `phase_kl` estimates from rollouts (here: exact on equal-weight ones)."""
    seqs, p_a, r, patterns = toy(2)
    eta = 0.8
    x1, mask, x_t, state, _ = batch_of_all_states(seqs, p_a, patterns)
    m = mask.sum(1)
    # P(this pattern | t) lambda(t) / L integrated over t ~ U(0, 1): int (1-t)^{m-1} t^{L-m} dt / L
    hazard = torch.tensor([math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L) / L if k else 0.0
                           for k in m.tolist()], dtype=torch.float64)
    tw = p_a.repeat_interleave(len(patterns)) * hazard * len(x1)
    r_b, tilt = r.repeat_interleave(len(patterns)), p_a * torch.exp(eta * r)
    where = mask.nonzero()
    post = {name: torch.stack([posterior(seqs, w, x_t[b], i).log() for b, i in where.tolist()])
            for name, w in (("teacher", p_a), ("tilted", tilt))}
    log_Z = torch.full_like(r_b, tilt.sum().log().item())

    def J(logits):
        return dtm_loss(logits, post["teacher"], x1, mask, r_b, tw, eta, 1.0, log_Z=log_Z).item()
    q = tilt / tilt.sum()
    kl = (q * (q / p_a).log()).sum().item()
    assert J(post["teacher"]) - J(post["tilted"]) == pytest.approx(kl / L, rel=1e-10)
    assert kl > 0.01                                                       # a gain that could be missed
    rows = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = torch.softmax(eta * rows, 1)                                      # 3 prompts, 5 equal-weight rollouts
    assert phase_kl(rows.numpy(), eta, L) == pytest.approx((q * (q * 5).log()).sum(1).mean().item() / L, rel=1e-12)


def test_per_sequence_terms_average_to_the_loss():
    x1, mask, logits, reward, tw, group = random_batch()
    terms = dtm_loss(logits, logits + 0.3, x1, mask, reward, tw, 0.7, 1.0, group, per_sequence=True)
    assert terms.shape == (len(x1),)
    torch.testing.assert_close(terms.mean(), dtm_loss(logits, logits + 0.3, x1, mask, reward, tw, 0.7, 1.0, group))


def random_batch(B=6, T=PROMPT_LEN + 5, V=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[:, :PROMPT_LEN] = False
    mask[:, -1] = True                                                     # every row counts somewhere
    N = int(mask.sum())
    logits = torch.randn(N, V, generator=g, dtype=dtype)
    reward = torch.randn(B, generator=g, dtype=dtype)
    tw = torch.rand(B, generator=g, dtype=dtype) + 0.5
    group = torch.tensor([0, 0, 1, 1, 1, 2])[:B]
    return x1, mask, logits, reward, tw, group


def grad_of_loss(eta, phi, teacher_offset=0.0):
    x1, mask, logits, reward, tw, group = random_batch()
    student = logits.clone().requires_grad_(True)
    dtm_loss(student, logits + teacher_offset, x1, mask, reward, tw, eta, phi, group).backward()
    return student.grad


def test_a_per_position_phi_weights_each_token_with_its_own_coefficient():
    """phi (B, T): token i's NLL weight is (e^{eta r} - phi_i) / Z and its distillation weight phi_i / Z;
    a phi constant along each row is the per-sequence phi."""
    g = torch.Generator().manual_seed(0)
    B, T, eta = 4, 5, 0.7
    x1 = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    N = int(mask.sum())
    logits, teacher = torch.randn(N, V, generator=g), torch.randn(N, V, generator=g)
    r, tw, phi = torch.randn(B, generator=g), torch.rand(B, generator=g), torch.rand(B, T, generator=g) * 1.5
    seq = mask.nonzero()[:, 0]
    Z = torch.exp(eta * r).mean()
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(1, x1[mask][:, None])[:, 0]
    ce = -(torch.softmax(teacher, -1) * logp).sum(-1)
    hand = (tw[seq] * ((torch.exp(eta * r[seq]) - phi[mask]) / Z * nll + phi[mask] / Z * ce)).sum() / B
    torch.testing.assert_close(dtm_loss(logits, teacher, x1, mask, r, tw, eta, phi), hand, rtol=1e-6, atol=0)
    row = phi[:, :1].expand(B, T).contiguous()
    assert dtm_loss(logits, teacher, x1, mask, r, tw, eta, row) == dtm_loss(logits, teacher, x1, mask, r, tw, eta,
                                                                            phi[:, 0])


def test_phi1_eta0_gradient_is_zero_at_teacher():
    """eta = 0, phi = 1: the target is p_a itself, so at p_theta = p_a the gradient vanishes."""
    assert grad_of_loss(eta=0.0, phi=1.0).abs().max() < 1e-12
    # ...and it could fail: a tilt, no control variate or a different teacher all move the student
    assert grad_of_loss(eta=0.5, phi=1.0).abs().max() > 1e-3
    assert grad_of_loss(eta=0.0, phi=0.0).abs().max() > 1e-3
    offset = torch.randn(1, 7, generator=torch.Generator().manual_seed(5)).double()
    assert grad_of_loss(eta=0.0, phi=1.0, teacher_offset=offset).abs().max() > 1e-3


def test_phi0_eta0_equals_the_elbo():
    """With no tilt and no control variate DTM is the MDM's ELBO (eq. 5) with the same hazard."""
    x1, mask, logits, _, _, _ = random_batch(dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    hazard = torch.rand(len(x1), generator=g) * 3 + 1
    L = x1.shape[1] - PROMPT_LEN
    ours = dtm_loss(logits, None, x1, mask, torch.randn(len(x1), generator=g), hazard / L, eta=0.0, phi=0.0)
    torch.testing.assert_close(ours, elbo_loss(logits, x1, mask, hazard))


def test_phi0_is_reward_weighted_elbo_with_per_group_Z():
    """phi = 0: each sequence's NLL is weighted by e^{eta r} / Z, Z = mean e^{eta r} of its group."""
    x1, mask, logits, reward, tw, group = random_batch()
    eta = 0.7
    ours = dtm_loss(logits, None, x1, mask, reward, tw, eta, 0.0, group)
    nll = torch.nn.functional.cross_entropy(logits, x1[mask], reduction="none")
    seq = mask.nonzero()[:, 0]
    expected = 0.0
    for b in range(len(x1)):
        same = group == group[b]
        w = torch.exp(eta * reward[b]) / torch.exp(eta * reward[same]).mean()
        expected += w * tw[b] * nll[seq == b].sum()
    torch.testing.assert_close(ours, expected / len(x1), rtol=1e-12, atol=0)


def test_phi1_large_eta_with_Z_per_prompt_is_cross_entropy_on_each_prompts_best_rollout():
    """eta -> infinity, phi = 1, Z per prompt: e^{eta r} / Z -> n_g on a prompt's best rollout and -> 0 on the
    rest, and the teacher term phi / Z -> 0. So the loss is (1/B) sum_g n_g tw CE(best of g): rejection-sampling
    fine-tuning (lab/rft.py) with DTM's masking and time weight. Equal bests share the prompt's n_g.
    (It needs r >= 0: with e^{eta r} < phi the weight phi / Z would grow without bound instead.)"""
    x1, mask, logits, reward, tw, group = random_batch()
    teacher = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
    reward = torch.tensor([0.0, 1.0, 0.5, 1.5, 1.5, 2.0], dtype=logits.dtype)  # groups 0 0 1 1 1 2; a tie in 1
    # r >= 0, so e^{eta r} >= phi, as llada_finetune.py makes it by shifting r by the buffer's minimum
    nll = torch.nn.functional.cross_entropy(logits, x1[mask], reduction="none")
    seq = mask.nonzero()[:, 0]
    per_seq = torch.zeros(len(x1), dtype=nll.dtype).index_add(0, seq, nll) * tw
    expected = 0.0
    for g in group.unique():
        rows = (group == g).nonzero()[:, 0]
        best = rows[reward[rows] == reward[rows].max()]
        expected += len(rows) * per_seq[best].mean()
    expected /= len(x1)
    ours = dtm_loss(logits, teacher, x1, mask, reward, tw, eta=100.0, phi=1.0, group=group)  # e^{-50}: 0
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    # ...and it could fail: at a finite eta the other rollouts and the teacher still count
    assert abs(dtm_loss(logits, teacher, x1, mask, reward, tw, eta=2.0, phi=1.0, group=group) - expected) > 1e-3


@pytest.mark.parametrize("phi", [0.0, 1.0])
def test_drawing_rows_from_the_tilted_buffer_with_log_Z_eta_r_has_the_uniform_draws_expected_loss(phi):
    """llada_finetune.py --minibatch tilted: row b drawn with q_b = (e^{eta r_b} / Z_b) / B and given log Z = eta r_b
    (weight 1 / (B q_b)). Its expected loss, sum_b q_b l_b, is the uniform draw's (1/B) sum_b l_b, exactly."""
    x1, mask, logits, reward, tw, group = random_batch()
    reward = reward - reward.min()
    teacher = logits + 0.3
    eta = 3.0
    log_Z = group_log_mean_exp(eta * reward, group)
    uniform = dtm_loss(logits, teacher, x1, mask, reward, tw, eta, phi, log_Z=log_Z, per_sequence=True).mean()
    q = torch.exp(eta * reward - log_Z) / len(x1)
    assert q.sum().item() == pytest.approx(1.0, abs=1e-12)           # the weights e^{eta r}/Z average to 1
    tilted = dtm_loss(logits, teacher, x1, mask, reward, tw, eta, phi, log_Z=eta * reward, per_sequence=True)
    torch.testing.assert_close((q * tilted).sum(), uniform, rtol=1e-12, atol=0)
    assert abs(tilted.mean() - uniform) > 1e-3                       # ...a uniform draw of those terms is not


def test_group_log_mean_exp_is_log_Z_and_a_callers_log_Z_is_used_as_given():
    """log Z_g = log mean_{b in g} e^{eta r_b}, exactly; passing it as log_Z gives the in-batch loss,
    and a Z from elsewhere (e.g. a whole replay buffer) changes the loss by exactly its ratio."""
    x1, mask, logits, reward, tw, group = random_batch()
    eta = 0.8
    log_Z = group_log_mean_exp(eta * reward, group)
    for b in range(len(x1)):
        expected = torch.log(torch.exp(eta * reward[group == group[b]]).mean())
        torch.testing.assert_close(log_Z[b], expected, rtol=1e-12, atol=1e-12)
    teacher = logits.flip(-1)
    in_batch = dtm_loss(logits, teacher, x1, mask, reward, tw, eta, 1.0, group)
    torch.testing.assert_close(dtm_loss(logits, teacher, x1, mask, reward, tw, eta, 1.0, log_Z=log_Z),
                               in_batch, rtol=1e-12, atol=0)
    doubled = dtm_loss(logits, teacher, x1, mask, reward, tw, eta, 1.0, log_Z=log_Z + math.log(2.0))
    torch.testing.assert_close(doubled, in_batch / 2, rtol=1e-12, atol=0)


def test_phi0_weights_are_invariant_to_a_constant_added_to_the_reward():
    x1, mask, logits, reward, tw, group = random_batch()
    before = dtm_loss(logits, None, x1, mask, reward, tw, 0.9, 0.0, group)
    after = dtm_loss(logits, None, x1, mask, reward + 37.0, tw, 0.9, 0.0, group)
    torch.testing.assert_close(before, after, rtol=1e-12, atol=0)
    # without Z the shift changes the loss, so the invariance above is Z's doing
    raw = dtm_loss(logits, None, x1, mask, reward + 37.0, tw, 0.9, 0.0, group, log_Z=torch.zeros_like(reward))
    assert not torch.isclose(raw, before)


def test_phi1_control_variate_is_not_shift_invariant():
    """Eq. 16-17 as written: the distillation weight is phi / Z, and Z scales by e^{eta c} when c is
    added to r. So phi = 1 assumes e^{eta r} ~ 1 (rewards near 0); this pins that paper behaviour:
    r + c at phi is exactly r at phi e^{-eta c} (NLL weight (e^{eta r} - phi e^{-eta c}) / Z, teacher
    weight phi e^{-eta c} / Z), the form the maze's r_offset = 1 takes (lab/FINDINGS_maze.md)."""
    x1, mask, logits, reward, tw, group = random_batch()
    before = dtm_loss(logits, logits.flip(-1), x1, mask, reward, tw, 0.9, 1.0, group)
    after = dtm_loss(logits, logits.flip(-1), x1, mask, reward + 3.0, tw, 0.9, 1.0, group)
    assert not torch.isclose(before, after)
    as_phi = dtm_loss(logits, logits.flip(-1), x1, mask, reward, tw, 0.9, math.exp(-0.9 * 3.0), group)
    torch.testing.assert_close(after, as_phi, rtol=1e-12, atol=0)


def centred(logits, teacher, x1, mask, reward, tw, eta, phi, group):
    """lab/experiments.py --centred: eq. 17's coefficient phi Z, a function of the prompt (the group)."""
    log_Z = group_log_mean_exp(eta * reward, group)
    return dtm_loss(logits, teacher, x1, mask, reward, tw, eta, phi * torch.exp(log_Z), group, log_Z)


def test_centred_control_variate_is_shift_invariant_and_its_nll_weights_average_to_1_minus_phi():
    """--centred: distillation weight phi, NLL weight e^{eta r} / Z - phi. Adding c to r scales e^{eta r}
    and Z alike, so nothing changes; and over each group the NLL weights average to 1 - phi (zero at
    phi = 1: no refit of the teacher's own samples), where the paper's average 1 - phi / Z."""
    x1, mask, logits, reward, tw, group = random_batch()
    teacher = logits.flip(-1)
    for phi in (0.5, 1.0):
        before = centred(logits, teacher, x1, mask, reward, tw, 0.9, phi, group)
        after = centred(logits, teacher, x1, mask, reward + 3.0, tw, 0.9, phi, group)
        torch.testing.assert_close(before, after, rtol=1e-12, atol=0)
    # one token per sequence; the teacher is sure of a token y != x1, the student gives y logit 2:
    # then NLL = A and CE = B for every row, and loss = A mean(NLL weight) + B phi
    one = torch.zeros_like(mask)
    one[:, PROMPT_LEN] = True
    V, ones = logits.shape[1], torch.ones(len(x1), dtype=torch.float64)
    y = (x1[:, PROMPT_LEN] + 1) % V
    teacher = torch.zeros(len(x1), V, dtype=torch.float64).scatter(1, y[:, None], 60.0)
    student = torch.zeros(len(x1), V, dtype=torch.float64).scatter(1, y[:, None], 2.0)
    A = math.log(V - 1 + math.e ** 2)
    B = A - 2.0
    for phi in (0.0, 0.5, 1.0):
        loss = centred(student, teacher, x1, one, reward, ones, 0.9, phi, group)
        torch.testing.assert_close((loss - B * phi) / A, torch.tensor(1 - phi, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    paper = dtm_loss(student, teacher, x1, one, reward, ones, 0.9, 1.0, group)
    assert abs((paper - B) / A) > 0.05                                 # paper: 1 - mean(1 / Z) != 0 here


@pytest.mark.parametrize("phi", [0.0, 1.0])
def test_huge_tilts_stay_finite(phi):
    """log-sum-exp keeps e^{eta r} / Z finite where e^{eta r} alone (here e^{5000}) would overflow."""
    x1, mask, logits, reward, tw, group = random_batch(dtype=torch.float32)
    assert torch.isfinite(dtm_loss(logits, logits, x1, mask, reward.abs() * 1e3, tw, 5.0, phi, group))


def test_phi1_loss_is_unbounded_below_when_e_eta_r_is_below_phi():
    """One masked token, phi = 1: its target is (p_a + (e^{eta r} - 1) onehot(x1)) / Z. With r < 0 and a
    sampled token that p_a finds rare (p_a(x1) < 1 - e^{eta r}), that entry is negative, and lowering
    the student's logit of x1 lowers the loss without end. With r >= 0 the same move raises it."""
    x1 = torch.tensor([[0, 0, 0, 0]])                  # the prompt, then one completion token
    mask = torch.tensor([[False] * PROMPT_LEN + [True]])
    teacher = torch.tensor([[0.05, 0.50, 0.45]], dtype=torch.float64).log()
    tw = torch.ones(1, dtype=torch.float64)

    def loss(logit_of_x1, r):
        student = teacher.clone()
        student[0, 0] = logit_of_x1
        return dtm_loss(student, teacher, x1, mask, torch.tensor([r], dtype=torch.float64), tw, 1.0, 1.0).item()
    down = [loss(v, -1.0) for v in (-5.0, -50.0, -500.0)]
    assert down[0] > down[1] > down[2] and down[2] < -100
    up = [loss(v, 0.5) for v in (-5.0, -50.0, -500.0)]
    assert up[0] < up[1] < up[2]
