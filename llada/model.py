"""LLaDA-8B-Instruct in plain torch: the safetensors reader and writer, the network, its loader, the
tokenizer and chat template. The sampler is llada/sampler.py.

No `transformers`: torch and `tokenizers` only. The network matches the original `modeling_llada.py`
bit for bit (tests/test_llada_model.py checks it against a slow per-head reference). On its own:

    import torch
    from llada.model import load_model, load_tokenizer, chat_prompt, decode
    from llada.sampler import generate
    model = load_model("LLaDA-8B-Instruct", "cuda", torch.bfloat16)
    tok = load_tokenizer("LLaDA-8B-Instruct")
    ids = torch.tensor([chat_prompt(tok, "What is 7 * 8?")], device="cuda")
    print(decode(tok, generate(model, ids, gen_length=64, steps=32)[0], model.cfg))
"""
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(Exception):
    """A checkpoint, adapter or config file that cannot be used; the message says which and why."""


# ============================================================================ safetensors
# Layout: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}},
# then the raw buffer; offsets are relative to the buffer's start.
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs):
    """json.loads' object_pairs_hook: a dict, or DuplicateKey when a name appears twice."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def read_safetensors_header(path):
    """The validated header of a safetensors file: ({name: (dtype, shape, begin, end)}, metadata, start).
    Every offset is bounds-checked against the file size before any tensor is touched, and, as the
    format requires, the tensors' byte ranges tile the data buffer exactly (no overlap, no gap)."""
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
        header = json.loads(raw, object_pairs_hook=unique_keys)
    except DuplicateKey as e:                          # JSON would keep the last silently: refuse
        raise CheckpointError(f"{path}: the header names {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    meta, buf, out = header.pop("__metadata__", None) or {}, size - 8 - n, {}
    for name, e in header.items():
        if not (isinstance(e, dict) and isinstance(e.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in e["shape"])
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(type(o) is int for o in e["data_offsets"])):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}")
        if e.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {e.get('dtype')!r}; "
                                  f"supported: {', '.join(DTYPES)}")
        dtype, (b, end) = DTYPES[e["dtype"]], e["data_offsets"]
        if math.prod(max(d, 1) for d in e["shape"]) * dtype.itemsize >= 2**63:   # torch's strides overflow,
            raise CheckpointError(f"{path}: tensor {name!r} has an impossible shape {e['shape']}")  # even at 0
        nbytes = math.prod(e["shape"]) * dtype.itemsize
        if not 0 <= b <= end <= buf:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets [{b}, {end}] outside the "
                                  f"{buf}-byte data buffer (truncated file?)")
        if end - b != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - b} bytes, its shape "
                                  f"{e['shape']} and dtype {e['dtype']} need {nbytes}")
        out[name] = (dtype, tuple(e["shape"]), b, end)
    edge = 0                                           # the tensors tile the buffer: no overlap, no gap
    for name, (_, _, b, end) in sorted(out.items(), key=lambda kv: kv[1][2:]):
        if b != edge:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {b} of the data buffer, the "
                                  f"tensor before it ends at {edge} ({'overlap' if b < edge else 'gap'})")
        edge = end
    if edge != buf:
        raise CheckpointError(f"{path}: the tensors cover {edge} of the {buf} bytes of the data buffer")
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


# ============================================================================ the network and its loader
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
                          ("activation_type", "silu"), ("block_type", "llama"), ("rope", True),
                          ("scale_logits", False), ("input_emb_norm", False)):
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

    def forward(self, x, pos, keep, kv=None, span=None):
        """kv: a list to which this call appends its (k, v) (a cache refresh), or, with span = (lo, hi),
        the cached (k, v) of the whole sequence, whose positions lo:hi x's fresh ones replace."""
        B, T, D = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.nh, self.hd).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if span is not None:                                                # the other positions: cached
            (kc, vc), (lo, hi) = kv, span
            k, v = (torch.cat([c[:, :, :lo], z, c[:, :, hi:]], 2) for c, z in ((kc, k), (vc, v)))
        elif kv is not None:
            kv.append((k, v))
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

    def forward(self, ids, attention_mask=None, where=None, cache=None, span=None):
        """ids (B, T); attention_mask (B, T), 1 = token, 0 = left padding; where (B, T) bool: the logits
        are computed only there, (N, V) row-major (the head is ~1/8 of the 8B's FLOPs per token).
        Positions count real tokens only, so a left-padded prompt sees the positions it would alone.
        KV cache (the cached sampler): cache=[] fills the list with every layer's keys and values;
        cache=that list and span=(lo, hi) runs only positions lo:hi, against the cached others."""
        B, T = ids.shape
        if attention_mask is None:
            pos, keep = torch.arange(T, device=ids.device).expand(B, T), None
        else:
            pos = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
            keep = attention_mask.bool()[:, None, None, :]
        if span is not None:
            ids, pos, where = ids[:, span[0]:span[1]], pos[:, span[0]:span[1]], where[:, span[0]:span[1]]
        x = self.wte(ids)
        for i, block in enumerate(self.blocks):
            if self.checkpointing and torch.is_grad_enabled():              # recompute in backward
                x = torch.utils.checkpoint.checkpoint(block, x, pos, keep, use_reentrant=False)
            else:
                x = block(x, pos, keep, cache if span is None else cache[i], span)
        x = self.ln_f(x)
        return self.ff_out(x if where is None else x[where])


def load_model(model_dir, device="cpu", dtype=torch.float32, check_finite=True):
    """Build LLaDA from model_dir/config.json and load its safetensors weights (one file, or shards
    listed in model.safetensors.index.json). A clear CheckpointError names any missing, unexpected,
    mis-shaped or non-finite tensor, and one that two shards both hold. The network is built on the meta
    device, so no memory is spent twice. check_finite reads every weight once on `device` (on a GPU a
    fraction of a second for the 8B; on one CPU core about a minute: check_finite=False skips it)."""
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
    state, source = {}, {}
    for name in files:
        for key, t in load_safetensors(os.path.join(model_dir, name)).items():
            if key not in want:
                raise CheckpointError(f"{name}: unexpected tensor {key} (not part of LLaDA's layout)")
            if key in source:
                raise CheckpointError(f"tensor {key} is in two shards, {source[key]} and {name}")
            if t.shape != want[key]:
                raise CheckpointError(f"{name}: tensor {key} has shape {list(t.shape)}, "
                                      f"config.json implies {list(want[key])}")
            t = t.to(device, dtype)
            if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{name}: tensor {key} holds non-finite values (inf or nan)")
            state[key[len("model.transformer."):]], source[key] = t, name
    missing = sorted(set(want) - {f"model.transformer.{k}" for k in state})
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]}" +
                              (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.load_state_dict(state, assign=True)
    return model.requires_grad_(False)


def random_model(cfg, device="cpu", dtype=torch.float32, seed=0):
    """LLaDA of config `cfg` with random weights (N(0, 0.02), norms 1), built in place on `device` in
    `dtype`: for benchmarks and tests, when no checkpoint is at hand (`--bench_shape 8b`: 16 GB in bf16)."""
    with torch.device("meta"):
        model = LLaDA(cfg).to(dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") or name == "ln_f.weight" else p.normal_(0, 0.02, generator=g)
    return model.requires_grad_(False)


# ============================================================================ the tokenizer and chat template
def load_tokenizer(model_dir):
    from tokenizers import Tokenizer                   # the only non-torch dependency
    path = os.path.join(model_dir, "tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:                             # tokenizers raises a bare Exception
        raise CheckpointError(f"{path}: cannot read the tokenizer ({e})") from None


def chat_text(text, prefill=""):
    """LLaDA-Instruct's chat template (BOS only before the first message); `prefill` is text the
    assistant's turn starts with (SPG's evaluation puts "<reasoning>" there)."""
    return ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + text +
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + prefill)


def chat_prompt(tok, text, prefill=""):
    """chat_text as token ids."""
    return tok.encode(chat_text(text, prefill), add_special_tokens=False).ids


def decode(tok, ids, cfg, raw=False):
    """The completion's text up to its first <|endoftext|> / <|eot_id|>; raw=True: all of it, special
    tokens included (what the baselines' parsers read)."""
    ids = list(ids)
    if raw:
        return tok.decode(ids, skip_special_tokens=False)
    stop = {cfg.eos_token_id, tok.token_to_id("<|eot_id|>")}
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return tok.decode(ids[:cut], skip_special_tokens=True)
