"""DTM fine-tuning of LLaDA-8B-Instruct in plain torch: model, safetensors reader, LoRA, sampler, tasks.

One file, top to bottom: (1) a safetensors reader/writer, (2) LLaDA's network built from the
checkpoint's config.json and loaded from its HF shards, (3) a hand-written LoRA whose teacher copy
lives in the same layer, (4) LLaDA's semi-autoregressive low-confidence sampler, (5) the four tasks
and their rewards, (6) SAR-aligned DTM training (paper App. C and §3) with the loss of dtm.py,
(7) the evaluation protocol. No `transformers`, no `peft`: torch and `tokenizers` only.

    # the real model (download once, with internet):  huggingface-cli download GSAI-ML/LLaDA-8B-Instruct --local-dir LLaDA-8B-Instruct
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task sudoku                 # DTM, App. D.2 preset
    torchrun --nproc_per_node=8 llada_finetune.py --model_dir LLaDA-8B-Instruct --task countdown
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task gsm8k --eval --test_data gsm8k_test.jsonl
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task sudoku --resume --out runs/sudoku
    python llada_finetune.py --model_dir LLaDA-8B-Instruct --task sudoku --bench --batch 8 --grad_checkpointing
    python llada_finetune.py --help
"""
import argparse
import ast
import json
import math
import mmap
import os
import pickle
import random
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from itertools import permutations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dtm import dtm_loss, group_log_mean_exp


class CheckpointError(Exception):
    """A checkpoint, adapter or config file that cannot be used; the message says which and why."""


# ============================================================================ 1. safetensors
# Layout: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}},
# then the raw buffer; offsets are relative to the buffer's start.
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors_header(path):
    """The validated header of a safetensors file: ({name: (dtype, shape, begin, end)}, metadata, start).
    Every offset is bounds-checked against the file size before any tensor is touched."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    meta, buf, out = header.pop("__metadata__", None) or {}, size - 8 - n, {}
    for name, e in header.items():
        if not (isinstance(e, dict) and isinstance(e.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in e["shape"])
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(isinstance(o, int) for o in e["data_offsets"])):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}")
        if e.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {e.get('dtype')!r}; "
                                  f"supported: {', '.join(DTYPES)}")
        dtype, (b, end) = DTYPES[e["dtype"]], e["data_offsets"]
        nbytes = math.prod(e["shape"]) * dtype.itemsize
        if not 0 <= b <= end <= buf:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets [{b}, {end}] outside the "
                                  f"{buf}-byte data buffer (truncated file?)")
        if end - b != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - b} bytes, its shape "
                                  f"{e['shape']} and dtype {e['dtype']} need {nbytes}")
        out[name] = (dtype, tuple(e["shape"]), b, end)
    return out, meta, 8 + n


def load_safetensors(path):
    """{name: tensor} of a safetensors file, memory-mapped (pages are read when a tensor is used)."""
    header, _, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.path.getsize(path) else b""
    out = {}
    for name, (dtype, shape, b, end) in header.items():
        if end == b:
            out[name] = torch.empty(shape, dtype=dtype)
        else:                                          # a view of the mmap, no copy
            out[name] = torch.frombuffer(mm, dtype=dtype, count=(end - b) // dtype.itemsize,
                                         offset=start + b).view(shape)
    return out


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as safetensors, atomically (a temporary file, then a rename)."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} is not one of {list(DTYPES)}")
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(data)])
        offset += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)                     # keep the buffer 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


# ============================================================================ 2. the model
@dataclass
class LLaDAConfig:                     # field names are config.json's; defaults are LLaDA-8B's
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    embedding_size: int = 126464
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    mask_token_id: int = 126336        # <|mdm_mask|>
    eos_token_id: int = 126081         # <|endoftext|>, also the pad token

    @classmethod
    def from_json(cls, path):
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read config.json ({e})") from None
        for key, want in (("include_bias", False), ("weight_tying", False), ("layer_norm_type", "rms"),
                          ("activation_type", "silu")):
            if raw.get(key, want) != want:
                raise CheckpointError(f"{path}: {key} = {raw[key]!r}; this script implements {want!r}")
        raw.setdefault("embedding_size", raw.get("vocab_size", cls.embedding_size))
        raw["n_kv_heads"] = raw.get("n_kv_heads") or raw.get("n_heads", cls.n_heads)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if raw.get(k) is not None})


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, then times the weight (as modeling_llada.py does)."""
    def __init__(self, d, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(x, pos, theta):
    """Rotary embedding, non-interleaved ("rotate half") over the full head dim, in float32.
    x (B, nh, T, hd), pos (B, T) integer positions."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos[:, None, :, None].float() * inv_freq                       # (B, 1, T, hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Block(nn.Module):
    """h = x + attn_out(attn(attn_norm(x))); out = h + ff_out(silu(ff_proj(n)) * up_proj(n)), n = ff_norm(h).
    Attention is bidirectional: the only mask is the padding mask."""
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.hd, self.theta = c.n_heads, c.n_kv_heads, c.d_model // c.n_heads, c.rope_theta
        lin = lambda i, o: nn.Linear(i, o, bias=False)                   # noqa: E731
        self.attn_norm, self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps), RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj, self.attn_out = lin(c.d_model, c.d_model), lin(c.d_model, c.d_model)
        self.k_proj, self.v_proj = lin(c.d_model, self.nkv * self.hd), lin(c.d_model, self.nkv * self.hd)
        self.ff_proj, self.up_proj = lin(c.d_model, c.mlp_hidden_size), lin(c.d_model, c.mlp_hidden_size)
        self.ff_out = lin(c.mlp_hidden_size, c.d_model)

    def forward(self, x, pos, keep):
        B, T, D = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.nh, self.hd).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if self.nkv != self.nh:                                             # grouped-query attention
            k, v = (z.repeat_interleave(self.nh // self.nkv, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)        # keep: (B, 1, 1, T) or None
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, D))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))  # ff_proj is the gate


class LLaDA(nn.Module):
    """LLaDA's mask predictor. Module names are the checkpoint's keys minus `model.transformer.`."""
    def __init__(self, c):
        super().__init__()
        self.cfg, self.checkpointing = c, False
        self.wte = nn.Embedding(c.embedding_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_out = nn.Linear(c.d_model, c.embedding_size, bias=False)   # untied head

    def forward(self, ids, attention_mask=None, where=None):
        """ids (B, T); attention_mask (B, T), 1 = token, 0 = left padding; where (B, T) bool: the logits
        are computed only there, (N, V) row-major (the head is ~1/8 of the 8B's FLOPs per token).
        Positions count real tokens only, so a left-padded prompt sees the positions it would alone."""
        B, T = ids.shape
        if attention_mask is None:
            pos, keep = torch.arange(T, device=ids.device).expand(B, T), None
        else:
            pos = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
            keep = attention_mask.bool()[:, None, None, :]
        x = self.wte(ids)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():              # recompute in backward
                x = torch.utils.checkpoint.checkpoint(block, x, pos, keep, use_reentrant=False)
            else:
                x = block(x, pos, keep)
        x = self.ln_f(x)
        return self.ff_out(x if where is None else x[where])


def load_model(model_dir, device="cpu", dtype=torch.float32):
    """Build LLaDA from model_dir/config.json and load its safetensors weights (one file, or shards
    listed in model.safetensors.index.json). A clear CheckpointError names any missing, unexpected or
    mis-shaped tensor. The network is built on the meta device, so no memory is spent twice."""
    cfg = LLaDAConfig.from_json(os.path.join(model_dir, "config.json"))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: cannot read the weight map ({e})") from None
    elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with torch.device("meta"):
        model = LLaDA(cfg)
    want = {f"model.transformer.{k}": v.shape for k, v in model.state_dict().items()}
    state = {}
    for name in files:
        for key, t in load_safetensors(os.path.join(model_dir, name)).items():
            if key not in want:
                raise CheckpointError(f"{name}: unexpected tensor {key} (not part of LLaDA's layout)")
            if t.shape != want[key]:
                raise CheckpointError(f"{name}: tensor {key} has shape {list(t.shape)}, "
                                      f"config.json implies {list(want[key])}")
            state[key[len("model.transformer."):]] = t.to(device, dtype)
    missing = sorted(set(want) - {f"model.transformer.{k}" for k in state})
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]}" +
                              (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.load_state_dict(state, assign=True)
    return model.requires_grad_(False)


def load_tokenizer(model_dir):
    from tokenizers import Tokenizer                   # the only non-torch dependency
    path = os.path.join(model_dir, "tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:                             # tokenizers raises a bare Exception
        raise CheckpointError(f"{path}: cannot read the tokenizer ({e})") from None


def chat_prompt(tok, text):
    """LLaDA-Instruct's chat template (BOS only before the first message), as token ids."""
    s = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + text +
         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    return tok.encode(s, add_special_tokens=False).ids


def decode(tok, ids, cfg):
    """The completion's text up to its first <|endoftext|> / <|eot_id|>."""
    stop = {cfg.eos_token_id, tok.token_to_id("<|eot_id|>")}
    ids = list(ids)
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return tok.decode(ids[:cut], skip_special_tokens=True)


# ============================================================================ 3. LoRA
def lora_linear(x, weight, A, B, scale, dropout=0.0, training=False):
    """y = x W^T + scale * dropout(x) A^T B^T (Hu et al., 2021): the low-rank path runs on the
    activations, so W + scale B A is never formed. A (r, in), B (out, r)."""
    y = F.linear(x, weight)
    h = F.dropout(x, dropout, training).to(A.dtype)
    return y + (scale * F.linear(F.linear(h, A), B)).to(y.dtype)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable student adapter (lora_A, lora_B) and a frozen teacher copy
    (teacher_A, teacher_B). DTM's teacher p_a is the base with the adapter of the start of the phase,
    so one 8B base serves both; `use_teacher` picks the adapter (see `teacher_mode`)."""
    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base, self.r, self.scale, self.dropout = base, r, alpha / r, dropout
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))              # as nn.Linear (and PEFT)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))  # 0: = base
        self.register_buffer("teacher_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("teacher_B", self.lora_B.detach().clone(), persistent=False)
        self.use_teacher, self.merged = False, False

    def forward(self, x):
        if self.use_teacher:
            return lora_linear(x, self.base.weight, self.teacher_A, self.teacher_B, self.scale)
        if self.merged:
            return self.base(x)
        return lora_linear(x, self.base.weight, self.lora_A, self.lora_B, self.scale, self.dropout,
                           self.training)

    def delta(self):
        return (self.scale * self.lora_B @ self.lora_A).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self):                                   # W <- W + scale B A, for export or inference
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def add_lora(model, r=128, alpha=64, dropout=0.05, targets=LORA_TARGETS):
    """Wrap the chosen linear layers of every block; freeze everything but the adapters."""
    model.requires_grad_(False)
    for block in model.blocks:
        for name in targets:
            setattr(block, name, LoRALinear(getattr(block, name), r, alpha, dropout))
    return model


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def snapshot_teacher(model):
    """Start a phase: the teacher adapter becomes a copy of the student's (p_a := p_theta)."""
    for m in lora_layers(model).values():
        m.teacher_A.copy_(m.lora_A)
        m.teacher_B.copy_(m.lora_B)


class teacher_mode:
    """`with teacher_mode(model): ...` runs the network as the frozen teacher p_a."""
    def __init__(self, model):
        self.layers = list(lora_layers(model).values())

    def __enter__(self):
        for m in self.layers:
            m.use_teacher = True

    def __exit__(self, *exc):
        for m in self.layers:
            m.use_teacher = False


PEFT_PREFIX = "base_model.model.model.transformer."   # PeftModel -> LLaDAModelLM.model.transformer


def save_adapter(model, out_dir, r, alpha, dropout, base_name="GSAI-ML/LLaDA-8B-Instruct"):
    """adapter_model.safetensors + adapter_config.json in PEFT's layout, loadable by
    `PeftModel.from_pretrained(llada, out_dir)`. target_modules is a regex (PEFT full-matches it)
    so that the LM head, also called ff_out, is not wrapped."""
    os.makedirs(out_dir, exist_ok=True)
    layers = lora_layers(model)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float()
    targets = sorted({n.rsplit(".", 1)[1] for n in layers})
    save_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), {"format": "pt"})
    config = dict(peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                  target_modules=rf".*\.blocks\.\d+\.({'|'.join(targets)})", fan_in_fan_out=False,
                  inference_mode=True, init_lora_weights=True, base_model_name_or_path=base_name,
                  task_type=None, modules_to_save=None, use_rslora=False, use_dora=False)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(model, adapter_dir):
    """Load a PEFT-layout adapter into a model that `add_lora` wrapped with the same r."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_safetensors(path)
    layers = lora_layers(model)
    for key, t in tensors.items():
        name, _, which = key[len(PEFT_PREFIX):].rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or name not in layers or which not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{path}: unexpected tensor {key}")
        p = getattr(layers[name], "lora_" + which[0])
        if p.shape != t.shape:
            raise CheckpointError(f"{path}: {key} has shape {list(t.shape)}, the model wants {list(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
    missing = [n for n in layers if f"{PEFT_PREFIX}{n}.lora_A.weight" not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing the adapter of {missing[0]}")


# ============================================================================ 4. the sampler
def num_transfer_tokens(masked, steps):
    """(B, steps): tokens revealed per step, masked.sum(1) split evenly, the remainder first."""
    n = masked.sum(1, keepdim=True)
    return n // steps + (torch.arange(steps, device=masked.device) < n % steps).long()


@torch.no_grad()
def generate(model, prompt, attention_mask=None, gen_length=256, steps=128, block_length=32,
             temperature=0.0, remasking="low_confidence", generator=None):
    """LLaDA's semi-autoregressive sampler with low-confidence remasking (generate.py's algorithm).

    prompt (B, P), left-padded with attention_mask (B, P) when prompts differ in length.
    The gen_length masks are decoded block by block, steps / num_blocks steps per block. At each
    step: x0 = Gumbel-max of the logits at the temperature, in float64 (plain argmax at 0);
    confidence = softmax prob of x0 (or uniform noise for remasking="random"); the k most confident
    masked positions of the current block are revealed. Differences from generate.py, none of which
    changes a token at temperature 0: logits and noise are computed for the current block only (the
    reference computes them over the whole sequence and then discards them), and masks inside the
    prompt are never filled.
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
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        where = torch.zeros_like(x, dtype=torch.bool)
        where[:, lo:hi] = True
        k_per_step = num_transfer_tokens(x[:, lo:hi] == mask_id, steps // n_blocks)   # (B, steps/blocks)
        for s in range(steps // n_blocks):
            logits = model(x, am, where).view(B, block_length, -1).double()        # (B, blk, V)
            if temperature > 0:                         # Gumbel-max: exp(l) / (-log u)^T, float64
                u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=x.device)
                x0 = (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            if remasking == "low_confidence":
                conf = F.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            else:
                conf = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x.device)
            blk = x[:, lo:hi]
            conf = torch.where(blk == mask_id, conf, -math.inf)
            rank = torch.argsort(conf, dim=-1, descending=True, stable=True).argsort(-1)     # 0 = most confident
            reveal = rank < k_per_step[:, s:s + 1]
            x[:, lo:hi] = torch.where(reveal, x0, blk)
    return x[:, P:]


def left_pad(seqs, pad_id, device="cpu"):
    """Left-pad token lists: ids (B, P) and attention_mask (B, P)."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    am = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):], am[i, P - len(s):] = torch.as_tensor(s), 1
    return ids.to(device), am.to(device)


# ============================================================================ 5. tasks and rewards
# Every reward is total: any string in, a float out, never an exception.
def last_tag(text, tag):
    m = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return m[-1] if m else None


def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces matched), or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


# ---- Sudoku 4x4
SUDOKU_SHOTS = [("3014002020004130", "3214142323414132"), ("0000100420013142", "4213132424313142"),
                ("2001403002001420", "2341413232141423")]


def sudoku_grids():
    """All 288 completed 4x4 Sudoku grids, as 16-character strings (rows, then columns)."""
    rows = list(permutations("1234"))
    ok = lambda g: all(len({g[r][c] for r in range(4)}) == 4 for c in range(4)) and all(   # noqa: E731
        len({g[r + i][c + j] for i in (0, 1) for j in (0, 1)}) == 4 for r in (0, 2) for c in (0, 2))
    return ["".join("".join(r) for r in g) for g in
            ((a, b, c, d) for a in rows for b in rows for c in rows for d in rows) if ok(g)]


def sudoku_data(seed=42, n_test=256):
    """SPG-style split by solution grid: 200 grids for training (the exemplars' forced in), puzzles of
    the other 88 for the test set (2 each, one more for the first 80), 7-9 empty cells, unique
    solutions. Training puzzles are drawn afresh from the 200 grids, 4-12 empty cells."""
    grids, rng = sudoku_grids(), random.Random(seed)
    table = torch.tensor([[int(ch) for ch in g] for g in grids])          # (288, 16)
    shots = {s for _, s in SUDOKU_SHOTS}
    rest = [g for g in grids if g not in shots]
    rng.shuffle(rest)
    train_grids, test_grids = sorted(shots) + rest[:200 - len(shots)], rest[200 - len(shots):]

    def puzzle(g, n_empty):                            # blank n_empty cells; keep it if it has one solution
        while True:
            holes = rng.sample(range(16), n_empty)
            p = "".join("0" if i in holes else ch for i, ch in enumerate(g))
            pt = torch.tensor([int(ch) for ch in p])
            if int(((table == pt) | (pt == 0)).all(1).sum()) == 1:
                return dict(puzzle=p, solution=g)
    test = [puzzle(g, rng.choice((7, 8, 9))) for i in range(n_test) for g in
            [test_grids[i % len(test_grids)]]]
    train = [puzzle(rng.choice(train_grids), rng.randint(4, 12)) for _ in range(4000)]
    train = [t for t in train if t["puzzle"] not in {p for p, _ in SUDOKU_SHOTS}]
    return train, test


def sudoku_prompt(item):
    shot = lambda p, s: (f"Question:\nSolve the following Sudoku puzzle: {p}\nAnswer:\n<reasoning>\n"   # noqa: E731
                         f"Fill each 0 so that every row, column and 2x2 box holds 1-4 once.\n"
                         f"</reasoning>\n<answer>\n{s}\n</answer>\n\n")
    return ("Solve 4x4 Sudoku puzzles. The puzzle is 16 digits, row by row; 0 marks an empty cell. "
            "Give the solved grid as 16 digits inside <answer></answer>.\n\n" +
            "".join(shot(p, s) for p, s in SUDOKU_SHOTS) +
            f"Question:\nSolve the following Sudoku puzzle: {item['puzzle']}\nAnswer:\n")


def sudoku_cells(text, item, cascade=False):
    """(correct empty cells, empty cells). Training reads the last <answer>; eval (cascade) falls
    back to any run of 16 digits, as the baselines' evaluation does."""
    ans = last_tag(text, "answer")
    if ans is None and cascade:
        runs = re.findall(r"[0-9]{16}", text)
        ans = runs[-1] if runs else None
    empty = [i for i, ch in enumerate(item["puzzle"]) if ch == "0"]
    if ans is None:
        return 0, len(empty)
    digits = (re.sub(r"[^0-9]", "", ans) + "0" * 16)[:16]
    return sum(digits[i] == item["solution"][i] for i in empty), len(empty)


def sudoku_reward(text, item):
    """Twice the fraction of the empty cells filled correctly (DTM's scale, in [0, 2])."""
    ok, n = sudoku_cells(text, item)
    return 2.0 * ok / max(n, 1)


# ---- Countdown (3 numbers)
def countdown_data(seed, n, exclude=()):
    """n solvable questions: 3 numbers in 1-100, a target in 1-100 reached by + - * / using each once
    (none of them in `exclude`, e.g. the test set)."""
    rng, out = random.Random(seed), []
    seen = {(tuple(sorted(e["numbers"])), e["target"]) for e in exclude}
    ops = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b if b else None]
    while len(out) < n:
        nums = [rng.randint(1, 100) for _ in range(3)]
        a, b, c = (Fraction(v) for v in rng.sample(nums, 3))
        f, g = rng.choice(ops), rng.choice(ops)
        inner = f(a, b)
        t = None if inner is None else (g(inner, c) if rng.random() < 0.5 else g(c, inner))
        key = (tuple(sorted(nums)), t)
        if t is not None and t.denominator == 1 and 1 <= t <= 100 and key not in seen:
            seen.add(key)
            out.append(dict(numbers=nums, target=int(t)))
    return out


def arith(expr):
    """Value of an arithmetic expression of numbers, + - * / and parentheses, as a Fraction, or None.
    A whitelist over Python's parse tree: no names, calls or attributes can get through, and nothing
    is ever executed (no eval)."""
    if len(expr) > 200:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    binops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}

    def value(n):
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return Fraction(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = value(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp) and type(n.op) in binops:
            return binops[type(n.op)](value(n.left), value(n.right))
        raise ValueError(f"not arithmetic: {type(n).__name__}")
    try:
        return value(tree)
    except (ValueError, ZeroDivisionError, RecursionError, OverflowError):
        return None


def countdown_reward(text, item):
    """1.0: uses exactly the given numbers and hits the target; 0.1: an answer that does not; 0: none."""
    ans = last_tag(text, "answer")
    if ans is None:
        return 0.0
    boxed = last_boxed(ans)                             # the eval prompt asks for \boxed{} in <answer>
    if boxed is not None:
        ans = boxed.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
    if sorted(int(v) for v in re.findall(r"\d+", ans)) != sorted(item["numbers"]):
        return 0.1
    if not re.fullmatch(r"[\d+\-*/(). \s]+", ans):
        return 0.1
    v = arith(ans)
    return 1.0 if v is not None and abs(v - item["target"]) < 1e-5 else 0.1


def countdown_prompt(item):
    a, b, c = item["numbers"]
    return (f"Using only the numbers [{a}, {b}, {c}], create an arithmetic expression that evaluates to "
            f"exactly {item['target']}. You may use +, -, *, / and parentheses, and each number exactly "
            f"once. Think in <reasoning></reasoning>, then give only the expression inside "
            f"<answer></answer>.")


# ---- GSM8K and MATH500 (local JSONL)
MATH_PROMPT = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
               "Wrap the final answer in a \\boxed{}.\nRespond in the following format:\n<reasoning>\n"
               "Your reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>\n\n")


def math_prompt(item):
    return MATH_PROMPT + item["question"]


def strip_math(s):
    """Hendrycks-style normalisation of a LaTeX answer, so that equal answers compare equal."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\").replace("tfrac", "frac")
    s = s.replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[^}]*\}\s*$", "", s) if not s.startswith("\\text") else s
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    s = "0" + s if s.startswith(".") else s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:                   # "x = 5" -> "5"
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = "\\frac{1}{2}" if s == "0.5" else s
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m[1]}}}{{{m[2]}}}" if m else s


def math_equiv(a, b):
    if a is None or b is None:
        return False
    try:
        return strip_math(a) == strip_math(b)
    except Exception:                                   # a normaliser must never crash a reward
        return a == b


def gsm8k_gold(item):
    return item["answer"].split("####")[-1].strip().replace(",", "")


def number(s):
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    m = re.findall(r"-?\d+(?:\.\d+)?", s)
    return float(m[-1]) if m else None


def format_terms(text):
    """GSM8K's format rewards (d1/SPG): XML counts, soft and strict structure."""
    r = sum(0.125 for t in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
            if text.count(t) == 1)
    if text.count("\n</answer>") == 1:
        r -= 0.001 * len(text.split("\n</answer>")[-1].strip())             # trailing text
    r += 0.5 * bool(re.match(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", text, re.DOTALL))
    r += 0.5 * bool(re.match(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$", text, re.DOTALL))
    return r


def gsm8k_answer(text):
    ans = last_tag(text, "answer")
    boxed = last_boxed(text)
    return boxed if boxed is not None else ans


def gsm8k_reward(text, item):
    """2.0 for the right number + 0.5 if the answer is an integer + format terms (max ~4)."""
    ans = gsm8k_answer(text)
    gold = number(gsm8k_gold(item))
    r = format_terms(text)
    r += 0.5 * bool(ans is not None and re.fullmatch(r"-?\d+", ans.strip().replace(",", "")))
    v = number(ans)
    return r + 2.0 * (v is not None and gold is not None and abs(v - gold) < 1e-6)


def math_reward(text, item):
    """2.0 if the last \\boxed{} is equivalent to the gold answer, + 0.5 x (1 for <answer>, + 1 if a
    \\boxed{} is inside it, else + 0.5). The baselines' code tests for the wrong escape and never
    gives the boxed branch; this one does."""
    ans = last_tag(text, "answer")
    fmt = 0.0 if ans is None else 1.0 + (1.0 if "\\boxed" in ans else 0.5)
    return 2.0 * math_equiv(last_boxed(text), item["answer"]) + 0.5 * fmt


def accuracy(task, text, item):
    """(correct, total) of the evaluation protocol: Sudoku counts cells; the others, questions."""
    if task == "sudoku":
        return sudoku_cells(text, item, cascade=True)
    if task == "countdown":
        return float(countdown_reward(text, item) == 1.0), 1
    if task == "gsm8k":
        v, gold = number(gsm8k_answer(text)), number(gsm8k_gold(item))
        return float(v is not None and gold is not None and abs(v - gold) < 1e-6), 1
    return float(math_equiv(last_boxed(text), item["answer"])), 1


def read_jsonl(path, what, fields=("question", "answer")):
    if not path:
        raise CheckpointError(f"{what} needs a local JSONL file (one object per line); nothing is downloaded")
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e})") from None
    for row in rows:                                    # MATH files name the question "problem"
        if isinstance(row, dict) and "problem" in row:
            row.setdefault("question", row["problem"])
    if not rows or any(not isinstance(r, dict) or any(k not in r for k in fields) for r in rows):
        raise CheckpointError(f"{path}: every line of {what} needs the fields {', '.join(fields)}")
    return rows


REWARDS = dict(sudoku=sudoku_reward, countdown=countdown_reward, gsm8k=gsm8k_reward, math=math_reward)
PROMPTS = dict(sudoku=sudoku_prompt, countdown=countdown_prompt, gsm8k=math_prompt, math=math_prompt)


def task_data(args):
    """(train items, test items) of args.task; a JSONL path given on the command line wins."""
    if args.task == "sudoku":
        return sudoku_data(args.seed)
    if args.task == "countdown":
        cd = ("numbers", "target")
        test = read_jsonl(args.test_data, "countdown test", cd) if args.test_data else countdown_data(10**6, 256)
        train = read_jsonl(args.train_data, "countdown train", cd) if args.train_data else \
            countdown_data(args.seed, 20000, exclude=test)
        return train, test
    return (read_jsonl(args.train_data, f"{args.task} train") if not args.eval else [],
            read_jsonl(args.test_data, f"{args.task} test") if args.eval else [])


# ============================================================================ 6. SAR-aligned DTM
# App. D.2 of the paper and the authors' released configs (../shared/LLADA.md). The paper's per-task
# learning rates and eta were lost from its text: lr/min_lr are the released ones where there are some
# (Countdown, Sudoku), eta is the released h; the GSM8K and MATH values are our choice (override them).
PRESETS = dict(
    sudoku=dict(steps_per_phase=256, batch=64, clip=2.0, buffer_prompts=80, completions=1,
                refresh_prompts=20, refresh_every=32, lr=3e-6, min_lr=1e-6, eta=5.0, temperature=0.0,
                z="buffer"),                   # 1 greedy completion per prompt: Z over the buffer
    countdown=dict(steps_per_phase=800, batch=96, clip=2.0, buffer_prompts=80, completions=6,
                   refresh_prompts=20, refresh_every=25, lr=4e-6, min_lr=2e-6, eta=6.0, temperature=0.9,
                   z="prompt"),
    gsm8k=dict(steps_per_phase=800, batch=96, clip=2.0, buffer_prompts=80, completions=6,
               refresh_prompts=20, refresh_every=50, lr=3e-6, min_lr=1e-6, eta=5.0, temperature=0.9,
               z="prompt"),
    math=dict(steps_per_phase=400, batch=72, clip=1.0, buffer_prompts=60, completions=8,
              refresh_prompts=15, refresh_every=50, lr=3e-6, min_lr=1e-6, eta=5.0, temperature=0.9,
              z="prompt"),
)


def sar_mask(comp, block_length, mask_id, generator=None):
    """SAR-aligned forward process (App. C) on completions comp (B, G), as the sampler sees them:
    an active block k ~ U{0..K-1} per sequence; blocks before k clean, blocks after k fully masked;
    inside block k each token masked with probability 1 - kappa(t) = 1 - t, t ~ U(0, 1) stratified
    over the batch. Only the masked tokens of block k count, with the hazard weight
    kappa'(t) / (1 - kappa(t)) = 1 / (1 - t), divided by the block length (the constant K dropped).
    Returns x_t (B, G), counted (B, G) bool, time_weight (B,)."""
    B, G = comp.shape
    dev = comp.device
    k = torch.randint(G // block_length, (B,), generator=generator, device=dev)
    t = (torch.rand((), generator=generator, device=dev) + torch.arange(B, device=dev)) / B
    t = t[torch.randperm(B, generator=generator, device=dev)]
    blk = torch.arange(G, device=dev) // block_length                  # block of each position
    counted = (blk == k[:, None]) & (torch.rand(B, G, generator=generator, device=dev) < (1 - t)[:, None])
    x_t = torch.where(counted | (blk > k[:, None]), torch.full_like(comp, mask_id), comp)
    return x_t, counted, 1.0 / (1.0 - t).clamp_min(1e-3) / block_length


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

    def __init__(self, args):
        self.args = a = args
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(a.device)
        torch.manual_seed(a.seed)                                      # LoRA's A: the same on every rank
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = add_lora(load_model(a.model_dir, self.device, dtype), a.lora_r, a.lora_alpha,
                              a.lora_dropout, a.lora_targets)
        self.model.checkpointing = a.grad_checkpointing
        self.cfg, self.tok = self.model.cfg, load_tokenizer(a.model_dir)
        if a.adapter:
            load_adapter(self.model, a.adapter)
        self.items = task_data(a)[0]
        self.prompt_cache = {}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.gen = torch.Generator(self.device).manual_seed(a.seed + self.rank)
        torch.manual_seed(a.seed + self.rank)                          # LoRA dropout, per rank
        n = int(math.ceil(a.a_max / a.eta - 1e-9))
        self.a_grid = [min(k * a.eta, a.a_max) for k in range(n + 1)]
        self.phase, self.step, self.global_step, self.buffer, self.opt = 1, 0, 0, None, None
        self.path = os.path.join(a.out, f"state_rank{self.rank}.pt")
        self.stop = False

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda")

    # ---- rollouts
    @torch.no_grad()
    def rollouts(self, prompt_ids):
        """`completions` teacher rollouts of each prompt: {idx, comp (n, G), r (n,)}."""
        a, C = self.args, self.args.completions
        rows = [i for i in prompt_ids for _ in range(C)]
        comps, rs = [], []
        self.model.eval()
        for j in range(0, len(rows), a.rollout_batch):
            chunk = rows[j:j + a.rollout_batch]
            ids, am = left_pad([self.prompt(i) for i in chunk], self.cfg.eos_token_id, self.device)
            with teacher_mode(self.model), self.autocast():
                comp = generate(self.model, ids, am, a.gen_length, a.gen_length // a.tokens_per_step,
                                a.block_length, a.temperature, generator=self.gen)
            comps.append(comp)
            rs += [REWARDS[a.task](decode(self.tok, c, self.cfg), self.items[i])
                   for c, i in zip(comp.tolist(), chunk)]
        self.model.train()
        return dict(idx=torch.tensor(rows, device=self.device), comp=torch.cat(comps),
                    r=torch.tensor(rs, dtype=torch.float32, device=self.device))

    def prompt(self, i):
        """Token ids of training prompt i (chat template applied), tokenised once, when first drawn."""
        if i not in self.prompt_cache:
            self.prompt_cache[i] = chat_prompt(self.tok, PROMPTS[self.args.task](self.items[i]))
        return self.prompt_cache[i]

    def draw_prompts(self, n):
        return torch.randint(len(self.items), (n,), generator=self.gen, device=self.device).tolist()

    def refresh(self):
        """Replace the rollouts of refresh_prompts prompt slots with new prompts' (from the teacher)."""
        a, C = self.args, self.args.completions
        slots = torch.randperm(a.buffer_prompts, generator=self.gen, device=self.device)[:a.refresh_prompts]
        rows = (slots[:, None] * C + torch.arange(C, device=self.device)).flatten()
        new = self.rollouts(self.draw_prompts(len(slots)))
        for k in self.buffer:
            self.buffer[k][rows] = new[k]

    # ---- one optimiser step
    def loss(self, rows, eta, log_Z, r):
        a, cfg = self.args, self.cfg
        prompts = [self.prompt(i) for i in self.buffer["idx"][rows].tolist()]
        ids, am = left_pad(prompts, cfg.eos_token_id, self.device)
        comp = self.buffer["comp"][rows]
        c_t, counted, tw = sar_mask(comp, a.block_length, cfg.mask_token_id, self.gen)
        x1, x_t = torch.cat([ids, comp], 1), torch.cat([ids, c_t], 1)
        am = torch.cat([am, torch.ones_like(comp)], 1)
        where = torch.cat([torch.zeros_like(ids, dtype=torch.bool), counted], 1)  # the active block's masks
        with self.autocast():
            logits = self.model(x_t, am, where)
            teacher_logits = None
            if a.phi != 0:
                with torch.no_grad(), teacher_mode(self.model):
                    teacher_logits = self.model(x_t, am, where)
        return dtm_loss(logits, teacher_logits, x1, where, r[rows], tw, eta, a.phi, log_Z=log_Z[rows])

    def train_step(self, eta):
        a = self.args
        # The tilt is unchanged by a constant shift of r; shifting by the buffer's minimum makes
        # e^{eta r} >= 1 >= phi, so every NLL weight (e^{eta r} - phi) / Z is >= 0 and the loss is
        # bounded (dtm.py's docstring). Z = E_a[e^{eta r}] per prompt (or pooled) over the whole buffer.
        r = self.buffer["r"] - self.buffer["r"].min()
        group = self.buffer["idx"] if a.z == "prompt" else None
        log_Z = group_log_mean_exp(eta * r.double(), group)
        micro = a.micro_batch or a.batch
        total = 0.0
        for j in range(0, a.batch, micro):
            rows = torch.randint(len(r), (min(micro, a.batch - j),), generator=self.gen, device=self.device)
            loss = self.loss(rows, eta, log_Z, r) * len(rows) / a.batch    # gradient accumulation
            loss.backward()
            total += loss.item()
        if self.world > 1:                                              # average the LoRA gradients
            flat = torch.cat([p.grad.flatten() for p in self.params])
            dist.all_reduce(flat)
            flat /= self.world
            off = 0
            for p in self.params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, a.clip)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, a.steps_per_phase, a.lr, a.min_lr)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total, float(gnorm)

    def new_optimizer(self):
        a = self.args
        return torch.optim.AdamW(self.params, lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay)

    # ---- state
    def save(self):
        """Every rank writes its own buffer and RNG states; the adapters and AdamW, the same on every
        rank, are written by rank 0 only. Each file is replaced atomically: old or new, never half."""
        state = dict(buffer=self.buffer, phase=self.phase, step=self.step, global_step=self.global_step,
                     gen=self.gen.get_state(), rng=torch.get_rng_state(), args=vars(self.args),
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
        if shared["opt"] is not None:
            self.opt = self.new_optimizer()
            self.opt.load_state_dict(shared["opt"])
        self.gen.set_state(s["gen"].cpu())
        torch.set_rng_state(s["rng"].cpu())
        if s.get("cuda_rng") is not None:                              # LoRA dropout on the GPU
            torch.cuda.set_rng_state(s["cuda_rng"].cpu(), self.device)

    def log(self, **row):
        if self.rank == 0:
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---- the loop
    def run(self):
        a = self.args
        os.makedirs(a.out, exist_ok=True)
        if a.resume and os.path.isfile(self.path):
            self.load()
            print(f"rank {self.rank}: resumed from {self.path} at phase {self.phase}, step {self.step}")
        previous = signal.signal(signal.SIGINT, self.on_interrupt)
        try:
            while self.phase < len(self.a_grid):
                k, t0 = self.phase, time.time()
                eta = self.a_grid[k] - self.a_grid[k - 1]
                if self.step == 0:                                      # start of a phase
                    snapshot_teacher(self.model)                        # p_a := the current model
                    self.opt = self.new_optimizer()
                    self.buffer = self.rollouts(self.draw_prompts(a.buffer_prompts))
                    self.log(phase=k, a=self.a_grid[k - 1], buffer_reward=self.buffer["r"].mean().item(),
                             rollout_s=round(time.time() - t0, 1))
                bar = tqdm(total=a.steps_per_phase, initial=self.step, disable=self.rank != 0,
                           desc=f"phase {k}/{len(self.a_grid) - 1} a->{self.a_grid[k]:g}")
                while self.step < a.steps_per_phase:
                    if self.step and self.step % a.refresh_every == 0:
                        self.refresh()
                    loss, gnorm = self.train_step(eta)
                    self.step, self.global_step = self.step + 1, self.global_step + 1
                    self.log(phase=k, step=self.step, global_step=self.global_step, loss=loss, grad_norm=gnorm,
                             lr=self.opt.param_groups[0]["lr"], buffer_reward=self.buffer["r"].mean().item())
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.4f}", r=f"{self.buffer['r'].mean().item():.3f}")
                    if self.stop or (a.stop_after and self.global_step >= a.stop_after):
                        self.save()
                        print(f"rank {self.rank}: stopped at phase {k}, step {self.step}; saved {self.path}")
                        return
                    if a.save_every and self.global_step % a.save_every == 0:
                        self.save()
                bar.close()
                self.phase, self.step = self.phase + 1, 0
                self.save()
                if self.rank == 0:
                    save_adapter(self.model, os.path.join(a.out, "adapter"), a.lora_r, a.lora_alpha, a.lora_dropout)
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_interrupt(self, *_):
        if self.stop:                                                   # a second Ctrl-C: abort now
            raise KeyboardInterrupt
        self.stop = True
        print("\nCtrl-C: saving after this step (press again to abort without saving)")


# ============================================================================ 7. evaluation
@torch.no_grad()
def evaluate(model, tok, task, items, gen_length, batch=8, block_length=32):
    """The paper's protocol: chat template, block 32, steps = gen_length / 2, temperature 0.
    Returns the accuracy (Sudoku: cells; the others: questions), summed over all ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = items[rank::world]
    dev = model.ff_out.weight.device
    ok = torch.zeros(2, dtype=torch.float64, device=dev)
    model.eval()
    for j in tqdm(range(0, len(mine), batch), desc=f"{task} gen {gen_length}", disable=rank != 0):
        chunk = mine[j:j + batch]
        ids, am = left_pad([chat_prompt(tok, PROMPTS[task](it)) for it in chunk], model.cfg.eos_token_id, dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            comp = generate(model, ids, am, gen_length, gen_length // 2, block_length, 0.0)
        for c, it in zip(comp.tolist(), chunk):
            ok += torch.tensor(accuracy(task, decode(tok, c, model.cfg), it), dtype=torch.float64, device=dev)
    if world > 1:
        dist.all_reduce(ok)
    return (ok[0] / ok[1].clamp_min(1)).item()


def run_eval(args):
    dev = torch.device(args.device)
    model = load_model(args.model_dir, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tok = load_tokenizer(args.model_dir)
    if args.adapter:
        add_lora(model, args.lora_r, args.lora_alpha, 0.0, args.lora_targets)
        load_adapter(model, args.adapter)
        for m in lora_layers(model).values():
            m.merge()                                   # inference only: fold B A into W
    items = task_data(args)[1][:args.eval_limit or None]
    acc = {L: evaluate(model, tok, args.task, items, L, args.eval_batch, args.block_length)
           for L in args.eval_lengths}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"\n| task | {' | '.join(f'gen {L}' for L in acc)} |\n|---|{'---|' * len(acc)}")
        print(f"| {args.task} ({len(items)}) | {' | '.join(f'{100 * v:.1f}' for v in acc.values())} |")
    return acc


def bench(args):
    """Peak memory of one DTM training step and of one sampling step (one network call on a block),
    on args.batch sequences of (64-token prompt + gen_length). CUDA: the allocator's peak; CPU: the
    growth of the process's peak resident set (a coarse, upper-bound measure)."""
    import resource
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def peak_mb():
        if cuda:
            return torch.cuda.max_memory_allocated(dev) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10      # kB on Linux
    args.buffer_prompts, args.completions, args.refresh_prompts = 1, args.batch, 0
    t = Trainer(args)
    t.rollouts = lambda ids: dict(                      # a random buffer: no rollouts needed to time a step
        idx=torch.zeros(args.batch, dtype=torch.long, device=dev),
        comp=torch.randint(6, t.cfg.embedding_size, (args.batch, args.gen_length), device=dev),
        r=torch.rand(args.batch, device=dev))
    t.prompt_cache[0] = list(range(6, 70))
    t.buffer, t.opt = t.rollouts(None), t.new_optimizer()
    snapshot_teacher(t.model)
    n_lora = sum(p.numel() for p in t.params)
    print(f"model: {sum(p.numel() for p in t.model.parameters()) - n_lora:,} base + {n_lora:,} LoRA parameters")
    base = peak_mb()                                    # CPU: a running peak, so the training figure
    ids = torch.tensor([t.prompt_cache[0]] * args.batch, device=dev)
    t0 = time.time()
    with torch.no_grad(), teacher_mode(t.model), t.autocast():
        generate(t.model, ids, None, args.block_length, args.block_length // args.tokens_per_step,
                 args.block_length, 1.0, generator=t.gen)
    sample_mb, sample_s = peak_mb() - base, (time.time() - t0) / (args.block_length // args.tokens_per_step)
    if cuda:                                            # is the larger of the two steps there
        torch.cuda.reset_peak_memory_stats(dev)
        base = peak_mb()
    t0 = time.time()
    t.train_step(args.eta)
    train_mb, train_s = peak_mb() - base, time.time() - t0
    print(f"one sampling step ({args.batch} x {64 + args.gen_length} tokens): +{sample_mb:.1f} MB peak, "
          f"{sample_s:.3f} s")
    print(f"one training step ({args.batch} sequences, teacher + student + backward + AdamW): "
          f"+{train_mb:.1f} MB peak, {train_s:.3f} s")
    return sample_mb, train_mb


# ============================================================================ the command line
def parse(argv=None):
    presets = "\n".join(f"  {t:9s} " + " ".join(f"{k}={v}" for k, v in d.items()) for t, d in PRESETS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=type("Fmt", (argparse.ArgumentDefaultsHelpFormatter,
                                                             argparse.RawDescriptionHelpFormatter), {}),
                                epilog="presets (App. D.2 and the released configs; a flag overrides "
                                       "its value):\n" + presets)
    p.add_argument("--model_dir", required=True, help="LLaDA checkpoint: config.json, tokenizer.json, safetensors")
    p.add_argument("--task", required=True, choices=list(PRESETS),
                   help="sudoku (4x4, generated), countdown (3 numbers, generated or --train_data), "
                        "gsm8k / math (local JSONL: question, answer)")
    p.add_argument("--train_data", help="JSONL of training items (gsm8k, math; optional for countdown)")
    p.add_argument("--test_data", help="JSONL of test items (gsm8k, math; optional for countdown)")
    p.add_argument("--out", default="runs/llada", help="state_rank*.pt, metrics.jsonl, adapter/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state_rank*.pt")
    p.add_argument("--adapter", help="start from (or evaluate) this PEFT-layout LoRA adapter directory")
    p.add_argument("--eval", action="store_true", help="only evaluate: block 32, steps = gen/2, temperature 0")
    p.add_argument("--bench", action="store_true", help="only measure the peak memory of one training step "
                                                        "and one sampling step")
    p.add_argument("--eval_lengths", type=int, nargs="+", default=[256, 512], help="generation lengths")
    p.add_argument("--eval_batch", type=int, default=8, help="prompts per sampling batch")
    p.add_argument("--eval_limit", type=int, default=0, help="first N test items only (0: all)")
    g = p.add_argument_group("DTM (None: the task's preset, App. D.2)")
    g.add_argument("--phi", type=float, default=1.0, help="control variate (eq. 17); 1 in all of the paper's runs")
    g.add_argument("--eta", type=float, help="annealing step of the tilt a")
    g.add_argument("--a_max", type=float, default=100.0, help="final tilt (the released a_end)")
    g.add_argument("--steps_per_phase", type=int, help="optimiser steps per phase")
    g.add_argument("--batch", type=int, help="sequences per optimiser step per GPU")
    g.add_argument("--micro_batch", type=int, default=0,
                   help="sequences per forward (gradient accumulation); 0: batch")
    g.add_argument("--lr", type=float, help="AdamW peak learning rate (betas 0.9, 0.99)")
    g.add_argument("--min_lr", type=float, help="learning rate at the end of a phase's 10%% decay")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (App. D.2: 0.1)")
    g.add_argument("--clip", type=float, help="gradient-norm clip")
    g.add_argument("--buffer_prompts", type=int, help="prompts in the replay buffer (per GPU)")
    g.add_argument("--completions", type=int, help="rollouts per buffer prompt")
    g.add_argument("--refresh_prompts", type=int, help="prompts replaced at each refresh")
    g.add_argument("--refresh_every", type=int, help="steps between refreshes")
    g.add_argument("--temperature", type=float, help="rollout temperature")
    g.add_argument("--z", choices=["prompt", "buffer"],
                   help="Z = E_a[e^{eta r}] per prompt or over the whole buffer")
    s = p.add_argument_group("sampling and model")
    s.add_argument("--gen_length", type=int, default=256, help="completion tokens of a rollout")
    s.add_argument("--block_length", type=int, default=32, help="semi-autoregressive block")
    s.add_argument("--tokens_per_step", type=int, default=2, help="rollout steps = gen_length / this")
    s.add_argument("--rollout_batch", type=int, default=16, help="sequences per sampling batch")
    s.add_argument("--lora_r", type=int, default=128, help="LoRA rank (App. D.2: 128)")
    s.add_argument("--lora_alpha", type=float, default=64, help="LoRA alpha; scale = alpha / r")
    s.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    s.add_argument("--lora_targets", nargs="+", default=list(LORA_TARGETS), choices=LORA_TARGETS,
                   help="linear layers of every block that get an adapter")
    s.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward")
    s.add_argument("--save_every", type=int, default=50, help="steps between state saves (0: phase ends only)")
    s.add_argument("--stop_after", type=int, default=0, help="save and stop after this many steps in all")
    s.add_argument("--seed", type=int, default=0, help="seeds data, masking, sampling (rank r: seed + r)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: bf16 weights and autocast; cpu: float32")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    problems = [m for bad, m in [
        (args.eta <= 0, f"--eta must be > 0 (got {args.eta})"),
        (not 0 <= args.phi <= 1, f"--phi must be in [0, 1] (got {args.phi})"),
        (args.gen_length % args.block_length, "--gen_length must be a multiple of --block_length"),
        ((args.gen_length // args.tokens_per_step) % (args.gen_length // args.block_length),
         "gen_length / tokens_per_step steps must split evenly over the blocks"),
        (args.refresh_prompts > args.buffer_prompts, "--refresh_prompts exceeds --buffer_prompts"),
        (not os.path.isdir(args.model_dir), f"--model_dir {args.model_dir} is not a directory")] if bad]
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
        if args.bench:
            bench(args)
        elif args.eval:
            run_eval(args)
        else:
            Trainer(args).run()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
