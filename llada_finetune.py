"""DTM fine-tuning of LLaDA-8B-Instruct, the command line: training (DTM, or d1's GRPO with --method grpo),
--eval and --bench, on one GPU or several (torchrun), resumable.

It is parsing and dispatch. The concepts live one per file: `llada/trainer.py` (SAR-aligned masking, the
annealing loop), `dtm.py: dtm_loss` (the loss, passed to the trainer), `llada/model.py` (safetensors, the
network, the sampler), `llada/lora.py` (the adapter and its teacher copy), `llada/tasks.py` (data, prompts,
rewards), `llada/protocols.py` (the paper's prompts and scorers, the evaluation loop), `llada/presets.py`
(the presets), `llada/grpo.py` (--method grpo) and `llada/bench.py` (--bench).
No `transformers`, no `peft`: torch and `tokenizers` only.

    # the real model (download once, with internet):  huggingface-cli download GSAI-ML/LLaDA-8B-Instruct --local-dir LLaDA-8B-Instruct
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task sudoku                 # DTM, App. D.2 preset
    torchrun --nproc_per_node=8 llada_finetune.py --model_dir LLaDA-8B-Instruct --task countdown
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task gsm8k --eval --test_data gsm8k_test.jsonl
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task sudoku --resume --out runs/sudoku
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task sudoku --bench --batch 8 --grad_checkpointing
    python llada_finetune.py --model_dir runs/tiny/base --task sudoku --preset tiny   # a small LLaDA (llada/sft.py)
    python llada_finetune.py --help
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from dtm import dtm_loss, group_log_mean_exp
from grpo import group_advantage, grpo_loss
from llada.bench import SHAPES, bench
from llada.grpo import GRPOTrainer
from llada.lora import LORA_TARGETS
from llada.model import CheckpointError, LLaDAConfig, random_model
from llada.presets import D1, ELICIT, FALLBACK, PRESETS, RELEASED, TINY
from llada.protocols import PROTOCOLS, run_eval
from llada.trainer import Trainer
from maze.mdm import Help


def make_trainer(args):
    """The trainer of args.method: DTM's with dtm.py's loss, or d1's (llada/grpo.py) on it with grpo.py's.
    The library takes the losses as arguments, so that it imports no script."""
    t = Trainer(args, dtm_loss, group_log_mean_exp)
    return GRPOTrainer(t, grpo_loss, group_advantage) if args.method == "grpo" else t


# ============================================================================ the command line
def batch_or_auto(text):
    """--rollout_batch: a positive integer, or auto."""
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"a positive integer or auto (got {text!r})")


def parser():
    presets = "\n".join(f"  {name} {t:9s} " + " ".join(f"{k}={v}" for k, v in d.items())
                        for name, table in (("paper   ", PRESETS), ("released", RELEASED), ("tiny    ", TINY),
                                            ("elicit  ", ELICIT))
                        for t, d in table.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help,
                                epilog="presets (--preset paper: App. D.2; released: the authors' configs; tiny: a small "
                                       "LLaDA from llada.sft on 2 CPU cores; elicit: the one made with --mix; a flag overrides its value; "
                                       "what no preset sets: " + " ".join(f"{k}={v}" for k, v in FALLBACK.items())
                                       + "):\n" + presets)
    p.add_argument("--model_dir", help="LLaDA checkpoint: config.json, tokenizer.json, safetensors")
    p.add_argument("--skip_finite_check", action="store_true",
                   help="load the weights without checking that every one is finite (the check reads the whole "
                        "checkpoint once: about a minute for the 8B on one CPU core, well under a second on a GPU)")
    p.add_argument("--task", required=True, choices=list(PRESETS),
                   help="sudoku (4x4, generated), countdown (3 numbers, generated or --train_data), "
                        "gsm8k / math (local JSONL: question, answer)")
    p.add_argument("--train_data", help="training items: JSONL (gsm8k, math; optional for countdown: numbers/"
                                        "target, nums/target or input/output) or CSV (sudoku: Puzzle,Solution)")
    p.add_argument("--test_data", help="test items, as --train_data (e.g. SPG's countdown_cd3_test.jsonl, "
                                       "test_sudoku_split_new.csv)")
    p.add_argument("--out", default="runs/llada", help="state_rank*.pt, metrics.jsonl, adapter/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state_rank*.pt")
    p.add_argument("--adapter", help="start from (or evaluate) this PEFT-layout LoRA adapter directory")
    p.add_argument("--eval", action="store_true", help="only evaluate: block 32, steps = gen/2, temperature 0")
    p.add_argument("--bench", action="store_true", help="only time warm sampling and training steps and "
                                                        "measure their peak memory (see --bench_shape)")
    p.add_argument("--bench_shape", choices=list(SHAPES), help="bench a random model of this shape, built in "
                                                                "memory (no --model_dir needed)")
    p.add_argument("--bench_batches", type=int, nargs="+", help="batch sizes to bench (default: --batch)")
    p.add_argument("--bench_sampler", action="store_true", help="also time whole greedy generations, exact "
                                                                "against the KV-cached samplers")
    p.add_argument("--protocol", choices=list(PROTOCOLS),
                   help="prompts, rewards and scorers: ours; the paper's (the DTM authors' Countdown and "
                        "Sudoku, SPG's GSM8K and MATH500; the numbers of Table 1); short: ours with a one-line "
                        "Sudoku prompt, for a small model (default: ours)")
    p.add_argument("--eval_lengths", type=int, nargs="+", help="generation lengths (default: 256 512)")
    p.add_argument("--eval_batch", type=int, help="prompts per sampling batch (default: 8)")
    p.add_argument("--eval_limit", type=int, default=0, help="first N test items only (0: all)")
    dtm_flags(p.add_argument_group("DTM (a flag with no default shown takes the task's preset: the epilog)"))
    grpo_flags(p.add_argument_group("--method grpo: diffu-GRPO, d1's RL baseline (llada/grpo.py); unset flags take "
                                    "d1's released values (tiny: the same loop, sized for the small LLaDA)"))
    model_flags(p.add_argument_group("sampling and model"))
    return p


def dtm_flags(g):
    """DTM's flags (paper §3, App. C-D.2)"""
    g.add_argument("--preset", choices=["paper", "released", "tiny", "elicit"], default="paper",
                   help="paper: App. D.2 (all tasks); released: the authors' Countdown and Sudoku configs; "
                        "tiny: Sudoku on a small LLaDA made by python -m llada.sft, 2 CPU cores; elicit: tiny's "
                        "sizes for the base of python -m llada.sft --mix 0.5 (temperature-1 rollouts, eta 10)")
    g.add_argument("--weighting", choices=["paper", "released"],
                   help="paper: hazard time weight, Z per prompt, r shifted by the buffer's minimum; released: "
                        "1/n over the counted masks, raw e^{eta r}, r clipped at 0 (default: paper)")
    g.add_argument("--ema", type=float, help="released: the student's EMA (this decay, every step) becomes "
                                            "student and teacher at each phase end; 0: off (default: 0)")
    g.add_argument("--phi", type=float, default=1.0, help="control variate (eq. 17); 1 in all of the paper's runs")
    g.add_argument("--eta", type=float, help="annealing step of the tilt a")
    g.add_argument("--a_max", type=float, help="final tilt (default: 100, the released a_end)")
    g.add_argument("--steps_per_phase", type=int, help="optimiser steps per phase")
    g.add_argument("--batch", type=int, help="sequences per optimiser step per GPU")
    g.add_argument("--micro_batch", type=int,
                   help="sequences per forward (gradient accumulation); 0: batch (default: 0)")
    g.add_argument("--lr", type=float, help="AdamW peak learning rate (betas 0.9, 0.99)")
    g.add_argument("--min_lr", type=float, help="learning rate at the end of a phase's 10%% decay")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (App. D.2: 0.1)")
    g.add_argument("--clip", type=float, help="gradient-norm clip")
    g.add_argument("--buffer_prompts", type=int, help="prompts in the replay buffer (per GPU)")
    g.add_argument("--completions", type=int, help="rollouts per buffer prompt")
    g.add_argument("--refresh_prompts", type=int, help="prompts replaced at each refresh")
    g.add_argument("--refresh_every", type=int, help="steps between refreshes")
    g.add_argument("--temperature", type=float, help="rollout temperature")
    g.add_argument("--held_out_prompts", type=int,
                   help="prompts whose teacher rollouts each phase holds out for its health check, the change "
                        "of its objective there (< 0 by more than its SE: the phase learned; else it fitted "
                        "noise); 0: off (default: 16)")
    g.add_argument("--held_out_maskings", type=int,
                   help="maskings of each held-out rollout (their mean is its change): the check's masking noise "
                        "falls with them at no cost in rollouts (default: 4)")
    g.add_argument("--z", choices=["prompt", "buffer"],
                   help="Z = E_a[e^{eta r}] per prompt or over the whole buffer")
    g.add_argument("--masking", choices=["sar", "any_order"], default="sar",
                   help="the loss's forward process: sar, one active block as the sampler sees it (App. C, "
                        "eq. 34); any_order, every completion token masked with probability 1 - t (eq. 9; "
                        "the ablation of App. D.3)")
    g.add_argument("--minibatch", choices=["uniform", "without", "tilted"],
                   help="how a step draws its rows from the buffer: uniform, with replacement (the paper); "
                        "without, --batch distinct rows (the authors'); tilted, with probability e^{eta r}/Z "
                        "each, importance-weighted back (the same expected loss; at large eta the batch is not "
                        "spent on rows of weight ~0) (default: uniform)")
    g.add_argument("--shift", choices=["buffer", "prompt"],
                   help="r minus its minimum over the buffer, or over each prompt's rollouts (then a prompt "
                        "whose rollouts tie carries only the teacher term); the same tilt and minimiser "
                        "(default: buffer)")
    g.add_argument("--block_count", choices=["0..b", "1..b"],
                   help="SAR masking's number of counted masks in the active block: 0..b (t ~ U(0, 1), each "
                        "token masked with probability 1 - t, hazard weight; 1/(b+1) of the rows count "
                        "nothing) or 1..b (uniform, weight 1/count: the same expected loss, no empty rows; "
                        "the authors' draw) (default: 0..b)")
    g.add_argument("--reset_optimizer", choices=["phase", "never"],
                   help="a fresh AdamW at every phase (the authors'), or its moments carried across phases "
                        "(default: phase)")
    g.add_argument("--prompt_order", choices=["random", "shuffled"],
                   help="training prompts drawn with replacement, or in order through the training set shuffled "
                        "afresh at each pass (the authors') (default: random)")
    g.add_argument("--refresh_order", choices=["random", "cycle"],
                   help="the buffer slots a refresh replaces: drawn at random, or in turn from slot 0 of each "
                        "phase's buffer (the authors') (default: random)")
    g.add_argument("--lr_rounding", choices=["round", "floor"],
                   help="the warm-up's 5%% and the decay's 10%% of a phase's steps, rounded (ours) or floored "
                        "(the authors': 12 and 25 of 256) (default: round)")
    g.add_argument("--warmup_steps", type=int,
                   help="lr warm-up steps at the start of each phase (0: 5%% of the phase, at least 1; the "
                        "released) (default: 0)")
    g.add_argument("--control", action="store_true",
                   help="the no-tilt control: every step, the rewards are shuffled over the buffer (by a "
                        "generator of their own) before the weights, so they carry no signal and the rest "
                        "of the run, its loss noise included, is DTM's")
    g.add_argument("--phase_eval", type=int, help="evaluate the student on the first N test items (the --eval "
                                                  "protocol, first --eval_lengths) at the start and after "
                                                  "every --eval_every phases, into metrics.jsonl (default: 0, off)")
    g.add_argument("--eval_every", type=int, help="--phase_eval: phases (or --method grpo's iterations) between "
                                                  "evaluations; the last is always evaluated (default: 1)")


def grpo_flags(r):
    """--method grpo's flags (d1's names)"""
    r.add_argument("--method", choices=["dtm", "grpo"], default="dtm", help="the fine-tuning method")
    r.add_argument("--beta", type=float, help="KL coefficient to the reference (d1: 0.04)")
    r.add_argument("--mu", type=int, help="updates per batch of rollouts (d1: 12)")
    r.add_argument("--eps", type=float, help="ratio clip (d1: 0.5)")
    r.add_argument("--p_mask_prompt", type=float, default=0.15, help="prompt masking of d1's surrogate log q")
    r.add_argument("--grpo_prompts", type=int, help="prompts per iteration; G = --completions rollouts each")
    r.add_argument("--iterations", type=int, help="GRPO iterations (rollouts = iterations x prompts x G)")
    r.add_argument("--ref_sync", type=int, help="iterations between re-syncs of the reference to the policy "
                                                "(d1: 64 steps = 5 iterations of 12; 0: never)")


def model_flags(s):
    """The sampler's, LoRA's and the run's flags"""
    s.add_argument("--gen_length", type=int, help="completion tokens of a rollout (default: 256)")
    s.add_argument("--block_length", type=int, help="semi-autoregressive block (default: 32)")
    s.add_argument("--tokens_per_step", type=int, help="rollout steps = gen_length / this (default: 2)")
    s.add_argument("--rollout_batch", type=batch_or_auto,
                   help="sequences per sampling batch; auto: measured at the first rollouts, the smallest "
                        "batch within 5%% of the best tokens/s that fits in 75%% of free memory (default: 16)")
    s.add_argument("--rollout_cache", choices=["prefix", "dual"],
                   help="Fast-dLLM's block KV cache for rollouts: faster, approximate (llada/README.md); default: exact")
    s.add_argument("--lora_r", type=int, help="LoRA rank (default: 128, App. D.2)")
    s.add_argument("--lora_alpha", type=float, help="LoRA alpha; scale = alpha / r (default: 64)")
    s.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    s.add_argument("--lora_targets", nargs="+", choices=LORA_TARGETS,
                   help="linear layers of every block that get an adapter (default: all seven)")
    s.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward")
    s.add_argument("--save_every", type=int, default=50, help="steps between state saves (0: phase ends only)")
    s.add_argument("--stop_after", type=int, default=0, help="save and stop after this many steps in all")
    s.add_argument("--max_seconds", type=float, default=0, help="stop after the phase (or --method grpo's iteration) "
                                                                "in which training passes this many seconds, "
                                                                "evaluations left out (0: no limit)")
    s.add_argument("--seed", type=int, default=0, help="seeds data, masking, sampling (rank r: seed + r)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: bf16 weights and autocast; cpu: float32")


def parse(argv=None):
    p = parser()
    args = p.parse_args(argv)
    table = dict(paper=PRESETS, released=RELEASED, tiny=TINY, elicit=ELICIT)[args.preset]
    if args.task not in table:
        p.error(f"--preset {args.preset}: there is a config for {' and '.join(table)} only")
    d1 = D1[args.preset] if args.method == "grpo" else {}
    for k, v in {**FALLBACK, "lora_targets": list(LORA_TARGETS), **table[args.task], **d1}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    problems = [m for bad, m in [
        (args.eta <= 0, f"--eta must be > 0 (got {args.eta})"),
        (not 0 <= args.phi <= 1, f"--phi must be in [0, 1] (got {args.phi})"),
        (not 0 <= args.ema < 1, f"--ema must be in [0, 1) (got {args.ema})"),
        (args.gen_length % args.block_length, "--gen_length must be a multiple of --block_length"),
        ((args.gen_length // args.tokens_per_step) % (args.gen_length // args.block_length),
         "gen_length / tokens_per_step steps must split evenly over the blocks"),
        (args.refresh_prompts > args.buffer_prompts, "--refresh_prompts exceeds --buffer_prompts"),
        (args.minibatch == "without" and args.batch > args.buffer_prompts * args.completions,
         "--minibatch without needs --batch <= --buffer_prompts x --completions (distinct rows)"),
        (args.held_out_maskings < 1 or args.eval_every < 1, "--held_out_maskings and --eval_every must be >= 1"),
        (not args.bench_shape and not args.model_dir, "--model_dir is required (except with --bench_shape)"),
        (args.model_dir and not os.path.isdir(args.model_dir), f"--model_dir {args.model_dir} is not a directory"),
        (args.method == "grpo" and args.completions < 2, "--method grpo needs --completions >= 2 (a group)"),
        (args.method == "grpo" and args.resume, "--resume is for DTM runs only"),
        (args.minibatch == "tilted" and args.weighting == "released",
         "--minibatch tilted needs --weighting paper (the released weights have no Z)")]
        if bad]
    if problems:
        p.error(problems[0])
    return args


def main(argv=None):
    args = parse(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:   # torchrun
        local = int(os.environ.get("LOCAL_RANK", 0))
        if args.device.startswith("cuda"):
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        if args.bench:                                  # a random model of --bench_shape, or --model_dir's
            dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
            model = random_model(LLaDAConfig(**SHAPES[args.bench_shape]), args.device, dtype) \
                if args.bench_shape else None
            bench(args, Trainer(args, dtm_loss, group_log_mean_exp, model))   # DTM's steps, whatever --method
        elif args.eval:
            run_eval(args)
        else:
            if not dist.is_initialized() or dist.get_rank() == 0:     # what the run was, for the reports
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "args.json"), "w") as f:
                    json.dump(vars(args), f, indent=1)
            make_trainer(args).run()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

