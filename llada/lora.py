"""A hand-written LoRA (Hu et al., 2021) for LLaDA, with DTM's frozen teacher copy in the same layer,
saved and loaded in PEFT's layout (`PeftModel.from_pretrained` reads our adapters and we read its).

    from llada.lora import add_lora, teacher_mode, snapshot_teacher, save_adapter
    model = add_lora(load_model(path), r=128, alpha=64)   # only lora_A / lora_B train
    with teacher_mode(model): ...                         # the frozen adapter of the phase's start
    snapshot_teacher(model)                               # a new phase: teacher := student
    save_adapter(model, "runs/llada/adapter", r=128, alpha=64, dropout=0.05)
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from llada.model import CheckpointError, load_safetensors, save_safetensors


def lora_linear(x, weight, A, B, scale, dropout=0.0, training=False, bias=None):
    """y = x W^T + b + scale * dropout(x) A^T B^T (Hu et al., 2021): the low-rank path runs on the
    activations, so W + scale B A is never formed. A (r, in), B (out, r); bias (out,) or None."""
    y = F.linear(x, weight, bias)
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
            return lora_linear(x, self.base.weight, self.teacher_A, self.teacher_B, self.scale, bias=self.base.bias)
        if self.merged:
            return self.base(x)
        return lora_linear(x, self.base.weight, self.lora_A, self.lora_B, self.scale, self.dropout,
                           self.training, self.base.bias)

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

