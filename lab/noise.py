"""The gradient noise of eq. 17's control variates at the teacher: the paper's phi = 1 against coefficients
that depend on the state x_t (lab/FINDINGS_maze.md, "Control variates that do not cut the noise").

Eq. 17 keeps the minimiser for any coefficient that is a function of x_t (and of the position i). This file
estimates two such coefficients from teacher completions of each masked state (`complete`,
`state_coefficients`) and measures, on the same minibatches, how much each leaves of the per-batch gradient
noise that sets SGD's excess loss in a phase (`noise`).

    python -m lab.experiments noise --out runs/noise      # writes OUT/noise.json and OUT/noise.md
"""
import math

import numpy as np
import torch
from tqdm import tqdm

import dtm
from dtm import dtm_loss
from maze import env, exact
from maze.mdm import PROMPT_LEN, draw, load, mask_completions


@torch.no_grad()
def complete(model, x_t, temperature=1.0, generator=None):
    """Finish masked states x_t (B, T) with the model, one masked position at a time in a uniformly random
    order: the sampler's law (maze.mdm.sample, order "random") given that it reached x_t."""
    x = x_t.clone()
    while True:
        todo = (x == env.MASK).any(1).nonzero()[:, 0]                  # the rows still masked
        if len(todo) == 0:
            return x
        y = x[todo]
        score = torch.rand(y.shape, generator=generator, device=y.device).masked_fill(y != env.MASK, -1.0)
        reveal = torch.zeros_like(y, dtype=torch.bool).scatter_(1, score.argmax(1, keepdim=True), True)
        y[reveal] = draw(model(y, reveal), temperature, generator)
        x[todo] = y


def state_coefficients(p_a, mask, x1k, e):
    """Two coefficients of eq. 17 that are functions of x_t, from K teacher completions x1^(k) (K, B, T) of
    each state x_t (drawn independently of the trained x1 given x_t, as eq. 15 needs), e (K, B) their
    e^{eta (r + c)}, and the teacher's p_a(. | x_t, i) (N, V) at the N True entries of mask (B, T):
      phi(x_t) = mean_k e_k,                           the state baseline E_a[e^{eta r} | x_t], (B,);
      phi_i(x_t) = sum_k e_k |u_ik|^2 / sum_k |u_ik|^2, per position, (B, T) (1 off the mask), where
                   u_ik = p_a(. | x_t, i) - 1{x1^(k)_i}: at the teacher a token's logit gradient is
                   (e^{eta r} - phi_i) u_i / Z, and this phi_i minimises its variance given x_t."""
    hit = p_a.gather(1, x1k[:, mask].T).T                              # (K, N) p_a(x1^(k)_i | x_t, i)
    u2 = (p_a ** 2).sum(-1) - 2 * hit + 1                              # (K, N) |u_ik|^2
    e_tok = e[:, mask.nonzero()[:, 0]]                                 # (K, N) e_k of each token's state
    phi_i = torch.ones(mask.shape, dtype=p_a.dtype, device=p_a.device)
    phi_i[mask] = (e_tok * u2).sum(0) / u2.sum(0)
    return e.mean(0), phi_i


def noise(args):
    """The per-batch gradient noise of the first phase's loss at the teacher (the base) for eq. 17's
    coefficients: the paper's phi = 1, the state baseline and the per-position phi_i (`state_coefficients`,
    from --completions teacher completions of each state), and halfway blends of each with 1. Every
    coefficient sees the same --noise_batches minibatches (stratified from a buffer of --rollouts_per_prompt
    reference rollouts per prompt, masked once), so the comparison is paired. Noise: E|g - g_mean|^2 over the batches (unbiased), the quantity that sets SGD's
    stationary excess loss, lr / (1 - momentum) E|g - g_mean|^2 / 4. Returns the rows and a markdown table."""
    torch.manual_seed(args.seed)
    gen, pick = torch.Generator(args.device).manual_seed(args.seed), torch.Generator().manual_seed(args.seed)
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    ref_x, ref_r, _ = exact.base_reference(args.base, wall, prompts, args.reference_per_prompt, args)
    P, M, K = len(prompts), args.rollouts_per_prompt, args.completions
    keep = torch.stack([torch.randperm(ref_x.shape[1], generator=pick)[:M] for _ in range(P)])
    x1_buf = dtm.with_prompts(prompts, ref_x)[torch.arange(P)[:, None], keep]
    r_buf = torch.as_tensor(ref_r, dtype=torch.float32)[torch.arange(P)[:, None], keep]
    model = load(args.base, args.device)[0]
    L = model.cfg.gen_len
    names = ["phi = 1 (the paper's)", "phi = E_a[e^{eta r} | x_t]", "phi = (1 + E_a[e^{eta r} | x_t]) / 2",
             "phi_i(x_t), per position", "phi = (1 + phi_i(x_t)) / 2"]
    grads = {n: [] for n in names}
    for _ in tqdm(range(args.noise_batches), desc="noise", disable=None):
        rows, j = dtm.stratified(P, M, args.batch, pick)
        x1, r = x1_buf[rows, j].flatten(0, 1).to(args.device), r_buf[rows, j].flatten().to(args.device)
        x_t, mask, hazard = mask_completions(x1, gen)
        with torch.no_grad():
            teacher_logits = model(x_t, mask)
        x1k = complete(model, x_t.repeat(K, 1), args.temperature, gen)      # K completions of each state
        valid, rk, _ = env.score(wall, x1k[:, PROMPT_LEN:].cpu().numpy(), x1k[:, :2].cpu().numpy())
        e = torch.exp(args.eta * torch.as_tensor(np.where(valid, rk, args.invalid_reward) + args.r_offset))
        phi_s, phi_i = state_coefficients(torch.softmax(teacher_logits.double(), -1), mask,
                                          x1k.view(K, *x1.shape), e.view(K, -1).to(args.device))
        for n, phi in zip(names, [1.0, phi_s, (1 + phi_s) / 2, phi_i, (1 + phi_i) / 2]):
            loss = dtm_loss(model(x_t, mask), teacher_logits, x1, mask, r + args.r_offset, hazard / L, args.eta,
                            phi, rows.flatten().to(args.device))
            model.zero_grad(set_to_none=True)
            loss.backward()
            grads[n].append(torch.cat([q.grad.flatten() for q in model.parameters()]).double().cpu())
    out = []
    for n in names:
        g = torch.stack(grads[n])
        dev2 = ((g - g.mean(0)) ** 2).sum(1) * len(g) / (len(g) - 1)    # unbiased per-batch |g - g_mean|^2
        out.append(dict(coefficient=n, noise=dev2.mean().item(), noise_se=(dev2.std() / math.sqrt(len(g))).item(),
                        mean_sq_norm=(g ** 2).sum(1).mean().item(), batches=len(g)))
    lines = ["| coefficient (eq. 17) | per-batch gradient noise E\\|g - g_mean\\|^2 | over phi = 1's | E\\|g\\|^2 |",
             "|---|---|---|---|"]
    lines += [f"| {r['coefficient'].replace('|', chr(92) + '|')} | {r['noise']:.3g} ± {r['noise_se']:.1g} | "
              f"{r['noise'] / out[0]['noise']:.2f} | {r['mean_sq_norm']:.3g} |" for r in out]
    return out, lines
