"""llada/sft.py: LLaDA's SFT loss, the Hugging Face directory it writes, its Sudoku data, and --preset tiny."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import llada_finetune as lf
from llada import sft
from llada.model import chat_text, load_model, load_tokenizer
from llada.protocols import PROTOCOLS
from llada.tasks import sudoku_reward, sudoku_test_set

SHORT = PROTOCOLS["short"]["prompts"]["sudoku"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FixedLogits(nn.Module):
    """A 'network' whose logits depend on the position only: table (T, V)."""
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids, attention_mask=None, where=None):
        return self.table.expand(ids.shape[0], -1, -1)[where]


def test_sft_loss_is_the_masked_cross_entropy_weighted_one_over_p_and_divided_by_the_response_length():
    B, P, G, V = 3, 2, 5, 7
    table = torch.randn(P + G, V, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    prompt, response = torch.randint(V - 1, (B, P), generator=g), torch.randint(V - 1, (B, G), generator=g)
    loss = sft.sft_loss(FixedLogits(table), prompt, response, V - 1, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)                                 # the same draws, by hand
    p = (1 - sft.EPS) * torch.rand(B, 1, generator=g) + sft.EPS
    masked = torch.rand(B, G, generator=g) < p
    logp = table[P:].log_softmax(-1)
    want = sum(-logp[j, response[b, j]] / p[b, 0] for b in range(B) for j in range(G) if masked[b, j]) / (B * G)
    assert masked.any() and not masked.all()
    torch.testing.assert_close(loss, want)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A new small LLaDA from llada.sft's pieces, saved in the HF layout."""
    tok = sft.build_tokenizer([chat_text(SHORT(dict(puzzle="0" * 16))), sft.sudoku_response("")], 320)
    args = argparse.Namespace(d_model=32, n_layers=2, n_heads=4, mlp=48, seed=0, device="cpu")
    model = sft.new_model(tok, args)
    out = str(tmp_path_factory.mktemp("sft") / "model")
    sft.save_model_dir(model, tok, out)
    return model, tok, out


def test_a_new_model_dir_loads_back_with_the_same_logits_through_load_model(small):
    model, tok, out = small
    assert sorted(os.listdir(out)) == ["config.json", "model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                       "tokenizer.json"]
    back = load_model(out)
    ids = torch.randint(model.cfg.embedding_size, (2, 9), generator=torch.Generator().manual_seed(3))
    assert back.cfg == model.cfg
    assert torch.equal(back(ids), model(ids))


def test_saving_over_a_model_dir_replaces_it_whole_and_leaves_nothing_behind(small, tmp_path):
    model, tok, _ = small
    out = str(tmp_path / "m")
    sft.save_model_dir(model, tok, out)
    with torch.no_grad():
        model.ln_f.weight.add_(1.0)
    sft.save_model_dir(model, tok, out)
    with torch.no_grad():
        model.ln_f.weight.sub_(1.0)
    assert torch.equal(load_model(out).ln_f.weight, model.ln_f.weight + 1.0)
    assert sorted(os.listdir(tmp_path)) == ["m"]                         # no m.tmp, no m.old


def test_the_tokenizer_has_llada_special_tokens_one_token_per_digit_and_round_trips_an_answer(small):
    _, tok, out = small
    tok = load_tokenizer(out)
    assert [tok.token_to_id(t) for t in sft.SPECIAL] == list(range(6))
    solution = "3214142323414132"
    ids = tok.encode(sft.sudoku_response(solution), add_special_tokens=False).ids
    assert len(ids) == 16 + 4                                            # <answer> \n 16 digits \n </answer>
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == sft.sudoku_response(solution)
    assert sudoku_reward(text, dict(puzzle="0" * 16, solution=solution)) == 2.0


def test_sft_grids_are_training_grids_only_and_k_of_them_are_the_same_for_a_seed():
    test_solutions = {t["solution"] for t in sudoku_test_set()}
    assert len(sft.sudoku_sft_grids(0, 0)) == 200
    k8 = sft.sudoku_sft_grids(8, 3)
    assert len(set(k8)) == 8 and not set(k8) & test_solutions and k8 == sft.sudoku_sft_grids(8, 3)


def test_sudoku_batches_are_short_prompts_of_the_grids_and_answers_padded_with_end_of_text(small):
    _, tok, _ = small
    grids = sft.sudoku_sft_grids(2, 0)
    prompt, am, resp = sft.sudoku_batches(tok, grids, SHORT, 24, 5, seed=0)()
    eos = tok.token_to_id("<|endoftext|>")
    assert resp.shape == (5, 24) and (resp[:, 20:] == eos).all() and am.all()
    for p, r in zip(prompt.tolist(), resp.tolist()):
        answer = tok.decode(r[:20], skip_special_tokens=True)
        solution = answer.split("\n")[1]
        puzzle = tok.decode(p, skip_special_tokens=True).split(": ")[-1][:16]
        assert solution in grids and puzzle.isdigit() and "0" in puzzle
        assert all(a in ("0", b) for a, b in zip(puzzle, solution))          # the puzzle is of its solution


def test_the_tiny_preset_fills_the_small_sizes_and_a_flag_still_wins(small):
    a = lf.parse(["--model_dir", small[2], "--task", "sudoku", "--preset", "tiny", "--lora_r", "4"])
    assert (a.gen_length, a.block_length, a.protocol, a.eval_lengths, a.lora_r) == (24, 8, "short", [24], 4)
    b = lf.parse(["--model_dir", small[2], "--task", "sudoku"])                  # the 8B's, unchanged
    assert (b.gen_length, b.block_length, b.protocol, b.lora_r, b.a_max) == (256, 32, "ours", 128, 100.0)
    with pytest.raises(SystemExit):
        lf.parse(["--model_dir", small[2], "--task", "countdown", "--preset", "tiny"])


def test_the_report_reads_each_runs_test_accuracy_per_phase_and_buffer_rewards(tmp_path):
    from lab import sudoku_report
    for name, accs in (("d0", [0.4, 0.5, 0.6]), ("d1", [0.4, 0.6, 0.8]), ("c0", [0.4, 0.4, 0.5])):
        rows = [dict(phase=0, a=0.0, test=dict(acc=accs[0], se=0.01, whole=0.0, whole_se=0.0, n=4))]
        for k, acc in enumerate(accs[1:], 1):
            rows += [dict(phase=k, a=k - 1.0, buffer_reward=acc, rollout_s=1.0), dict(phase=k, step=1, loss=0.1),
                     dict(phase=k, a=float(k), held_out_change=0.1 - acc / 4, held_out_change_se=0.02),
                     dict(phase=k, a=float(k), test=dict(acc=acc, se=0.01, whole=acc / 2, whole_se=0.0, n=4))]
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = sudoku_report.table({"DTM": [str(tmp_path / "d0"), str(tmp_path / "d1")], "control": [str(tmp_path / "c0")]})
    assert lines[2] == "| DTM | 2 | 0.400 ± 0.000 -> 0.700 ± 0.100 | 0.350 ± 0.050 | 0.55 / 0.70 | 4 of 4 |"
    assert lines[3] == "| control | 1 | 0.400 (1 seed) -> 0.500 (1 seed) | 0.250 (1 seed) | 0.40 / 0.50 | 1 of 2 |"
    sudoku_report.main(["--group", "DTM", str(tmp_path / "d0"), str(tmp_path / "d1"), "--group", "control",
                        str(tmp_path / "c0"), "--figure", str(tmp_path / "f.png")])
    assert os.path.getsize(tmp_path / "f.png") > 0


def test_the_cost_table_reads_grpo_runs_by_iteration_and_picks_their_last_evaluation_within_dtms_seconds(tmp_path):
    from lab import sudoku_report
    test = lambda acc: dict(acc=acc, se=0.01, whole=acc / 4, whole_se=0.0, n=4)            # noqa: E731
    runs = {"dtm": [dict(phase=0, a=0.0, rollouts=0, seconds=0.0, test=test(0.4)),
                    dict(phase=1, a=10.0, rollouts=320, seconds=100.0, test=test(0.5))],
            "grpo": [dict(iteration=0, rollouts=0, seconds=0.0, test=test(0.4)),
                     dict(iteration=2, rollouts=256, seconds=60.0, test=test(0.45)),
                     dict(iteration=4, rollouts=512, seconds=120.0, test=test(0.6))]}
    for name, rows in runs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = {"DTM": [str(tmp_path / "dtm")], "d1": [str(tmp_path / "grpo")]}
    lines = sudoku_report.cost_table(groups)
    assert lines[2:] == ["| DTM | 1 | the end | 320 | 100 | 0.500 (1 seed) | 0.125 (1 seed) |",
                         "| d1 | 1 | the end | 512 | 120 | 0.600 (1 seed) | 0.150 (1 seed) |",
                         "| d1 | 1 | 100 s | 256 | 60 | 0.450 (1 seed) | 0.113 (1 seed) |"]
    assert sudoku_report.table(groups)[3].startswith("| d1 | 1 | 0.400 (1 seed) -> 0.600 (1 seed) |")
    sudoku_report.main(["--group", "DTM", groups["DTM"][0], "--group", "d1", groups["d1"][0],
                        "--cost_figure", str(tmp_path / "c.png")])
    assert os.path.getsize(tmp_path / "c.png") > 0


def test_the_results_rows_carry_each_runs_curve_and_the_tilts_ceiling(tmp_path):
    """sudoku_report.results: a row per run with its curve (every evaluation from the base on) and the base's
    pass@n from lab.modes' modes.json; results_table shows the end's whole puzzles as a share of that ceiling."""
    from lab import sudoku_report
    test = lambda acc, whole: dict(acc=acc, se=0.01, whole=whole, whole_se=0.0, n=4)       # noqa: E731
    rows = [dict(phase=0, a=0.0, rollouts=0, seconds=0.0, test=test(0.4, 0.1)),
            dict(phase=4, a=200.0, rollouts=512, seconds=50.0, test=test(0.6, 0.2)),
            dict(phase=8, a=400.0, rollouts=1024, seconds=99.5, test=test(0.7, 0.3))]
    os.makedirs(tmp_path / "d0")
    (tmp_path / "d0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "modes.json").write_text(json.dumps(dict(t1=dict(solved=0.6, pass_at=64))))
    assert sudoku_report.ceiling(str(tmp_path / "modes.json")) == (0.6, 64)
    (row,) = sudoku_report.results({"dtm": [str(tmp_path / "d0")]}, 0.6)
    assert row["curve"] == [dict(rollouts=0, seconds=0.0, acc=0.4, whole=0.1),
                            dict(rollouts=512, seconds=50.0, acc=0.6, whole=0.2),
                            dict(rollouts=1024, seconds=99.5, acc=0.7, whole=0.3)]
    assert (row["ceiling_whole"], row["final_whole"], row["rollouts"]) == (0.6, 0.3, 1024)
    os.makedirs(tmp_path / "d1")                                      # the same seed, another method
    (tmp_path / "d1" / "metrics.jsonl").write_text("".join(json.dumps(dict(r, test=test(r["test"]["acc"] - 0.05,
                                                                                      0.0))) + "\n" for r in rows))
    at = sudoku_report.at_table({"a": [str(tmp_path / "d0")], "b": [str(tmp_path / "d1")]}, [512, 1000])
    assert at[2:] == ["| a | 1 | 0.600 (1 seed) | 0.600 (1 seed) | - | - |",            # 1000: the last eval within
                      "| b | 1 | 0.550 (1 seed) | 0.550 (1 seed) | -0.050 (1 seed) | -0.050 (1 seed) |"]
    at = sudoku_report.at_table({"a": [str(tmp_path / "d0")]}, [99], seconds=True)
    assert at[0].startswith("| runs | seeds | 99 s |") and at[2] == "| a | 1 | 0.600 (1 seed) | - |"
    assert sudoku_report.results_table([row])[2] == ("| dtm | 1 | 1024 | 100 | 0.400 -> 0.700 (1 seed) | 0.100 -> "
                                                     "0.300 (1 seed) | 0.500 (1 seed) | - | - |")


def test_the_cost_figure_averages_seeds_at_the_rollouts_every_seed_evaluated(tmp_path):
    """A seed evaluated every 128 rollouts and one every 256: the mean is taken at 0, 256 and 512 only."""
    from lab import sudoku_report
    for name, every in (("a", 128), ("b", 256)):
        os.makedirs(tmp_path / name)
        rows = [dict(rollouts=k, seconds=k / 10, test=dict(acc=k / 1000, whole=0.0)) for k in range(0, 513, every)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = sudoku_report.shared_curves([str(tmp_path / "a"), str(tmp_path / "b")])
    assert c.shape == (2, 3, 4) and c[:, :, 0].tolist() == [[0, 256, 512]] * 2 and c[0, 2, 2] == 0.512


@pytest.mark.slow
def test_end_to_end_sft_then_dtm_and_its_control_then_eval_on_the_small_sudoku_llada(tmp_path):
    """python -m llada.sft makes a small LLaDA (reduced: 150 steps, d 64), llada_finetune.py --preset tiny
    (reduced) fine-tunes it with DTM and with its control (--control: the rewards shuffled over the buffer)
    from one seed, and --eval scores the adapter: the 8B's code path end to end. Phase 1 of both sees the
    same rollouts; the test accuracy is logged at the start and after every phase. (That DTM's rollouts
    then score higher than the control's does not hold from this base; from a base of mixed quality it
    does: test_llada_elicit.py's end-to-end test.)"""
    base = str(tmp_path / "base")
    sft.main(["--out", base, "--grids", "2", "--steps", "150", "--d_model", "64", "--n_layers", "2", "--mlp", "128",
              "--batch", "32", "--lr", "3e-3"])
    runs = {}
    for control in ([], ["--control"]):
        out = str(tmp_path / ("ctl" if control else "dtm"))
        lf.main(["--model_dir", base, "--task", "sudoku", "--preset", "tiny", "--out", out, "--buffer_prompts", "16",
                 "--refresh_prompts", "4", "--refresh_every", "5", "--held_out_prompts", "8", "--steps_per_phase",
                 "10", "--a_max", "20", "--phase_eval", "16", "--save_every", "0", *control])
        runs[bool(control)] = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    buffer = {c: [r["buffer_reward"] for r in m if "rollout_s" in r] for c, m in runs.items()}
    tests = {c: [r["a"] for r in m if "test" in r] for c, m in runs.items()}
    assert buffer[True][0] == buffer[False][0] and len(buffer[False]) == 2
    assert tests[False] == tests[True] == [0.0, 10.0, 20.0]
    assert sum("held_out_change" in r for r in runs[False]) == 2
    adapters = [open(tmp_path / c / "adapter" / "adapter_model.safetensors", "rb").read() for c in ("dtm", "ctl")]
    assert adapters[0] != adapters[1]                               # the shuffled rewards trained another adapter
    r = subprocess.run([sys.executable, "llada_finetune.py", "--model_dir", base, "--task", "sudoku", "--preset", "tiny",
                        "--eval", "--eval_limit", "16", "--adapter", str(tmp_path / "dtm" / "adapter")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "short protocol" in r.stdout and "| sudoku (16) |" in r.stdout


@pytest.mark.parametrize("flags, message", [(["--grids", "201"], "--grids must be in 0..200"),
                                            (["--gen_length", "12"], "shorter than a response"),
                                            (["--model_dir", "/nonexistent"], "config.json")])
def test_bad_sft_flags_and_a_missing_model_dir_give_a_one_line_error(flags, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llada.sft", "--out", str(tmp_path / "m"), "--steps", "1", *flags],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_evaluation_summary_is_the_ratio_estimator_with_its_se_and_the_share_wholly_right():
    from llada.protocols import summarise
    items = torch.tensor([[1.0, 2], [2, 2], [0, 2]], dtype=torch.float64)          # (correct, scored) per item
    c, t = items[:, 0], items[:, 1]
    s = summarise(torch.stack([c.sum(), t.sum(), (c * c).sum(), (t * t).sum(), (c * t).sum(),
                               (c == t).double().sum(), torch.tensor(3.0, dtype=torch.float64)]))
    # acc = 3 / 6; residuals c - acc t = 0, 1, -1: variance 1, SE sqrt(1 / 3) / mean t
    assert s["acc"] == 0.5 and s["se"] == pytest.approx((1 / 3) ** 0.5 / 2)
    assert s["whole"] == pytest.approx(1 / 3) and s["whole_se"] == pytest.approx(((1 / 3) * (2 / 3) / 2) ** 0.5)
