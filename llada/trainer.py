"""The DTM trainer for LLaDA: SAR-aligned masking (paper App. C), the per-phase LR schedule, and the
annealing loop with its replay buffer, health check, EMA, DDP gradient averaging and resumable state.
`llada_finetune.py` is its command line; `llada/grpo.py` runs d1's loop on the same trainer.

    from llada.trainer import Trainer
    from dtm import dtm_loss, group_log_mean_exp
    Trainer(args, dtm_loss, group_log_mean_exp).run()      # args: llada_finetune.parse(...)

The loss is dtm.py's, passed in (as llada/grpo.py takes grpo.py's), so that the library imports no script.
"""
import json
import math
import os
import pickle
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from llada.bench import auto_rollout_batch
from llada.lora import add_lora, load_adapter, lora_layers, save_adapter, snapshot_teacher, teacher_mode
from llada.model import CheckpointError, chat_prompt, decode, load_model, load_tokenizer
from llada.sampler import generate, left_pad
from llada.protocols import PROTOCOLS, evaluate
from llada.tasks import task_data


# ----------------------------------------------------------------------------- SAR-aligned masking, the LR schedule
def stratified_t(B, generator=None, device="cpu"):
    """B times in (0, 1), one in each of B equal strata (one shared uniform offset), in random order."""
    t = (torch.rand((), generator=generator, device=device) + torch.arange(B, device=device)) / B
    return t[torch.randperm(B, generator=generator, device=device)]


def sar_mask(comp, block_length, mask_id, generator=None, count="0..b"):
    """SAR-aligned forward process (App. C) on completions comp (B, G), as the sampler sees them:
    an active block k ~ U{0..K-1} per sequence; blocks before k clean, blocks after k fully masked;
    inside block k each token masked with probability 1 - kappa(t) = 1 - t, t ~ U(0, 1) stratified
    over the batch. Only the masked tokens of block k count, with the hazard weight
    kappa'(t) / (1 - kappa(t)) = 1 / (1 - t), divided by the block length b (the constant K dropped).
    The number of counted masks m is then uniform on {0..b}: 1/(b+1) of the rows count nothing.

    count="1..b" (the authors' draw): m ~ U{1..b}, m positions of block k drawn uniformly, weight 1/m. A
    given set S of m masks has probability 1/((b+1) C(b, m)) above, where its weight averages
    E[1/((1-t) b) | S] = (b+1)/(b m) (t | S is Beta: 1 - t ~ Beta(m+1, b-m+1)); here probability 1/(b C(b, m))
    and weight 1/m. Both products are 1/(b m C(b, m)): the same expected loss, state by state (so the same
    minimiser and scale), with no empty rows and no 1/(1-t) spikes.
    Returns x_t (B, G), counted (B, G) bool, time_weight (B,), t (B,) (1..b: t = 1 - m/b)."""
    B, G = comp.shape
    dev = comp.device
    k = torch.randint(G // block_length, (B,), generator=generator, device=dev)
    blk = torch.arange(G, device=dev) // block_length                  # block of each position
    active = blk == k[:, None]                                         # (B, G)
    if count == "1..b":
        m = torch.randint(1, block_length + 1, (B,), generator=generator, device=dev)
        keys = torch.rand(B, G, generator=generator, device=dev).masked_fill(~active, 2.0)   # block k's first
        rank = keys.argsort(1).argsort(1)                              # each position's place in that order
        counted = rank < m[:, None]
        t, time_weight = 1.0 - m / block_length, 1.0 / m
    else:
        t = stratified_t(B, generator, dev)
        counted = active & (torch.rand(B, G, generator=generator, device=dev) < (1 - t)[:, None])
        time_weight = 1.0 / (1.0 - t).clamp_min(1e-3) / block_length
    x_t = torch.where(counted | (blk > k[:, None]), torch.full_like(comp, mask_id), comp)
    return x_t, counted, time_weight, t


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


def lr_at(step, n, lr, min_lr, warmup=0.05, decay=0.1, warmup_steps=None, rounding="round"):
    """Per phase (released code): linear warm-up over 5% of the steps (or warmup_steps), flat, linear decay
    over the last 10%; those steps rounded to the nearest (ours) or down (rounding="floor", the authors')."""
    to_int = math.floor if rounding == "floor" else round
    w, d = warmup_steps or max(1, to_int(warmup * n)), max(1, to_int(decay * n))
    if step < w:
        return lr * (step + 1) / w
    if step >= n - d:
        return min_lr + (lr - min_lr) * (n - 1 - step) / d
    return lr


def verdict(held_out_change, held_out_change_se, phase_kl):
    """The health check in words: the change of the phase's objective on held-out teacher rollouts (x ± se)
    against the most the phase can lower it (phase_kl, y). Where se > y the check cannot tell."""
    x, se, y = held_out_change, held_out_change_se, phase_kl
    if se > y:
        return f"{x:.2e}: inconclusive: SE {se:.1e} > the phase's bound {y:.1e} (hold out more prompts)"
    learned = "below 0 by more than its SE, the phase learned"
    return f"{x:.2e} ± {se:.1e} (the most it can fall: {y:.1e}): " + (
        learned if x < -se else "not below 0 by its SE, the phase fitted noise")


class Trainer:
    """The annealing loop of DTM for LLaDA, one replay buffer per rank.

    for each phase a -> a + eta:
        teacher adapter := student adapter; fresh AdamW (unless --reset_optimizer never); LR schedule restarts
        buffer := (prompt, completion, r) from the teacher, `completions` per prompt
        for step in phase:  every refresh_every steps, replace refresh_prompts prompts' rollouts
                            minibatch from the buffer, SAR-masked afresh; dtm_loss; AdamW step
    The state (both adapters, optimizer, buffer, RNG, phase, step) is saved atomically every
    save_every steps, at the end of each phase, on Ctrl-C and at --stop_after; --resume goes on from it.
    """

    def __init__(self, args, dtm_loss, log_mean_exp, model=None):
        """args: llada_finetune.parse's; dtm_loss, log_mean_exp: dtm.py's dtm_loss and group_log_mean_exp;
        model: a LLaDA to use instead of loading args.model_dir (bench: a random one)."""
        self.args, self.dtm_loss, self.log_mean_exp = args, dtm_loss, log_mean_exp
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
        self.order, self.cursor, self.next_slot = None, 0, 0           # --prompt_order shuffled, --refresh_order cycle
        self.n_rollouts = 0                                            # every one drawn, all ranks (the check's too)
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
        """n training prompts, drawn with replacement (--prompt_order random), or in order through the training
        set shuffled afresh at each pass (shuffled: the authors'). The health check's (gen given): at random."""
        if gen is not None or self.args.prompt_order == "random":
            return torch.randint(len(self.items), (n,), generator=gen or self.gen, device=self.device).tolist()
        out = []
        while len(out) < n:
            if self.order is None or self.cursor == len(self.order):
                self.order = torch.randperm(len(self.items), generator=self.gen, device=self.device).tolist()
                self.cursor = 0
            take = self.order[self.cursor:self.cursor + n - len(out)]
            out, self.cursor = out + take, self.cursor + len(take)
        return out

    def refresh(self):
        """Replace the rollouts of refresh_prompts prompt slots with new prompts' (from the teacher)."""
        args, C = self.args, self.args.completions
        if args.refresh_order == "cycle":          # the authors': the slots in turn, from slot 0 of the phase's buffer
            slots = (self.next_slot + torch.arange(args.refresh_prompts, device=self.device)) % args.buffer_prompts
            self.next_slot = (self.next_slot + args.refresh_prompts) % args.buffer_prompts
        else:
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
        return sar_mask(comp, self.args.block_length, self.cfg.mask_token_id, gen, self.args.block_count)

    def loss(self, rows, eta, log_Z, r):
        x1, x_t, am, where, tw = self.inputs(self.buffer, rows)
        with self.autocast():
            logits = self.model(x_t, am, where)
            teacher_logits = None
            if self.args.phi != 0:
                with torch.no_grad(), teacher_mode(self.model):
                    teacher_logits = self.model(x_t, am, where)
        return self.dtm_loss(logits, teacher_logits, x1, where, r[rows], tw, eta, self.args.phi, log_Z=log_Z[rows])

    # ---- the health check of a phase (dtm.py: phase_objective)
    def held_out(self):
        """held_out_prompts new prompts' teacher rollouts that the phase never trains on, each masked
        held_out_maskings times (as --masking), once for the phase: rows (maskings x rollouts), copy-major."""
        h = self.rollouts(self.draw_prompts(self.args.held_out_prompts, self.check_gen), self.check_gen)
        k = self.args.held_out_maskings
        h = dict(idx=h["idx"].repeat(k), comp=h["comp"].repeat(k, 1), r=h["r"].repeat(k), maskings=k)
        h["c_t"], h["counted"], h["tw"], _ = self.mask(h["comp"], self.check_gen)
        return h

    @torch.no_grad()
    def phase_objective(self, eta, student):
        """The phase's own objective on the held-out set, per rollout (dtm.py: phase_objective): eq. 16 with
        Z over the set (per prompt or pooled, as --z). student=False: the teacher's, at the phase's start."""
        args, h = self.args, self.held
        r = self.shift(h)
        log_Z = self.log_mean_exp(eta * r.double(), h["idx"] if args.z == "prompt" else None)
        self.model.eval()
        out = []
        for rows in torch.arange(len(r), device=self.device).split(args.micro_batch or args.batch):
            x1, x_t, am, where, tw = self.inputs(h, rows)
            with self.autocast():
                with teacher_mode(self.model):
                    teacher_logits = self.model(x_t, am, where)
                logits = self.model(x_t, am, where) if student else teacher_logits
            out.append(self.dtm_loss(logits, teacher_logits, x1, where, r[rows], tw, eta, args.phi, log_Z=log_Z[rows],
                                per_sequence=True))
        self.model.train()
        return torch.cat(out).double()

    def phase_bound(self, eta):
        """The most the phase can lower its objective: KL(p_{a+eta} || p_a) / G per prompt (Prop. 3.4; dtm.py:
        phase_kl), from the held-out rollouts' rewards by self-normalised weights, averaged over their prompts."""
        h = self.held
        er, g = eta * h["r"].double(), torch.unique(h["idx"], return_inverse=True)[1]
        log_Z = self.log_mean_exp(er, g)                                # each row's prompt's log E_a[e^{eta r}]
        kl = torch.zeros(int(g.max()) + 1, dtype=torch.float64, device=er.device).index_add(
            0, g, torch.exp(er - log_Z) * (er - log_Z)) / torch.bincount(g)   # E_{a+eta}[eta r] - log Z
        return kl.mean().item() / self.args.gen_length

    def shift(self, data):
        """r - min r over the buffer (--shift buffer) or over each prompt's rollouts (--shift prompt). The tilt
        is unchanged by a constant, and the per-prompt one is a constant of the prompt, so of x_t: with Z per
        prompt it is the buffer's shift with phi e^{eta (min_p r - min r)} (eq. 17 allows any phi(x_t)): the same
        minimiser, more of the teacher term. Either makes e^{eta r} >= 1 >= phi, so every NLL weight
        (e^{eta r} - phi) / Z is >= 0 and the loss bounded (dtm.py's docstring); per prompt, a prompt whose
        rollouts tie keeps only the teacher term."""
        r = data["r"]
        if self.args.shift == "buffer":
            return r - r.min()
        g = torch.unique(data["idx"], return_inverse=True)[1]
        low = torch.full((int(g.max()) + 1,), math.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, g, r, "amin")
        return r - low[g]

    def train_step(self, eta):
        args = self.args
        # r >= 0 (`shift`); Z = E_a[e^{eta r}] per prompt (or pooled) over the whole buffer.
        released = args.weighting == "released"           # the released code: r clipped at 0, e^{eta r} raw
        r = self.buffer["r"].clamp_min(0) if released else self.shift(self.buffer)
        if args.control:                                   # no tilt: the rewards moved to other rollouts
            r = r[torch.randperm(len(r), generator=self.control_gen, device=self.device)]
        group = self.buffer["idx"] if args.z == "prompt" else None
        log_Z = torch.zeros_like(r) if released else self.log_mean_exp(eta * r.double(), group)
        if args.minibatch == "tilted":
            # Draw the rows with probability q_b = (e^{eta r_b} / Z_b) / B, the tilted buffer (eq. 11-12), and
            # weight each by 1 / (B q_b): its log Z becomes eta r_b, so its NLL weight is 1 - phi e^{-eta r_b}
            # and its teacher weight phi e^{-eta r_b}. The expected loss is the uniform draw's (eq. 16, the
            # same minimiser); at large eta it no longer spends the batch on rows of weight ~0.
            tilted = torch.exp(eta * r.double() - log_Z)
            log_Z = eta * r.double()
        micro = args.micro_batch or args.batch
        if args.minibatch == "without":                     # the authors': batch distinct rows, then micro-batches
            distinct = torch.randperm(len(r), generator=self.gen, device=self.device)[:args.batch]
        total = 0.0
        for j in range(0, args.batch, micro):
            n = min(micro, args.batch - j)
            if args.minibatch == "tilted":
                rows = torch.multinomial(tilted, n, replacement=True, generator=self.gen)
            elif args.minibatch == "without":
                rows = distinct[j:j + n]
            else:
                rows = torch.randint(len(r), (n,), generator=self.gen, device=self.device)
            loss = self.loss(rows, eta, log_Z, r) * len(rows) / args.batch    # gradient accumulation
            loss.backward()
            total += loss.item()
        gnorm = self.average_and_clip()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, args.steps_per_phase, args.lr, args.min_lr, warmup_steps=args.warmup_steps,
                            rounding=args.lr_rounding)
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
                     order=None if self.order is None else torch.tensor(self.order), cursor=self.cursor,
                     next_slot=self.next_slot,
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
        self.order = s["order"].tolist() if s.get("order") is not None else None
        self.cursor, self.next_slot = s.get("cursor", 0), s.get("next_slot", 0)
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

    def out_of_time(self):
        """--max_seconds: training seconds (evaluations left out) spent."""
        return bool(self.args.max_seconds) and time.time() - self.t_start - self.eval_s >= self.args.max_seconds

    def log(self, **row):
        if self.rank == 0:
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---- the loop
    def run(self):
        """The loop of the class docstring, from the saved state with --resume; Ctrl-C saves and stops."""
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
                eta = self.a_grid[self.phase] - self.a_grid[self.phase - 1]
                if self.step == 0:
                    self.start_phase(eta)
                if not self.train_phase(eta):                           # stopped, and saved
                    return
                self.end_phase(eta)
                if self.out_of_time():
                    print(f"--max_seconds {args.max_seconds:g}: stopped after phase {self.phase - 1}, saved")
                    return
        finally:
            signal.signal(signal.SIGINT, previous)

    def start_phase(self, eta):
        """p_a := the current model; a fresh AdamW (and EMA); the buffer and the held-out set from p_a."""
        args, k, t0 = self.args, self.phase, time.time()
        snapshot_teacher(self.model)
        self.ema = [p.detach().clone() for p in self.params] if args.ema else None
        if self.opt is None or args.reset_optimizer == "phase":          # never: AdamW's moments carried on
            self.opt = self.new_optimizer()
        self.buffer, self.next_slot = self.rollouts(self.draw_prompts(args.buffer_prompts)), 0
        self.n_rollouts += len(self.buffer["r"]) * self.world
        if args.held_out_prompts:
            self.held = self.held_out()
            self.n_rollouts += len(self.held["r"]) // self.held["maskings"] * self.world   # the check's count too
            self.held["j_teacher"] = self.phase_objective(eta, student=False)
        self.log(phase=k, a=self.a_grid[k - 1], buffer_reward=self.buffer["r"].mean().item(),
                 rollout_s=round(time.time() - t0, 1))

    def train_phase(self, eta):
        """The phase's remaining steps, refreshing the buffer every refresh_every; False if it stopped early
        (Ctrl-C or --stop_after), after saving."""
        args, k = self.args, self.phase
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
                return False
            if args.save_every and self.global_step % args.save_every == 0:
                self.save()
        bar.close()
        return True

    def end_phase(self, eta):
        """The EMA (released) becomes the student; the health check; --phase_eval; save the state and adapter."""
        args, k = self.args, self.phase
        if self.ema is not None:                                        # and so the next phase's teacher
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    p.copy_(e)
        if args.held_out_prompts and self.held is not None:
            d = self.phase_objective(eta, student=True) - self.held["j_teacher"]      # per row, then per rollout:
            d = d.view(self.held.get("maskings", 1), -1).mean(0)                        # the mean of its maskings
            check = dict(held_out_change=d.mean().item(), held_out_change_se=(d.std() / len(d) ** 0.5).item(),
                         phase_kl=self.phase_bound(eta))
            self.log(phase=k, a=self.a_grid[k], **check)
            if self.rank == 0:
                print(f"phase {k}: held-out objective change " + verdict(**check))
        if args.phase_eval and (k % args.eval_every == 0 or k == len(self.a_grid) - 1 or self.out_of_time()):
            self.test_accuracy(phase=k, a=self.a_grid[k], rollouts=self.n_rollouts)
        self.phase, self.step = self.phase + 1, 0
        self.save()
        if self.rank == 0:
            save_adapter(self.model, os.path.join(args.out, "adapter"), args.lora_r, args.lora_alpha,
                         args.lora_dropout)

    def on_interrupt(self, *_):
        if self.stop:                                                   # a second Ctrl-C: abort now
            raise KeyboardInterrupt
        self.stop = True
        print("\nCtrl-C: saving after this step (press again to abort without saving)")


