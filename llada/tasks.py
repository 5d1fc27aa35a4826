"""The four LLaDA tasks of the paper (Sudoku 4x4, Countdown with 3 numbers, GSM8K, MATH500): their
data, prompts, rewards (for training) and accuracy (for evaluation). Plain Python, no torch needed
except to check Sudoku solutions.

    from llada.tasks import PROMPTS, REWARDS, accuracy, countdown_data
    item = countdown_data(seed=0, n=1)[0]
    PROMPTS["countdown"](item)                      # the text to put in the chat template
    REWARDS["countdown"]("<answer>3*5+7</answer>", item)
"""
import ast
import csv
import functools
import json
import random
import re
from fractions import Fraction
from itertools import permutations

import torch

from llada.model import CheckpointError


# Every reward is total: any string in, a float out, never an exception. And linear in the text: a
# lazy regex between two tags (<answer>(.*?)</answer>) is quadratic when the closing tag is missing, as
# it is in a long unfinished completion, so tags are found with str.find.
def tag_spans(text, open_tag, close_tag, dotall=True):
    """The contents of the non-overlapping open ... close pairs, left to right, each closed at the first
    close after its open: re.findall(open + "(.*?)" + close, text, re.DOTALL if dotall else 0), in O(len).
    Without dotall a pair may not span a newline: a start that meets one first fails, and so does every
    start before that newline."""
    pos, out, n = 0, [], len(text)
    while (i := text.find(open_tag, pos)) >= 0:
        start = i + len(open_tag)
        nl = -1 if dotall else text.find("\n", start)
        stop = n if nl < 0 else nl
        j = text.find(close_tag, start, stop)
        if j < 0 and stop == n:
            break
        out += [] if j < 0 else [text[start:j]]
        pos = stop + 1 if j < 0 else j + len(close_tag)
    return out


def last_tag(text, tag):
    m = tag_spans(text, f"<{tag}>", f"</{tag}>")
    return m[-1] if m else None


def first_tag(text, tag):                               # the first pair: re.search's match
    i = text.find(f"<{tag}>")
    j = text.find(f"</{tag}>", i + len(tag) + 2) if i >= 0 else -1
    return text[i + len(tag) + 2:j] if j >= 0 else None


def closing_brace(text, start):
    """Index of the '}' that brings the brace depth, counted from text[start], back to 0; None if none."""
    depth = 0
    for k in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if text[k] == "}" and depth == 0:
            return k
    return None


def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces matched), or None."""
    i = text.rfind("\\boxed")
    j = text.find("{", i) if i >= 0 else -1
    k = closing_brace(text, j) if j >= 0 else None
    return None if k is None else text[j + 1:k]


# ---- Sudoku 4x4
SUDOKU_SHOTS = [("3014002020004130", "3214142323414132"), ("0000100420013142", "4213132424313142"),
                ("2001403002001420", "2341413232141423")]


SUDOKU_SPLIT_SEED = 42                                 # SPG's; fixed, so that --seed cannot move the split


@functools.lru_cache(maxsize=1)
def sudoku_grids():
    """All 288 completed 4x4 Sudoku grids, as 16-character strings (rows, then columns)."""
    rows = list(permutations("1234"))
    ok = lambda g: all(len({g[r][c] for r in range(4)}) == 4 for c in range(4)) and all(   # noqa: E731
        len({g[r + i][c + j] for i in (0, 1) for j in (0, 1)}) == 4 for r in (0, 2) for c in (0, 2))
    return tuple("".join("".join(r) for r in g) for g in
                 ((a, b, c, d) for a in rows for b in rows for c in rows for d in rows) if ok(g))


@functools.lru_cache(maxsize=1)
def sudoku_table():
    return torch.tensor([[int(ch) for ch in g] for g in sudoku_grids()])        # (288, 16)


def sudoku_puzzle(grid, n_empty, rng):
    """Blank n_empty random cells of grid, again until the puzzle has one solution: {puzzle, solution}."""
    table = sudoku_table()
    while True:
        holes = rng.sample(range(16), n_empty)
        p = "".join("0" if i in holes else ch for i, ch in enumerate(grid))
        pt = torch.tensor([int(ch) for ch in p])
        if int(((table == pt) | (pt == 0)).all(1).sum()) == 1:
            return dict(puzzle=p, solution=grid)


def sudoku_test_set(n_test=256):
    """SPG-style held-out set, the same in every run: the grids split by solution, 200 for training (the
    exemplars' forced in) and 88 for the test set, n_test puzzles of those 88 (2 each, one more for the
    first 80), 7-9 empty cells, unique solutions."""
    rng = random.Random(SUDOKU_SPLIT_SEED)
    shots = {s for _, s in SUDOKU_SHOTS}
    rest = [g for g in sudoku_grids() if g not in shots]
    rng.shuffle(rest)
    test_grids = rest[200 - len(shots):]
    return [sudoku_puzzle(test_grids[i % len(test_grids)], rng.choice((7, 8, 9)), rng) for i in range(n_test)]


def sudoku_train_grids(test):
    """The grids that solve no puzzle of `test`: the only ones training may draw from."""
    held_out = {t["solution"] for t in test}
    return [g for g in sudoku_grids() if g not in held_out]


def sudoku_train_puzzle(grids, rng):
    """A training puzzle: a random grid of `grids`, 4-12 empty cells, a unique solution."""
    return sudoku_puzzle(rng.choice(grids), rng.randint(4, 12), rng)


def sudoku_row_only(puzzle):
    """A plausible wrong solver (the minority's foil in `python -m llada.sft --mix`): each row's empty
    cells get the digits that row is missing, in increasing order; columns and boxes are ignored. Every
    row it writes holds 1-4 once, so it looks like an answer; it is right where a row's order happens to
    be. E.g. the row 0 3 0 1 -> 2 3 4 1 (its missing 2, 4 in increasing order)."""
    out = []
    for r in range(4):
        row = puzzle[4 * r:4 * r + 4]
        missing = iter(sorted(set("1234") - set(row)))
        out += [next(missing) if ch == "0" else ch for ch in row]
    return "".join(out)


def sudoku_data(seed=0, test=None, n_train=4000):
    """(train, test). test is `sudoku_test_set()` unless given (e.g. SPG's test CSV). Training puzzles
    are drawn with `seed` from the grids that solve no test puzzle: no seed and no test file can put a
    test solution into training."""
    test = sudoku_test_set() if test is None else test
    train_grids = sudoku_train_grids(test)
    rng, shots = random.Random(seed), {p for p, _ in SUDOKU_SHOTS}
    train = [sudoku_train_puzzle(train_grids, rng) for _ in range(n_train)]
    return [t for t in train if t["puzzle"] not in shots], test


def sudoku_prompt(item):
    shot = lambda p, s: (f"Question:\nSolve the following Sudoku puzzle: {p}\nAnswer:\n<reasoning>\n"   # noqa: E731
                         f"Fill each 0 so that every row, column and 2x2 box holds 1-4 once.\n"
                         f"</reasoning>\n<answer>\n{s}\n</answer>\n\n")
    return ("Solve 4x4 Sudoku puzzles. The puzzle is 16 digits, row by row; 0 marks an empty cell. "
            "Give the solved grid as 16 digits inside <answer></answer>.\n\n" +
            "".join(shot(p, s) for p, s in SUDOKU_SHOTS) +
            f"Question:\nSolve the following Sudoku puzzle: {item['puzzle']}\nAnswer:\n")


def sudoku_short_prompt(item):
    """One line, zero-shot (`--protocol short`): what a small model trained from scratch can read. The
    answer format, reward and scorer are ours."""
    return f"Sudoku 4x4, 0 = empty; answer in <answer></answer>: {item['puzzle']}"


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


def arith(expr, python=False):
    """Value of an arithmetic expression of numbers, + - * / and parentheses, as a Fraction, or None.
    A whitelist over Python's parse tree: no names, calls or attributes can get through, and nothing
    is ever executed (no eval). python=True also takes ** (integer powers up to 64) and //, as the
    baselines' eval() does."""
    if len(expr) > 200:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    binops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}

    def power(a, b):
        if b.denominator != 1 or abs(b) > 64:
            raise ValueError("only integer powers up to 64")
        return a ** int(b)
    if python:
        binops.update({ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Pow: power})

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


def uses_exactly(expr, numbers):
    """Are the numbers written in expr exactly `numbers` (as a multiset)? Compared as digit strings, so
    that a 5,000-digit answer is just wrong, not an error (Python's int() refuses over 4,300 digits)."""
    return sorted(v.lstrip("0") or "0" for v in re.findall(r"\d+", expr)) == sorted(str(n) for n in numbers)


def countdown_reward(text, item):
    """1.0: uses exactly the given numbers and hits the target; 0.1: an answer that does not; 0: none."""
    ans = last_tag(text, "answer")
    if ans is None:
        return 0.0
    boxed = last_boxed(ans)                             # the eval prompt asks for \boxed{} in <answer>
    if boxed is not None:
        ans = boxed.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
    if not uses_exactly(ans, item["numbers"]):
        return 0.1
    if not re.fullmatch(r"[\d+\-*/(). \s]+", ans):
        return 0.1
    v = arith(ans)
    return 1.0 if v is not None and abs(v - item["target"]) < 1e-5 else 0.1


def countdown_prompt(item):
    return (f"Using only the numbers [{', '.join(map(str, item['numbers']))}], create an arithmetic expression "
            f"that evaluates to exactly {item['target']}. You may use +, -, *, / and parentheses, and each number "
            f"exactly once. Think in <reasoning></reasoning>, then give only the expression inside "
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
    s = s if s.startswith("\\text") else drop_final_text(s)
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


def drop_final_text(s):
    """re.sub(r"\\\\text\\{\\s*[^}]*\\}\\s*$", "", s) in O(len): a final \\text{...} (only whitespace after
    its '}', which is the last '}') goes, from the first \\text{ after the '}' before it."""
    b = s.rfind("}")
    if b < 0 or s[b + 1:].strip():
        return s
    i = s.find("\\text{", s.rfind("}", 0, b) + 1)
    return s[:i] if 0 <= i and i + 6 <= b else s


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
    """The last number in s, as a float; a/b and \\frac{a}{b} count as fractions (1/0: None)."""
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    s = re.sub(r"\\[dt]?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", r"\1/\2", s)
    m = re.findall(r"(-?\d+(?:\.\d+)?)(?:\s*/\s*(-?\d+(?:\.\d+)?))?", s)
    if not m:
        return None
    num, den = m[-1]
    if not den:
        return float(num)
    return float(num) / float(den) if float(den) != 0 else None


def format_terms(text, structure=True):
    """GSM8K's format rewards (d1/SPG): XML counts, and (structure=True) soft and strict structure."""
    r = sum(0.125 for t in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
            if text.count(t) == 1)
    if text.count("\n</answer>") == 1:
        r -= 0.001 * len(text.split("\n</answer>")[-1].strip())             # trailing text
    if structure:
        r += 0.5 * soft_format(text) + 0.5 * strict_format(text)
    return r


def soft_format(text):
    """re.match(r"<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", text, re.DOTALL), in O(len)."""
    if not text.startswith("<reasoning>"):
        return False
    k = text.find("</reasoning>", 11)
    while k >= 0:                                       # the first </reasoning> that <answer> follows
        a = k + 12
        while a < len(text) and text[a].isspace():      # \s is str.isspace
            a += 1
        if text.startswith("<answer>", a):
            return text.find("</answer>", a + 8) >= 0
        k = text.find("</reasoning>", k + 1)
    return False


def strict_format(text):
    """re.match(r"^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n?$", text, re.DOTALL),
    in O(len): $ also matches before a final newline, so the text may end in up to two."""
    mid = text.find("\n</reasoning>\n<answer>\n", 12) if text.startswith("<reasoning>\n") else -1
    ends = [len(text) - len(t) for t in ("\n</answer>", "\n</answer>\n", "\n</answer>\n\n") if text.endswith(t)]
    return mid >= 0 and any(mid + 23 <= e for e in ends)


def gsm8k_answer(text):
    ans = last_tag(text, "answer")
    boxed = last_boxed(text)
    return boxed if boxed is not None else ans


def gsm8k_reward(text, item, structure=True):
    """2.0 for the right number + 0.5 if the answer is an integer + format terms (max ~4); structure=False
    drops the soft and strict format terms, as the paper did."""
    ans = gsm8k_answer(text)
    gold = number(gsm8k_gold(item))
    r = format_terms(text, structure)
    r += 0.5 * bool(ans is not None and re.fullmatch(r"-?\d+", ans.strip().replace(",", "")))
    v = number(ans)
    return r + 2.0 * (v is not None and gold is not None and abs(v - gold) < 1e-6)


def math_reward(text, item):
    """2.0 if the last \\boxed{} is equivalent to the gold answer, + 0.5 x (1 for <answer>, + 1 if a
    \\boxed{} is inside it, else + 0.5): with no <answer> at all, 0.25, as in the baselines. Their code
    tests for the wrong escape and never gives the boxed branch; this one does."""
    ans = last_tag(text, "answer")
    fmt = (ans is not None) + (1.0 if ans is not None and "\\boxed" in ans else 0.5)
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


REWARDS = dict(sudoku=sudoku_reward, countdown=countdown_reward, gsm8k=gsm8k_reward, math=math_reward)
PROMPTS = dict(sudoku=sudoku_prompt, countdown=countdown_prompt, gsm8k=math_prompt, math=math_prompt)


# ============================================================================ data files
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


def countdown_item(row):
    """{numbers, target} of a Countdown row in any layout in use: ours {"numbers", "target"}, SPG's test
    file {"input": "30,100,93", "output": "23"}, Countdown-Tasks-3to4 {"nums", "target"}; else None."""
    try:
        nums, target = ((row.get("numbers", row.get("nums")), row["target"]) if "numbers" in row or "nums" in row
                        else (str(row["input"]).split(","), row["output"]))
        return dict(numbers=[int(str(v).strip()) for v in nums], target=int(str(target).strip()))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def read_countdown(path, what):
    rows = [countdown_item(r) for r in read_jsonl(path, what, fields=())]
    bad = next((k for k, r in enumerate(rows) if r is None), None)
    if bad is not None:
        raise CheckpointError(f"{path}: line {bad + 1} of {what} has no numbers/target, nums/target or "
                              f"input/output fields of integers")
    return rows


def read_sudoku_csv(path, what):
    """Puzzle,Solution rows of 16 digits (SPG's train_/test_sudoku_split_new.csv); 0 = an empty cell."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e})") from None
    items = [dict(puzzle=str(r.get("Puzzle") or "").zfill(16), solution=str(r.get("Solution") or "").zfill(16))
             for r in rows]
    if not items or any(not re.fullmatch(r"[0-4]{16}", t["puzzle"]) or not re.fullmatch(r"[1-4]{16}", t["solution"])
                        for t in items):
        raise CheckpointError(f"{path}: {what} needs a Puzzle,Solution header and 16-digit rows")
    return items


def task_data(args):
    """(train items, test items) of args.task; a data file given on the command line wins."""
    if args.task == "sudoku":
        test = read_sudoku_csv(args.test_data, "sudoku test") if args.test_data else None
        train, test = sudoku_data(args.seed, test)
        if args.train_data:
            train = read_sudoku_csv(args.train_data, "sudoku train")
            leak = {t["solution"] for t in train} & {t["solution"] for t in test}
            if leak:
                raise CheckpointError(f"{args.train_data}: {len(leak)} solution grids of the training file are "
                                      f"solutions of test puzzles too (a leak)")
        return train, test
    if args.task == "countdown":
        test = read_countdown(args.test_data, "countdown test") if args.test_data else countdown_data(10**6, 256)
        if not args.train_data:
            return countdown_data(args.seed, 20000, exclude=test), test
        train = [t for t in read_countdown(args.train_data, "countdown train") if len(t["numbers"]) == 3]
        if not train:                                   # the paper trains on the 3-number items only
            raise CheckpointError(f"{args.train_data}: no 3-number Countdown items")
        return train, test
    return (read_jsonl(args.train_data, f"{args.task} train") if not args.eval else [],
            read_jsonl(args.test_data, f"{args.task} test") if args.eval else [])
