"""The two evaluation protocols of the LLaDA tasks: ours (llada/tasks.py) and the paper's, whose Table 1
numbers come from the published evaluation code, and the evaluation loop that scores a model with both.

The paper's protocol: the DTM authors' prompts and parsers for Countdown and Sudoku (no prefill; Sudoku
3-shot), SPG's for GSM8K and MATH500 (a "<reasoning>" prefill after the assistant header). Its scorers
read the raw decoded completion, special tokens included. Written from their documented behaviour; none
of their code is used. Every parser is linear in the text (llada/tasks.py says why).

    from llada.protocols import PROTOCOLS, SCORERS, run_eval
    PROTOCOLS["paper"]["prompts"]["sudoku"](item)   # the text to put in the chat template
    SCORERS["paper"][0]("sudoku", completion, item)  # (correct cells, empty cells)
"""
import math
import re

import torch
import torch.distributed as dist
from tqdm import tqdm

from llada.lora import add_lora, load_adapter, lora_layers
from llada.model import chat_prompt, decode, load_model, load_tokenizer
from llada.sampler import generate, left_pad
from llada.tasks import (MATH_PROMPT, PROMPTS, REWARDS, SUDOKU_SHOTS, accuracy, arith, closing_brace, first_tag,
                         gsm8k_gold, gsm8k_reward, math_equiv, number, sudoku_short_prompt, tag_spans, task_data,
                         uses_exactly)


PAPER_FORMAT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
PAPER_SUDOKU_SYSTEM = (
    "\nPlease solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading "
    "left-to-right, top-to-bottom, where '0' represents empty cells.\n\nRules:\n- Fill empty cells with digits "
    "1-4\n- Each row must contain digits 1-4 exactly once\n- Each column must contain digits 1-4 exactly once\n"
    "- Each 2x2 box must contain digits 1-4 exactly once\n\nImportant: Your solution must be a COMPLETE "
    "16-character string with only the digits 1-4, representing your final solved grid.\n\nRespond in this "
    "exact format:\n<reasoning>\nYour step-by-step solving process\n</reasoning>\n<answer>\n[16-character "
    "solution string with no spaces or separators]\n</answer>\n")
PAPER_SUDOKU_REASONING = [             # the worked reasoning of the 3 exemplars (SUDOKU_SHOTS), in order
    "Fill easy singles:\nR1 missing 2 → R1C2=2.\nR4 missing 2 → R4C4=2.\nBox D (R3-4,C3-4) then needs "
    "{1,4}; column4 can only accept 1 → R3C4=1, R3C3=4.\nR3 now missing 3 → R3C2=3.\nColumn1 missing 1 → "
    "R2C1=1.\nColumn2 missing 4 → R2C2=4.\nLast cell R2C4=3.\n",
    "Fill easy singles:\nCol1 missing 4 → R1C1=4.\nCol4 missing 3 → R1C4=3.\nBox A (R1-2,C1-2) missing "
    "{2,3} and R1 now needs {1,2} → R1C2=2, R2C2=3.\nR1C3=1.\nR2 now missing 2 → R2C3=2.\nCol2 missing 4 → "
    "R3C2=4, then R3C3=3.\n",
    "Fill easy singles:\nR1 missing {3,4}; Col2 can't be 1 so R1C2=3 → R1C3=4.\nR4 missing 3 → R4C4=3.\n"
    "Col4 missing {2,4}; R2 must take 2 → R2C4=2 → R2C2=1.\nCol1 missing 3 → R3C1=3.\nCol3 missing 1 → "
    "R3C3=1 → R3C4=4.\n"]
PREFILL = dict(gsm8k="<reasoning>", math="<reasoning>")        # appended after the chat template (SPG)


def grid_rows(g):
    return "\n".join(f"R{r + 1}: {' '.join(g[4 * r:4 * r + 4])}" for r in range(4))


def paper_sudoku_prompt(item):
    shots = "\n\n".join(
        f"Question:\nSolve the following Sudoku puzzle: {p}\nAnswer:\n<reasoning>\nInterpret puzzle as 4 rows "
        f"of 4:\n{grid_rows(p)}\n\n{why}\nFinal grid:\n{grid_rows(s)}\n</reasoning>\n<answer>\n{s}\n</answer>"
        for (p, s), why in zip(SUDOKU_SHOTS, PAPER_SUDOKU_REASONING))
    question = f"Question: Solve the following Sudoku puzzle: {item['puzzle']}\nAnswer:\n"
    return f"{PAPER_SUDOKU_SYSTEM}\n\n{shots}\n\n{question}"


def paper_countdown_prompt(item):
    return (f"{PAPER_FORMAT}\nUsing only the numbers {list(item['numbers'])}, create an arithmetic expression "
            f"that evaluates to exactly {item['target']}. You must use all numbers from the list, and each number "
            f"must be used exactly once. You may use the operations +, -, *, and / as needed. After reasoning, "
            f"provide only your final expression inside <answer></answer> tags without including an equals sign "
            f"or the target number. For example, if the numbers are [2, 3, 4] and the target is 5, a valid answer "
            f"is: <answer>\n2*4-3\n</answer>")


def paper_math_prompt(item):           # SPG's; the paper's Fig. 8 text was not available to us
    return MATH_PROMPT.replace("\\boxed{}.\n", "\\boxed{}. \n").rstrip("\n") + "\n\n" + item["question"]


def first_answer(text):
    m = first_tag(text, "answer")
    return m.strip() if m is not None else None


def first_number(s, last=False):
    """SPG's number reading: the whole string as a float, else its first (or last) number."""
    try:
        return float(s)
    except (ValueError, OverflowError):
        m = re.findall(r"-?\d+\.?\d*", s)
        return float(m[-1 if last else 0]) if m else None


def paper_gsm8k_answer(text):
    """SPG: the first non-empty \\boxed{...} up to its first '}', else the first <answer>, else the text after
    the last <answer> (an unclosed one too), each as a number."""
    for b in tag_spans(text, "\\boxed{", "}", dotall=False):  # re.findall(r"\\boxed{(.*?)}", text)
        b = b.strip()
        if b and not re.fullmatch(r"\.+", b) and (v := first_number(b)) is not None:
            return v
    ans = first_answer(text)
    if ans and (v := first_number(ans, last=True)) is not None:
        return v
    rest = text.split("<answer>")[-1].split("</answer>")[0].strip()
    return first_number(rest, last=True) if rest else None


def spg_last_boxed(text):
    """d1/SPG's `remove_boxed(last_boxed_only_string(text))`: the content of the last \\boxed{...}, the whole
    text when it has no \\boxed, None when the last one is never closed."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    i = text.rfind("\\boxed") if "\\boxed" in text else text.rfind("\\fbox")
    if i < 0:
        return text
    j = closing_brace(text, i)
    if j is None:
        return None
    box = text[i:j + 1]
    return box[7:-1] if box.startswith("\\boxed{") else box


def paper_math_answer(text):
    """SPG: the last \\boxed{...} (a text with no \\boxed is its own answer); an unclosed one falls back to
    the first <answer>."""
    box = spg_last_boxed(text)
    return box if box else first_answer(text)


def countdown_correct(eq, item):
    """The baselines' check of an extracted expression: LaTeX operators mapped, the part before '= value' if
    there is one; the right numbers, allowed characters only, |value - target| < 1e-5."""
    eq = eq.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    # re.search(r"([0-9+\-*/() ]+)=[0-9. ]+", eq) in O(len): the first maximal run of those characters
    # that '=' and a digit, '.' or ' ' follow
    for m in re.finditer(r"[0-9+\-*/() ]+", eq):
        if eq[m.end():m.end() + 1] == "=" and eq[m.end() + 1:m.end() + 2] in tuple("0123456789. "):
            eq = m.group().strip()
            break
    if not uses_exactly(eq, item["numbers"]) or not re.match(r"^[\d+\-*/().\s]+$", eq):
        return False
    v = arith(eq, python=True)
    return v is not None and abs(v - item["target"]) < 1e-5


def paper_countdown_correct(text, item):
    """The DTM authors' parser: the first <answer>, else the whole text."""
    ans = first_answer(text)
    return countdown_correct(text if ans is None else ans, item)


def spg_countdown_correct(text, item):
    """SPG's parser: the last \\boxed{} (the whole text if there is none); if it is never closed, the first
    <answer>, else the whole text."""
    eq = spg_last_boxed(text)
    if eq is None:
        eq = first_answer(text)
    return countdown_correct(text if eq is None else eq, item)


EOT = ("<|eot_id|>", "<|endoftext|>")


def first_of(text, needles, start):
    """The smallest index >= start at which one of the needles begins, or -1."""
    return min((k for k in (text.find(n, start) for n in needles) if k >= 0), default=-1)


def paper_sudoku_answers(text):
    """The groups of the published cascade's five patterns, in order, None where one does not match:
        <answer>.*?```\\s*([\\d\\s]+)```             <answer>(.*?)(?:EOT|</answer>)
        </answer>\\s*(.*?)(?:EOT|$)                 .*?(\\d{16})\\s*</answer>          \\b(\\d{16})\\b
    (re.search, DOTALL; EOT: <|eot_id|> or <|endoftext|>), found with str.find, so that a long completion
    with unclosed tags costs O(len) and not the regexes' O(len^2). \\d is str.isdecimal, \\s str.isspace."""
    n, i, c = len(text), text.find("<answer>"), text.find("</answer>")
    out = [None] * 5
    k = text.find("```", i + 8) if i >= 0 else -1
    while k >= 0:                                      # 1: the first ``` that a digit/space run and ``` follow
        e = j = k + 3
        while e < n and (text[e].isdecimal() or text[e].isspace()):
            e += 1
        if e > j and text.startswith("```", e):
            lead = len(text[j:e]) - len(text[j:e].lstrip())
            out[0] = text[e - 1:e] if lead == e - j else text[j + lead:e]  # \\s* gives one back if need be
            break
        k = text.find("```", k + 1)
    if i >= 0 and (k := first_of(text, EOT + ("</answer>",), i + 8)) >= 0:
        out[1] = text[i + 8:k]
    if c >= 0:                                         # 3: $ is the end, or before a final newline
        p = c + 9
        while p < n and text[p].isspace():
            p += 1
        end = n - 1 if text.endswith("\n") and n - 1 >= p else n
        k = first_of(text, EOT, p)
        out[2] = text[p:end if k < 0 else min(k, end)]
    while c >= 0:                                      # 4: 16 digits, then only whitespace, then </answer>
        w = c
        while w > 0 and text[w - 1].isspace():
            w -= 1
        if w >= 16 and text[w - 16:w].isdecimal():
            out[3] = text[w - 16:w]
            break
        c = text.find("</answer>", c + 1)
    m = re.search(r"\b(\d{16})\b", text)
    out[4] = m.group(1) if m else None
    return out


def paper_sudoku_cells(text, item):
    """The DTM authors' (= SPG's) cascade: the first of five patterns that yields text, whitespace removed,
    separators kept, padded or cut to 16 characters."""
    empty = [i for i, ch in enumerate(item["puzzle"]) if ch == "0"]
    for g in paper_sudoku_answers(text):
        if g is not None and g.strip():
            ans = (re.sub(r"\s", "", g) + "0" * 16)[:16]
            return sum(ans[i] == item["solution"][i] for i in empty), len(empty)
    return 0, len(empty)


def paper_accuracy(task, text, item):
    """(correct, total) as the published evaluation code scores the raw completion."""
    if task == "sudoku":
        return paper_sudoku_cells(text, item)
    if task == "countdown":
        return float(paper_countdown_correct(text, item)), 1
    if task == "gsm8k":
        v, gold = paper_gsm8k_answer(text), number(gsm8k_gold(item))
        return float(v is not None and v == gold), 1
    return float(math_equiv(paper_math_answer(text), item["answer"])), 1


def paper_gsm8k_reward(text, item):
    """GSM8K's reward without the soft and strict format terms, which the paper removed."""
    return gsm8k_reward(text, item, structure=False)


# ============================================================================ the protocols
PAPER_REWARDS = dict(REWARDS, gsm8k=paper_gsm8k_reward)
PAPER_PROMPTS = dict(sudoku=paper_sudoku_prompt, countdown=paper_countdown_prompt, gsm8k=paper_math_prompt,
                     math=paper_math_prompt)
# short: ours, with Sudoku's prompt cut to one line for a small model (llada/sft.py); scored as ours.
PROTOCOLS = dict(ours=dict(prompts=PROMPTS, rewards=REWARDS, prefill={}, scorer="ours"),
                 paper=dict(prompts=PAPER_PROMPTS, rewards=PAPER_REWARDS, prefill=PREFILL, scorer="paper"),
                 short=dict(prompts=dict(PROMPTS, sudoku=sudoku_short_prompt), rewards=REWARDS, prefill={},
                            scorer="ours"))


def spg_accuracy(task, text, item):
    """SPG's scorer: the paper's, but for Countdown's parser (the last \\boxed{}, not the first <answer>)."""
    return (float(spg_countdown_correct(text, item)), 1) if task == "countdown" else paper_accuracy(task, text, item)


# name: (scorer, reads the raw completion); evaluation reports each (SPG's only where it differs: Countdown)
SCORERS = dict(ours=(accuracy, False), paper=(paper_accuracy, True), spg=(spg_accuracy, True))


# ============================================================================ evaluation
def summarise(sums):
    """sums (7,) over items of (c, t, c^2, t^2, c t, whole, n), c = correct, t = scored (Sudoku: cells):
    accuracy C / T with the ratio estimator's SE, and the share of items wholly right with its SE."""
    c, t, cc, tt, ct, whole, n = sums.tolist()
    acc = c / max(t, 1)
    var = max(cc - 2 * acc * ct + acc ** 2 * tt, 0.0) / max(n - 1, 1)        # of c_i - acc t_i
    w = whole / max(n, 1)
    return dict(acc=acc, se=math.sqrt(var / max(n, 1)) / max(t / max(n, 1), 1e-12), whole=w,
                whole_se=math.sqrt(w * (1 - w) / max(n - 1, 1)), n=int(n))


@torch.no_grad()
def evaluate(model, tok, task, items, gen_length, batch=8, block_length=32, protocol="ours"):
    """The paper's sampling protocol: chat template, block 32, steps = gen_length / 2, temperature 0,
    with the prompts (and prefill) of `protocol`. Every completion is scored by every scorer of
    SCORERS. Returns {scorer: summarise(...)}: accuracy (Sudoku: cells; the others: questions) and the
    share of items wholly right, with standard errors, over all ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    P, names = PROTOCOLS[protocol], [n for n in SCORERS if n != "spg" or task == "countdown"]
    mine = items[rank::world]
    dev = model.ff_out.weight.device
    sums = torch.zeros(len(names), 7, dtype=torch.float64, device=dev)
    model.eval()
    for j in tqdm(range(0, len(mine), batch), desc=f"{task} gen {gen_length}", disable=rank != 0):
        chunk = mine[j:j + batch]
        ids, am = left_pad([chat_prompt(tok, P["prompts"][task](it), P["prefill"].get(task, "")) for it in chunk],
                           model.cfg.eos_token_id, dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            comp = generate(model, ids, am, gen_length, gen_length // 2, block_length, 0.0)
        for c, it in zip(comp.tolist(), chunk):
            text = {raw: decode(tok, c, model.cfg, raw=raw) for raw in (False, True)}
            ok = torch.tensor([SCORERS[n][0](task, text[SCORERS[n][1]], it) for n in names],
                              dtype=torch.float64, device=dev)                            # (scorers, 2)
            sums += torch.stack([ok[:, 0], ok[:, 1], ok[:, 0] ** 2, ok[:, 1] ** 2, ok[:, 0] * ok[:, 1],
                                 (ok[:, 0] == ok[:, 1]).double(), torch.ones_like(ok[:, 0])], 1)
    if world > 1:
        dist.all_reduce(sums)
    return {n: summarise(sums[k].cpu()) for k, n in enumerate(names)}


def run_eval(args):
    dev = torch.device(args.device)
    model = load_model(args.model_dir, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32,
                       not args.skip_finite_check)
    tok = load_tokenizer(args.model_dir)
    if args.adapter:
        add_lora(model, args.lora_r, args.lora_alpha, 0.0, args.lora_targets)
        load_adapter(model, args.adapter)
        for m in lora_layers(model).values():
            m.merge()                                   # inference only: fold B A into W
    items = task_data(args)[1][:args.eval_limit or None]
    acc = {L: evaluate(model, tok, args.task, items, L, args.eval_batch, args.block_length, args.protocol)
           for L in args.eval_lengths}
    if not dist.is_initialized() or dist.get_rank() == 0:
        mine, unit = PROTOCOLS[args.protocol]["scorer"], "cells" if args.task == "sudoku" else "questions"
        print(f"\nprompts: {args.protocol} protocol; first row: its scorer, then the others'; accuracy over "
              f"{unit} ± SE" + (" (whole puzzles ± SE)" if args.task == "sudoku" else ""))
        print(f"| task | {' | '.join(f'gen {L}' for L in acc)} |\n|---|{'---|' * len(acc)}")
        for n in sorted(acc[args.eval_lengths[0]], key=lambda n: n != mine):
            label = f"{args.task} ({len(items)})" + ("" if n == mine else f", {n} scorer")
            cells = [f"{100 * a[n]['acc']:.1f} ± {100 * a[n]['se']:.1f}" +
                     (f" ({100 * a[n]['whole']:.1f} ± {100 * a[n]['whole_se']:.1f})" if args.task == "sudoku" else "")
                     for a in acc.values()]
            print(f"| {label} | {' | '.join(cells)} |")
    return acc
