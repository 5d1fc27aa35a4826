"""llada/tasks.py: each task's reward and accuracy on hand-made answers, the data splits, and every
reward total on garbage.
"""
import random

import pytest

import llada.tasks as tasks


SUDOKU = dict(puzzle="3014002020004130", solution="3214142323414132")    # 8 empty cells


def test_sudoku_reward_counts_correct_empty_cells_twice():
    assert tasks.sudoku_reward("<answer>\n3214142323414132\n</answer>", SUDOKU) == 2.0
    assert tasks.sudoku_reward("<answer>3214 1423 2341 4131</answer>", SUDOKU) == pytest.approx(2 * 7 / 8)   # 1 wrong
    assert tasks.sudoku_reward("no tags 3214142323414132", SUDOKU) == 0.0
    assert tasks.sudoku_cells("no tags 3214142323414132", SUDOKU, cascade=True) == (8, 8)
    assert tasks.sudoku_reward("<answer>32</answer>", SUDOKU) == pytest.approx(2 * 1 / 8)   # padded with 0


def test_all_288_sudoku_grids_and_a_split_by_solution():
    grids = tasks.sudoku_grids()
    assert len(grids) == len(set(grids)) == 288
    train, test = tasks.sudoku_data(seed=42)
    assert len(test) == 256 and all(7 <= t["puzzle"].count("0") <= 9 for t in test)
    assert not {t["solution"] for t in train} & {t["solution"] for t in test}
    assert {s for _, s in tasks.SUDOKU_SHOTS} <= {t["solution"] for t in train}
    assert len({t["solution"] for t in test}) == 88


def test_countdown_reward_values_and_refusals():
    item = dict(numbers=[3, 5, 7], target=22)
    assert tasks.countdown_reward("<answer>3*5+7</answer>", item) == 1.0
    assert tasks.countdown_reward("<answer>\\boxed{3 \\times 5 + 7}</answer>", item) == 1.0
    assert tasks.countdown_reward("<answer>3*5-7</answer>", item) == 0.1              # wrong value
    assert tasks.countdown_reward("<answer>3*5+7+7</answer>", item) == 0.1            # 7 used twice
    assert tasks.countdown_reward("3*5+7", item) == 0.0                               # no tag
    assert tasks.countdown_reward("<answer>__import__('os').system('3 5 7')</answer>", item) == 0.1
    for evil in ["__import__('os')", "(3).__class__", "open('x')", "3**5**7**9", "[3]*5", "lambda: 3"]:
        assert tasks.arith(evil) is None
    assert tasks.arith("(3 + 5) / 4 - -1") == 3 and tasks.arith("1/0") is None


def test_countdown_questions_are_solvable_and_test_is_held_out():
    test = tasks.countdown_data(10 ** 6, 256)
    train = tasks.countdown_data(0, 500, exclude=test)
    for q in test[:50]:
        a, b, c = q["numbers"]
        orders = [(a, b, c), (a, c, b), (b, c, a), (b, a, c), (c, a, b), (c, b, a)]
        exprs = [e for x, y, z in orders for o1 in "+-*/" for o2 in "+-*/"
                 for e in (f"({x}{o1}{y}){o2}{z}", f"{z}{o2}({x}{o1}{y})")]
        assert any(tasks.arith(e) == q["target"] for e in exprs), q
    key = lambda q: (tuple(sorted(q["numbers"])), q["target"])                     # noqa: E731
    assert not {key(q) for q in train} & {key(q) for q in test}


def test_gsm8k_reward_and_format_terms():
    item = dict(question="?", answer="so #### 1,234")
    perfect = "<reasoning>\nadd\n</reasoning>\n<answer>\n\\boxed{1234}\n</answer>\n"
    # 4 tags x 0.125, soft 0.5, strict 0.5, integer 0.5, right 2.0: the maximum, 4
    assert tasks.gsm8k_reward(perfect, item) == pytest.approx(4.0)
    assert tasks.gsm8k_reward(perfect.replace("1234", "1234.5"), item) == pytest.approx(1.5)
    assert tasks.gsm8k_reward(perfect + "tail", item) == pytest.approx(4.0 - 0.004 - 0.5)   # not strict
    assert tasks.gsm8k_reward("the answer is 7", item) == 0.0
    assert tasks.accuracy("gsm8k", "<answer>\\boxed{1,234}</answer>", item) == (1.0, 1)


def test_math_answers_compare_after_normalisation():
    assert tasks.math_equiv("\\dfrac{1}{2}", "0.5") and tasks.math_equiv("\\frac12", "\\frac{1}{2}")
    assert tasks.math_equiv("x = 3", "3") and tasks.math_equiv("10\\%", "10") and tasks.math_equiv("3/4", "\\frac{3}{4}")
    assert tasks.math_equiv("\\left( 1, 2 \\right)", "(1,2)") and not tasks.math_equiv("2", "3")
    item = dict(question="?", answer="\\frac{1}{2}")
    assert tasks.math_reward("<answer>\\boxed{\\dfrac12}</answer>", item) == 2.0 + 0.5 * 2.0
    assert tasks.math_reward("<answer>1/3</answer>", item) == 0.5 * 1.5
    assert tasks.math_reward("\\boxed{1/2}", item) == 2.0


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
            assert isinstance(tasks.REWARDS[task](s, item), float)
            assert len(tasks.accuracy(task, s, item)) == 2

