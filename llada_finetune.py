"""DTM fine-tuning of LLaDA-8B-Instruct: SAR-aligned masking (paper App. C), the annealing loop and the
command line (training, --eval, --bench).

The concepts it uses live one per file: `llada/model.py` (safetensors, the network, the sampler),
`llada/lora.py` (the adapter and its teacher copy), `llada/tasks.py` (data, prompts, rewards),
`llada/protocols.py` (the paper's prompts and scorers, the evaluation loop), `llada/presets.py` (the
presets), `llada/grpo.py` (--method grpo), `llada/bench.py` (--bench) and `dtm.py: dtm_loss` (the loss).
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
import math
import os
import pickle
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from dtm import dtm_loss, group_log_mean_exp
from llada.bench import SHAPES, auto_rollout_batch, bench
from llada.grpo import GRPOTrainer
from llada.lora import LORA_TARGETS, add_lora, load_adapter, lora_layers, save_adapter, snapshot_teacher, teacher_mode
from llada.model import (CheckpointError, LLaDAConfig, chat_prompt, decode, generate, left_pad, load_model,
                         load_tokenizer, random_model)
from llada.presets import D1, ELICIT, FALLBACK, PRESETS, RELEASED, TINY
from llada.protocols import PROTOCOLS, evaluate, run_eval
from llada.tasks import task_data
from maze.mdm import Help


# ============================================================================ SAR-aligned DTM
# The presets (PRESETS, RELEASED, TINY, FALLBACK, D1) live in llada/presets.py.


def stratified_t(B, generator=None, device="cpu"):
    """B times in (0, 1), one in each of B equal strata (one shared uniform offset), in random order."""
    t = (torch.rand((), generator=generator, device=device) + torch.arange(B, device=device)) / B
    return t[torch.randperm(B, generator=generator, device=device)]


def sar_mask(comp, block_length, mask_id, generator=None):
    """SAR-aligned forward process (App. C) on completions comp (B, G), as the sampler sees them:
    an active block k ~ U{0..K-1} per sequence; blocks before k clean, blocks after k fully masked;
    inside block k each token masked with probability 1 - kappa(t) = 1 - t, t ~ U(0, 1) stratified
    over the batch. Only the masked tokens of block k count, with the hazard weight
    kappa'(t) / (1 - kappa(t)) = 1 / (1 - t), divided by the block length (the constant K dropped).
    Returns x_t (B, G), counted (B, G) bool, time_weight (B,), t (B,)."""
    B, G = comp.shape
    dev = comp.device
    k = torch.randint(G // block_length, (B,), generator=generator, device=dev)
    t = stratified_t(B, generator, dev)
    blk = torch.arange(G, device=dev) // block_length                  # block of each position
    counted = (blk == k[:, None]) & (torch.rand(B, G, generator=generator, device=dev) < (1 - t)[:, None])
    x_t = torch.where(counted | (blk > k[:, None]), torch.full_like(comp, mask_id), comp)
    return x_t, counted, 1.0 / (1.0 - t).clamp_min(1e-3) / block_length, t


def any_order_mask(comp, mask_id, generator=None):
    """The any-order interpolant (eq. 9), the SAR ablation of App. D.3 (--masking any_order): every
    completion token masked with probability 1 - t, t ~ U(0, 1) stratified over the batch, whatever its
    block; all masked tokens count, with the hazard weight 1 / (1 - t), divided by the completion length.
    Returns x_t (B, G), counted (B, G) bool, time_weight (B,), t (B,), as sar_mask."""
    B, G = comp.shape
    dev = comp.device
    t = stratified_t(B, generator, dev)
    counted = torch.rand(B, G, generator=generator, device=dev) < (1 - t)[:, None]
    return comp.masked_fill(counted, mask_id), counted, 1.0 / (1.0 - t).clamp_min(1e-3) / G, t


def lr_at(step, n, lr, min_lr, warmup=0.05, decay=0.1):
    """Per phase (released code): linear warm-up over 5% of the steps, flat, linear decay over the last 10%."""
    w, d = max(1, round(warmup * n)), max(1, round(decay * n))
    if step < w:
        return lr * (step + 1) / w
    if step >= n - d:
        return min_lr + (lr - min_lr) * (n - 1 - step) / d
    return lr


class Trainer:
    """The annealing loop of DTM for LLaDA, one replay buffer per rank.

    for each phase a -> a + eta:
        teacher adapter := student adapter; fresh AdamW; LR schedule restarts
        buffer := (prompt, completion, r) from the teacher, `completions` per prompt
        for step in phase:  every refresh_every steps, replace refresh_prompts prompts' rollouts
                            minibatch from the buffer, SAR-masked afresh; dtm_loss; AdamW step
    The state (both adapters, optimizer, buffer, RNG, phase, step) is saved atomically every
    save_every steps, at the end of each phase, on Ctrl-C and at --stop_after; --resume goes on from it.
    """

    def __init__(self, args, model=None):
        self.args = args
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)                                      # LoRA's A: the same on every rank
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        base = (load_model(args.model_dir, self.device, dtype, not args.skip_finite_check) if model is None
                else model)                                            # bench: a random one
        self.model = add_lora(base, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
        self.model.checkpointing = args.grad_checkpointing
        self.cfg, self.tok = self.model.cfg, load_tokenizer(args.model_dir) if model is None else None
        if args.adapter:
            load_adapter(self.model, args.adapter)
        self.items, self.test = task_data(args)
        self.prompt_of, self.reward_of = (PROTOCOLS[args.protocol][k][args.task] for k in ("prompts", "rewards"))
        self.prompt_cache = {}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.gen = torch.Generator(self.device).manual_seed(args.seed + self.rank)
        self.check_gen = torch.Generator(self.device).manual_seed(args.seed + self.rank + 10 ** 6)   # the health
        # check's own draws: it does not change the training; nor do --control's shuffles
        self.control_gen = torch.Generator(self.device).manual_seed(args.seed + self.rank + 2 * 10 ** 6)
        torch.manual_seed(args.seed + self.rank)                          # LoRA dropout, per rank
        n = int(math.ceil(args.a_max / args.eta - 1e-9))
        self.a_grid = [min(k * args.eta, args.a_max) for k in range(n + 1)]
        self.phase, self.step, self.global_step, self.buffer, self.opt, self.ema = 1, 0, 0, None, None, None
        self.held = None                                               # the phase's held-out rollouts
        self.n_rollouts = 0                                            # trained on, all ranks (not the check's)
        self.rollout_batch = None if args.rollout_batch == "auto" else args.rollout_batch
        self.path = os.path.join(args.out, f"state_rank{self.rank}.pt")
        self.stop = False

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda")

    # ---- rollouts
    def rollout_mode(self):
        """The adapter the rollouts come from: DTM's frozen teacher p_a (llada/grpo.py: the policy)."""
        return teacher_mode(self.model)

    @torch.no_grad()
    def rollouts(self, prompt_ids, gen=None):
        """`completions` rollouts of each prompt, from `rollout_mode`: {idx, comp (n, G), r (n,)}."""
        args, C = self.args, self.args.completions
        rows = [i for i in prompt_ids for _ in range(C)]
        comps, rs = [], []
        self.model.eval()
        if self.rollout_batch is None:                                 # --rollout_batch auto, measured once
            T = max(len(self.prompt(i)) for i in prompt_ids) + args.gen_length
            with self.rollout_mode(), self.autocast():
                self.rollout_batch, table = auto_rollout_batch(self.model, T, args.block_length, args.temperature)
            print("rollout batch auto: " + ", ".join(f"{b}: {b * args.tokens_per_step / s:.0f} tokens/s"
                                                     for b, s, _ in table) + f" -> {self.rollout_batch}")
        for j in range(0, len(rows), self.rollout_batch):
            chunk = rows[j:j + self.rollout_batch]
            ids, am = left_pad([self.prompt(i) for i in chunk], self.cfg.eos_token_id, self.device)
            with self.rollout_mode(), self.autocast():
                comp = generate(self.model, ids, am, args.gen_length, args.gen_length // args.tokens_per_step,
                                args.block_length, args.temperature, generator=gen or self.gen,
                                cache=args.rollout_cache)
            comps.append(comp)
            rs += [self.reward_of(decode(self.tok, c, self.cfg), self.items[i])
                   for c, i in zip(comp.tolist(), chunk)]
        self.model.train()
        return dict(idx=torch.tensor(rows, device=self.device), comp=torch.cat(comps),
                    r=torch.tensor(rs, dtype=torch.float32, device=self.device))

    def prompt(self, i):
        """Token ids of training prompt i (chat template applied), tokenised once, when first drawn."""
        if i not in self.prompt_cache:
            self.prompt_cache[i] = chat_prompt(self.tok, self.prompt_of(self.items[i]))
        return self.prompt_cache[i]

    def draw_prompts(self, n, gen=None):
        return torch.randint(len(self.items), (n,), generator=gen or self.gen, device=self.device).tolist()

    def refresh(self):
        """Replace the rollouts of refresh_prompts prompt slots with new prompts' (from the teacher)."""
        args, C = self.args, self.args.completions
        slots = torch.randperm(args.buffer_prompts, generator=self.gen, device=self.device)[:args.refresh_prompts]
        rows = (slots[:, None] * C + torch.arange(C, device=self.device)).flatten()
        new = self.rollouts(self.draw_prompts(len(slots)))
        self.n_rollouts += len(new["r"]) * self.world
        for k in self.buffer:
            self.buffer[k][rows] = new[k]

    # ---- one optimiser step
    def inputs(self, data, rows):
        """x1, x_t, attention mask, the counted masks and the time weight of rows of data (the buffer or the
        held-out set): prompt + completion, SAR-masked afresh, or by data's own fixed masks (c_t, counted, tw)."""
        args, cfg = self.args, self.cfg
        prompts = [self.prompt(i) for i in data["idx"][rows].tolist()]
        ids, am = left_pad(prompts, cfg.eos_token_id, self.device)
        comp = data["comp"][rows]
        c_t, counted, tw = (data[k][rows] for k in ("c_t", "counted", "tw")) if "c_t" in data else \
            self.mask(comp, self.gen)[:3]
        if args.weighting == "released":                   # 1/n over the counted masks: the hazard's mean
            tw = 1.0 / counted.sum(1).clamp_min(1).float()
        x1, x_t = torch.cat([ids, comp], 1), torch.cat([ids, c_t], 1)
        am = torch.cat([am, torch.ones_like(comp)], 1)
        where = torch.cat([torch.zeros_like(ids, dtype=torch.bool), counted], 1)  # the active block's masks
        return x1, x_t, am, where, tw

    def mask(self, comp, gen):
        """The forward process of the loss: SAR-aligned (App. C), or --masking any_order (eq. 9)."""
        if self.args.masking == "any_order":
            return any_order_mask(comp, self.cfg.mask_token_id, gen)
        return sar_mask(comp, self.args.block_length, self.cfg.mask_token_id, gen)

    def loss(self, rows, eta, log_Z, r):
        x1, x_t, am, where, tw = self.inputs(self.buffer, rows)
        with self.autocast():
            logits = self.model(x_t, am, where)
            teacher_logits = None
            if self.args.phi != 0:
                with torch.no_grad(), teacher_mode(self.model):
                    teacher_logits = self.model(x_t, am, where)
        return dtm_loss(logits, teacher_logits, x1, where, r[rows], tw, eta, self.args.phi, log_Z=log_Z[rows])

    # ---- the health check of a phase (dtm.py: phase_objective)
    def held_out(self):
        """held_out_prompts new prompts' teacher rollouts that the phase never trains on, masked once (as --masking)."""
        h = self.rollouts(self.draw_prompts(self.args.held_out_prompts, self.check_gen), self.check_gen)
        h["c_t"], h["counted"], h["tw"], _ = self.mask(h["comp"], self.check_gen)
        return h

    @torch.no_grad()
    def phase_objective(self, eta, student):
        """The phase's own objective on the held-out set, per rollout (dtm.py: phase_objective): eq. 16 with
        Z over the set (per prompt or pooled, as --z). student=False: the teacher's, at the phase's start."""
        args, h = self.args, self.held
        r = h["r"] - h["r"].min()
        log_Z = group_log_mean_exp(eta * r.double(), h["idx"] if args.z == "prompt" else None)
        self.model.eval()
        out = []
        for rows in torch.arange(len(r), device=self.device).split(args.micro_batch or args.batch):
            x1, x_t, am, where, tw = self.inputs(h, rows)
            with self.autocast():
                with teacher_mode(self.model):
                    teacher_logits = self.model(x_t, am, where)
                logits = self.model(x_t, am, where) if student else teacher_logits
            out.append(dtm_loss(logits, teacher_logits, x1, where, r[rows], tw, eta, args.phi, log_Z=log_Z[rows],
                                per_sequence=True))
        self.model.train()
        return torch.cat(out).double()

    def train_step(self, eta):
        args = self.args
        # The tilt is unchanged by a constant shift of r; shifting by the buffer's minimum makes
        # e^{eta r} >= 1 >= phi, so every NLL weight (e^{eta r} - phi) / Z is >= 0 and the loss is
        # bounded (dtm.py's docstring). Z = E_a[e^{eta r}] per prompt (or pooled) over the whole buffer.
        released = args.weighting == "released"           # the released code: r clipped at 0, e^{eta r} raw
        r = self.buffer["r"].clamp_min(0) if released else self.buffer["r"] - self.buffer["r"].min()
        if args.control:                                   # no tilt: the rewards moved to other rollouts
            r = r[torch.randperm(len(r), generator=self.control_gen, device=self.device)]
        group = self.buffer["idx"] if args.z == "prompt" else None
        log_Z = torch.zeros_like(r) if released else group_log_mean_exp(eta * r.double(), group)
        if args.minibatch == "tilted":
            # Draw the rows with probability q_b = (e^{eta r_b} / Z_b) / B, the tilted buffer (eq. 11-12), and
            # weight each by 1 / (B q_b): its log Z becomes eta r_b, so its NLL weight is 1 - phi e^{-eta r_b}
            # and its teacher weight phi e^{-eta r_b}. The expected loss is the uniform draw's (eq. 16, the
            # same minimiser); at large eta it no longer spends the batch on rows of weight ~0.
            tilted = torch.exp(eta * r.double() - log_Z)
            log_Z = eta * r.double()
        micro = args.micro_batch or args.batch
        total = 0.0
        for j in range(0, args.batch, micro):
            n = min(micro, args.batch - j)
            rows = torch.multinomial(tilted, n, replacement=True, generator=self.gen) if args.minibatch == "tilted" \
                else torch.randint(len(r), (n,), generator=self.gen, device=self.device)
            loss = self.loss(rows, eta, log_Z, r) * len(rows) / args.batch    # gradient accumulation
            loss.backward()
            total += loss.item()
        gnorm = self.average_and_clip()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, args.steps_per_phase, args.lr, args.min_lr)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:                        # the released EMA of the student, every step
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p, 1 - args.ema)
        return total, float(gnorm)

    def average_and_clip(self):
        """Average the LoRA gradients over the ranks; clip their norm; return it."""
        if self.world > 1:
            flat = torch.cat([p.grad.flatten() for p in self.params])
            dist.all_reduce(flat)
            flat /= self.world
            off = 0
            for p in self.params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        return torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)

    def new_optimizer(self):
        args = self.args
        return torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)

    # ---- state
    def save(self):
        """Every rank writes its own buffer and RNG states; the adapters and AdamW, the same on every
        rank, are written by rank 0 only. Each file is replaced atomically: old or new, never half."""
        state = dict(buffer=self.buffer, held=self.held, phase=self.phase, step=self.step,
                     global_step=self.global_step, ema=self.ema, n_rollouts=self.n_rollouts,
                     gen=self.gen.get_state(), check_gen=self.check_gen.get_state(),
                     control_gen=self.control_gen.get_state(), rng=torch.get_rng_state(),
                     args=vars(self.args),
                     cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                     lora_checksum=sum(p.double().sum().item() for p in self.params))   # equal on all ranks
        if self.rank == 0:
            layers = lora_layers(self.model)
            state.update(student={n: (m.lora_A.detach(), m.lora_B.detach()) for n, m in layers.items()},
                         teacher={n: (m.teacher_A, m.teacher_B) for n, m in layers.items()},
                         opt=self.opt.state_dict() if self.opt else None)
        torch.save(state, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def load(self):
        shared_path = os.path.join(self.args.out, "state_rank0.pt")
        try:
            s = torch.load(self.path, map_location=self.device, weights_only=True)
            shared = s if self.rank == 0 else torch.load(shared_path, map_location=self.device,
                                                        weights_only=True)
            if shared["global_step"] != s["global_step"]:
                raise ValueError(f"{shared_path} is at step {shared['global_step']}, this rank's file at "
                                 f"{s['global_step']} (a crash between two saves?)")
            with torch.no_grad():
                for n, m in lora_layers(self.model).items():
                    (A, B), (tA, tB) = shared["student"][n], shared["teacher"][n]
                    m.lora_A.copy_(A)
                    m.lora_B.copy_(B)
                    m.teacher_A.copy_(tA)
                    m.teacher_B.copy_(tB)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{self.path}: cannot resume (corrupt, or not a state file of this "
                                  f"script)") from None
        except (OSError, RuntimeError, KeyError, EOFError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot resume ({str(e).splitlines()[0]})") from None
        self.phase, self.step, self.global_step, self.buffer = s["phase"], s["step"], s["global_step"], s["buffer"]
        self.held, self.n_rollouts = s.get("held"), s.get("n_rollouts", 0)
        if shared["opt"] is not None:
            self.opt = self.new_optimizer()
            self.opt.load_state_dict(shared["opt"])
        self.ema = s.get("ema")
        self.gen.set_state(s["gen"].cpu())
        for k in ("check_gen", "control_gen"):
            if k in s:
                getattr(self, k).set_state(s[k].cpu())
        torch.set_rng_state(s["rng"].cpu())
        if s.get("cuda_rng") is not None:                              # LoRA dropout on the GPU
            torch.cuda.set_rng_state(s["cuda_rng"].cpu(), self.device)

    def test_accuracy(self, **at):
        """--phase_eval: the student on the first test items, as --eval scores them; logged with `at` (e.g. the
        phase and its a) and the training seconds so far (the evaluations' own time left out)."""
        args, t0 = self.args, time.time()
        acc = evaluate(self.model, self.tok, args.task, self.test[:args.phase_eval], args.eval_lengths[0],
                       args.eval_batch, args.block_length, args.protocol)[PROTOCOLS[args.protocol]["scorer"]]
        self.model.train()
        self.eval_s += time.time() - t0
        self.log(**at, seconds=round(time.time() - self.t_start - self.eval_s, 1), test=acc)
        if self.rank == 0:
            print(", ".join(f"{k} = {v:g}" for k, v in at.items()) + f": test accuracy {acc['acc']:.3f} ± "
                  f"{acc['se']:.3f} (all right: {acc['whole']:.3f} ± {acc['whole_se']:.3f}, {acc['n']} items)")

    def log(self, **row):
        if self.rank == 0:
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---- the loop
    def run(self):
        args = self.args
        os.makedirs(args.out, exist_ok=True)
        self.t_start, self.eval_s = time.time(), 0.0                   # the clock of --phase_eval's log
        if args.resume and os.path.isfile(self.path):
            self.load()
            print(f"rank {self.rank}: resumed from {self.path} at phase {self.phase}, step {self.step}")
        previous = signal.signal(signal.SIGINT, self.on_interrupt)
        try:
            if args.phase_eval and self.phase == 1 and self.step == 0:
                self.test_accuracy(phase=0, a=0.0, rollouts=0)          # the base
            while self.phase < len(self.a_grid):
                k, t0 = self.phase, time.time()
                eta = self.a_grid[k] - self.a_grid[k - 1]
                if self.step == 0:                                      # start of a phase
                    snapshot_teacher(self.model)                        # p_a := the current model
                    self.ema = [p.detach().clone() for p in self.params] if args.ema else None
                    self.opt = self.new_optimizer()
                    self.buffer = self.rollouts(self.draw_prompts(args.buffer_prompts))
                    self.n_rollouts += len(self.buffer["r"]) * self.world
                    if args.held_out_prompts:
                        self.held = self.held_out()
                        self.held["j_teacher"] = self.phase_objective(eta, student=False)
                    self.log(phase=k, a=self.a_grid[k - 1], buffer_reward=self.buffer["r"].mean().item(),
                             rollout_s=round(time.time() - t0, 1))
                bar = tqdm(total=args.steps_per_phase, initial=self.step, disable=self.rank != 0,
                           desc=f"phase {k}/{len(self.a_grid) - 1} a->{self.a_grid[k]:g}")
                while self.step < args.steps_per_phase:
                    if self.step and self.step % args.refresh_every == 0:
                        self.refresh()
                    loss, gnorm = self.train_step(eta)
                    self.step, self.global_step = self.step + 1, self.global_step + 1
                    self.log(phase=k, step=self.step, global_step=self.global_step, loss=loss, grad_norm=gnorm,
                             lr=self.opt.param_groups[0]["lr"], buffer_reward=self.buffer["r"].mean().item())
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.4f}", r=f"{self.buffer['r'].mean().item():.3f}")
                    if self.stop or (args.stop_after and self.global_step >= args.stop_after):
                        self.save()
                        print(f"rank {self.rank}: stopped at phase {k}, step {self.step}; saved {self.path}")
                        return
                    if args.save_every and self.global_step % args.save_every == 0:
                        self.save()
                bar.close()
                if self.ema is not None:                                # released: the EMA becomes
                    with torch.no_grad():                               # the student (and so the
                        for e, p in zip(self.ema, self.params):         # next phase's teacher)
                            p.copy_(e)
                if args.held_out_prompts and self.held is not None:        # the health check
                    d = self.phase_objective(eta, student=True) - self.held["j_teacher"]
                    check = dict(held_out_change=d.mean().item(), held_out_change_se=(d.std() / len(d) ** 0.5).item())
                    self.log(phase=k, a=self.a_grid[k], **check)
                    if self.rank == 0:
                        x, se = check["held_out_change"], check["held_out_change_se"]
                        print(f"phase {k}: held-out objective change {x:.2e} ± {se:.1e}: " +
                              ("below 0 by more than its SE, the phase learned" if x < -se else
                               "not below 0 by its SE, the phase fitted noise"))
                if args.phase_eval:
                    self.test_accuracy(phase=k, a=self.a_grid[k], rollouts=self.n_rollouts)
                self.phase, self.step = self.phase + 1, 0
                self.save()
                if self.rank == 0:
                    save_adapter(self.model, os.path.join(args.out, "adapter"), args.lora_r, args.lora_alpha,
                                 args.lora_dropout)
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_interrupt(self, *_):
        if self.stop:                                                   # a second Ctrl-C: abort now
            raise KeyboardInterrupt
        self.stop = True
        print("\nCtrl-C: saving after this step (press again to abort without saving)")


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
    g = p.add_argument_group("DTM (a flag with no default shown takes the task's preset: the epilog)")
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
    g.add_argument("--z", choices=["prompt", "buffer"],
                   help="Z = E_a[e^{eta r}] per prompt or over the whole buffer")
    g.add_argument("--masking", choices=["sar", "any_order"], default="sar",
                   help="the loss's forward process: sar, one active block as the sampler sees it (App. C, "
                        "eq. 34); any_order, every completion token masked with probability 1 - t (eq. 9; "
                        "the ablation of App. D.3)")
    g.add_argument("--minibatch", choices=["uniform", "tilted"],
                   help="how a step draws its rows from the buffer: uniform (the paper); tilted, with probability "
                        "e^{eta r}/Z each, importance-weighted back (the same expected loss; at large eta "
                        "the batch is not spent on rows of weight ~0) (default: uniform)")
    g.add_argument("--control", action="store_true",
                   help="the no-tilt control: every step, the rewards are shuffled over the buffer (by a "
                        "generator of their own) before the weights, so they carry no signal and the rest "
                        "of the run, its loss noise included, is DTM's")
    g.add_argument("--phase_eval", type=int, help="evaluate the student on the first N test items (the --eval "
                                                  "protocol, first --eval_lengths) at the start and after "
                                                  "every phase, into metrics.jsonl (default: 0, off)")
    r = p.add_argument_group("--method grpo: diffu-GRPO, d1's RL baseline (llada/grpo.py); unset flags take "
                             "d1's released values (tiny: the same loop, sized for the small LLaDA)")
    r.add_argument("--method", choices=["dtm", "grpo"], default="dtm", help="the fine-tuning method")
    r.add_argument("--beta", type=float, help="KL coefficient to the reference (d1: 0.04)")
    r.add_argument("--mu", type=int, help="updates per batch of rollouts (d1: 12)")
    r.add_argument("--eps", type=float, help="ratio clip (d1: 0.5)")
    r.add_argument("--p_mask_prompt", type=float, default=0.15, help="prompt masking of d1's surrogate log q")
    r.add_argument("--grpo_prompts", type=int, help="prompts per iteration; G = --completions rollouts each")
    r.add_argument("--iterations", type=int, help="GRPO iterations (rollouts = iterations x prompts x G)")
    r.add_argument("--ref_sync", type=int, help="iterations between re-syncs of the reference to the policy "
                                                "(d1: 64 steps = 5 iterations of 12; 0: never)")
    r.add_argument("--eval_every", type=int, default=2, help="--phase_eval: iterations between evaluations")
    s = p.add_argument_group("sampling and model")
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
    s.add_argument("--seed", type=int, default=0, help="seeds data, masking, sampling (rank r: seed + r)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: bf16 weights and autocast; cpu: float32")
    return p


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
            bench(args, Trainer(args, model))
        elif args.eval:
            run_eval(args)
        else:
            if not dist.is_initialized() or dist.get_rank() == 0:     # what the run was, for the reports
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "args.json"), "w") as f:
                    json.dump(vars(args), f, indent=1)
            (GRPOTrainer(Trainer(args)) if args.method == "grpo" else Trainer(args)).run()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
