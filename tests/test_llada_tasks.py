"""llada/tasks.py: each task's reward and accuracy on hand-made answers, the data splits, and every
reward total on garbage.
"""
import json
import random

import pytest

import llada.protocols as protocols
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
    assert tasks.math_reward("\\boxed{1/2}", item) == 2.0 + 0.5 * 0.5      # no <answer>: 0.25, as the baselines


def test_math_format_term_is_a_quarter_without_answer_tags_as_the_formula_says():
    item = dict(question="?", answer="7")
    assert tasks.math_reward("no tags at all", item) == 0.25
    assert tasks.math_reward("<answer>8</answer>", item) == 0.5 * 1.5
    assert tasks.math_reward("<answer>\\boxed{8}</answer>", item) == 0.5 * 2.0


def test_every_reward_and_scorer_of_both_protocols_is_total_on_1000_garbage_strings():
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
            assert isinstance(protocols.PAPER_REWARDS[task](s, item), float)                 # the paper's protocol
            assert all(len(score(task, s + "<|eot_id|>", item)) == 2 for score, _ in protocols.SCORERS.values())



# ----------------------------------------------------------------------------- bugs of the LLaDA evaluation issue
def test_a_5000_digit_countdown_answer_is_wrong_not_an_error():
    item, huge = dict(numbers=[3, 5, 7], target=22), "<answer>" + "1" * 5000 + "</answer>"
    assert tasks.countdown_reward(huge, item) == 0.1
    assert tasks.accuracy("countdown", huge, item) == (0.0, 1)
    assert protocols.paper_accuracy("countdown", huge, item) == (0.0, 1)


def test_division_by_zero_is_no_answer_and_fractions_are_fractions():
    gold_zero = dict(question="?", answer="#### 0")
    assert tasks.accuracy("gsm8k", "<answer>\\boxed{1/0}</answer>", gold_zero) == (0.0, 1)
    assert tasks.number("1/0") is None and tasks.number("3/4") == 0.75 and tasks.number("\\frac{3}{4}") == 0.75
    assert tasks.number("$1,234.50") == 1234.5 and tasks.number("x = 5") == 5.0


def test_sudoku_test_set_is_the_same_for_every_seed_and_training_never_sees_its_grids():
    tests = []
    for seed in (0, 1, 42):
        train, test = tasks.sudoku_data(seed=seed, n_train=300)
        assert not {t["solution"] for t in train} & {t["solution"] for t in test}
        tests.append(test)
    assert tests[0] == tests[1] == tests[2]
    assert len({t["solution"] for t in tests[0]}) == 88
    spg_like = [dict(puzzle="3014002020004130", solution="3214142323414132")] * 3     # a file with other grids
    train, test = tasks.sudoku_data(seed=0, test=spg_like, n_train=300)
    assert test == spg_like and "3214142323414132" not in {t["solution"] for t in train}


@pytest.mark.slow
def test_countdown_files_in_all_three_layouts_read_alike(tmp_path):
    class Args:
        task, seed, eval, train_data = "countdown", 0, True, None
    layouts = [{"numbers": [30, 100, 93], "target": 23}, {"input": "30,100,93", "output": "23"},
               {"nums": [30, 100, 93], "target": 23}]
    for k, row in enumerate(layouts):
        (tmp_path / f"{k}.jsonl").write_text(json.dumps(row) + "\n")
        Args.test_data = str(tmp_path / f"{k}.jsonl")
        assert tasks.task_data(Args)[1] == [dict(numbers=[30, 100, 93], target=23)]
    (tmp_path / "bad.jsonl").write_text('{"input": "1,2", "output": "x"}\n')
    Args.test_data = str(tmp_path / "bad.jsonl")
    with pytest.raises(tasks.CheckpointError, match="line 1 of countdown test"):
        tasks.task_data(Args)
    (tmp_path / "train.jsonl").write_text('{"nums": [1, 2, 3, 4], "target": 10}\n{"nums": [1, 2, 3], "target": 6}\n')
    Args.test_data, Args.train_data = None, str(tmp_path / "train.jsonl")
    assert tasks.task_data(Args)[0] == [dict(numbers=[1, 2, 3], target=6)]      # 3-number items only


def test_sudoku_csv_is_read_and_a_leaking_training_file_is_refused(tmp_path):
    class Args:
        task, seed, eval = "sudoku", 0, True
    (tmp_path / "test.csv").write_text("Puzzle,Solution\n3014002020004130,3214142323414132\n")
    (tmp_path / "train.csv").write_text("Puzzle,Solution\n0014002020004130,3214142323414132\n")
    Args.test_data, Args.train_data = str(tmp_path / "test.csv"), None
    assert tasks.task_data(Args)[1] == [dict(puzzle="3014002020004130", solution="3214142323414132")]
    Args.train_data = str(tmp_path / "train.csv")
    with pytest.raises(tasks.CheckpointError, match="a leak"):
        tasks.task_data(Args)


# ----------------------------------------------------------------------------- the paper's protocol
def test_paper_prompts_are_the_published_ones():
    cd = protocols.paper_countdown_prompt(dict(numbers=[30, 100, 93], target=23))
    assert cd.startswith("\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n")
    assert "Using only the numbers [30, 100, 93], create an arithmetic expression that evaluates to exactly 23." in cd
    assert cd.endswith("a valid answer is: <answer>\n2*4-3\n</answer>")
    sd = protocols.paper_sudoku_prompt(dict(puzzle="1234000000000000"))
    assert sd.count("Question:\nSolve the following Sudoku puzzle: ") == 3                     # 3 exemplars
    assert "R1: 3 0 1 4\nR2: 0 0 2 0\nR3: 2 0 0 0\nR4: 4 1 3 0\n\nFill easy singles:" in sd
    assert "Final grid:\nR1: 2 3 4 1\nR2: 4 1 3 2\nR3: 3 2 1 4\nR4: 1 4 2 3\n</reasoning>" in sd
    assert sd.endswith("</answer>\n\nQuestion: Solve the following Sudoku puzzle: 1234000000000000\nAnswer:\n")
    assert protocols.paper_math_prompt(dict(question="Q?")).endswith("\\boxed{...}\n</answer>\n\nQ?")
    assert "a \\boxed{}. \nRespond" in protocols.paper_math_prompt(dict(question="Q?"))


def test_paper_countdown_scorer_takes_the_first_answer_and_the_part_before_equals():
    item = dict(numbers=[3, 5, 7], target=22)
    score = lambda text: protocols.paper_accuracy("countdown", text, item)[0]                    # noqa: E731
    assert score("<answer>3*5+7 = 22</answer>") == 1.0                     # ours: 0 (an '=' in the answer)
    assert tasks.accuracy("countdown", "<answer>3*5+7 = 22</answer>", item)[0] == 0.0
    assert score("<answer>3*5+7</answer> then <answer>3+5+7</answer>") == 1.0           # the first answer
    assert score("3 \\times 5 + 7") == 1.0 and score("so: 3*5+7") == 0.0   # no tags: the whole text
    assert score("<answer>3*5-7</answer>") == 0.0
    assert score("<answer>\\boxed{3*5+7}</answer>") == 0.0                 # their regex refuses the braces
    assert protocols.paper_accuracy("countdown", "<answer>2**3</answer>", dict(numbers=[2, 3], target=8))[0] == 1.0


def test_spg_countdown_scorer_reads_the_last_boxed_where_the_dtm_authors_read_the_first_answer():
    item = dict(numbers=[3, 5, 7], target=22)
    for text, dtm, spg in [("so \\boxed{3*5+7}", 0.0, 1.0),                   # \boxed outside <answer>
                           ("<answer>3*5+7</answer>", 1.0, 0.0),               # no \boxed: SPG reads the whole text
                           ("<answer>3*5+7</answer> \\boxed{3*5+7", 1.0, 1.0),   # unclosed: the first <answer>
                           ("<answer>\\boxed{3*5+7}</answer>", 0.0, 1.0),      # DTM: braces refused ...
                           ("<answer>\\boxed{3 \\times 5 + 7 = 22}</answer>", 1.0, 1.0)]:   # ... unless '= 22'
                                                                                          # cuts them off
        assert protocols.paper_accuracy("countdown", text, item)[0] == dtm, text
        assert protocols.spg_accuracy("countdown", text, item)[0] == spg, text


def test_paper_sudoku_scorer_is_the_five_pattern_cascade_with_separators_kept():
    item = SUDOKU                                                           # 8 empty cells
    cells = lambda text: protocols.paper_accuracy("sudoku", text, item)[0]                     # noqa: E731
    assert cells("<answer>\n3214142323414132\n</answer><|eot_id|>") == 8
    assert cells("<answer>3214142323414132<|eot_id|><|endoftext|>") == 8   # unclosed, cut at the stop token
    assert cells("<answer>3,2,1,4,1,4,2,3,2,3,4,1,4,1,3,2</answer>") < 8   # commas count as characters
    assert tasks.accuracy("sudoku", "<answer>3,2,1,4,1,4,2,3,2,3,4,1,4,1,3,2</answer>", item)[0] == 8   # ours strips
    assert cells("<answer>3214142323414132</answer><answer>0000000000000000</answer>") == 8   # the first
    assert cells("the grid 3214142323414132 it is") == 8 and cells("nothing") == 0


def test_paper_gsm8k_and_math_scorers():
    item = dict(question="?", answer="so #### 36")
    gsm = lambda text: protocols.paper_accuracy("gsm8k", text, item)[0]                        # noqa: E731
    assert gsm("\\boxed{36}") == 1.0 and gsm("\\boxed{...} then \\boxed{36}") == 1.0
    assert gsm("<answer>it is 12 or 36</answer>") == 1.0                    # the last number in <answer>
    assert gsm("<answer>\\boxed{36") == 1.0                                 # unclosed: the text after <answer>
    assert gsm("\\boxed{1,234}") == 0.0
    m = dict(question="?", answer="\\frac{1}{2}")
    assert protocols.paper_accuracy("math", "so \\boxed{\\frac{1}{2}}.", m)[0] == 1.0
    assert protocols.paper_accuracy("math", "1/2", m)[0] == 1.0                 # no \boxed: the whole text
    assert protocols.paper_accuracy("math", "<answer>1/2</answer> \\boxed{1/2", m)[0] == 1.0    # unclosed
    assert protocols.paper_gsm8k_reward("<reasoning>\nadd\n</reasoning>\n<answer>\n\\boxed{36}\n</answer>\n", item) \
        == pytest.approx(4.0 - 1.0)                                         # no soft / strict format terms


# ---- scoring is linear in the text: the str.find parsers against the regexes they replace
PIECES = ["<answer>", "</answer>", "<reasoning>", "</reasoning>", "```", "<|eot_id|>", "<|endoftext|>",
          "\\boxed{", "\\text{", "{", "}", "=", "+", "*", "(", ")", ".", "1", "2", "3", "4", "0",
          "1234123412341234", "12341234123412341", " ", "\n", "\u2003", "\u0663", "x", "\\frac",
          "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>", "\n</answer>\n"]


def random_texts(n=4000, seed=0):
    """Short strings of the pieces the parsers look for; half start as a well-formed completion does."""
    rng = random.Random(seed)
    return [rng.choice(["", "<reasoning>", "<reasoning>\n"]) + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14)))
            for _ in range(n)]


def test_tag_parsers_return_what_the_lazy_regexes_return():
    import re
    for text in random_texts():
        assert tasks.tag_spans(text, "<answer>", "</answer>") == re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        assert tasks.tag_spans(text, "\\boxed{", "}", dotall=False) == re.findall(r"\\boxed{(.*?)}", text)
        m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        assert tasks.first_tag(text, "answer") == (m.group(1) if m else None)
        assert tasks.soft_format(text) == bool(re.match(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>",
                                                        text, re.DOTALL))
        strict = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$"
        assert tasks.strict_format(text) == bool(re.match(strict, text, re.DOTALL)), repr(text)
        assert tasks.drop_final_text(text) == re.sub(r"\\text\{\s*[^}]*\}\s*$", "", text), repr(text)


def test_the_papers_sudoku_cascade_finds_what_its_regexes_find():
    import re
    patterns = [r"<answer>.*?```\s*([\d\s]+)```", r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",
                r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)", r".*?(\d{16})\s*</answer>",
                r"\b(\d{16})\b"]
    for text in random_texts() + ["<answer>``` 1 2\n```", "<answer>```  ```", "x</answer> \n12\n"]:
        groups = [(m.group(1) if m else None) for m in (re.search(p, text, re.DOTALL) for p in patterns)]
        assert protocols.paper_sudoku_answers(text) == groups, repr(text)
        eq = re.search(r"([0-9+\-*/() ]+)=[0-9. ]+", text)
        item = dict(numbers=[1, 2, 3], target=6)
        expected = protocols.countdown_correct(eq.group(1).strip() if eq else text, item)
        assert protocols.countdown_correct(text, item) == expected


@pytest.mark.parametrize("text", ["<answer>" * 10_000, "<reasoning></reasoning><answer>" * 2_500,
                                  "<reasoning>" + "</reasoning>" * 6_600, "\\boxed{" * 11_400,
                                  "<answer>" + "\\text{" * 13_300 + "}</answer>", "<answer>```1" * 8_000,
                                  "1 " * 40_000 + "</answer>" + "\n" * 1000, "(1+2)" * 16_000])
def test_every_scorer_is_linear_in_the_text(text):
    """An 80k-character completion of unclosed tags took the lazy regexes 7-145 s per scorer; every reward
    and scorer of every task now reads it in well under a second."""
    import time
    items = dict(sudoku=tasks.sudoku_data(0, n_train=1)[0][0], countdown=tasks.countdown_data(0, 1)[0],
                 gsm8k=dict(question="q", answer="#### 42"), math=dict(question="q", answer="42"))
    for task, item in items.items():
        scorers = [lambda t, i: tasks.REWARDS[task](t, i), lambda t, i: protocols.PAPER_REWARDS[task](t, i)]
        scorers += [lambda t, i, f=f: f(task, t, i) for f, _ in protocols.SCORERS.values()]
        for score in scorers:
            t0 = time.perf_counter()
            score(text, item)
            assert time.perf_counter() - t0 < 1.0, task
