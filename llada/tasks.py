"""The four LLaDA tasks of the paper (Sudoku 4x4, Countdown with 3 numbers, GSM8K, MATH500): their
data, prompts, rewards (for training) and accuracy (for evaluation). Plain Python, no torch needed
except to check Sudoku solutions.

    from llada.tasks import PROMPTS, REWARDS, accuracy, countdown_data
    item = countdown_data(seed=0, n=1)[0]
    PROMPTS["countdown"](item)                      # the text to put in the chat template
    REWARDS["countdown"]("<answer>3*5+7</answer>", item)
"""
import ast
import json
import random
import re
from fractions import Fraction
from itertools import permutations

import torch

from llada.model import CheckpointError


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
