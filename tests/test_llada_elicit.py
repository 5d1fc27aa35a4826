"""A base from SFT data of mixed quality and what a reward can draw out of it: the wrong solver, the mixture
(llada/sft.py --mix), the modes and the exact tilt of a model's samples (lab/modes.py), and rejection-sampling
fine-tuning (lab/rft.py)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from llada import sft
from lab import modes, rft
from llada.model import chat_text
from llada.protocols import PROTOCOLS
from llada.tasks import sudoku_row_only, sudoku_test_set

SHORT = PROTOCOLS["short"]["prompts"]["sudoku"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_row_only_fills_each_rows_blanks_with_its_missing_digits_in_increasing_order():
    assert sudoku_row_only("0301" + "0000" + "4300" + "1234") == "2341" + "1234" + "4312" + "1234"
    test = sudoku_test_set()
    answers = [sudoku_row_only(t["puzzle"]) for t in test]
    assert all(sorted(a[4 * r:4 * r + 4]) == list("1234") for a in answers for r in range(4))   # rows look right
    assert all(a[i] == t["puzzle"][i] for a, t in zip(answers, test) for i in range(16) if t["puzzle"][i] != "0")
    right = sum(a[i] == t["solution"][i] for a, t in zip(answers, test) for i in range(16) if t["puzzle"][i] == "0")
    empty = sum(t["puzzle"].count("0") for t in test)
    assert (right, empty) == (973, 2072)                        # 0.470 of the test cells: a wrong solver
    assert 0 < sum(a == t["solution"] for a, t in zip(answers, test)) < 10   # right as a whole only by chance


@pytest.fixture(scope="module")
def tok():
    return sft.build_tokenizer([chat_text(SHORT(dict(puzzle="0" * 16))), sft.sudoku_response("")], 320)


def responses(tok, mix, n=400, seed=0):
    """The responses of n training puzzles under --mix: 'true', 'wrong' (row-only) or neither, and the puzzles."""
    import random
    grids = sft.sudoku_sft_grids(0, 0)
    prompt, am, resp = sft.sudoku_batches(tok, grids, SHORT, 24, n, seed=seed, mix=mix)()
    rng = random.Random(seed)                                   # sudoku_batches' puzzle draws, replayed
    from llada.tasks import sudoku_train_puzzle
    items = [sudoku_train_puzzle(grids, rng) for _ in range(n)]
    texts = [tok.decode(r.tolist()) for r in resp]
    kinds = [modes.mode_of(t, it) for t, it in zip(texts, items)]
    return kinds, items


def test_mix_gives_the_true_solution_with_probability_M_and_the_row_only_answer_otherwise(tok):
    kinds, items = responses(tok, 0.3)
    both = [sudoku_row_only(it["puzzle"]) == it["solution"] for it in items]   # the two solvers agree here
    assert all(k in (0, 1) for k in kinds)                      # every response is one of the two sources
    share = sum(k == 0 and not b for k, b in zip(kinds, both)) / sum(not b for b in both)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(kinds))
    assert responses(tok, 1.0)[0].count(0) == 400               # mix 1: all true (the unmixed data)
    kinds0, items0 = responses(tok, 0.0)
    assert all(k == 1 or sudoku_row_only(it["puzzle"]) == it["solution"] for k, it in zip(kinds0, items0))


def test_modes_read_an_answer_as_the_evaluation_does():
    item = dict(puzzle="0301000043001234", solution="2341412343121234")   # not a real grid: the reading only
    wrong = sudoku_row_only(item["puzzle"])
    assert modes.mode_of(f"<answer>\n{item['solution']}\n</answer>", item) == 0
    assert modes.mode_of(f"<answer>\n{wrong}\n</answer>", item) == 1
    assert modes.mode_of("<answer>\n1111222233334444\n</answer>", item) == 2
    assert modes.mode_of(f"no tags, a run: {item['solution']}", item) == 0      # the cascade's fallback
    assert modes.mode_of("<answer>\n2341 4123\n</answer>", item) == 2            # 8 digits: no answer
    assert modes.answer_grid("<answer>23 41 41 23 43 12 12 34</answer>") == "2341412343121234"


def test_tilt_targets_reweight_each_prompts_samples_by_e_to_the_a_r():
    r = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    true = torch.tensor([[False, True], [False, False]])
    a = math.log(3) / 2                                        # e^{a r}: 1 and 3 for the first prompt
    table, per = modes.tilt_targets(r, true, (0.0, a))
    assert table[0.0]["reward"] == pytest.approx(1.0) and table[0.0]["true"] == pytest.approx(0.25)
    torch.testing.assert_close(per[a][0], torch.tensor([1.5, 1.0], dtype=torch.float64))   # (0 + 3 * 2) / 4
    torch.testing.assert_close(per[a][1], torch.tensor([0.75, 0.0], dtype=torch.float64))
    big = modes.tilt_targets(r, true, (1e3,))[0][1e3]
    assert big["reward"] == pytest.approx(1.5) and big["true"] == pytest.approx(0.5)      # the best of n


def test_realised_fraction_is_a_ratio_of_means_with_its_se():
    base, target = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])
    final = torch.tensor([1.5, 1.25, 1.75])
    out = modes.realised(base, final, target)
    # d = 0.5, 0.25, 0.75; g = 1: fraction 0.5, residuals 0, -0.25, 0.25: SE 0.25 / sqrt(3)
    assert out["fraction"] == pytest.approx(0.5) and out["se"] == pytest.approx(0.25 / 3 ** 0.5)


def test_realised_against_the_bases_tilt_pairs_each_prompt_with_its_own_tilted_samples():
    ref = dict(per_prompt=dict(t1=dict(r=[[0.0, 2.0], [1.0, 1.0]], modes=[[2, 0], [2, 2]], reward=[1.0, 1.0],
                                       true=[0.5, 0.0])))
    new = dict(per_prompt=dict(t1=dict(r=[[1.0, 2.0], [1.0, 1.0]], modes=[[2, 0], [2, 2]], reward=[1.5, 1.0],
                                       true=[0.5, 0.0])))
    out = modes.realised_against(ref, new, 1e3)                 # the tilt at a = 1000: each prompt's best
    assert out["reward"]["fraction"] == pytest.approx(0.5)      # (0.5 + 0) / (1 + 0)
    assert out["true"]["fraction"] == pytest.approx(0.0)        # the true share did not move (target: 1, 0)
    with pytest.raises(ValueError, match="test puzzles"):
        modes.realised_against(ref, dict(per_prompt=dict(t1=dict(r=[[1.0]], modes=[[2]], reward=[1], true=[0]))), 1)


def test_pass_at_n_is_the_share_of_puzzles_that_any_of_the_n_samples_solves(monkeypatch):
    """measure()'s pass@n (the tilt's ceiling when n is large): a puzzle counts once however many samples solve it."""
    from types import SimpleNamespace
    item = dict(puzzle="0301000043001234", solution="2341412343121234")
    true, wrong, other = (f"<answer>{g}</answer>" for g in (item["solution"], sudoku_row_only(item["puzzle"]),
                                                            "1111222233334444"))
    draws = {1: [[true], [wrong], [other]],
             4: [[other, true, other, other], [wrong] * 4, [true, true, other, wrong]]}
    monkeypatch.setattr(modes, "sample", lambda model, tok, items, n, T, **kw: (draws[n], torch.ones(3, n)))
    model = SimpleNamespace(ff_out=SimpleNamespace(weight=torch.zeros(1)))
    out = modes.measure(model, None, [item] * 3, "row_only", samples=4)
    assert (out["greedy"]["pass_at"], out["greedy"]["solved"]) == (1, pytest.approx(1 / 3))
    assert (out["t1"]["pass_at"], out["t1"]["solved"]) == (4, pytest.approx(2 / 3))
    assert out["t1"]["solved_se"] == pytest.approx(torch.tensor([1.0, 0.0, 1.0]).std().item() / 3 ** 0.5)
    assert out["t1"]["true"] == pytest.approx(3 / 12)                     # the share of samples, beside it


def test_a_missing_adapter_is_named_in_a_one_line_error(tiny, tmp_path):
    with pytest.raises(modes.CheckpointError, match="adapter_config.json: no such file"):
        modes.load(tiny[0], str(tmp_path / "adapter"))


@pytest.mark.slow
def test_a_base_without_the_mixtures_record_and_a_bad_mix_give_a_one_line_error(tmp_path, tiny):
    with pytest.raises(modes.CheckpointError, match="no record of the SFT mixture"):
        modes.mixture(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "lab.modes", "--model_dir", tiny[0]], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no record of the SFT mixture" in r.stderr and "Traceback" not in r.stderr
    for bad in ("1.5", "-0.1"):
        r = subprocess.run([sys.executable, "-m", "llada.sft", "--out", str(tmp_path / "m"), "--mix", bad],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "--mix is a probability" in r.stderr and "Traceback" not in r.stderr


def test_rft_keeps_each_prompts_best_sample_and_logs_its_cost(tiny, tmp_path, monkeypatch):
    """One round on the tiny random LLaDA: the kept completion of each prompt is its highest-reward sample
    (the first of equals), and metrics.jsonl has the rows lab.sudoku_report reads."""
    kept = {}
    real = rft.best_rollouts

    def spy(model, tok, items, n, gen, args):
        state = gen.get_state()
        out = real(model, tok, items, n, gen, args)
        gen.set_state(state)                                    # the same samples, again, to check the pick
        _, r, comp = modes.sample(model, tok, items, n, args.temperature, args.gen_length, args.block_length,
                                  args.tokens_per_step, args.batch_sample, gen, args.protocol, return_ids=True)
        kept.update(r=r, comp=comp.view(len(items), n, -1), best=out[2], best_r=out[3])
        return out
    monkeypatch.setattr(rft, "best_rollouts", spy)
    out = str(tmp_path / "rft")
    rft.main(["--model_dir", tiny[0], "--out", out, "--rounds", "1", "--prompts", "3", "--samples", "4",
              "--steps", "2", "--batch", "4", "--eval_limit", "4"])
    k = kept["r"].argmax(1)
    torch.testing.assert_close(kept["best_r"], kept["r"].max(1).values)
    assert torch.equal(kept["best"], kept["comp"][torch.arange(3), k])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [0, 1] and [r["rollouts"] for r in rows] == [0, 12]
    assert os.path.isfile(os.path.join(out, "model", "config.json"))


@pytest.mark.slow
def test_end_to_end_mixed_sft_then_dtm_beats_its_same_seed_control_on_its_last_rollouts(tmp_path):
    """python -m llada.sft --mix makes a small base that holds the true solver as a minority (reduced: d 64,
    2 layers, 600 steps, M 0.7: 2.5% true solutions at temperature 1), llada_finetune.py --preset elicit
    (reduced: 64 prompts per phase, 60 steps, three phases to a = 150) fine-tunes it with DTM and with its
    same-seed control, and --eval scores DTM's adapter. DTM's last rollouts (the teacher's buffer of its last
    phase: the previous phase's student) score a higher mean reward than the control's, by more than their
    sampling error (measured: 1.222 against 1.146, SE 0.027). 97 s alone on the 2 cores, 188 s beside another job."""
    base = str(tmp_path / "base")
    sft.main(["--out", base, "--mix", "0.7", "--steps", "600", "--d_model", "64", "--n_layers", "2", "--mlp", "128",
              "--batch", "32", "--lr", "3e-3"])
    import llada_finetune as lf
    last = {}
    for control in ([], ["--control"]):
        out = str(tmp_path / ("ctl" if control else "dtm"))
        lf.main(["--model_dir", base, "--task", "sudoku", "--preset", "elicit", "--out", out, "--buffer_prompts", "64",
                 "--refresh_prompts", "8", "--refresh_every", "60", "--steps_per_phase", "60", "--lr", "3e-3",
                 "--a_max", "150", "--held_out_prompts", "0", "--phase_eval", "0", "--save_every", "0", *control])
        s = torch.load(os.path.join(out, "state_rank0.pt"), weights_only=True)
        last[bool(control)] = s["buffer"]["r"].double()
    d = last[False].mean() - last[True].mean()
    se = (last[False].var() / len(last[False]) + last[True].var() / len(last[True])) ** 0.5
    assert d > se, (d.item(), se.item())
    r = subprocess.run([sys.executable, "llada_finetune.py", "--model_dir", base, "--task", "sudoku", "--preset",
                        "elicit", "--eval", "--eval_limit", "32", "--adapter", str(tmp_path / "dtm" / "adapter")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "| sudoku (32) |" in r.stdout, r.stderr


def test_the_puzzles_are_grouped_by_how_many_of_the_bases_samples_solve_them():
    """lab.modes.by_base_share: the test puzzles by the base's true samples out of n (here 8: groups 0, 1, 2,
    3-4, 5-8; an empty group is left out), and this model's greedy share solved and temperature-1 modes in each."""
    base = {"per_prompt": {"t1": {"modes": [[2] * 8, [0] + [1] * 7, [0] * 3 + [2] * 5, [0] * 8, [2] * 8]}}}
    model = {"per_prompt": {"greedy": {"modes": [[1], [0], [0], [0], [2]]},
                            "t1": {"modes": [[1, 2], [0, 0], [0, 1], [0, 0], [2, 2]]}}}
    assert modes.by_base_share(base, model) == [("0 of 8", 2, 0.0, 0.0, 0.25, 0.75), ("1 of 8", 1, 1.0, 1.0, 0.0, 0.0),
                                                ("3-4 of 8", 1, 1.0, 0.5, 0.5, 0.0), ("5-8 of 8", 1, 1.0, 1.0, 0.0, 0.0)]
