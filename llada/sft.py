"""Masked-diffusion supervised fine-tuning (SFT) of the LLaDA network: LLaDA's published recipe, our code.

LLaDA's SFT (its paper, sec. 2.3 and App. B.1): the prompt p0 stays clean; the response r0, padded to a
fixed length with <|endoftext|>, is masked token by token with probability t ~ U(0, 1]; the loss is the
cross-entropy at the masked response tokens, weighted 1/t (the ELBO of eq. 5, conditioned on the prompt),
normalised by the response length:

    L = - E_{t, r_t} [ 1/t * sum_{i: r_t^i = M} log p(r0^i | p0, r_t) ] / |r0|

It creates a new small LLaDA from a config, or continues an existing model directory, and saves it in the
real Hugging Face layout that `llada/model.py: load_model` and `llada_finetune.py` read: `config.json`,
safetensors shards with their index, and a `tokenizer.json` (built with `tokenizers`, with LLaDA's special
tokens and chat template). So the small model goes through exactly the code path of LLaDA-8B-Instruct.

Sudoku (4x4): the prompt is `--protocol`'s (default `short`: one line) in the chat template; the response
is `<answer>\\n{16 digits}\\n</answer>`, then end-of-text to --gen_length. `--grids K` trains on fresh
puzzles of only K of the 200 training grids, a base that is weak for a structural reason (lab/FINDINGS_llada.md).

SFT data from sources of mixed quality (`--mix M`): each response is the true solution with probability M,
and otherwise the answer of a plausible wrong solver, `llada/tasks.py: sudoku_row_only` (each row's empty
cells get the row's missing digits in increasing order; columns and boxes ignored; 0.47 of the test cells
right on its own). The base then holds the right solver as a minority, the setting where a reward can
raise what a model already does unreliably (lab/FINDINGS_llada.md, "Eliciting a minority skill"). The mixture is
recorded in the directory's sft.json (`mix`, `wrong_solver`), which `python -m lab.modes` reads.

    python -m llada.sft --task sudoku --out runs/tiny_sudoku --grids 8          # a new 0.9M LLaDA, 2 cores
    python -m llada.sft --task sudoku --model_dir runs/tiny_sudoku --out runs/tiny_more --steps 500
    python -m llada.sft --task sudoku --out runs/mixed --mix 0.5                 # the mixed-quality base
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llada.model import (CheckpointError, LLaDAConfig, chat_prompt, chat_text, load_model, load_tokenizer,  # noqa: E402
                         random_model, save_safetensors)
from llada.protocols import PROTOCOLS                                                   # noqa: E402
from llada.sampler import left_pad                                                      # noqa: E402
from llada.tasks import sudoku_row_only, sudoku_test_set, sudoku_train_grids, sudoku_train_puzzle  # noqa: E402
from maze.mdm import Help                                                               # noqa: E402

# LLaDA's special tokens, by their names in its tokenizer.json; ours get the ids 0..5.
SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|mdm_mask|>"]
ANSWER_TAGS = ["<answer>", "</answer>"]             # one token each (added, not special: they decode)
EPS = 1e-3                                          # LLaDA's p_mask = (1 - eps) t + eps: t never 0
WRONG_SOLVERS = dict(row_only=sudoku_row_only)      # --mix: the other source of the SFT data


# ============================================================================ the loss
def sft_loss(model, prompt, response, mask_id, generator=None, attention_mask=None):
    """LLaDA's SFT loss on prompts (B, P) (left-padded: attention_mask (B, P)) and responses (B, G),
    eq. 5 conditioned on the prompt: each response token masked with p = (1 - eps) t + eps, t ~ U(0, 1) per
    sequence; the cross-entropy at the masked tokens weighted 1/p, summed, / G (every response is padded
    to G), averaged over the batch. Logits only at the masked tokens."""
    B, G = response.shape
    p = (1 - EPS) * torch.rand(B, 1, generator=generator, device=response.device) + EPS      # (B, 1)
    masked = torch.rand(B, G, generator=generator, device=response.device) < p               # (B, G)
    x_t = torch.cat([prompt, response.masked_fill(masked, mask_id)], 1)                      # (B, P + G)
    am = None if attention_mask is None else torch.cat([attention_mask, torch.ones_like(response)], 1)
    where = torch.cat([torch.zeros_like(prompt, dtype=torch.bool), masked], 1)
    ce = F.cross_entropy(model(x_t, am, where).float(), response[masked], reduction="none")  # (N,)
    return (ce / p.expand(B, G)[masked]).sum() / (B * G)


def train(model, next_batch, steps, lr, generator, warmup=100, clip=1.0, weight_decay=0.1, betas=(0.9, 0.95),
          desc="sft", after_step=None):
    """AdamW (LLaDA's weight decay 0.1) on sft_loss, lr warmed up linearly, then cosine to 0; the gradient
    norm clipped. next_batch() -> (prompt, attention_mask or None, response); after_step(steps taken), if
    given, after each step (e.g. an evaluation). Ctrl-C stops after the current step (the caller saves
    what was trained). Returns the losses, one per step taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    losses, bar = [], tqdm(range(steps), desc=desc, mininterval=2)
    model.train()
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            prompt, am, response = next_batch()
            loss = sft_loss(model, prompt, response, model.cfg.mask_token_id, generator, am)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            losses.append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if after_step is not None:
                after_step(step + 1)
                model.train()
    except KeyboardInterrupt:
        bar.close()
        print(f"\nCtrl-C: stopped after {len(losses)} of {steps} steps")
    model.eval()
    return losses


# ============================================================================ a new model directory
def build_tokenizer(corpus, vocab_size):
    """Byte-level BPE (LLaDA's kind) trained on `corpus` with LLaDA's special tokens at ids 0..5 and the
    answer tags as single tokens. Every digit stays a token of its own: the corpus has none to merge."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([c.translate(str.maketrans("", "", "0123456789")) for c in corpus],
                            trainers.BpeTrainer(vocab_size=vocab_size - len(ANSWER_TAGS), special_tokens=SPECIAL,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    tok.add_tokens([AddedToken(t, normalized=False) for t in ANSWER_TAGS])
    return tok


def save_model_dir(model, tok, out, shards=2, extra=None):
    """model (LLaDA) and tok as a Hugging Face LLaDA directory: config.json (LLaDA's keys), `shards`
    safetensors files named as HF names them, model.safetensors.index.json, tokenizer.json, and the
    {file name: object} of `extra` as JSON. Written into out.tmp, then swapped in: out is the old
    directory or the new one, never half of either."""
    c, tmp = model.cfg, out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {f"model.transformer.{k}": v for k, v in model.state_dict().items()}
    keys = sorted(state)
    parts = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_safetensors({k: state[k] for k in part}, os.path.join(tmp, name), {"format": "pt"})
        weight_map.update({k: name for k in part})
    index = dict(metadata=dict(total_size=sum(t.numel() * t.element_size() for t in state.values())),
                 weight_map=weight_map)
    config = dict(vars(c), vocab_size=c.embedding_size, include_bias=False, weight_tying=False,
                  layer_norm_type="rms", activation_type="silu", block_type="llama", rope=True,
                  model_type="llada", architectures=["LLaDAModelLM"])
    for name, obj in {"model.safetensors.index.json": index, "config.json": config, **(extra or {})}.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=1)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    old = out.rstrip("/") + ".old"
    if os.path.isdir(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ============================================================================ Sudoku data
def sudoku_response(solution):
    return f"<answer>\n{solution}\n</answer>"


def sudoku_sft_grids(k, seed):
    """k of the 200 training grids (those that solve no test puzzle), drawn with seed; all 200 if k = 0."""
    train = sudoku_train_grids(sudoku_test_set())
    return train if not k else random.Random(seed).sample(train, k)


def sudoku_batches(tok, grids, prompt_of, gen_length, batch, seed, device="cpu", mix=1.0, wrong="row_only"):
    """next_batch() for train: `batch` fresh puzzles of `grids` (llada/tasks.py: sudoku_train_puzzle, as
    sudoku_data draws them) -> (prompt ids, attention mask, response ids with EOS padding). Each response
    is the solution with probability `mix`, else WRONG_SOLVERS[wrong]'s answer (mix 1: the draws of
    the puzzles are those of an unmixed run)."""
    rng, eos = random.Random(seed), tok.token_to_id("<|endoftext|>")
    n = len(tok.encode(sudoku_response("1" * 16), add_special_tokens=False).ids)    # every answer: 16 digits
    if n > gen_length:
        raise ValueError(f"--gen_length {gen_length} is shorter than a response ({n} tokens)")
    mixer = random.Random(seed + 1)                                     # the mixture's own coin

    def response(it):
        answer = it["solution"] if mix >= 1 or mixer.random() < mix else WRONG_SOLVERS[wrong](it["puzzle"])
        ids = tok.encode(sudoku_response(answer), add_special_tokens=False).ids
        return ids + [eos] * (gen_length - len(ids))

    def next_batch():
        items = [sudoku_train_puzzle(grids, rng) for _ in range(batch)]
        ids, am = left_pad([chat_prompt(tok, prompt_of(it)) for it in items], eos, device)
        return ids, am, torch.tensor([response(it) for it in items], device=device)
    return next_batch


def new_model(tok, args):
    cfg = LLaDAConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads,
                      mlp_hidden_size=args.mlp, embedding_size=-(-tok.get_vocab_size() // 64) * 64,
                      rope_theta=10000.0, mask_token_id=tok.token_to_id("<|mdm_mask|>"),
                      eos_token_id=tok.token_to_id("<|endoftext|>"))
    return random_model(cfg, args.device, seed=args.seed).requires_grad_(True)


# ============================================================================ the command line
def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--task", choices=["sudoku"], default="sudoku", help="the task whose solutions are the responses")
    p.add_argument("--out", required=True, help="the model directory to write (HF layout)")
    p.add_argument("--model_dir", help="continue this model directory (its tokenizer and config); "
                                       "default: a new model of the sizes below")
    p.add_argument("--grids", type=int, default=0, help="train on puzzles of only this many of the 200 "
                                                        "training grids (0: all 200)")
    p.add_argument("--mix", type=float, default=1.0, help="SFT data of mixed quality: each response is the "
                                                          "true solution with this probability, else the "
                                                          "--wrong_solver's answer (1: all true)")
    p.add_argument("--wrong_solver", choices=list(WRONG_SOLVERS), default="row_only",
                   help="the other source: row_only fills each row's blanks with its missing digits in "
                        "increasing order, ignoring columns and boxes")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="short", help="whose prompt (llada_finetune.py)")
    p.add_argument("--gen_length", type=int, default=24, help="response tokens: the answer, then end-of-text")
    p.add_argument("--steps", type=int, default=600, help="AdamW steps")
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (100 warm-up steps, cosine to 0)")
    p.add_argument("--d_model", type=int, default=128, help="new model: width")
    p.add_argument("--n_layers", type=int, default=4, help="new model: blocks")
    p.add_argument("--n_heads", type=int, default=4, help="new model: attention heads")
    p.add_argument("--mlp", type=int, default=384, help="new model: MLP hidden size")
    p.add_argument("--vocab", type=int, default=320, help="new model: tokenizer size (bytes, specials, merges)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the grids, the puzzles and the masks")
    p.add_argument("--eval_every", type=int, default=0, help="every N steps (and at the start) the greedy test "
                   "cell accuracy (256 puzzles, block 8) into OUT/metrics.jsonl, with the training seconds; 0: off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="float32 on any device")
    return p


def test_logger(model, tok, args, rows, clock):
    """after_step for train: every --eval_every steps, a row of test accuracy into `rows`, as llada_finetune.py's
    --phase_eval logs it (rollouts 0: SFT needs none), the evaluations' own time left out of `seconds`."""
    from llada.protocols import evaluate
    test, spent = sudoku_test_set(), [0.0]

    def log(step, force=False):
        if step % args.eval_every and not force:
            return
        t0 = time.perf_counter()
        acc = evaluate(model, tok, args.task, test, args.gen_length, 64, 8, args.protocol)["ours"]
        spent[0] += time.perf_counter() - t0
        rows.append(dict(step=step, rollouts=0, seconds=round(time.perf_counter() - clock - spent[0], 1), test=acc))
        print(f"step {step}: test accuracy {acc['acc']:.3f} ± {acc['se']:.3f} (all right: {acc['whole']:.3f})")
    return log


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not 0 <= args.grids <= 200 or args.steps < 1 or args.batch < 1:
        p.error("--grids must be in 0..200, --steps and --batch at least 1")
    if not 0 <= args.mix <= 1:
        p.error(f"--mix is a probability, in [0, 1] (got {args.mix})")
    prompt_of = PROTOCOLS[args.protocol]["prompts"][args.task]
    torch.manual_seed(args.seed)
    grids = sudoku_sft_grids(args.grids, args.seed)
    try:
        if args.model_dir:
            model = load_model(args.model_dir, args.device).requires_grad_(True)
            tok = load_tokenizer(args.model_dir)
        else:
            example = dict(puzzle="0" * 16, solution="1" * 16)
            tok = build_tokenizer([chat_text(prompt_of(example)), sudoku_response("")], args.vocab)
            model = new_model(tok, args)
        batches = sudoku_batches(tok, grids, prompt_of, args.gen_length, args.batch, args.seed, args.device,
                                 args.mix, args.wrong_solver)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.2f}M parameters; {len(grids)} training grids; {args.steps} steps of {args.batch}")
    t0 = time.perf_counter()
    gen = torch.Generator(args.device).manual_seed(args.seed)
    log, rows = None, []
    if args.eval_every:
        log = test_logger(model, tok, args, rows, t0)
        log(0)
    losses = train(model, batches, args.steps, args.lr, gen, after_step=log)
    last = sum(losses[-50:]) / max(len(losses[-50:]), 1)
    if log is not None and len(losses) % args.eval_every:
        log(len(losses), force=True)                    # the end, also after a Ctrl-C
    save_model_dir(model, tok, args.out, extra={"sft.json": dict(
        vars(args), grid_list=grids, steps_taken=len(losses), seconds=round(time.perf_counter() - t0, 1),
        final_loss=last)})
    if rows:
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{time.perf_counter() - t0:.0f} s, {len(losses)} steps, final loss {last:.4f}; saved {args.out}")


if __name__ == "__main__":
    main()
