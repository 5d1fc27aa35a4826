"""llada_finetune.py on a tiny random LLaDA written in the real HF layout (tests/llada_tiny.py).

Each test compares against an independent slow reference or an exact hand-made answer.
"""
import json
import math
import os
import random
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llada_finetune as lf
from llada_tiny import CONFIG, write_tiny_llada

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llada"))
    return path, write_tiny_llada(path)


@pytest.fixture(scope="module")
def model(tiny):
    return lf.load_model(tiny[0])


# ----------------------------------------------------------------------------- the model
def reference_logits(state, c, ids):
    """LLaDA.md's block written out per position and per head, in float64 (no padding)."""
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
    padded, am = lf.left_pad([ids[0].tolist(), list(range(6, 20))], pad_id=1)
    torch.testing.assert_close(model(padded, am)[0, -9:], model(ids)[0], rtol=1e-5, atol=1e-5)


def test_logits_only_where_asked_equal_the_full_logits_there(model):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    where = torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) < 0.5
    torch.testing.assert_close(model(ids, where=where), model(ids)[where])


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)                           # the same LoRA A in both
        model = lf.add_lora(lf.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
        randomise_adapters(model)
        model.checkpointing = ckpt
        ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(6))
        model(ids).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_of_every_supported_dtype(tmp_path):
    ts = {f"t_{name}": torch.randn(3, 5).to(dt) for name, dt in lf.DTYPES.items()}
    ts["empty"] = torch.zeros(0, 4)
    lf.save_safetensors(ts, str(tmp_path / "x.safetensors"), {"k": "v"})
    back = lf.load_safetensors(str(tmp_path / "x.safetensors"))
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
])
def test_bad_safetensors_files_raise_a_clear_error(tmp_path, case, header, data, message):
    with pytest.raises(lf.CheckpointError, match=message):
        lf.load_safetensors(write_raw(tmp_path / "bad.safetensors", header, data))


def test_truncated_file_and_header_past_eof_raise_a_clear_error(tmp_path):
    good = str(tmp_path / "good.safetensors")
    lf.save_safetensors({"w": torch.randn(64)}, good)
    blob = open(good, "rb").read()
    for name, content, message in [("short", blob[:5], "too short"),
                                   ("cut", blob[:-10], "outside"),
                                   ("hdr", struct.pack("<Q", 10 ** 9) + blob[8:], "past the end"),
                                   ("json", blob[:8] + b"\xff" * (len(blob) - 8), "not valid JSON")]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(lf.CheckpointError, match=message):
            lf.load_safetensors(str(p))


def test_checkpoint_errors_name_the_missing_unexpected_or_misshaped_key(tmp_path, tiny):
    state = tiny[1]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONFIG, f)
    p = "model.transformer."
    cases = [({k: v for k, v in state.items() if "blocks.1.up_proj" not in k}, f"missing tensor {p}blocks.1.up_proj"),
             ({**state, p + "extra.weight": torch.zeros(1)}, f"unexpected tensor {p}extra.weight"),
             ({**state, p + "ln_f.weight": torch.zeros(3)}, f"{p}ln_f.weight has shape \\[3\\]")]
    for sd, message in cases:
        lf.save_safetensors(sd, str(tmp_path / "model.safetensors"))
        with pytest.raises(lf.CheckpointError, match=message):
            lf.load_model(str(tmp_path))


# ----------------------------------------------------------------------------- LoRA
def test_lora_at_init_equals_the_base_and_only_adapters_train(tiny):
    base = lf.load_model(tiny[0])
    wrapped = lf.add_lora(lf.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    ids = torch.randint(0, 300, (2, 6))
    torch.testing.assert_close(wrapped(ids), base(ids), rtol=0, atol=0)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(lf.LORA_TARGETS) * CONFIG["n_layers"]


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lf.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_the_base(tiny):
    # float64, so that the only difference left is the order of the sums (W + BA)x vs Wx + B(Ax)
    model = lf.add_lora(lf.load_model(tiny[0]), r=4, alpha=8, dropout=0.0).double()
    randomise_adapters(model)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5))
    w0 = model.blocks[0].q_proj.base.weight.clone()
    before = model(ids)
    for m in lf.lora_layers(model).values():
        m.merge()
    assert not torch.equal(model.blocks[0].q_proj.base.weight, w0)
    torch.testing.assert_close(model(ids), before, rtol=1e-10, atol=1e-10)
    for m in lf.lora_layers(model).values():
        m.unmerge()
    torch.testing.assert_close(model.blocks[0].q_proj.base.weight, w0, rtol=0, atol=1e-12)


def test_adapter_saves_in_peft_layout_and_loads_back(tiny, tmp_path):
    a = lf.add_lora(lf.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    randomise_adapters(a, seed=1)
    lf.save_adapter(a, str(tmp_path), r=4, alpha=8, dropout=0.0)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    keys = lf.load_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert "base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.transformer.blocks.1.ff_out.lora_B.weight"].shape == (32, 4)
    import re
    assert re.fullmatch(cfg["target_modules"], "model.transformer.blocks.3.ff_out")
    assert not re.fullmatch(cfg["target_modules"], "model.transformer.ff_out")      # not the LM head
    b = lf.add_lora(lf.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    lf.load_adapter(b, str(tmp_path))
    ids = torch.randint(0, 300, (1, 5))
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)


def test_teacher_mode_runs_the_adapter_snapshot_not_the_student(tiny):
    model = lf.add_lora(lf.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    ids = torch.randint(0, 300, (1, 5))
    base = model(ids)
    randomise_adapters(model)                          # the student moves; the teacher is still the base
    with lf.teacher_mode(model):
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    lf.snapshot_teacher(model)                         # a new phase: the teacher becomes the student
    student = model(ids)
    assert not torch.allclose(student, base)
    with lf.teacher_mode(model):
        torch.testing.assert_close(model(ids), student, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the sampler
def reference_generate(model, prompt, steps, gen_length, block_length):
    """LLaDA.md's sampler transcribed step by step at temperature 0: full-sequence logits, the
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
    ours = lf.generate(model, prompt, None, gen_length, steps, block_length, temperature=0.0)
    assert torch.equal(ours, reference_generate(model, prompt, steps, gen_length, block_length))


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
    out = lf.generate(spy, prompt, None, gen_length=10, steps=4, block_length=5, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    states = spy.seen + [torch.cat([prompt, out], 1)]
    assert all(torch.equal(s[:, :P], prompt) for s in states)
    masked = [int((s[0, P:] == mask_id).sum()) for s in states]
    assert masked == [10, 7, 5, 2, 0]                          # 5 per block over 2 steps: 3 then 2
    for s, block in zip(spy.seen, [0, 0, 1, 1]):               # later blocks untouched, earlier done
        c = s[0, P:]
        assert (c[5 * (block + 1):] == mask_id).all() and (c[:5 * block] != mask_id).all()
    assert lf.num_transfer_tokens(torch.ones(2, 7, dtype=torch.bool), 3).tolist() == [[3, 2, 2]] * 2


def test_sampler_is_deterministic_at_temperature_zero_and_seeded_above(model):
    prompt = torch.randint(6, 300, (2, 4))
    def g(T, seed):
        return lf.generate(model, prompt, None, 8, 4, 4, T, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(g(0.0, 1), g(0.0, 2))
    assert torch.equal(g(1.0, 3), g(1.0, 3)) and not torch.equal(g(1.0, 3), g(1.0, 4))


def test_batched_left_padded_prompts_sample_as_each_prompt_alone(model):
    a, b = list(range(10, 19)), list(range(40, 44))
    ids, am = lf.left_pad([a, b], pad_id=1)
    both = lf.generate(model, ids, am, 8, 4, 4)
    for row, p in zip(both, (a, b)):
        assert torch.equal(row, lf.generate(model, torch.tensor([p]), None, 8, 4, 4)[0])


# ----------------------------------------------------------------------------- tasks and rewards
SUDOKU = dict(puzzle="3014002020004130", solution="3214142323414132")    # 8 empty cells


def test_sudoku_reward_counts_correct_empty_cells_twice():
    assert lf.sudoku_reward("<answer>\n3214142323414132\n</answer>", SUDOKU) == 2.0
    assert lf.sudoku_reward("<answer>3214 1423 2341 4131</answer>", SUDOKU) == pytest.approx(2 * 7 / 8)   # 1 wrong
    assert lf.sudoku_reward("no tags 3214142323414132", SUDOKU) == 0.0
    assert lf.sudoku_cells("no tags 3214142323414132", SUDOKU, cascade=True) == (8, 8)
    assert lf.sudoku_reward("<answer>32</answer>", SUDOKU) == pytest.approx(2 * 1 / 8)   # padded with 0


def test_all_288_sudoku_grids_and_a_split_by_solution():
    grids = lf.sudoku_grids()
    assert len(grids) == len(set(grids)) == 288
    train, test = lf.sudoku_data(seed=42)
    assert len(test) == 256 and all(7 <= t["puzzle"].count("0") <= 9 for t in test)
    assert not {t["solution"] for t in train} & {t["solution"] for t in test}
    assert {s for _, s in lf.SUDOKU_SHOTS} <= {t["solution"] for t in train}
    assert len({t["solution"] for t in test}) == 88


def test_countdown_reward_values_and_refusals():
    item = dict(numbers=[3, 5, 7], target=22)
    assert lf.countdown_reward("<answer>3*5+7</answer>", item) == 1.0
    assert lf.countdown_reward("<answer>\\boxed{3 \\times 5 + 7}</answer>", item) == 1.0
    assert lf.countdown_reward("<answer>3*5-7</answer>", item) == 0.1              # wrong value
    assert lf.countdown_reward("<answer>3*5+7+7</answer>", item) == 0.1            # 7 used twice
    assert lf.countdown_reward("3*5+7", item) == 0.0                               # no tag
    assert lf.countdown_reward("<answer>__import__('os').system('3 5 7')</answer>", item) == 0.1
    for evil in ["__import__('os')", "(3).__class__", "open('x')", "3**5**7**9", "[3]*5", "lambda: 3"]:
        assert lf.arith(evil) is None
    assert lf.arith("(3 + 5) / 4 - -1") == 3 and lf.arith("1/0") is None


def test_countdown_questions_are_solvable_and_test_is_held_out():
    test = lf.countdown_data(10 ** 6, 256)
    train = lf.countdown_data(0, 500, exclude=test)
    for q in test[:50]:
        a, b, c = q["numbers"]
        orders = [(a, b, c), (a, c, b), (b, c, a), (b, a, c), (c, a, b), (c, b, a)]
        exprs = [e for x, y, z in orders for o1 in "+-*/" for o2 in "+-*/"
                 for e in (f"({x}{o1}{y}){o2}{z}", f"{z}{o2}({x}{o1}{y})")]
        assert any(lf.arith(e) == q["target"] for e in exprs), q
    key = lambda q: (tuple(sorted(q["numbers"])), q["target"])                     # noqa: E731
    assert not {key(q) for q in train} & {key(q) for q in test}


def test_gsm8k_reward_and_format_terms():
    item = dict(question="?", answer="so #### 1,234")
    perfect = "<reasoning>\nadd\n</reasoning>\n<answer>\n\\boxed{1234}\n</answer>\n"
    # 4 tags x 0.125, soft 0.5, strict 0.5, integer 0.5, right 2.0: the maximum, 4
    assert lf.gsm8k_reward(perfect, item) == pytest.approx(4.0)
    assert lf.gsm8k_reward(perfect.replace("1234", "1234.5"), item) == pytest.approx(1.5)
    assert lf.gsm8k_reward(perfect + "tail", item) == pytest.approx(4.0 - 0.004 - 0.5)   # not strict
    assert lf.gsm8k_reward("the answer is 7", item) == 0.0
    assert lf.accuracy("gsm8k", "<answer>\\boxed{1,234}</answer>", item) == (1.0, 1)


def test_math_answers_compare_after_normalisation():
    assert lf.math_equiv("\\dfrac{1}{2}", "0.5") and lf.math_equiv("\\frac12", "\\frac{1}{2}")
    assert lf.math_equiv("x = 3", "3") and lf.math_equiv("10\\%", "10") and lf.math_equiv("3/4", "\\frac{3}{4}")
    assert lf.math_equiv("\\left( 1, 2 \\right)", "(1,2)") and not lf.math_equiv("2", "3")
    item = dict(question="?", answer="\\frac{1}{2}")
    assert lf.math_reward("<answer>\\boxed{\\dfrac12}</answer>", item) == 2.0 + 0.5 * 2.0
    assert lf.math_reward("<answer>1/3</answer>", item) == 0.5 * 1.5
    assert lf.math_reward("\\boxed{1/2}", item) == 2.0


def test_every_reward_is_total_on_1000_garbage_strings():
    rng = random.Random(0)
    alphabet = "0123456789+-*/()<>answer/boxed{}\\ \n#.,=^$%reasoning"
    items = dict(sudoku=SUDOKU, countdown=dict(numbers=[1, 2, 3], target=6),
                 gsm8k=dict(question="?", answer="#### 6"), math=dict(question="?", answer="6"))
    for _ in range(1000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        if rng.random() < 0.5:
            s = f"<answer>{s}</answer>" + ("\\boxed{" * rng.randint(0, 3))
        for task, item in items.items():
            assert isinstance(lf.REWARDS[task](s, item), float)
            assert len(lf.accuracy(task, s, item)) == 2


# ----------------------------------------------------------------------------- SAR masking
def test_sar_masking_masks_only_the_active_block_and_everything_after_it():
    comp = torch.randint(6, 300, (200, 12))
    x_t, counted, w = lf.sar_mask(comp, 4, mask_id=5, generator=torch.Generator().manual_seed(0))
    for b in range(200):
        m = x_t[b] == 5
        k = int(torch.nonzero(counted[b])[0]) // 4 if counted[b].any() else None
        if k is None:
            continue
        blocks = torch.arange(12) // 4
        assert (blocks[counted[b]] == k).all()                        # counted only in the active block
        assert not m[blocks < k].any() and m[blocks > k].all()        # earlier clean, later masked
        assert torch.equal(m[blocks == k], counted[b][blocks == k])
        assert torch.equal(x_t[b][~m], comp[b][~m])
    assert counted.any(1).float().mean() > 0.3 and (w > 0).all()


def test_sar_masking_hazard_weight_makes_the_expected_count_per_token_one():
    """E[1{counted} / (1 - t)] over t ~ U(0,1) is 1 per token of the active block: the SAR loss is an
    unbiased per-token cross-entropy (times K), the ELBO's form."""
    comp = torch.zeros(20000, 4, dtype=torch.long)
    _, counted, w = lf.sar_mask(comp, 4, mask_id=5, generator=torch.Generator().manual_seed(1))
    assert (counted.sum(1) * w * 4 / 4).mean().item() == pytest.approx(1.0, abs=0.03)


# ----------------------------------------------------------------------------- training and CLI
def run_cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "llada_finetune.py", *args], cwd=cwd, capture_output=True,
                          text=True, env=env)


def train_args(tiny_dir, out, *extra):
    return ["--model_dir", tiny_dir, "--task", "countdown", "--out", out, "--gen_length", "8",
            "--block_length", "4", "--tokens_per_step", "2", "--eta", "0.5", "--a_max", "1.5",
            "--steps_per_phase", "2", "--batch", "4", "--micro_batch", "2", "--buffer_prompts", "3",
            "--completions", "2", "--refresh_prompts", "1", "--refresh_every", "1", "--lora_r", "4",
            "--lr", "1e-2", "--min_lr", "1e-3", "--save_every", "0", "--rollout_batch", "4", "--device", "cpu",
            *extra]


def adapters(path):
    return torch.load(path, weights_only=True)["student"]


def test_kill_and_resume_gives_the_uninterrupted_lora_weights(tiny, tmp_path):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    lf.main(train_args(tiny[0], straight, "--stop_after", "5"))
    lf.main(train_args(tiny[0], split, "--stop_after", "3"))        # "killed" mid phase 2
    lf.main(train_args(tiny[0], split, "--stop_after", "5", "--resume"))
    a, b = adapters(os.path.join(straight, "state_rank0.pt")), adapters(os.path.join(split, "state_rank0.pt"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), k
        moved += a[k][1].abs().sum().item()
    assert moved > 0                                                  # training did change the adapters
    rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert [r["global_step"] for r in rows if "global_step" in r] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_full_run_writes_a_peft_adapter_and_eval_prints_a_table(tiny, tmp_path):
    out = str(tmp_path / "run")
    lf.main(train_args(tiny[0], out, "--a_max", "0.5"))
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    r = run_cli("--model_dir", tiny[0], "--task", "countdown", "--eval", "--eval_lengths", "8", "16",
                "--block_length", "4", "--eval_limit", "3", "--adapter", os.path.join(out, "adapter"),
                "--lora_r", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "| task | gen 8 | gen 16 |" in r.stdout and "| countdown (3) |" in r.stdout


@pytest.mark.parametrize("flags, message", [(["--eta", "0"], "--eta must be > 0"),
                                            (["--eta", "-1"], "--eta must be > 0"),
                                            (["--phi", "2"], "--phi must be in [0, 1]")])
def test_bad_flags_give_a_one_line_error(tiny, flags, message):
    r = run_cli("--model_dir", tiny[0], "--task", "sudoku", *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_corrupt_checkpoint_and_missing_data_give_a_one_line_error(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bad / name).write_bytes(open(os.path.join(tiny[0], name), "rb").read())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = run_cli("--model_dir", str(bad), "--task", "countdown", "--device", "cpu")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = run_cli("--model_dir", tiny[0], "--task", "gsm8k", "--device", "cpu")
    assert r.returncode == 1 and "needs a local JSONL file" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_resume_state_gives_a_one_line_error(tiny, tmp_path):
    (tmp_path / "state_rank0.pt").write_bytes(b"not a torch file")
    r = run_cli(*train_args(tiny[0], str(tmp_path), "--resume"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "cannot resume (corrupt" in r.stderr


def test_torchrun_two_ranks_on_gloo_train_identical_adapters(tiny, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "llada_finetune.py",
           *train_args(tiny[0], out, "--stop_after", "2")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(os.path.join(out, f"state_rank{k}.pt"), weights_only=True) for k in (0, 1))
    assert s0["lora_checksum"] == s1["lora_checksum"]          # the same adapters after 2 steps
    assert "student" in s0 and "student" not in s1             # saved once, by rank 0
    assert not torch.equal(s0["buffer"]["comp"], s1["buffer"]["comp"])   # a buffer per rank
    # all-reduced gradients keep the ranks in step: rank 1, resumed from the shared adapters, takes
    # its next step to the same weights as rank 0 (both continue to step 3 and save)
    r = subprocess.run(cmd[:-1] + ["3", "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1: resumed" in r.stdout and "rank 1: stopped at phase 2, step 1" in r.stdout
    s0, s1 = (torch.load(os.path.join(out, f"state_rank{k}.pt"), weights_only=True) for k in (0, 1))
    assert s0["global_step"] == s1["global_step"] == 3 and s0["lora_checksum"] == s1["lora_checksum"]
