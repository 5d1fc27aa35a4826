"""LLaDA's semi-autoregressive sampler with low-confidence remasking (`generate`, generate.py's algorithm),
its one-step proposal (`propose`), and left padding for a batch of prompts (`left_pad`).

Needs only a model with LLaDA's call, model(x, attention_mask, where[, kv, span]) -> the logits at the
True entries of `where`, and model.cfg.mask_token_id (llada/model.py: LLaDA). On its own:

    import torch
    from llada.model import load_model, load_tokenizer, chat_prompt, decode
    from llada.sampler import generate, left_pad
    model = load_model("LLaDA-8B-Instruct", "cuda", torch.bfloat16)
    tok = load_tokenizer("LLaDA-8B-Instruct")
    questions = ["What is 7 * 8?", "Name a prime above 100."]
    ids, am = left_pad([chat_prompt(tok, q) for q in questions], model.cfg.eos_token_id, "cuda")
    for c in generate(model, ids, am, gen_length=64, steps=32, block_length=32):
        print(decode(tok, c, model.cfg))
"""
import math

import torch
import torch.nn.functional as F


def num_transfer_tokens(masked, steps):
    """(B, steps): tokens revealed per step, masked.sum(1) split evenly, the remainder first."""
    n = masked.sum(1, keepdim=True)
    return n // steps + (torch.arange(steps, device=masked.device) < n % steps).long()


def propose(logits, temperature=0.0, remasking="low_confidence", generator=None):
    """One sampler step's proposal at N masked positions from their float64 logits (N, V): the token x0
    (Gumbel-max at the temperature: argmax exp(l) / (-log u)^T; plain argmax at 0) and its confidence
    (softmax prob of x0, or uniform noise for remasking="random")."""
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        x0 = (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if remasking == "low_confidence":
        c = F.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
    else:
        c = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return x0, c


@torch.no_grad()
def generate(model, prompt, attention_mask=None, gen_length=256, steps=128, block_length=32,
             temperature=0.0, remasking="low_confidence", generator=None, cache=None, refresh=None):
    """LLaDA's semi-autoregressive sampler with low-confidence remasking (generate.py's algorithm).

    prompt (B, P), left-padded with attention_mask (B, P) when prompts differ in length.
    The gen_length masks are decoded block by block, steps / num_blocks steps per block; the counts per
    step split the block's masks evenly, the remainder first. At each step, at every masked position
    of the completion up to the end of the current block: x0 = Gumbel-max of the logits at the
    temperature, in float64 (plain argmax at 0); confidence = softmax prob of x0 (or uniform noise for
    remasking="random"); the k most confident are revealed. A position whose x0 is the mask id itself
    stays masked, and competes again at later steps, in later blocks too, as in generate.py.
    Differences from generate.py, none of which changes a token at temperature 0 (fp32): logits and
    noise are computed only at the masked positions that can be revealed (the reference computes them
    everywhere and discards them), and masks inside the prompt are never filled.

    cache="prefix" or "dual" (Fast-dLLM's block KV cache; approximate, opt-in): every `refresh` steps
    (default: once per block, at its first step) one full call caches every layer's keys and values;
    the other steps run only the current block and the masked suffix ("prefix": the prompt and finished
    blocks come from the cache) or only the current block ("dual": the suffix too). Under bidirectional
    attention the cached keys are stale, so the tokens can differ from the exact sampler's; between
    refreshes only the current block's masks can be revealed. refresh=1 is the exact sampler.
    """
    mask_id = model.cfg.mask_token_id
    B, P = prompt.shape
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}, "
                         f"and steps {steps} of the number of blocks")
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], 1)
    am = None if attention_mask is None else \
        torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype, device=x.device)], 1)
    n_blocks = gen_length // block_length
    col = torch.arange(x.shape[1], device=x.device)
    per_block = steps // n_blocks
    refresh = refresh or per_block
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        k_per_step = num_transfer_tokens(x[:, lo:hi] == mask_id, per_block)                # (B, steps)
        for s in range(per_block):
            if cache is None or s % refresh == 0:
                where = (x == mask_id) & (col >= P) & (col < hi)                # what may be revealed
                kv = [] if cache else None                                      # refresh the cache
                logits = (model(x, am, where, kv) if cache else model(x, am, where)).double()   # (N, V)
            else:
                where = (x == mask_id) & (col >= lo) & (col < hi)
                span = (lo, hi) if cache == "dual" else (lo, x.shape[1])
                logits = model(x, am, where, kv, span).double()
            x0, c = propose(logits, temperature, remasking, generator)
            conf = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device).masked_scatter(where, c)
            rank = torch.argsort(conf, dim=-1, descending=True, stable=True).argsort(-1)     # 0 = most confident
            reveal = where & (rank < k_per_step[:, s:s + 1])
            x[reveal] = x0[reveal[where]]
    return x[:, P:]


def left_pad(seqs, pad_id, device="cpu"):
    """Left-pad token lists: ids (B, P) and attention_mask (B, P)."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    am = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):], am[i, P - len(s):] = torch.as_tensor(s), 1
    return ids.to(device), am.to(device)
