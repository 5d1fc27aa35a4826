"""Rejection-sampling fine-tuning (RFT), iterated (expert iteration): the simplest reward fine-tuning, beside
DTM for the small Sudoku LLaDA.

One round: draw --prompts training puzzles, sample --samples completions of each from the current model with
the rollouts' sampler (temperature 1, as DTM's), keep each prompt's best (the highest reward; the first of
equals), and train the whole model on those with LLaDA's SFT loss (`llada/sft.py: sft_loss`, --steps AdamW
steps). Repeat from the new model. As eta -> infinity with Z per prompt, DTM's loss is this cross-entropy
on each prompt's best rollouts (tests/test_dtm_loss.py), with DTM's masking and a LoRA instead.

After every round the greedy test accuracy is logged to OUT/metrics.jsonl as llada_finetune.py --phase_eval
logs it (`iteration`, `rollouts`, `seconds` of training and sampling, `test`), so `lab.sudoku_report`
and `llada.elicit` read both; the model is saved in the HF layout with the base's sft.json.

    python -m lab.rft --model_dir runs/mixed --out runs/rft --rounds 2
"""
import argparse
import json
import os
import random
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llada.model import CheckpointError, chat_prompt, load_model, load_tokenizer          # noqa: E402
from llada.sampler import left_pad                                                    # noqa: E402
from lab.modes import sample                                                         # noqa: E402
from llada.protocols import PROTOCOLS, evaluate                                        # noqa: E402
from llada.sft import save_model_dir, train                                            # noqa: E402
from llada.tasks import sudoku_data                                                    # noqa: E402
from maze.mdm import Help                                                              # noqa: E402


@torch.no_grad()
def best_rollouts(model, tok, items, n, gen, args):
    """Sample n completions of each item at temperature 1 and keep each one's best: (prompt ids, mask,
    completion ids (P, G) of the best), their rewards (P,)."""
    prompt_of = PROTOCOLS[args.protocol]["prompts"]["sudoku"]
    ids, am = left_pad([chat_prompt(tok, prompt_of(it)) for it in items], model.cfg.eos_token_id)
    _, r, comp = sample(model, tok, items, n, args.temperature, args.gen_length, args.block_length,
                            args.tokens_per_step, args.batch_sample, gen, args.protocol, return_ids=True)
    k = r.argmax(1)                                      # each prompt's best; torch: the first of equals
    best = comp.view(len(items), n, -1)[torch.arange(len(items)), k]                 # (P, G)
    return ids, am, best, r[torch.arange(len(items)), k]


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--model_dir", required=True, help="the base: a model directory of python -m llada.sft")
    p.add_argument("--out", required=True, help="metrics.jsonl and the fine-tuned model (HF layout)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of sample, keep the best, SFT")
    p.add_argument("--prompts", type=int, default=512, help="training puzzles per round")
    p.add_argument("--samples", type=int, default=8, help="completions per puzzle; the best is kept")
    p.add_argument("--steps", type=int, default=200, help="AdamW steps of SFT per round")
    p.add_argument("--batch", type=int, default=64, help="sequences per SFT step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak lr (a tenth of the steps warm-up, cosine to 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (DTM's rollouts': 1)")
    p.add_argument("--gen_length", type=int, default=24, help="as --preset tiny")
    p.add_argument("--block_length", type=int, default=8, help="as --preset tiny")
    p.add_argument("--tokens_per_step", type=int, default=2, help="as --preset tiny")
    p.add_argument("--batch_sample", type=int, default=128, help="sequences per sampling batch")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="short", help="prompts and rewards")
    p.add_argument("--eval_limit", type=int, default=256, help="test puzzles of the greedy evaluation")
    p.add_argument("--eval_every", type=int, default=1, help="rounds between evaluations (the last is always)")
    p.add_argument("--seed", type=int, default=0, help="seeds the puzzles, the samples and the SFT masks")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if min(args.rounds, args.prompts, args.samples, args.steps, args.batch, args.eval_every) < 1:
        p.error("--rounds, --prompts, --samples, --steps, --batch and --eval_every must be at least 1")
    try:
        model, tok = load_model(args.model_dir).requires_grad_(True), load_tokenizer(args.model_dir)
        record = {}                                     # the base's SFT record (its mixture), carried over
        if os.path.isfile(os.path.join(args.model_dir, "sft.json")):
            with open(os.path.join(args.model_dir, "sft.json")) as f:
                record = {"sft.json": json.load(f)}
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    train_items, test = sudoku_data(args.seed)
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    log = open(os.path.join(args.out, "metrics.jsonl"), "w")
    seconds, rollouts = 0.0, 0

    def evaluation(k):
        acc = evaluate(model, tok, "sudoku", test[:args.eval_limit], args.gen_length, 64, args.block_length,
                       args.protocol)[PROTOCOLS[args.protocol]["scorer"]]
        log.write(json.dumps(dict(iteration=k, rollouts=rollouts, seconds=round(seconds, 1), test=acc)) + "\n")
        log.flush()
        print(f"round {k}: {rollouts} rollouts, {seconds:.0f} s: test accuracy {acc['acc']:.3f} ± {acc['se']:.3f} "
              f"(all right: {acc['whole']:.3f})")

    evaluation(0)
    for k in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        items = [rng.choice(train_items) for _ in range(args.prompts)]
        ids, am, best, r = best_rollouts(model, tok, items, args.samples, gen, args)
        rollouts += args.prompts * args.samples
        print(f"round {k}: kept the best of {args.samples} for {args.prompts} puzzles, mean reward {r.mean():.3f}")

        def next_batch():
            j = torch.randint(len(items), (args.batch,), generator=gen)
            return ids[j], am[j], best[j]
        train(model, next_batch, args.steps, args.lr, gen, warmup=max(1, args.steps // 10), desc=f"rft {k}")
        model.requires_grad_(True)
        seconds += time.perf_counter() - t0
        if k % args.eval_every == 0 or k == args.rounds:
            evaluation(k)
    log.close()
    save_model_dir(model, tok, os.path.join(args.out, "model"),
                   extra={**record, "rft.json": dict(vars(args), rollouts=rollouts, seconds=seconds)})
    print(f"saved {os.path.join(args.out, 'model')}")


if __name__ == "__main__":
    main()
