"""llada_finetune.py on the tiny random LLaDA (tests/llada_tiny.py): SAR masking, kill and resume, a full
run with its PEFT adapter and evaluation table, one-line errors, and two ranks under torchrun.
"""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import llada_finetune as lf
from llada.trainer import any_order_mask, sar_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- SAR masking
def test_sar_masking_masks_only_the_active_block_and_everything_after_it():
    comp = torch.randint(6, 300, (200, 12), generator=torch.Generator().manual_seed(4))
    x_t, counted, w, _ = sar_mask(comp, 4, mask_id=5, generator=torch.Generator().manual_seed(0))
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
    unbiased per-token cross-entropy (times K), the ELBO's form. Three blocks of 4: the weight divides by the
    block length (4), not the completion's (12), so each row's counted weights sum to 1 in expectation."""
    comp = torch.zeros(20000, 12, dtype=torch.long)
    _, counted, w, _ = sar_mask(comp, 4, mask_id=5, generator=torch.Generator().manual_seed(1))
    assert (counted.sum(1) * w).mean().item() == pytest.approx(1.0, abs=0.03)


def test_sar_weight_is_the_hazard_per_row_and_every_block_position_counts_once_in_expectation():
    """Per row, w (1 - t) B = 1 exactly; per position j, E[1{counted_j} w B] = 1/K (its block is active with
    probability 1/K, then counted with probability 1 - t): every token weighs the same in expectation,
    whatever its block and its place in the block, as in the ELBO."""
    B, G, L = 40000, 8, 4
    _, counted, w, t = sar_mask(torch.zeros(B, G, dtype=torch.long), L, mask_id=5,
                                   generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(w * (1 - t).clamp_min(1e-3) * L, torch.ones(B))
    assert torch.equal(torch.sort(t).values, (torch.arange(B) + t.min() * B) / B)       # stratified
    K = G // L
    for j in range(G):
        assert (counted[:, j] * w * L).mean().item() * K == pytest.approx(1.0, abs=0.05), j


def test_any_order_masking_counts_every_masked_token_of_every_block_with_the_hazard_weight():
    """eq. 9 (--masking any_order): a token is masked iff it counts, in any block; per row w (1 - t) G = 1;
    and E[1{counted_j} w G] = 1 at every position j, as the ELBO weighs every token once."""
    B, G = 40000, 8
    comp = torch.randint(6, 300, (B, G), generator=torch.Generator().manual_seed(5))
    x_t, counted, w, t = any_order_mask(comp, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_t == 5, counted) and torch.equal(x_t[~counted], comp[~counted])
    torch.testing.assert_close(w * (1 - t).clamp_min(1e-3) * G, torch.ones(B))
    assert counted[:, -1].float().mean().item() == pytest.approx(0.5, abs=0.01)     # the last block too
    for j in range(G):
        assert (counted[:, j] * w * G).mean().item() == pytest.approx(1.0, abs=0.05), j


def test_sar_count_on_1_to_b_never_leaves_a_row_empty_and_has_the_same_expected_loss_state_by_state():
    """--block_count 1..b: m ~ U{1..b} masks in the active block, weight 1/m. Each set S of m masks of a block of
    b has mass x weight 1/(b m C(b, m)), as under 0..b (probability 1/((b+1) C(b, m)) times the hazard weight's
    mean given S, (b+1)/(b m)): checked here by counting 60,000 rows of a block of 3 (2 blocks)."""
    B, b = 60000, 3
    comp = torch.randint(6, 300, (B, 2 * b), generator=torch.Generator().manual_seed(6))
    x_t, counted, w, t = sar_mask(comp, b, mask_id=5, generator=torch.Generator().manual_seed(7), count="1..b")
    m = counted.sum(1)
    assert (m >= 1).all() and torch.equal(w, 1.0 / m) and torch.allclose(t, 1 - m / b)
    blocks = torch.arange(2 * b) // b
    for row in range(200):                                          # as 0..b: one block counts, later ones masked
        k = int(blocks[counted[row]][0])
        assert (blocks[counted[row]] == k).all() and (x_t[row, blocks > k] == 5).all()
        assert torch.equal(x_t[row, blocks <= k] == 5, counted[row, blocks <= k])
    active = blocks[counted.float().argmax(1)]                      # the active block of each row
    for k in range(2):
        rows = active == k
        sets = counted[rows][:, blocks == k]                        # (n_k, b) the mask set within the block
        for code in range(1, 2 ** b):
            S = torch.tensor([(code >> j) & 1 for j in range(b)], dtype=torch.bool)
            hit = (sets == S).all(1).double()
            mass_weight = (hit / S.sum()).mean().item()             # E[w 1{S} | block k]
            n = int(S.sum())
            exact = 1 / (b * n * math.comb(b, n))                   # 0..b's, in closed form
            se = (hit / S.sum()).std().item() / len(hit) ** 0.5
            assert abs(mass_weight - exact) < 4 * se, (k, S.tolist(), mass_weight, exact)
    assert (counted.sum(1) * w).mean().item() == pytest.approx(1.0)   # the loss's scale: 1 per row, as 0..b


def test_the_0_to_b_count_leaves_one_row_in_b_plus_1_empty():
    _, counted, _, _ = sar_mask(torch.zeros(40000, 8, dtype=torch.long), 8, mask_id=5,
                                generator=torch.Generator().manual_seed(8))
    assert (counted.sum(1) == 0).float().mean().item() == pytest.approx(1 / 9, abs=0.005)


def test_the_warm_up_takes_the_steps_asked_and_the_released_5_percent_otherwise():
    from llada.trainer import lr_at
    assert [lr_at(s, 12, 1.0, 0.0) for s in range(3)] == [1.0, 1.0, 1.0]              # 5% of 12: one step
    assert [round(lr_at(s, 12, 1.0, 0.0, warmup_steps=4), 6) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(11, 12, 1.0, 0.1, warmup_steps=4) == pytest.approx(0.1)              # the decay's end


def test_the_authors_lr_rounding_floors_the_warm_up_and_decay_steps():
    """--lr_rounding floor (--preset released): 12 warm-up and 25 decay steps of 256, as their code; ours rounds
    to 13 and 26."""
    from llada.trainer import lr_at
    for rounding, w, d in (("floor", 12, 25), ("round", 13, 26)):
        lr = [lr_at(s, 256, 1.0, 0.0, rounding=rounding) for s in range(256)]
        assert lr.index(1.0) == w - 1 and sum(x < 1.0 for x in lr[128:]) == d, rounding   # (step + 1) / w


def test_the_shift_per_prompt_is_a_per_prompt_phi_and_a_tied_prompt_keeps_only_the_teacher_term():
    """--shift prompt: r - min over the prompt's rollouts. With Z per prompt that is the buffer's shift with
    phi e^{eta (min_p - min)} for the prompt's rows (a function of x_t, so the same minimiser, eq. 15), exactly;
    a prompt whose rollouts tie gets NLL weight 0 and teacher weight phi: distillation only."""
    from types import SimpleNamespace

    from dtm import dtm_loss, group_log_mean_exp
    from llada.trainer import Trainer
    data = dict(r=torch.tensor([1.0, 2.0, 0.5, 3.0, 3.0, 3.0], dtype=torch.float64),
                idx=torch.tensor([7, 7, 2, 2, 9, 9]))               # prompt 9's two rollouts tie at 3.0
    per_prompt = Trainer.shift(SimpleNamespace(args=SimpleNamespace(shift="prompt")), data)
    assert per_prompt.tolist() == [0.0, 1.0, 0.0, 2.5, 0.0, 0.0]
    buffer = Trainer.shift(SimpleNamespace(args=SimpleNamespace(shift="buffer")), data)
    assert buffer.tolist() == [0.5, 1.5, 0.0, 2.5, 2.5, 2.5]
    g = torch.Generator().manual_seed(0)
    x1 = torch.randint(7, (6, 5), generator=g)
    mask = torch.rand(6, 5, generator=g) < 0.6
    mask[:, 0] = True
    logits, teacher = (torch.randn(int(mask.sum()), 7, generator=g, dtype=torch.float64) for _ in range(2))
    tw, eta, group = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, 0.7, data["idx"]
    ours = dtm_loss(logits, teacher, x1, mask, per_prompt, tw, eta, 1.0, group)
    phi = torch.exp(eta * (buffer - per_prompt))                     # e^{eta (min_p - min)} per row
    torch.testing.assert_close(ours, dtm_loss(logits, teacher, x1, mask, buffer, tw, eta, phi, group), rtol=1e-12,
                               atol=0)
    tied = dtm_loss(logits, teacher, x1, mask, per_prompt, tw, eta, 1.0, group, per_sequence=True)[4:]
    seq = mask.nonzero()[:, 0]
    ce = -(torch.softmax(teacher, -1) * torch.log_softmax(logits, -1)).sum(-1)       # the teacher term alone
    hand = torch.zeros(6, dtype=torch.float64).index_add(0, seq, tw[seq] * ce)[4:]
    assert torch.equal(group_log_mean_exp(eta * per_prompt, group)[4:], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(tied, hand, rtol=1e-12, atol=0)


@pytest.mark.parametrize("x, se, bound, words", [(-3e-3, 1e-3, 5e-3, "the phase learned"),
                                                 (3e-3, 1e-3, 5e-3, "fitted noise"),
                                                 (-3e-3, 1e-3, 2e-3, "the phase learned"),
                                                 (3e-3, 8.6e-3, 2e-3, "inconclusive: SE 8.6e-03 > the phase's bound")])
def test_the_health_check_says_inconclusive_where_its_se_exceeds_what_the_phase_can_gain(x, se, bound, words):
    from llada.trainer import verdict
    assert words in verdict(x, se, bound)


def test_the_phase_bound_is_the_tilts_kl_per_token_as_on_the_maze():
    """Trainer.phase_bound from held-out rewards and prompt ids = dtm.phase_kl of the same rewards, with L the
    completion length."""
    from types import SimpleNamespace

    from dtm import group_log_mean_exp, phase_kl
    from llada.trainer import Trainer
    r = torch.rand(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    fake = SimpleNamespace(held=dict(r=r.flatten(), idx=torch.arange(4).repeat_interleave(8) * 3),
                           log_mean_exp=group_log_mean_exp, args=SimpleNamespace(gen_length=24))
    assert Trainer.phase_bound(fake, 2.0) == pytest.approx(phase_kl(r.numpy(), 2.0, 24), rel=1e-12)


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
            "--held_out_prompts", "2", *extra]


def adapters(path):
    return torch.load(path, weights_only=True)["student"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", [[], ["--preset", "released"]])    # released: EMA teacher, its weighting
def test_kill_and_resume_gives_the_uninterrupted_lora_weights(tiny, tmp_path, preset):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    lf.main(train_args(tiny[0], straight, "--stop_after", "5", *preset))
    lf.main(train_args(tiny[0], split, "--stop_after", "3", *preset))        # "killed" mid phase 2
    lf.main(train_args(tiny[0], split, "--stop_after", "5", "--resume", *preset))
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


@pytest.mark.slow
def test_every_phase_logs_its_held_out_change_which_is_zero_when_the_adapters_do_not_move(tiny, tmp_path):
    """The health check: J(student) - J(teacher) on the phase's held-out rollouts. At lr 0 the student
    is the teacher, so the change is exactly 0; at lr 1e-2 it is not. Its draws have a generator of
    their own: with the check off, the run trains the same adapters."""
    for lr, out in (("0", str(tmp_path / "still")), ("1e-2", str(tmp_path / "moving"))):
        lf.main(train_args(tiny[0], out, "--a_max", "1.0", "--lr", lr, "--min_lr", lr))
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        checks = [r for r in rows if "held_out_change" in r]
        assert [r["phase"] for r in checks] == [1, 2]
        assert all(math.isfinite(r["held_out_change_se"]) for r in checks)
        changes = [r["held_out_change"] for r in checks]
        assert changes == [0.0, 0.0] if lr == "0" else all(c != 0.0 for c in changes)
    off = str(tmp_path / "off")
    lf.main(train_args(tiny[0], off, "--a_max", "1.0", "--lr", "1e-2", "--min_lr", "1e-2", "--held_out_prompts", "0"))
    a, b = adapters(os.path.join(off, "state_rank0.pt")), adapters(os.path.join(out, "state_rank0.pt"))
    assert all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    assert not any("held_out_change" in json.loads(line) for line in open(os.path.join(off, "metrics.jsonl")))


@pytest.mark.slow
def test_the_control_shuffles_only_the_rewards_so_its_first_step_sees_dtms_buffer_and_masks(tiny, tmp_path,
                                                                                               monkeypatch):
    seen = {}

    def spy(self, rows, eta, log_Z, r):                  # record what the first step's loss is given
        x1, x_t, _, where, tw = self.inputs(self.buffer, rows)
        seen.setdefault(self.args.control, (rows, x_t, where, r.clone()))
        raise KeyboardInterrupt
    monkeypatch.setattr(lf.Trainer, "loss", spy)
    monkeypatch.setitem(lf.PROTOCOLS["ours"]["rewards"], "countdown", lambda text, item: float(len(text) % 7))
    for control in ([], ["--control"]):
        with pytest.raises(KeyboardInterrupt):
            lf.main(train_args(tiny[0], str(tmp_path / f"c{len(control)}"), "--held_out_prompts", "0", *control))
    (rows, x_t, where, r), (rows_c, x_t_c, where_c, r_c) = seen[False], seen[True]
    assert torch.equal(rows, rows_c) and torch.equal(x_t, x_t_c) and torch.equal(where, where_c)
    assert torch.equal(torch.sort(r).values, torch.sort(r_c).values) and not torch.equal(r, r_c)   # moved


def test_training_with_the_dual_cache_sampler_for_rollouts_runs_to_an_adapter(tiny, tmp_path):
    out = str(tmp_path / "cached")
    lf.main(train_args(tiny[0], out, "--a_max", "0.5", "--rollout_cache", "dual"))
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.slow
def test_full_run_writes_a_peft_adapter_and_eval_prints_a_table(tiny, tmp_path):
    out = str(tmp_path / "run")
    lf.main(train_args(tiny[0], out, "--a_max", "0.5"))
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    r = run_cli("--model_dir", tiny[0], "--task", "countdown", "--eval", "--eval_lengths", "8", "16",
                "--block_length", "4", "--eval_limit", "3", "--adapter", os.path.join(out, "adapter"),
                "--lora_r", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "| task | gen 8 | gen 16 |" in r.stdout and "| countdown (3) |" in r.stdout


@pytest.mark.slow
def test_eval_under_the_paper_protocol_reads_spg_files_and_prints_its_table(tiny, tmp_path):
    (tmp_path / "cd.jsonl").write_text('{"input": "30,100,93", "output": "23"}\n{"input": "1,2,3", "output": "6"}\n')
    r = run_cli("--model_dir", tiny[0], "--task", "countdown", "--eval", "--protocol", "paper", "--eval_lengths", "8",
                "--block_length", "4", "--test_data", str(tmp_path / "cd.jsonl"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "paper protocol" in r.stdout and "| task | gen 8 |" in r.stdout and "| countdown (2) |" in r.stdout
    assert "| countdown (2), ours scorer |" in r.stdout and "| countdown (2), spg scorer |" in r.stdout


@pytest.mark.slow
def test_released_preset_fills_what_is_not_given_and_ema_becomes_student_and_teacher(tiny, tmp_path):
    a = lf.parse(["--model_dir", tiny[0], "--task", "countdown", "--preset", "released", "--lr", "1e-5"])
    assert (a.steps_per_phase, a.batch, a.micro_batch, a.buffer_prompts, a.ema, a.weighting, a.lr) == \
        (1200, 96, 12, 40, 0.95, "released", 1e-5)
    assert a.lora_targets == ["q_proj", "k_proj", "v_proj", "up_proj"]
    out = str(tmp_path / "ema")
    lf.main(train_args(tiny[0], out, "--a_max", "0.5", "--ema", "0.5", "--steps_per_phase", "3"))
    s = torch.load(os.path.join(out, "state_rank0.pt"), weights_only=True)
    for i, (A, B) in enumerate(s["student"].values()):                      # after the phase: student = EMA
        assert torch.equal(A, s["ema"][2 * i]) and torch.equal(B, s["ema"][2 * i + 1])
    lf.main(train_args(tiny[0], out + "0", "--a_max", "0.5", "--ema", "0", "--steps_per_phase", "3"))
    plain = torch.load(os.path.join(out + "0", "state_rank0.pt"), weights_only=True)["student"]
    moved = [(B - B0).abs().sum().item() for (_, B), (_, B0) in zip(s["student"].values(), plain.values())]
    assert sum(moved) > 0 and sum(B.abs().sum().item() for _, B in s["student"].values()) > 0


@pytest.mark.parametrize("flags, message", [(["--eta", "0"], "--eta must be > 0"),
                                            (["--eta", "-1"], "--eta must be > 0"),
                                            (["--phi", "2"], "--phi must be in [0, 1]"),
                                            (["--rollout_batch", "0"], "a positive integer or auto")])
def test_bad_flags_give_a_one_line_error(tiny, flags, message):
    r = run_cli("--model_dir", tiny[0], "--task", "sudoku", *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_buffer_tilt_is_zero_when_the_phase_does_not_move_the_adapter_and_not_otherwise(tiny, tmp_path, monkeypatch):
    """lab/sudoku_report.py: buffer_tilt regresses the ELBO change of the last buffer on eta r."""
    from lab.sudoku_report import buffer_tilt
    monkeypatch.setitem(lf.PROTOCOLS["ours"]["rewards"], "countdown", lambda text, item: float(len(text) % 7))
    slopes = []
    for lr in ("0", "1e-2"):
        out = str(tmp_path / f"lr{lr}")
        lf.main(train_args(tiny[0], out, "--a_max", "0.5", "--lr", lr, "--min_lr", lr, "--held_out_prompts", "0"))
        slopes.append(buffer_tilt(out)[0])
    assert slopes[0] == 0.0 and slopes[1] != 0.0


def test_minibatch_without_draws_distinct_rows_across_its_micro_batches(tiny, tmp_path):
    """--minibatch without (--preset released): a step's --batch rows are distinct (the authors' draw), split
    into micro-batches; uniform draws with replacement."""
    seen = {}
    for draw in ("without", "uniform"):
        t = lf.make_trainer(lf.parse(train_args(tiny[0], str(tmp_path), "--held_out_prompts", "0",
                                                "--buffer_prompts", "3", "--completions", "2", "--batch", "6",
                                                "--micro_batch", "2", "--minibatch", draw)))
        t.start_phase(0.5)
        rows, real = [], t.loss
        t.loss = lambda r, *a: rows.append(r.tolist()) or real(r, *a)
        for _ in range(4):
            t.train_step(0.5)
        seen[draw] = rows
    assert all(len(r) == 2 for r in seen["without"])
    steps = [sum(seen["without"][k:k + 3], []) for k in range(0, 12, 3)]
    assert all(sorted(s) == list(range(6)) for s in steps)                      # each step: all 6 rows, once
    assert any(len(set(sum(seen["uniform"][k:k + 3], []))) < 6 for k in range(0, 12, 3))


def test_prompts_in_order_through_a_training_set_shuffled_afresh_at_each_pass(tiny, tmp_path):
    """--prompt_order shuffled (--preset released): every training prompt once per pass, a new order each pass,
    across draws of any size; the health check's prompts stay random draws of their own generator."""
    t = lf.make_trainer(lf.parse(train_args(tiny[0], str(tmp_path), "--prompt_order", "shuffled")))
    N, drawn, sizes = len(t.items), [], itertools.cycle([3, 5, 1])
    while len(drawn) < 2 * N:
        drawn += t.draw_prompts(next(sizes))
    first, second = drawn[:N], drawn[N:2 * N]
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    check = t.draw_prompts(N, t.check_gen)
    assert len(check) == N and len(set(check)) < N                            # with replacement


def test_refresh_in_turn_replaces_the_slots_cyclically_from_slot_0_of_each_phase(tiny, tmp_path):
    t = lf.make_trainer(lf.parse(train_args(tiny[0], str(tmp_path), "--held_out_prompts", "0", "--buffer_prompts",
                                            "3", "--refresh_prompts", "2", "--refresh_order", "cycle")))
    t.start_phase(0.5)
    C, marks = t.args.completions, []
    t.rollouts = lambda prompts, gen=None: dict(idx=torch.tensor(prompts).repeat_interleave(C),   # r: which
                                                comp=t.buffer["comp"][:len(prompts) * C].clone(),   # refresh wrote it
                                                r=torch.full((len(prompts) * C,), float(len(marks))))
    written = []
    for k in range(1, 4):
        marks.append(None)
        t.refresh()
        written.append((t.buffer["r"].view(3, C)[:, 0] == k).nonzero()[:, 0].tolist())
    assert written == [[0, 1], [0, 2], [1, 2]]                                 # slots 0 1 | 2 0 | 1 2
    t.start_phase(0.5)
    assert t.next_slot == 0


def test_the_released_preset_draws_as_the_authors_code(tiny):
    names = ("block_count", "lr_rounding", "minibatch", "prompt_order", "refresh_order")
    for task in ("countdown", "sudoku"):
        a = lf.parse(["--model_dir", tiny[0], "--task", task, "--preset", "released"])
        assert tuple(getattr(a, k) for k in names) == ("1..b", "floor", "without", "shuffled", "cycle"), task
    a = lf.parse(["--model_dir", tiny[0], "--task", "sudoku"])                  # the paper's preset: ours
    assert tuple(getattr(a, k) for k in names) == ("0..b", "round", "uniform", "random", "random")
    r = run_cli("--model_dir", tiny[0], "--task", "sudoku", "--minibatch", "without", "--batch", "99",
                "--buffer_prompts", "8", "--refresh_prompts", "2", "--completions", "2")
    assert r.returncode == 2 and "--minibatch without needs --batch <=" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("reset", ["phase", "never"])
def test_adams_moments_restart_each_phase_or_carry_on_as_asked(tiny, tmp_path, reset):
    t = lf.make_trainer(lf.parse(train_args(tiny[0], str(tmp_path), "--held_out_prompts", "0", "--reset_optimizer",
                                            reset)))
    t.start_phase(0.5)
    t.train_step(0.5)
    first = t.opt
    t.start_phase(0.5)                                   # the next phase
    t.train_step(0.5)
    steps = {int(s["step"]) for s in t.opt.state.values()}
    assert (t.opt is first, steps) == ((False, {1}) if reset == "phase" else (True, {2}))


def test_every_rollout_drawn_counts_the_health_checks_too(tiny, tmp_path):
    t = lf.make_trainer(lf.parse(train_args(tiny[0], str(tmp_path), "--held_out_maskings", "3")))   # 3 x 2 and
    t.start_phase(0.5)                                                                # 2 held out x 2, masked 3 times
    assert len(t.held["r"]) == 3 * 2 * 2 and torch.equal(t.held["comp"][:4], t.held["comp"][4:8])
    assert not torch.equal(t.held["counted"][:4], t.held["counted"][4:8])            # masked afresh each time
    assert t.n_rollouts == len(t.buffer["r"]) + len(t.held["r"]) // 3 == 3 * 2 + 2 * 2


def test_max_seconds_stops_after_the_phase_that_passes_it_and_evaluates_it(tiny, tmp_path):
    out = str(tmp_path / "run")
    lf.main(train_args(tiny[0], out, "--held_out_prompts", "0", "--max_seconds", "1e-9", "--phase_eval", "2",
                       "--eval_every", "5", "--eval_lengths", "8"))                       # 3 phases asked
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["phase"] for r in rows if "test" in r] == [0, 1]                            # the base, then phase 1
    assert max(r.get("phase", 0) for r in rows) == 1


# ----------------------------------------------------------------------------- --method grpo (llada/grpo.py)
def grpo_args(tiny_dir, out, *extra):
    return ["--model_dir", tiny_dir, "--task", "countdown", "--out", out, "--method", "grpo", "--gen_length", "8",
            "--block_length", "4", "--tokens_per_step", "2", "--completions", "3", "--grpo_prompts", "2",
            "--iterations", "2", "--mu", "2", "--lora_r", "4", "--lr", "1e-2", "--rollout_batch", "6",
            "--device", "cpu", *extra]


def test_grpo_surrogate_masks_the_whole_completion_and_real_prompt_tokens_only_and_counts_to_the_first_stop(tiny,
                                                                                                         tmp_path):
    g = lf.make_trainer(lf.parse(grpo_args(tiny[0], str(tmp_path / "g"), "--p_mask_prompt", "0.5")))
    cfg, eos = g.t.cfg, g.t.cfg.eos_token_id
    comp = torch.tensor([[7, 8, eos, 9, eos, eos, eos, eos], [7, 8, 9, 10, 11, 12, 13, 14]])
    data = dict(idx=torch.tensor([0, 1]), comp=comp)
    x1, x_in, am, where, weight = g.inputs(data, g.t.gen)
    G = comp.shape[1]
    assert (x_in[:, -G:] == cfg.mask_token_id).all() and torch.equal(x1[:, -G:], comp)
    assert where[0, -G:].tolist() == [True] * 3 + [False] * 5 and where[1, -G:].all() and not where[:, :-G].any()
    assert torch.equal(weight, torch.tensor([1 / 3, 1 / 8]))
    prompt_masked = x_in[:, :-G] == cfg.mask_token_id
    assert not (prompt_masked & (am[:, :-G] == 0)).any()                  # never the left padding
    assert 0 < prompt_masked.sum() < am[:, :-G].sum()


def varied_reward(monkeypatch):                        # a reward that varies within a group of the random model
    monkeypatch.setitem(lf.PROTOCOLS["ours"]["rewards"], "countdown", lambda text, item: float(len(text) % 7))


@pytest.mark.slow
def test_grpo_at_lr_0_keeps_the_adapter_at_the_reference_and_its_kl_is_zero_and_moves_it_otherwise(tiny, tmp_path,
                                                                                                 monkeypatch):
    from llada.model import load_safetensors
    varied_reward(monkeypatch)
    for lr in ("0", "1e-2"):
        out = str(tmp_path / lr)
        lf.main(grpo_args(tiny[0], out, "--lr", lr))
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [r["iteration"] for r in rows] == [1, 2] and [r["rollouts"] for r in rows] == [6, 12]
        B = [t for k, t in load_safetensors(os.path.join(out, "adapter", "adapter_model.safetensors")).items()
             if "lora_B" in k]
        moved = sum(b.abs().sum().item() for b in B)
        if lr == "0":
            assert moved == 0 and all(r["kl"] == 0 for r in rows)
        else:
            assert moved > 0 and rows[-1]["kl"] > 0


@pytest.mark.slow
def test_grpo_micro_batches_accumulate_to_the_whole_batch_update(tiny, tmp_path, monkeypatch):
    from llada.model import load_safetensors
    varied_reward(monkeypatch)
    got = []
    for micro in ("0", "2"):
        out = str(tmp_path / micro)
        lf.main(grpo_args(tiny[0], out, "--iterations", "1", "--micro_batch", micro, "--lora_dropout", "0"))
        got.append(load_safetensors(os.path.join(out, "adapter", "adapter_model.safetensors")))
    assert got[0].keys() == got[1].keys()
    assert sum(t.abs().sum().item() for k, t in got[0].items() if "lora_B" in k) > 0
    for k in got[0]:
        torch.testing.assert_close(got[0][k], got[1][k], rtol=1e-4, atol=1e-6)
