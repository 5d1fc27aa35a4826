"""A tiny masked diffusion model (MDM) over maze paths: the network, the ELBO, the sampler, pretraining.

Paper §2 (eq. 5) and App. D.1. A sequence is `[s, g, SEP, c_1 .. c_L]`; the prompt is never masked.
What a masked diffusion model changes from a GPT, marked [NEW] below:
  - attention is bidirectional (no causal mask);
  - the input is a partially masked sequence x_t, and the network predicts the clean token x1^i at
    each masked position i: row i of softmax(logits) is the unmasking posterior p_theta(. | x_t, i);
  - the loss is the ELBO of eq. 5, a cross-entropy on masked positions weighted by the hazard
    lambda(t) = kappa'(t) / (1 - kappa(t)) = 1 / (1 - t) for the linear schedule kappa(t) = t;
  - sampling starts fully masked and reveals tokens over K steps instead of left to right.
Maze-specific: a cell token's embedding is a free vector plus a row and a column embedding, and the
output layer is tied to it, so the net starts with a sense of which cells are near each other.

    python -m maze.mdm --out maze/base.pt                   # pretrain the base model (1332 s measured)
                                                            # (default --out runs/base.pt: no overwrite)
    python -m maze.mdm --eval maze/base.pt                  # validity / reward of 512 rollouts
"""
import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maze import env

PROMPT_LEN = 3                     # [s, g, SEP]


@dataclass
class Config:
    gen_len: int = 64              # completion tokens; perturbed-shortest paths of our prompts fit
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128             # ~1M parameters: trains on 2 CPU cores in minutes
    mlp_ratio: int = 4             # MLP hidden width / d_model
    dropout: float = 0.0


PAPER = dict(n_layer=8, n_head=8, d_model=288)   # --paper: 8.5M parameters (the paper's base: 8.9M)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=False)    # [NEW] bidirectional, (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class MDM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(env.VOCAB, d)
        self.row = nn.Embedding(env.SIZE + 1, d, padding_idx=env.SIZE)   # index 41: not a cell
        self.col = nn.Embedding(env.SIZE + 1, d, padding_idx=env.SIZE)
        self.pos = nn.Embedding(PROMPT_LEN + cfg.gen_len, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.bias = nn.Parameter(torch.zeros(env.MASK))                 # outputs: every id but MASK
        v = torch.arange(env.VOCAB)
        is_cell = v < env.N_CELLS
        self.register_buffer("row_of", torch.where(is_cell, v // env.SIZE, env.SIZE), persistent=False)
        self.register_buffer("col_of", torch.where(is_cell, v % env.SIZE, env.SIZE), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if getattr(m, "padding_idx", None) is not None:
                m.weight.data[m.padding_idx].zero_()

    def embed_table(self):
        """(V, d): a cell's vector is token + row + column embedding; shared by input and output."""
        return self.tok.weight + self.row(self.row_of) + self.col(self.col_of)

    def hidden(self, x_t, table=None):
        """Final hidden states (B, T, d) of a partially masked batch x_t (B, T)."""
        table = self.embed_table() if table is None else table
        h = F.embedding(x_t, table) + self.pos.weight[: x_t.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x_t, where):
        """Logits (N, V) only at the N positions where `where` (B, T) is True, row-major order.

        Only masked positions enter any loss or sampling step, so the V-wide output layer is
        applied to those alone (h[where] has N rows, not B*T). MASK is the last id and is never a
        clean token, so the output covers ids 0 .. MASK - 1 and column k is token k.
        """
        table = self.embed_table()
        return self.hidden(x_t, table)[where] @ table[: env.MASK].T + self.bias


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- forward masking
def mask_completions(x1, generator=None):
    """Forward process of the linear schedule kappa(t) = t on the completion part of x1 (B, T).

    t ~ U(0, 1) per sequence, stratified over the batch (t_b = (u + b) / B) to lower variance; each
    completion token is masked independently with probability 1 - kappa(t) = 1 - t.
    Returns x_t (B, T), mask (B, T) bool, and the hazard weight lambda(t) = 1 / (1 - t) per sequence.
    """
    B, T = x1.shape
    u = torch.rand((), generator=generator, device=x1.device)
    t = (u + torch.arange(B, device=x1.device)) / B
    t = t[torch.randperm(B, generator=generator, device=x1.device)]
    mask = torch.rand(B, T, generator=generator, device=x1.device) < (1 - t)[:, None]
    mask[:, :PROMPT_LEN] = False
    x_t = torch.where(mask, torch.full_like(x1, env.MASK), x1)
    hazard = 1.0 / (1.0 - t).clamp_min(1e-3)
    return x_t, mask, hazard


def mask_along_path(x1, rank, generator=None):
    """Re-enter the sampler's own path: x_t is the state of the rollout x1 (B, T) just before its
    step k, k ~ U{0 .. S-1} per sequence (S = its number of sampler steps); `rank` (B, L) is the step
    at which each completion position was revealed (sample(..., return_rank=True)).
    Returns x_t (B, T) with every position of rank >= k masked; `next` (B, T) bool, the positions
    of rank k: those the sampler revealed from x_t, each drawn from p_theta(. | x_t, i); and S (B,).

    Why: forward masking (`mask_completions`) pairs x1 with a uniformly random masked set, but a
    model that is not self-consistent makes different sequences along different orders, so given x1
    its order is not uniform, and p_theta(. | x_t, i) is not the posterior of its own sampling law
    there. At the sampler's own states it is, exactly: the token revealed at i from x_t was drawn
    from p_theta(. | x_t, i). Summing the per-step cross-entropies over k is the path's -log-likelihood,
    so S times the cross-entropy at `next` is its unbiased estimate (the time weight S / L per token).
    """
    B, T = x1.shape
    steps = rank.max(1).values + 1                                        # (B,)
    k = (torch.rand(B, generator=generator, device=x1.device) * steps).long()
    return (*path_state(x1, rank, k), steps)


def path_state(x1, rank, k):
    """The state of each rollout x1 (B, T) just before its sampler step k (B,): x_t (B, T) with every
    completion position of rank >= k masked, and the positions of rank k (B, T) bool, revealed from it."""
    full = torch.full_like(x1, -1)
    full[:, PROMPT_LEN:] = rank
    x_t = torch.where(full >= k[:, None], torch.full_like(x1, env.MASK), x1)
    return x_t, full == k[:, None]


def elbo_loss(logits, x1, mask, hazard):
    """Eq. 5: E_t [ lambda(t) * sum_{i masked} -log p_theta(x1^i | x_t, i) ], per completion token.

    logits (N, V) at the True entries of mask (B, T); hazard (B,). Dividing by the completion
    length L makes it a per-token bound; the sum over masked tokens is what makes it an ELBO.
    """
    nll = F.cross_entropy(logits, x1[mask], reduction="none")          # (N,)
    seq = mask.nonzero()[:, 0]                                         # sequence of each masked token
    L = mask.shape[1] - PROMPT_LEN
    return (hazard[seq] * nll).sum() / (mask.shape[0] * L)


@torch.no_grad()
def self_consistency_gap(model, x1, generator=None, rank=None):
    """How far the network's conditionals are from the posteriors of its own sampling law.

    x1 (B, T): rollouts of `model`. Mask them as in training; at each masked position compare the
    cross-entropy of the rollout's token, -log p_theta(x1^i | x_t, i), with the entropy of the
    conditional, H(p_theta(. | x_t, i)). If the conditionals were the posteriors of the law that made
    x1 (a self-consistent model), x1^i | x_t would be distributed as p_theta(. | x_t, i) and the two
    means would agree. Returns the mean CE, the mean entropy and the gap CE - H per masked token,
    and the gap's standard error over sequences: 0 for a self-consistent model.
    With `rank` (the rollouts' reveal steps), x_t are the sampler's own states instead and the tokens
    those it revealed next (`mask_along_path`): there the gap is 0 in expectation for any model.
    """
    if rank is None:
        x_t, mask, _ = mask_completions(x1, generator)
    else:
        x_t, mask, _ = mask_along_path(x1, rank, generator)
    logp = F.log_softmax(model(x_t, mask).float(), -1)                  # (N, V)
    ce = -logp.gather(1, x1[mask][:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    seq = mask.nonzero()[:, 0]
    n = torch.bincount(seq, minlength=len(x1)).float()
    per_seq = torch.zeros(len(x1), device=x1.device).index_add(0, seq, ce - ent) / n.clamp_min(1)
    keep = n > 0
    gap_se = (per_seq[keep].std() / keep.sum().sqrt()).item()
    return dict(ce=ce.mean().item(), entropy=ent.mean().item(), gap=(ce - ent).mean().item(), gap_se=gap_se)


# ----------------------------------------------------------------------------- sampling
def draw(logits, temperature=1.0, generator=None):
    """One token per row of logits (N, V) from softmax(logits / temperature): inverse CDF (cumsum +
    searchsorted, one uniform per row rather than one per vocabulary entry); argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=generator, device=logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)[:, 0].clamp_max(cdf.shape[1] - 1)


@torch.no_grad()
def sample(model, prompts, steps=None, temperature=1.0, order="random", generator=None, return_rank=False):
    """Run the reverse process from a fully masked completion. prompts (B, 2) -> completions (B, L),
    and with return_rank also the step (B, L) at which each position was revealed (its path).

    Each of `steps` steps reveals an equal share of the L tokens (the remainder in the earliest
    steps, as LLaDA does); the token at a revealed position is drawn from softmax(logits / temperature)
    (`draw`). Which positions are revealed:
      order="random":     uniformly among the masked ones (the CTMC of the linear schedule). The choice
                          does not depend on the tokens, so it is made first and the V-wide output layer
                          runs only at the n revealed positions;
      order="confidence": those whose drawn token has the highest probability p_theta(x0 | x_t, i)
                          (LLaDA's low-confidence remasking): logits at every masked position.
    `generator` must live on the model's device (torch.Generator(device)).
    """
    cfg = model.cfg
    L = cfg.gen_len
    steps = L if steps is None else steps
    dev = next(model.parameters()).device
    prompts = torch.as_tensor(prompts, device=dev)
    B = prompts.shape[0]
    x = torch.full((B, PROMPT_LEN + L), env.MASK, device=dev)
    x[:, 0], x[:, 1], x[:, 2] = prompts[:, 0], prompts[:, 1], env.SEP
    rank = torch.full_like(x, -1)
    counts = [L // steps + (k < L % steps) for k in range(steps)]
    for k, n in enumerate(counts):
        if n == 0:
            continue
        masked = x == env.MASK
        if order == "random":
            score = torch.rand(x.shape, generator=generator, device=dev).masked_fill(~masked, -1.0)
            reveal = torch.zeros_like(masked).scatter_(1, score.topk(n, dim=1).indices, True)
            x[reveal] = draw(model(x, reveal), temperature, generator)   # logits (B*n, V), row-major
            rank[reveal] = k
            continue
        logits = model(x, masked)                                      # (N, V) at masked positions
        x0 = draw(logits, temperature, generator)
        score = torch.full(x.shape, -math.inf, device=dev)
        score[masked] = torch.softmax(logits, -1).gather(1, x0[:, None])[:, 0]
        reveal = torch.zeros_like(masked).scatter_(1, score.topk(n, dim=1).indices, True)
        proposal = torch.full_like(x, env.MASK)
        proposal[masked] = x0
        x = torch.where(reveal, proposal, x)
        rank[reveal] = k
    return (x[:, PROMPT_LEN:], rank[:, PROMPT_LEN:]) if return_rank else x[:, PROMPT_LEN:]


def evaluate(model, wall, prompts, per_prompt, temperature=1.0, order="random", steps=None,
             batch=512, generator=None, progress=False):
    """Sample `per_prompt` rollouts for each prompt and score them.

    Returns (metrics dict, completions (B, L), prompt index (B,), reward (B,), reveal step (B, L)),
    grouped by prompt.
    """
    ids = np.repeat(np.arange(len(prompts)), per_prompt)
    P = np.asarray(prompts)[ids]
    out = [sample(model, P[i:i + batch], steps, temperature, order, generator, return_rank=True)
           for i in tqdm(range(0, len(P), batch), desc="rollouts", leave=False,
                         disable=None if progress else True)]
    x = torch.cat([o[0] for o in out]).cpu().numpy()
    rank = torch.cat([o[1] for o in out]).cpu().numpy()
    metrics, reward = rollout_metrics(wall, prompts, x, ids)
    return metrics, x, ids, reward, rank


def with_prompts(prompts, comp):
    """Whole sequences [s, g, SEP, c_1 .. c_L] (P, n, 3 + L) from completions comp (P, n, L) of the P prompts."""
    comp = torch.as_tensor(comp)
    P, n, _ = comp.shape
    pr = torch.as_tensor(np.asarray(prompts))[:, None, :].expand(P, n, 2)
    return torch.cat([pr, torch.full((P, n, 1), env.SEP), comp], 2)


def reference_path(ckpt, per_prompt, temperature=1.0, order="random", steps=None):
    """Where `cached_rollouts` keeps the rollouts of checkpoint `ckpt`: a name made from a digest of its
    bytes and of the sampler's settings, beside it."""
    if not os.path.isfile(ckpt):
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    digest = hashlib.sha256()
    with open(ckpt, "rb") as f:
        digest.update(f.read())
    digest.update(f"{per_prompt} {temperature:g} {order} {steps}".encode())
    return f"{os.path.splitext(ckpt)[0]}_reference_{digest.hexdigest()[:8]}.npz"


def cached_rollouts(ckpt, wall, prompts, per_prompt, temperature=1.0, order="random", steps=None, device="cpu",
                    seed=1234):
    """per_prompt rollouts of checkpoint `ckpt` for every prompt, drawn once with `seed` and cached at
    `reference_path` (atomically). Returns completions (P, n, L), env's reward (P, n), valid (P, n), numpy."""
    path = reference_path(ckpt, per_prompt, temperature, order, steps)
    if not os.path.isfile(path):
        t0 = time.time()
        tqdm.write(f"drawing {per_prompt} rollouts per prompt of {ckpt}, once -> {path}")
        model = load(ckpt, device)[0].eval()
        _, comp, _, r, _ = evaluate(model, wall, prompts, per_prompt, temperature, order, steps,
                                    generator=torch.Generator(device).manual_seed(seed), progress=True)
        P = len(prompts)
        tmp = path + ".part.npz"
        np.savez_compressed(tmp, completions=comp.reshape(P, per_prompt, -1).astype(np.int16),
                            reward=np.asarray(r, dtype=np.float32).reshape(P, per_prompt),
                            valid=(np.asarray(r) > env.INVALID_REWARD).reshape(P, per_prompt))
        os.replace(tmp, path)                                          # atomic: never half a file
        tqdm.write(f"  {P * per_prompt} rollouts in {time.time() - t0:.0f} s")
    try:
        z = np.load(path)
        return z["completions"].astype(np.int64), z["reward"], z["valid"]
    except Exception as e:
        raise CheckpointError(f"cannot read cached rollouts {path} ({type(e).__name__}); delete it "
                              "and they are drawn again") from None


def rollout_metrics(wall, prompts, x, ids):
    """Validity, mean reward and diversity of completions x (B, L) of prompts[ids]; and each reward."""
    valid, reward, _ = env.score(wall, x, np.asarray(prompts)[ids])
    distinct, cells = env.diversity(x, ids, valid)
    metrics = dict(validity=float(valid.mean()), reward=float(reward.mean()),
                   distinct_valid_per_prompt=distinct, cells_covered_per_prompt=cells)
    return metrics, reward


# ----------------------------------------------------------------------------- checkpoints
def save(model, path, **extra):
    tmp = path + ".tmp"
    torch.save({"config": asdict(model.cfg), "model": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)                                              # atomic: never half a file


class CheckpointError(Exception):
    pass


def load(path, device="cpu"):
    """Load an MDM checkpoint written by `save` (weights only: no code runs on load)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
        model = MDM(Config(**ck["config"])).to(device)
        model.load_state_dict(ck["model"])
    except Exception as e:                                             # corrupt, truncated, wrong file
        first_line = (str(e).strip().splitlines() or [""])[0]            # torch's advice runs for lines
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    return model, ck


# ----------------------------------------------------------------------------- pretraining
def training_set(wall, prompts, per_prompt, gen_len, seed=0, sigma=1.25):
    """(N, 3 + gen_len) sequences of diverse valid paths (perturbed shortest paths that fit)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, g in tqdm(prompts, desc="training paths", leave=False, disable=None):
        paths = [p for p in env.perturbed_shortest_paths(wall, s, g, per_prompt, rng, sigma)
                 if len(p) <= gen_len]
        rows += [env.encode((s, g), p, gen_len) for p in paths]
    return torch.from_numpy(np.stack(rows))


def pretrain(cfg, steps, batch=128, lr=2e-3, paths_per_prompt=4000, seed=0, device="cpu",
             out=None, maze_seed=0, n_prompts=8):
    """Train the base MDM with the ELBO (eq. 5): AdamW, 200 warm-up steps, then cosine decay."""
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True                   # on a GPU, TF32 matmuls (as nanoGPT)
    wall = env.make_maze(maze_seed)
    prompts = env.make_prompts(wall, n_prompts)
    data = training_set(wall, prompts, paths_per_prompt, cfg.gen_len, seed).to(device)
    model = MDM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    t0 = time.time()
    bar = tqdm(range(steps), desc="pretrain", disable=None)          # None: no bar in a redirected log
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x1 = data[torch.randint(len(data), (batch,), device=device)]
        x_t, mask, hazard = mask_completions(x1)
        loss = elbo_loss(model(x_t, mask), x1, mask, hazard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    info = dict(steps=steps, wall_s=round(time.time() - t0), batch=batch, lr=lr,
                paths=len(data), maze_seed=maze_seed, n_prompts=n_prompts, seed=seed)
    if out:
        save(model, out, pretrain=info)
    return model, info


class Help(argparse.RawDescriptionHelpFormatter):
    """The --help of dtm.py, grpo.py, maze/mdm.py, lab/experiments.py and llada_finetune.py: each flag's default
    after its help, 0 included; none where there is nothing to show (None, a store_true's False) or
    where the help already names it. Descriptions and epilogs keep their own line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "(default" in text or not action.option_strings:
            return text
        d = action.default
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})"             # help strings are %-formatted


def parser():
    p = argparse.ArgumentParser(description="Pretrain or evaluate the tiny maze MDM (ELBO, eq. 5).",
                                formatter_class=Help)
    p.add_argument("--steps", type=int, default=2400, help="pretraining steps (1332 s measured on 2 CPU cores)")
    p.add_argument("--out", default="runs/base.pt",
                   help="where the base checkpoint is written (the committed one: --out maze/base.pt)")
    p.add_argument("--eval", metavar="CKPT", help="only evaluate this checkpoint (no pretraining)")
    p.add_argument("--paper", action="store_true", help="the 8.5M-parameter preset, near the paper's 8.9M (GPU)")
    p.add_argument("--d_model", type=int, default=None, help="width (overrides the default 128 or --paper's)")
    p.add_argument("--n_layer", type=int, default=None, help="depth (overrides the default 4 or --paper's)")
    p.add_argument("--batch", type=int, default=128, help="sequences per pretraining step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine decay)")
    p.add_argument("--rollouts", type=int, default=512, help="evaluation rollouts (all prompts)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--order", choices=["random", "confidence"], default="random",
                   help="unmasking order: random is the CTMC; confidence is more valid, far less diverse")
    p.add_argument("--sample_steps", type=int, default=64, help="sampling steps (64 = one token per step)")
    p.add_argument("--seed", type=int, default=0, help="seeds pretraining and the evaluation rollouts")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    torch.manual_seed(a.seed)
    if a.eval:
        try:
            model, ck = load(a.eval, a.device)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
    else:
        cfg = Config(**{**(PAPER if a.paper else {}),
                        **{k: v for k, v in (("d_model", a.d_model), ("n_layer", a.n_layer)) if v}})
        model, info = pretrain(cfg, a.steps, a.batch, a.lr, seed=a.seed, device=a.device, out=a.out)
        print(f"pretrained {n_params(model) / 1e6:.2f}M params: {info}; wrote {a.out}")
    wall = env.make_maze()
    prompts = env.make_prompts(wall)
    g = torch.Generator(a.device).manual_seed(a.seed)
    t0 = time.time()
    m = evaluate(model.eval(), wall, prompts, a.rollouts // len(prompts), a.temperature,
                 a.order, a.sample_steps, generator=g)[0]
    print({k: round(v, 4) for k, v in m.items()}, f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
