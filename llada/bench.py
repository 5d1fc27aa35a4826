"""Benchmark of LLaDA fine-tuning: warm timings of a sampling step and a DTM training step per batch
size (tokens/s, sequences/s, model TFLOP/s and the share of the card's peak, peak memory), and the exact
sampler against the KV-cached ones, side by side. Random models of a given shape are built in memory,
so no checkpoint is needed. Run it through the command line:

    python llada_finetune.py --bench_shape 8b --task countdown --bench --bench_batches 4 8 16 --bench_sampler
    python llada_finetune.py --bench_shape 100m --task countdown --bench --bench_batches 1 4 --device cpu
"""
import resource
import time

import torch

from llada.lora import snapshot_teacher, teacher_mode
from llada.sampler import generate, propose

SHAPES = dict(                                   # --bench_shape: random models built in memory
    **{"8b": {}},                               # LLaDA-8B (LLaDAConfig's defaults): 16 GB in bf16
    **{"100m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, mlp_hidden_size=2048,
                    embedding_size=32000, mask_token_id=31999, eos_token_id=31998)})   # 134M, for CPU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16, SXM


def forward_flops(cfg, tokens, seq_len, logit_rows, lora_params=0):
    """Model FLOPs of one forward: 2 per weight per token (blocks' linears and adapters), attention's
    4 T d per token per layer, and the head only at the logit rows (the standard MFU count)."""
    d, f = cfg.d_model, cfg.mlp_hidden_size
    per_layer = 2 * d * d + 2 * d * (cfg.n_kv_heads * d // cfg.n_heads) + 3 * d * f
    return (tokens * (2 * (cfg.n_layers * per_layer + lora_params) + 4 * cfg.n_layers * seq_len * d)
            + logit_rows * 2 * d * cfg.embedding_size)


def timed(fn, warmup=2, repeat=5, sync=lambda: None):
    """Median seconds of `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(args, t):
    """Warm timings of a sampling step and a training step at a few batch sizes: tokens/s, sequences/s,
    model TFLOP/s (and the share of the device's peak), peak memory. A sampling step is one network call
    over the whole sequence (64 prompt + gen_length tokens) with float64 logits on one block and the
    proposal there at --temperature (`sampling_step`), which the exact sampler makes
    gen_length / tokens_per_step times; a training step is teacher + student forward,
    backward and AdamW on `batch` sequences, with the Trainer `t` (llada/trainer.py) on a random buffer."""
    dev = torch.device(args.device)
    cuda, dtype = dev.type == "cuda", torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)

    def peak_gib(reset=False):
        if cuda:
            if reset:
                torch.cuda.reset_peak_memory_stats(dev)
            return torch.cuda.max_memory_allocated(dev) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20    # kB on Linux; a running peak
    batches = args.bench_batches or [args.batch]
    cfg, T, G = t.cfg, 64 + args.gen_length, args.gen_length
    n_lora = sum(p.numel() for p in t.params)
    n_base = sum(p.numel() for p in t.model.parameters()) - n_lora
    peak = next((v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(dev)), None)
    print(f"model: {n_base:,} base + {n_lora:,} LoRA parameters, {dtype}, {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if cuda else "") + f"; sequences of 64 + {G} tokens")
    rows = []
    for B in batches:
        args.batch = B
        t.buffer = dict(idx=torch.zeros(B, dtype=torch.long, device=dev),                 # a random buffer
                        comp=torch.randint(6, cfg.embedding_size, (B, G), device=dev), r=torch.rand(B, device=dev))
        t.prompt_cache[0] = list(range(6, 70))
        t.opt = t.new_optimizer()
        snapshot_teacher(t.model)
        x = torch.cat([torch.tensor([t.prompt_cache[0]] * B, device=dev), t.buffer["comp"]], 1)
        where = torch.zeros_like(x, dtype=torch.bool)
        where[:, 64:64 + args.block_length] = True
        x[where] = cfg.mask_token_id

        def sample_step():
            with teacher_mode(t.model), t.autocast():
                t.model.eval()
                sampling_step(t.model, x, where, args.temperature)
            t.model.train()
        peak_gib(reset=True)
        base = peak_gib()
        s_step = timed(sample_step, sync=sync)
        s_mem = peak_gib() - (0 if cuda else base)
        s_flops = forward_flops(cfg, B * T, T, B * args.block_length, n_lora // 2)
        peak_gib(reset=True)
        base = peak_gib()
        t_step = timed(lambda: t.train_step(args.eta), sync=sync)
        t_mem = peak_gib() - (0 if cuda else base)
        rows_counted = B * args.block_length // 2                                         # E[counted] = blk / 2
        t_flops = 4 * forward_flops(cfg, B * T, T, rows_counted, n_lora // 2)             # teacher + 3 x student
        def share(flops, s):                                                            # TFLOP/s (% of peak)
            return f"{flops / s / 1e12:.3g}" + (f" ({100 * flops / s / 1e12 / peak:.0f}%)" if peak else "")
        rows.append((B, s_step, B * args.tokens_per_step / s_step, share(s_flops, s_step), s_mem,
                     t_step, B / t_step, share(t_flops, t_step), t_mem))
    if args.bench_sampler:
        bench_sampler(t.model, args, batches[0], sync)
    mem = "peak GiB" if cuda else "peak RSS growth GiB (coarse)"
    print("step times: the median of 5 warm steps, after 2 warm-up steps (`timed`); a sampling step is one "
          "network call and its proposal, a training step one optimiser step")
    print(f"| batch | sampling step s | tokens/s at {args.tokens_per_step}/step | TFLOP/s | {mem} "
          f"| training step s | sequences/s | TFLOP/s | {mem} |\n|---|---|---|---|---|---|---|---|---|")
    for B, ss, tok_s, sf, sm, ts, seq_s, tf, tm in rows:
        print(f"| {B} | {ss:.3f} | {tok_s:.1f} | {sf} | {sm:.2f} | {ts:.3f} | {seq_s:.2f} | {tf} | {tm:.2f} |")
    return rows


def sampler_flops(cfg, B, P, G, steps, blk, cache):
    """Model FLOPs of one `generate` call: a full call per step (exact), or per refresh (once per block)
    plus span calls over the block (dual) or the block and the suffix (prefix), against all T keys."""
    T, per_block = P + G, steps // (G // blk)
    total = 0
    for b in range(G // blk):
        lo = P + b * blk
        span = T if cache is None else blk if cache == "dual" else T - lo
        total += forward_flops(cfg, B * T, T, B * blk) + (per_block - 1) * forward_flops(cfg, B * span, T, B * blk)
    return total


def bench_sampler(model, args, B, sync):
    """The exact sampler against the cached ones, side by side: one full greedy generate each on the same
    random prompts (after a one-block warm-up), tokens/s, the FLOP ratio, and token agreement with exact."""
    dev, cfg, G = next(model.parameters()).device, model.cfg, args.gen_length
    steps = G // args.tokens_per_step
    prompt = torch.randint(6, cfg.embedding_size, (B, 64), generator=torch.Generator().manual_seed(0)).to(dev)
    prompt[prompt == cfg.mask_token_id] = 6                                             # no mask in a prompt
    rows, exact = [], None
    with teacher_mode(model), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        model.eval()
        for cache in (None, "prefix", "dual"):
            generate(model, prompt, None, args.block_length, args.block_length // args.tokens_per_step,
                     args.block_length, cache=cache)                                     # warm-up
            sync()
            t0 = time.perf_counter()
            out = generate(model, prompt, None, G, steps, args.block_length, cache=cache)
            sync()
            dt = time.perf_counter() - t0
            exact = out if exact is None else exact
            flops = sampler_flops(cfg, B, 64, G, steps, args.block_length, cache)
            rows.append((cache or "exact", dt, B * G / dt, flops, (out == exact).float().mean().item()))
        model.train()
    print(f"sampler, batch {B}, 64 + {G} tokens, {steps} steps, block {args.block_length}, temperature 0:\n"
          f"| sampler | s | tokens/s | speed-up | model TFLOP | FLOP ratio | token agreement with exact |\n"
          f"|---|---|---|---|---|---|---|")
    for name, dt, tps, fl, agree in rows:
        print(f"| {name} | {dt:.2f} | {tps:.1f} | {rows[0][1] / dt:.2f}x | {fl / 1e12:.3g} | "
              f"{rows[0][3] / fl:.2f}x | {100 * agree:.1f}% |")
    return rows


@torch.no_grad()
def sampling_step(model, x, where, temperature=0.0, generator=None):
    """The work of one exact `generate` step: a full network call with float64 logits at the masked
    positions `where` that may be revealed, and the proposal (token and confidence) there."""
    return propose(model(x, None, where).double(), temperature, generator=generator)


def pick_rollout_batch(measure, cap=128, budget=None, tolerance=0.05):
    """--rollout_batch auto: where tokens/s stops rising, within memory.

    measure(B) -> (seconds of one sampling step at batch B, peak bytes or None). Batches 1, 2, 4, ... up
    to `cap` are measured while the next one's peak, extrapolated linearly from the last two (from
    the origin after the first, which overestimates it), stays under `budget` bytes (None: no limit; an out-of-memory error also ends the search). Returns the
    smallest measured batch whose sequences/s is within `tolerance` of the best, and the table
    [(B, seconds, peak)]."""
    table, B = [], 1
    while B <= cap:
        try:
            seconds, peak = measure(B)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        table.append((B, seconds, peak))
        if budget is not None and peak is not None:
            B0, _, peak0 = table[-2] if len(table) > 1 else (0, 0, 0)
            if peak + (peak - peak0) / (B - B0) * B > budget:           # the next batch, 2B, would not fit
                break
        B *= 2
    if not table:
        raise RuntimeError("--rollout_batch auto: not even one sequence fits in memory")
    best = max(b / s for b, s, _ in table)
    return next(b for b, s, _ in table if b / s >= (1 - tolerance) * best), table


def auto_rollout_batch(model, seq_len, block_length, temperature, cap=128, headroom=0.25):
    """Measure `pick_rollout_batch` on the model's device: warm sampling steps on random sequences of
    seq_len tokens with the last block masked. On CUDA the budget is the free and the reserved memory
    less `headroom` of it (kept for the optimiser state and the training activations, which come
    later); on the CPU memory is not limited. Call it in the sampler's context (no grad, autocast)."""
    dev, cfg = next(model.parameters()).device, model.cfg
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    budget = (1 - headroom) * (torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev)) if cuda else None

    def measure(B):
        x = torch.randint(6, cfg.embedding_size, (B, seq_len), device=dev)
        where = torch.zeros_like(x, dtype=torch.bool)
        where[:, -block_length:] = True
        x[where] = cfg.mask_token_id
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = timed(lambda: sampling_step(model, x, where, temperature), warmup=1, repeat=3, sync=sync)
        return seconds, torch.cuda.max_memory_allocated(dev) if cuda else None
    return pick_rollout_batch(measure, cap, budget)
