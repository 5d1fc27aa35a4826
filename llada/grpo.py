"""diffu-GRPO (d1) for LLaDA, beside DTM: the same Trainer's rollouts, LoRA, sampler, rewards and evaluation;
only the loss (grpo.py's `grpo_loss` and `group_advantage`, passed in by llada_finetune.py: the library
imports no script) and the update schedule differ.

    python llada_finetune.py --model_dir runs/tiny/base --task sudoku --preset tiny --method grpo
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task sudoku --method grpo     # d1's released sizes

One iteration: `grpo_prompts` prompts, G = `completions` rollouts each from the current policy (the student
adapter); the advantage r - mean of the prompt's group; mu updates on these rollouts, each with its own
prompt masking (d1's surrogate log q: completion fully masked, prompt tokens masked with probability
p_mask_prompt), the clipped ratio to the policy that drew them and the k3 KL to the reference. The
reference is the adapter at the start (LoRA's B = 0: the base), kept in the Trainer's teacher slot and
re-synced to the policy every `ref_sync` iterations (d1: every 64 steps; 0: never, so the optimum stays the
tilt at a = 1 / beta of the starting model). Completion tokens count up to and including the first stop token.
"""
import contextlib
import os
import signal
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llada.lora import save_adapter, snapshot_teacher, teacher_mode
from llada.sampler import left_pad


class GRPOTrainer:
    """d1's loop on a Trainer (llada/trainer.py): it borrows the trainer's model, adapters, data, rollouts
    and evaluation, and replaces its phases by GRPO iterations. grpo_loss, group_advantage: grpo.py's."""

    def __init__(self, trainer, grpo_loss, group_advantage):
        self.t, self.grpo_loss, self.group_advantage = trainer, grpo_loss, group_advantage
        trainer.rollout_mode = contextlib.nullcontext                  # rollouts from the policy itself
        m = trainer.cfg
        self.stop_ids = {m.eos_token_id} | ({trainer.tok.token_to_id("<|eot_id|>")} - {None})

    def inputs(self, data, gen):
        """d1's surrogate input for every rollout of data: x1, x_in, attention mask, where (the counted
        completion tokens), weight (1 / their number)."""
        t, cfg = self.t, self.t.cfg
        ids, am = left_pad([t.prompt(i) for i in data["idx"].tolist()], cfg.eos_token_id, t.device)
        comp = data["comp"]
        hit = torch.isin(comp, torch.tensor(sorted(self.stop_ids), device=t.device))
        first = torch.where(hit.any(1), hit.float().argmax(1), comp.shape[1])        # the first stop token
        counted = torch.arange(comp.shape[1], device=t.device)[None] <= first[:, None]
        prompt_masked = (torch.rand(ids.shape, generator=gen, device=t.device) < t.args.p_mask_prompt) & am.bool()
        mask = cfg.mask_token_id
        x_in = torch.cat([ids.masked_fill(prompt_masked, mask), torch.full_like(comp, mask)], 1)
        where = torch.cat([torch.zeros_like(ids, dtype=torch.bool), counted], 1)
        return (torch.cat([ids, comp], 1), x_in, torch.cat([am, torch.ones_like(comp)], 1), where,
                1.0 / counted.sum(1).float())

    def logp(self, x1, x_in, am, where):
        with self.t.autocast():
            logits = self.t.model(x_in, am, where)
        return F.log_softmax(logits.float(), -1).gather(1, x1[where][:, None])[:, 0]

    def run(self):
        t, a = self.t, self.t.args
        os.makedirs(a.out, exist_ok=True)
        t.t_start, t.eval_s = time.time(), 0.0
        previous = signal.signal(signal.SIGINT, t.on_interrupt)        # Ctrl-C: stop after this iteration, save
        try:
            self.iterate()
        finally:
            signal.signal(signal.SIGINT, previous)
        if t.rank == 0:
            save_adapter(t.model, f"{a.out}/adapter", a.lora_r, a.lora_alpha, a.lora_dropout)

    def iterate(self):
        t, a = self.t, self.t.args
        snapshot_teacher(t.model)                                       # the reference: the start
        t.opt = t.new_optimizer()
        if a.phase_eval:
            t.test_accuracy(iteration=0, rollouts=0)
        for it in tqdm(range(1, a.iterations + 1), desc="grpo", disable=t.rank != 0):
            if a.ref_sync and it > 1 and (it - 1) % a.ref_sync == 0:
                snapshot_teacher(t.model)
            # 1. G rollouts per prompt from the current policy
            data = t.rollouts(t.draw_prompts(a.grpo_prompts))
            adv = self.group_advantage(data["r"].view(-1, a.completions)).flatten()
            # 2. mu surrogate inputs, and the old policy's and the reference's log q there, before any update
            inputs = []
            t.model.eval()
            with torch.no_grad():
                for _ in range(a.mu):
                    x1, x_in, am, where, weight = self.inputs(data, t.gen)
                    old = self.logp(x1, x_in, am, where)
                    with teacher_mode(t.model):
                        ref = self.logp(x1, x_in, am, where)
                    inputs.append((x1, x_in, am, where, weight, old, ref))
            t.model.train()
            # 3. mu clipped-ratio updates (micro-batches accumulate; the gradient is averaged over ranks)
            micro = a.micro_batch or len(adv)
            for x1, x_in, am, where, weight, old, ref in inputs:
                seq_all = where.nonzero()[:, 0]
                loss_sum = kl_sum = 0.0                                 # the log keeps the last update's
                for rows in torch.arange(len(adv), device=t.device).split(micro):
                    sel, share = torch.isin(seq_all, rows), len(rows) / len(adv)    # rows' tokens; their share
                    lp = self.logp(x1[rows], x_in[rows], am[rows], where[rows])
                    seq = where[rows].nonzero()[:, 0]
                    loss, kl = self.grpo_loss(lp, old[sel], ref[sel], adv[rows], seq, weight[rows], a.eps, a.beta)
                    (loss * share).backward()
                    loss_sum, kl_sum = loss_sum + loss.item() * share, kl_sum + kl.item() * share
                gnorm = t.average_and_clip()
                t.opt.step()
                t.opt.zero_grad(set_to_none=True)
            t.n_rollouts += len(adv) * t.world
            t.log(iteration=it, rollouts=t.n_rollouts, loss=loss_sum, kl=kl_sum, grad_norm=float(gnorm),
                  reward=data["r"].mean().item(), seconds=round(time.time() - t.t_start - t.eval_s, 1))
            if a.phase_eval and (it % a.eval_every == 0 or it == a.iterations or t.out_of_time()):
                t.test_accuracy(iteration=it, rollouts=t.n_rollouts)
            if t.stop or t.out_of_time():
                print(f"stopped after iteration {it}; the adapter is saved")
                return

