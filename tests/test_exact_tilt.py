"""DTM's claims checked exactly on an enumerable MDM (tests/tabular.py): V = 3 tokens, L = 4 positions."""
import functools

import torch

import tabular as T


@functools.lru_cache(maxsize=None)
def final_tv(phi, shift=0.0, eta=0.25, n=2000):
    """TV to p0 e^{r} / Z after annealing a = 0 -> 1 (shared by the tests below: ~3 s each)."""
    p0, r = T.problem()
    return T.anneal(p0, r + shift, eta=eta, phi=phi, n=n)[-1]


def test_table_of_exact_posteriors_reproduces_its_law():
    p0, _ = T.problem()
    assert T.tv(T.terminal_law(T.posterior_table(p0)), p0) < 1e-12


def test_phi1_dtm_anneals_onto_the_exact_tilted_law():
    """Four phases of eta = 0.25 from Monte-Carlo rollouts (2000 per phase) land within TV 0.02 of
    p0 e^{r} / Z, which is TV > 0.1 away from where they start."""
    p0, r = T.problem()
    assert T.tv(p0, T.tilted(p0, r, 1.0)) > 0.1
    assert final_tv(1.0) <= 0.02


def test_phi0_with_the_same_rollouts_is_much_further_from_the_tilt():
    """phi = 0 fits the reweighted empirical law of the rollouts; phi = 1 only their correction."""
    assert final_tv(0.0) > 3 * final_tv(1.0), (final_tv(0.0), final_tv(1.0))


def test_excess_dtm_loss_bounds_the_terminal_kl():
    """Prop. 3.4: L(theta) - L(theta*) >= KL(p_{a+eta} || q_theta), with the ELBO (hazard) weights."""
    g = torch.Generator().manual_seed(3)
    p0, r = T.problem()
    teacher = T.posterior_table(p0)
    eta = 0.5
    target = T.tilted(p0, r, eta)
    best = T.posterior_table(target)
    for phi in (0.0, 1.0):
        L_best = T.expected_loss(best, teacher, p0, r, eta, phi)
        for scale in (0.1, 0.5, 2.0):
            student = best + scale * torch.randn(best.shape, generator=g, dtype=best.dtype)
            excess = T.expected_loss(student, teacher, p0, r, eta, phi) - L_best
            q = T.terminal_law(student)
            kl = (target * (target / q).log()).sum()
            assert 0 < kl <= excess, (phi, scale, kl.item(), excess.item())


def test_phi1_cuts_the_gradient_variance_at_small_eta():
    """Prop. 3.3: at the teacher, Var[grad] for phi = 1 is ~eta^2 of phi = 0's; it loses the edge at large eta."""
    p0, r = T.problem()
    table = T.posterior_table(p0)

    def ratio(eta):
        v1 = T.gradient_variance(table, r, eta, 1.0, 1000, torch.Generator().manual_seed(1))
        v0 = T.gradient_variance(table, r, eta, 0.0, 1000, torch.Generator().manual_seed(1))
        return v1 / v0
    assert ratio(0.1) < 0.01
    assert ratio(10.0) > 0.5


def test_a_negative_per_sample_target_makes_the_loss_unbounded():
    """With phi = 1 and r << 0, e^{eta r} - phi < 0: a state seen with one rare token has a negative
    target there, and pushing that token's logit down lowers the loss without bound. The tilt is the
    same for r - 3 and r, but the annealing falls apart; dtm.py therefore feeds r - min r >= 0."""
    assert final_tv(1.0) <= 0.02 and final_tv(1.0, shift=-3.0) > 0.3, (final_tv(1.0), final_tv(1.0, -3.0))
