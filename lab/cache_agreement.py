"""How often the KV-cached samplers agree with the exact one on a *trained* LLaDA-shaped model.

On random weights every greedy choice is a near tie, so one stale key flips a token and the rest of the
row follows (llada/README.md: 19-50%). A trained model is confident where the task decides. This script
trains a small LLaDA (our llada/model.py network, 0.86M parameters) with LLaDA's SFT loss (`llada/sft.py`) to
sort digits: prompt = 16 random digits and a separator, completion = the same digits sorted, then end-of-text
padding to gen_length. Then it decodes held-out prompts greedily (temperature 0) with the exact sampler
and with the `prefix` and `dual` caches, and prints time, accuracy (the sorted answer, exact match),
token agreement with the exact sampler, and accuracy at temperature 1 (how DTM draws its rollouts).
Nothing is downloaded; about 8 minutes on one CPU core.

    python -m lab.cache_agreement [--steps 1500] [--gen_length 32] [--block_length 8]
"""
import argparse
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maze.mdm import Help                                                      # noqa: E402
from llada.model import LLaDAConfig, random_model                                 # noqa: E402
from llada.sampler import generate                                                 # noqa: E402
from llada.sft import train                                                    # noqa: E402

SEP, EOS, MASK = 10, 11, 12                                # digits are 0..9
N_DIGITS = 16


def batch(n, gen_length, g):
    """Prompts (n, N_DIGITS + 1) and their completions (n, gen_length): the digits sorted, then EOS."""
    digits = torch.randint(0, 10, (n, N_DIGITS), generator=g)
    prompt = torch.cat([digits, torch.full((n, 1), SEP)], 1)
    answer = torch.cat([digits.sort(1).values, torch.full((n, gen_length - N_DIGITS), EOS)], 1)
    return prompt, answer


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--steps", type=int, default=1500, help="AdamW steps of the ELBO")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr (cosine decay to 0)")
    p.add_argument("--gen_length", type=int, default=32, help="completion length (16 sorted digits, then EOS)")
    p.add_argument("--block_length", type=int, default=8, help="sampler block")
    p.add_argument("--test", type=int, default=256, help="held-out prompts decoded by each sampler")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the masks")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = LLaDAConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, embedding_size=16,
                      rope_theta=10000.0, mask_token_id=MASK, eos_token_id=EOS)
    model = random_model(cfg, seed=args.seed).requires_grad_(True)
    n_params = sum(q.numel() for q in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    def next_batch():                                  # fresh digits every step, no padding
        prompt, answer = batch(args.batch, args.gen_length, g)
        return prompt, None, answer
    losses = train(model, next_batch, args.steps, args.lr, g, weight_decay=0.0, betas=(0.9, 0.999))
    print(f"loss {sum(losses[-50:]) / 50:.4f}  {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval().requires_grad_(False)

    prompt, answer = batch(args.test, args.gen_length, torch.Generator().manual_seed(10_000 + args.seed))
    G, blk = args.gen_length, args.block_length
    print(f"\n{n_params / 1e6:.2f}M parameters, {args.steps} steps in {time.perf_counter() - t0:.0f} s; "
          f"{args.test} held-out prompts, {N_DIGITS + 1} + {G} tokens, {G} steps (one token per step), "
          f"block {blk}, temperature 0\n"
          f"| sampler | s | sorted exactly | token agreement with exact | rows identical to exact | "
          f"sorted exactly at temperature 1 |\n|---|---|---|---|---|---|")
    exact = None
    for cache in (None, "prefix", "dual"):
        t1 = time.perf_counter()
        out = generate(model, prompt, None, G, G, blk, cache=cache)
        dt = time.perf_counter() - t1
        exact = out if exact is None else exact
        hot = generate(model, prompt, None, G, G, blk, temperature=1.0, cache=cache,    # DTM's rollouts
                       generator=torch.Generator().manual_seed(args.seed))
        print(f"| {cache or 'exact'} | {dt:.1f} | {sorted_share(out, answer)} | "
              f"{100 * (out == exact).float().mean().item():.1f}% | "
              f"{100 * (out == exact).all(1).float().mean().item():.1f}% | {sorted_share(hot, answer)} |", flush=True)


def sorted_share(out, answer):
    """Share of rows that are the sorted answer exactly, with its standard error."""
    ok = (out == answer).all(1).float()
    return f"{ok.mean().item():.3f} ± {ok.std().item() / len(ok) ** 0.5:.3f}"


if __name__ == "__main__":
    main()
