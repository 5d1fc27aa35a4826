"""llada/model.py on a tiny random LLaDA written in the real HF layout (tests/llada_tiny.py): the
network against a slow per-head reference, the safetensors reader on good and bad files, and the
sampler against a step-by-step transcription of LLaDA's generate.py.
"""
import json
import math
import random
import struct

import pytest
import torch
import torch.nn.functional as F

import llada.lora as lora
import llada.model as lm
import llada.sampler as sampler
from llada_tiny import CONFIG, randomise_adapters


@pytest.fixture(scope="module")
def model(tiny):
    return lm.load_model(tiny[0])


# ----------------------------------------------------------------------------- the model
def reference_logits(state, c, ids):
    """LLaDA's block (modeling_llada.py) written out per position and per head, in float64 (no padding)."""
    W = {k[len("model.transformer."):]: v.double() for k, v in state.items()}
    T, D, nh, nkv = len(ids), c["d_model"], c["n_heads"], c["n_kv_heads"]
    hd = D // nh

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c["rms_norm_eps"])

    def rot(v, p):                                    # rotate-half RoPE of one head vector at position p
        half, out = hd // 2, v.clone()
        for i in range(half):
            ang = p * c["rope_theta"] ** (-2 * i / hd)
            out[i] = v[i] * math.cos(ang) - v[i + half] * math.sin(ang)
            out[i + half] = v[i + half] * math.cos(ang) + v[i] * math.sin(ang)
        return out

    x = W["wte.weight"][ids]
    for n in range(c["n_layers"]):
        b = lambda name: W[f"blocks.{n}.{name}.weight"]                                # noqa: E731
        h = rms(x, b("attn_norm"))
        q, k, v = h @ b("q_proj").T, h @ b("k_proj").T, h @ b("v_proj").T
        heads = []
        for j in range(nh):
            g = j // (nh // nkv)                       # the kv head this query head reads
            qj = torch.stack([rot(q[t, j * hd:(j + 1) * hd], t) for t in range(T)])
            kj = torch.stack([rot(k[t, g * hd:(g + 1) * hd], t) for t in range(T)])
            att = torch.softmax(qj @ kj.T / math.sqrt(hd), -1)       # bidirectional: no causal mask
            heads.append(att @ v[:, g * hd:(g + 1) * hd])
        x = x + torch.cat(heads, -1) @ b("attn_out").T
        h = rms(x, b("ff_norm"))
        x = x + (F.silu(h @ b("ff_proj").T) * (h @ b("up_proj").T)) @ b("ff_out").T
    return rms(x, W["ln_f.weight"]) @ W["ff_out.weight"].T


def test_two_shard_checkpoint_forward_equals_a_slow_per_head_reference(tiny, model):
    path, state = tiny
    ids = torch.randint(0, CONFIG["embedding_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    assert logits.shape == (2, 11, CONFIG["embedding_size"]) and torch.isfinite(logits).all()
    for b in range(2):
        torch.testing.assert_close(logits[b].double(), reference_logits(state, CONFIG, ids[b]),
                                   rtol=1e-5, atol=1e-5)


def test_left_padding_with_attention_mask_gives_the_unpadded_logits(model):
    ids = torch.randint(6, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    padded, am = sampler.left_pad([ids[0].tolist(), list(range(6, 20))], pad_id=1)
    torch.testing.assert_close(model(padded, am)[0, -9:], model(ids)[0], rtol=1e-5, atol=1e-5)


def test_logits_only_where_asked_equal_the_full_logits_there(model):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    where = torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) < 0.5
    torch.testing.assert_close(model(ids, where=where), model(ids)[where])


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)                           # the same LoRA A in both
        model = lora.add_lora(lm.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
        randomise_adapters(model)
        model.checkpointing = ckpt
        ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(6))
        model(ids).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_of_every_supported_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {f"t_{name}": torch.randn(3, 5, generator=g).to(dt) for name, dt in lm.DTYPES.items()}
    ts["empty"] = torch.zeros(0, 4)
    lm.save_safetensors(ts, str(tmp_path / "x.safetensors"), {"k": "v"})
    back = lm.load_safetensors(str(tmp_path / "x.safetensors"))
    assert set(back) == set(ts)
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k])


def write_raw(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.parametrize("case, header, data, message", [
    ("offsets past the data", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8,
     "outside"),
    ("size disagrees with shape", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8,
     "need 16"),
    ("unknown dtype", {"w": {"dtype": "I4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2, "dtype 'I4'"),
    ("malformed entry", {"w": {"dtype": "F32", "shape": "4"}}, b"", "malformed"),
    ("zero next to huge dims", {"w": {"dtype": "F32", "shape": [2**31, 2**62, 0], "data_offsets": [0, 0]}}, b"",
     "impossible shape"),
    ("two tensors on the same bytes", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
     "overlap"),
    ("a gap between tensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                               "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12, "gap"),
    ("bytes after the last tensor", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8,
     "cover 4 of the 8"),
])
def test_bad_safetensors_files_raise_a_clear_error(tmp_path, case, header, data, message):
    with pytest.raises(lm.CheckpointError, match=message):
        lm.load_safetensors(write_raw(tmp_path / "bad.safetensors", header, data))


def hand_built(path, entries, data, pad=11):
    """A safetensors file written byte by byte: the header's JSON (its entries in the order given, so not
    necessarily the data's), padded with `pad` spaces, then the raw data. Independent of save_safetensors."""
    raw = ("{" + ", ".join(f'"{k}": {json.dumps(v)}' for k, v in entries) + "}" + " " * pad).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return str(path)


def test_a_hand_built_file_with_its_header_out_of_data_order_mixed_dtypes_and_padding_loads_its_values(tmp_path):
    """The data holds bf16 [1.0, -3.5], then f32 [[1.5, -2], [0.25, 3]], then f16 [0.5, -1, 2]; the header
    names them f32, metadata, f16, an empty tensor, bf16; the JSON is followed by spaces (as the format allows),
    here 12, so that the data starts at a byte that is not a multiple of 8."""
    bf16 = bytes([0x80, 0x3F, 0x60, 0xC0])                          # the high halves of f32 0x3F800000, 0xC0600000
    f32 = struct.pack("<4f", 1.5, -2.0, 0.25, 3.0)
    f16 = struct.pack("<3e", 0.5, -1.0, 2.0)
    entries = [("w.f32", dict(dtype="F32", shape=[2, 2], data_offsets=[4, 20])),
               ("__metadata__", dict(format="pt")),
               ("w.f16", dict(dtype="F16", shape=[3], data_offsets=[20, 26])),
               ("w.empty", dict(dtype="F32", shape=[0, 3], data_offsets=[20, 20])),
               ("w.bf16", dict(dtype="BF16", shape=[2], data_offsets=[0, 4]))]
    path = hand_built(tmp_path / "hand.safetensors", entries, bf16 + f32 + f16, pad=12)
    header, meta, start = lm.read_safetensors_header(path)
    assert meta == {"format": "pt"} and (start - 8) % 8 != 0 and list(header) == ["w.f32", "w.f16", "w.empty",
                                                                                  "w.bf16"]
    t = lm.load_safetensors(path)
    assert t["w.bf16"].dtype == torch.bfloat16 and t["w.bf16"].tolist() == [1.0, -3.5]
    assert t["w.f32"].dtype == torch.float32 and t["w.f32"].tolist() == [[1.5, -2.0], [0.25, 3.0]]
    assert t["w.f16"].dtype == torch.float16 and t["w.f16"].tolist() == [0.5, -1.0, 2.0]
    assert t["w.empty"].shape == (0, 3)
    # the same header with the f16 tensor moved 2 bytes earlier (an overlap) or later (a gap) is refused
    for begin, message in ((18, "overlap"), (22, "gap")):
        moved = [(k, dict(v, data_offsets=[begin, begin + 6]) if k == "w.f16" else v) for k, v in entries]
        with pytest.raises(lm.CheckpointError, match=message):
            lm.load_safetensors(hand_built(tmp_path / f"{message}.safetensors", moved, bf16 + f32 + f16 + b"\0\0"))


def test_a_header_that_names_a_tensor_twice_is_refused_not_read_as_the_last(tmp_path):
    """JSON keeps the last of two equal keys, so such a file would load one tensor and hide the other."""
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = ('{"w": ' + entry + ', "w": ' + entry + '}').encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(lm.CheckpointError, match="names 'w' twice"):
        lm.load_safetensors(str(path))


def test_truncated_file_and_header_past_eof_raise_a_clear_error(tmp_path):
    good = str(tmp_path / "good.safetensors")
    lm.save_safetensors({"w": torch.randn(64, generator=torch.Generator().manual_seed(1))}, good)
    blob = open(good, "rb").read()
    for name, content, message in [("short", blob[:5], "too short"),
                                   ("cut", blob[:-10], "outside"),
                                   ("hdr", struct.pack("<Q", 10 ** 9) + blob[8:], "past the end"),
                                   ("json", blob[:8] + b"\xff" * (len(blob) - 8), "not valid JSON")]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(lm.CheckpointError, match=message):
            lm.load_safetensors(str(p))


def test_3000_mutated_files_load_or_raise_checkpoint_error_never_anything_else(tmp_path):
    """Byte flips, truncations, and edits of the header's length and fields of a valid 3-tensor file."""
    good = str(tmp_path / "good.safetensors")
    g = torch.Generator().manual_seed(2)
    lm.save_safetensors({"a": torch.randn(3, 2, generator=g), "b": torch.zeros(0, 5),
                         "c": torch.randn(4, generator=g).half()}, good)
    blob, rng = open(good, "rb").read(), random.Random(0)
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    edits = [2**31, 2**62, 2**64, -1, 0, 1, 7, 1.5, True, None, "3", [], [1, 2]]
    outcomes = {"loaded": 0, "CheckpointError": 0}
    for i in range(3000):
        kind = i % 4
        if kind == 0:                                  # flip 1-4 random bytes
            b = bytearray(blob)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif kind == 1:                                # truncate
            data = blob[:rng.randrange(len(blob))]
        elif kind == 2:                                # a wrong header length
            data = struct.pack("<Q", max(0, n + rng.randint(-20, 20))) + blob[8:]
        else:                                          # edit one field of one tensor
            h = json.loads(json.dumps(header))
            e = h[rng.choice(["a", "b", "c"])]
            field = rng.choice(["shape", "data_offsets"])
            e[field] = list(e[field]) or [0]
            e[field][rng.randrange(len(e[field]))] = rng.choice(edits)
            raw = json.dumps(h).encode()
            data = struct.pack("<Q", len(raw)) + raw + blob[8 + n:]
        path = tmp_path / "fuzz.safetensors"
        path.write_bytes(data)
        try:
            for t in lm.load_safetensors(str(path)).values():
                t.float().sum()                        # touch every byte
            outcomes["loaded"] += 1
        except lm.CheckpointError as err:
            assert "\n" not in str(err)
            outcomes["CheckpointError"] += 1
    assert outcomes["CheckpointError"] > 2000 and outcomes["loaded"] > 30, outcomes   # both paths taken


@pytest.mark.parametrize("key, value", [("scale_logits", True), ("input_emb_norm", True), ("block_type", "sequential"),
                                        ("rope", False), ("include_bias", True)])
def test_config_fields_this_network_does_not_implement_are_a_clear_error(tmp_path, key, value):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**CONFIG, key: value}, f)
    with pytest.raises(lm.CheckpointError, match=f"{key} = {value!r}; this script implements"):
        lm.LLaDAConfig.from_json(str(tmp_path / "config.json"))


def test_checkpoint_errors_name_the_missing_unexpected_or_misshaped_key(tmp_path, tiny):
    state = tiny[1]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONFIG, f)
    p = "model.transformer."
    cases = [({k: v for k, v in state.items() if "blocks.1.up_proj" not in k}, f"missing tensor {p}blocks.1.up_proj"),
             ({**state, p + "extra.weight": torch.zeros(1)}, f"unexpected tensor {p}extra.weight"),
             ({**state, p + "ln_f.weight": torch.zeros(3)}, f"{p}ln_f.weight has shape \\[3\\]")]
    for sd, message in cases:
        lm.save_safetensors(sd, str(tmp_path / "model.safetensors"))
        with pytest.raises(lm.CheckpointError, match=message):
            lm.load_model(str(tmp_path))


def test_a_tensor_in_two_shards_is_refused_naming_both_files(tmp_path, tiny):
    state = tiny[1]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONFIG, f)
    key = "model.transformer.ln_f.weight"
    lm.save_safetensors(state, str(tmp_path / "a.safetensors"))                     # holds every tensor
    lm.save_safetensors({key: state[key] + 1}, str(tmp_path / "b.safetensors"))     # and one again
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {**{k: "a.safetensors" for k in state}, key: "b.safetensors"}}, f)
    with pytest.raises(lm.CheckpointError, match=f"tensor {key} is in two shards, a.safetensors and b.safetensors"):
        lm.load_model(str(tmp_path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor_unless_the_check_is_off(tmp_path, tiny, bad):
    state = dict(tiny[1])
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONFIG, f)
    key = "model.transformer.blocks.0.q_proj.weight"
    state[key] = state[key].clone()
    state[key][1, 2] = bad
    lm.save_safetensors(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(lm.CheckpointError, match=f"tensor {key} holds non-finite values"):
        lm.load_model(str(tmp_path))
    assert not torch.isfinite(lm.load_model(str(tmp_path), check_finite=False).blocks[0].q_proj.weight).all()


# ----------------------------------------------------------------------------- the sampler
def reference_generate(model, prompt, steps, gen_length, block_length):
    """LLaDA's sampler (generate.py) transcribed step by step at temperature 0: full-sequence logits, the
    confidence of x0, -inf after the current block, per-row top-k."""
    mask_id = model.cfg.mask_token_id
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id)
    x[:, :P] = prompt
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for nb in range(n_blocks):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        n = (x[:, lo:hi] == mask_id).sum(1)
        counts = [[int(n[j]) // per_block + (1 if i < int(n[j]) % per_block else 0) for i in range(per_block)]
                  for j in range(B)]
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model(x).double()
            x0 = logits.argmax(-1)
            x0_p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            x0_p[:, hi:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-math.inf, dtype=torch.float64))
            for j in range(B):
                _, sel = torch.topk(confidence[j], k=counts[j][i])
                x[j, sel] = x0[j, sel]
    return x[:, P:]


@pytest.mark.parametrize("gen_length, steps, block_length", [(8, 8, 4), (12, 6, 4), (10, 4, 5), (6, 3, 6)])
def test_greedy_sampler_is_token_identical_to_the_slow_transcription(model, gen_length, steps, block_length):
    prompt = torch.randint(6, 300, (3, 7), generator=torch.Generator().manual_seed(gen_length))
    ours = sampler.generate(model, prompt, None, gen_length, steps, block_length, temperature=0.0)
    assert torch.equal(ours, reference_generate(model, prompt, steps, gen_length, block_length))


class MaskHungry(torch.nn.Module):
    """The tiny model, but in its first `calls` calls (the first block) it predicts the mask id itself,
    just above its best token, at every third position: those stay masked and are filled later."""
    def __init__(self, model, calls):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, calls

    def forward(self, x, attention_mask=None, where=None):
        logits = self.model(x, attention_mask).clone()
        if self.calls > 0:
            self.calls -= 1
            m, third = self.cfg.mask_token_id, torch.arange(x.shape[1]) % 3 == 0
            logits[:, third, m] = logits[:, third].max(-1).values + 1e-3
        return logits if where is None else logits[where]


def test_a_predicted_mask_id_stays_masked_and_is_filled_later_as_in_generate_py(model):
    mask_id = CONFIG["mask_token_id"]
    prompt = torch.randint(6, 300, (3, 4), generator=torch.Generator().manual_seed(7))
    ours = sampler.generate(MaskHungry(model, 4), prompt, None, gen_length=12, steps=12, block_length=4)
    ref = reference_generate(MaskHungry(model, 4), prompt, steps=12, gen_length=12, block_length=4)
    assert torch.equal(ours, ref)
    first_block = sampler.generate(MaskHungry(model, 4), prompt, None, gen_length=4, steps=4, block_length=4)
    left = first_block == mask_id                                 # block 1's leftover masks ...
    assert left.any() and (ours[:, :4][left] != mask_id).any()    # ... some filled in a later block


@pytest.mark.parametrize("span", [(10, 14), (10, 18)])                # dual (one block), prefix (to the end)
def test_a_span_call_against_a_fresh_cache_gives_the_full_call_logits_there(model, span):
    ids = torch.randint(6, 300, (2, 18), generator=torch.Generator().manual_seed(9))
    ids, am = sampler.left_pad([ids[0].tolist(), ids[1, 3:].tolist()], pad_id=1)       # left padding too
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, span[0]:span[1]] = True
    kv = []
    full = model(ids, am, where, kv)
    assert len(kv) == CONFIG["n_layers"]
    torch.testing.assert_close(model(ids, am, where, kv, span), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_sampler_refreshed_every_step_is_the_exact_sampler_and_agrees_otherwise(model, cache):
    prompt = torch.randint(6, 300, (16, 12), generator=torch.Generator().manual_seed(10))
    exact = sampler.generate(model, prompt, None, 32, 16, 8)
    assert torch.equal(sampler.generate(model, prompt, None, 32, 16, 8, cache=cache, refresh=1), exact)
    agree = (sampler.generate(model, prompt, None, 32, 16, 8, cache=cache) == exact).float().mean().item()
    # The tiny model's random weights (std 0.3) make it chaotic: one changed token changes the rest of the
    # row, so another torch or BLAS build that rounds one logit across a tie lands on other rows. Measured here:
    # prefix 0.50, dual 0.41 on these prompts (chance: 1/320); on 30 other sets of 16 prompts (seeds 1000-1029,
    # standing in for such a build) prefix 0.438 ± sd 0.051 (0.338-0.547), dual 0.367 ± sd 0.047 (0.287-0.471).
    # The bar is 4.6 sd below dual's mean there and 50x chance. llada/README.md: the agreement to expect.
    assert agree > 0.15


class Spy(torch.nn.Module):
    """Records the sequence at every network call of the sampler."""
    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.seen = model, model.cfg, []

    def forward(self, x, attention_mask=None, where=None):
        self.seen.append(x.clone())
        return self.model(x, attention_mask, where)


def test_sampler_reveals_the_scheduled_counts_block_by_block_and_keeps_the_prompt(model):
    spy, mask_id, P = Spy(model), CONFIG["mask_token_id"], 5
    prompt = torch.tensor([[7, 8, mask_id, 9, 10]])            # a mask token inside the prompt stays
    out = sampler.generate(spy, prompt, None, gen_length=10, steps=4, block_length=5, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    states = spy.seen + [torch.cat([prompt, out], 1)]
    assert all(torch.equal(s[:, :P], prompt) for s in states)
    masked = [int((s[0, P:] == mask_id).sum()) for s in states]
    assert masked == [10, 7, 5, 2, 0]                          # 5 per block over 2 steps: 3 then 2
    for s, block in zip(spy.seen, [0, 0, 1, 1]):               # later blocks untouched, earlier done
        c = s[0, P:]
        assert (c[5 * (block + 1):] == mask_id).all() and (c[:5 * block] != mask_id).all()
    assert sampler.num_transfer_tokens(torch.ones(2, 7, dtype=torch.bool), 3).tolist() == [[3, 2, 2]] * 2


def test_sampler_is_deterministic_at_temperature_zero_and_seeded_above(model):
    prompt = torch.randint(6, 300, (2, 4), generator=torch.Generator().manual_seed(11))
    def g(T, seed):
        return sampler.generate(model, prompt, None, 8, 4, 4, T, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(g(0.0, 1), g(0.0, 2))
    assert torch.equal(g(1.0, 3), g(1.0, 3)) and not torch.equal(g(1.0, 3), g(1.0, 4))


def test_batched_left_padded_prompts_sample_as_each_prompt_alone(model):
    a, b = list(range(10, 19)), list(range(40, 44))
    ids, am = sampler.left_pad([a, b], pad_id=1)
    both = sampler.generate(model, ids, am, 8, 4, 4)
    for row, p in zip(both, (a, b)):
        assert torch.equal(row, sampler.generate(model, torch.tensor([p]), None, 8, 4, 4)[0])

