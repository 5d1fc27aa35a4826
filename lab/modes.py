"""What a reward can draw out of a small Sudoku LLaDA made from SFT data of mixed quality (`python -m
llada.sft --mix M`): the modes of its answers, and the exact tilt of its own samples.

A mode is what a whole answer is: exactly the true solution, exactly the wrong solver's answer (the
mixture's other source, `llada/tasks.py: sudoku_row_only`), or neither. Where the two coincide (2% of
the test puzzles) the answer counts as true. `modes` measures the shares on the test puzzles, greedy
and at temperature 1 (with the rollouts' sampler: --block_length, --tokens_per_step), as the maze
reports distinct valid paths.

The exact target, as on the maze (maze/exact.py): the tilted law p_a ∝ p_0 e^{a r} of the base's own
temperature-1 samples, reweighted per prompt, w_j = e^{a r_j} / sum_k e^{a r_k} over a prompt's n
samples. Its mean reward and true-solution share at each a (`tilt_targets`) are what DTM's annealing
aims at, on the prompts it never trains on. How far a run got, `realised`: (final - base) / (tilt - base)
of the temperature-1 mean reward (and of the true share), a ratio of means over the prompts, paired,
with the ratio estimator's SE. The SE counts the prompts' and the samples' noise; not the bias of
self-normalising over n samples, which makes the tilt at large a the best of n (n = 8 by default).

    python -m lab.modes --model_dir runs/mixed                      # the base: modes and the tilt's targets
    python -m lab.modes --model_dir runs/mixed --adapter runs/elicit/adapter --reference runs/mixed/modes.json
"""
import argparse
import json
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llada.lora import add_lora, load_adapter, lora_layers                              # noqa: E402
from llada.model import CheckpointError, chat_prompt, decode, load_model, load_tokenizer   # noqa: E402
from llada.sampler import generate, left_pad                                              # noqa: E402
from llada.protocols import PROTOCOLS                                                  # noqa: E402
from llada.tasks import last_tag, sudoku_reward, sudoku_row_only, sudoku_test_set      # noqa: E402
from maze.mdm import Help                                                              # noqa: E402

WRONG = dict(row_only=sudoku_row_only)                 # llada/sft.py: WRONG_SOLVERS, by the names it records
MODES = ("true", "wrong", "other")
A_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 25.0, 40.0, 50.0, 100.0)


def mixture(model_dir):
    """The mixture a base was trained on, from its sft.json: (mix, wrong solver's name). One-line error
    for a directory that has no such record."""
    path = os.path.join(model_dir, "sft.json")
    try:
        with open(path) as f:
            rec = json.load(f)
        mix, wrong = float(rec["mix"]), rec["wrong_solver"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: no record of the SFT mixture (mix, wrong_solver); make the base with "
                              f"python -m llada.sft --mix M") from None
    if wrong not in WRONG:
        raise CheckpointError(f"{path}: unknown wrong solver {wrong!r} (known: {', '.join(WRONG)})")
    return mix, wrong


def answer_grid(text):
    """The 16 digits an answer gives, read as the evaluation reads it (the last <answer>, else the last
    run of 16 digits; separators dropped), or None."""
    ans = last_tag(text, "answer")
    if ans is None:
        runs = [w for w in "".join(ch if ch.isdigit() else " " for ch in text).split() if len(w) == 16]
        ans = runs[-1] if runs else None
    digits = None if ans is None else "".join(ch for ch in ans if ch.isdigit())
    return digits if digits and len(digits) == 16 else None


def mode_of(text, item, wrong="row_only"):
    """0 (true solution), 1 (the wrong solver's answer) or 2 (neither) for one completion."""
    g = answer_grid(text)
    return 0 if g == item["solution"] else 1 if g == WRONG[wrong](item["puzzle"]) else 2


@torch.no_grad()
def sample(model, tok, items, n, temperature, gen_length=24, block_length=8, tokens_per_step=2, batch=128,
           generator=None, protocol="short", return_ids=False):
    """n completions of each item with LLaDA's sampler (as the rollouts: gen_length / tokens_per_step
    steps): their texts, as a list of n-lists, and rewards (P, n); return_ids: also the tokens (P n, G)."""
    prompt_of, dev = PROTOCOLS[protocol]["prompts"]["sudoku"], model.ff_out.weight.device
    rows = [it for it in items for _ in range(n)]
    texts, ids_out = [], []
    model.eval()
    for j in range(0, len(rows), batch):
        chunk = rows[j:j + batch]
        ids, am = left_pad([chat_prompt(tok, prompt_of(it)) for it in chunk], model.cfg.eos_token_id, dev)
        comp = generate(model, ids, am, gen_length, gen_length // tokens_per_step, block_length, temperature,
                        generator=generator)
        texts += [decode(tok, c, model.cfg) for c in comp.tolist()]
        ids_out.append(comp.cpu())
    r = torch.tensor([sudoku_reward(t, it) for t, it in zip(texts, rows)], dtype=torch.float64).view(len(items), n)
    texts = [texts[i * n:(i + 1) * n] for i in range(len(items))]
    return (texts, r, torch.cat(ids_out)) if return_ids else (texts, r)


def shares(m):
    """m (P, n) modes -> {mode: share, mode_se: SE over the prompts}."""
    out = {}
    for k, name in enumerate(MODES):
        per = (m == k).double().mean(1)                                               # (P,)
        out[name], out[name + "_se"] = per.mean().item(), (per.std() / len(per) ** 0.5).item()
    return out


def tilt_targets(r, true, a_grid=A_GRID):
    """The tilted law of the samples at each a: per prompt, weights softmax(a r) over its n samples (r (P, n),
    true (P, n) bool). Returns {a: {reward, reward_se, true, true_se}} (means over the prompts, SE over
    them) and the per-prompt values {a: (reward (P,), true (P,))} for pairing."""
    table, per = {}, {}
    for a in a_grid:
        w = torch.softmax(a * r, 1)                                                   # (P, n)
        pr, pt = (w * r).sum(1), (w * true.double()).sum(1)
        per[a] = (pr, pt)
        table[a] = dict(reward=pr.mean().item(), reward_se=(pr.std() / len(pr) ** 0.5).item(),
                        true=pt.mean().item(), true_se=(pt.std() / len(pt) ** 0.5).item())
    return table, per


def realised(base, final, target):
    """(final - base) / (target - base) of per-prompt values (P,), a ratio of means, with the ratio
    estimator's SE (paired over prompts): {fraction, se}."""
    d, g = (final - base).double(), (target - base).double()
    f = d.mean() / g.mean()
    se = ((d - f * g).std() / len(d) ** 0.5 / g.mean().abs()).item()
    return dict(fraction=f.item(), se=se)


def load(model_dir, adapter=None, device="cpu"):
    """The model of model_dir, with a PEFT-layout adapter of ours folded in (its r, alpha and targets read
    from its adapter_config.json), and its tokenizer."""
    model, tok = load_model(model_dir, device), load_tokenizer(model_dir)
    if adapter:
        path = os.path.join(adapter, "adapter_config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file (a run saves its adapter at each phase's end)")
        try:
            with open(path) as f:
                c = json.load(f)
            targets = c["target_modules"].rsplit("(", 1)[1].rstrip(")").split("|")
            r, alpha = int(c["r"]), float(c["lora_alpha"])
        except (OSError, ValueError, KeyError, IndexError, AttributeError):
            raise CheckpointError(f"{path}: not an adapter config of llada/lora.py") from None
        add_lora(model, r, alpha, 0.0, targets)
        load_adapter(model, adapter)
        for m in lora_layers(model).values():
            m.merge()
    return model.eval(), tok


def measure(model, tok, items, wrong, samples=8, seed=0, a_grid=A_GRID, **sampler):
    """Modes greedy and at temperature 1, the temperature-1 mean reward, the tilt's targets of these samples;
    per-prompt values kept (`per_prompt`) for `realised` against another model's."""
    gen = torch.Generator(model.ff_out.weight.device).manual_seed(seed)
    out, per = {}, {}
    for name, T, n in (("greedy", 0.0, 1), ("t1", 1.0, samples)):
        texts, r = sample(model, tok, items, n, T, generator=gen, **sampler)
        m = torch.tensor([[mode_of(t, it, wrong) for t in row] for row, it in zip(texts, items)])
        out[name] = dict(shares(m), reward=r.mean().item(), reward_se=(r.mean(1).std() / len(r) ** 0.5).item())
        solved = (m == 0).any(1).double()                                          # pass@n: any sample true
        out[name].update(pass_at=n, solved=solved.mean().item(), solved_se=(solved.std() / len(solved) ** 0.5).item())
        per[name] = dict(reward=r.mean(1).tolist(), true=(m == 0).double().mean(1).tolist(), r=r.tolist(),
                         modes=m.tolist())
        if name == "t1":
            out["tilt"] = {f"{a:g}": v for a, v in tilt_targets(r, m == 0, a_grid)[0].items()}
    out["per_prompt"] = per
    return out


def realised_against(reference, result, a):
    """How far `result` got towards the tilt at a of the base `reference` (both measure()'s, same items):
    {reward: realised(...), true: realised(...)} of the temperature-1 samples."""
    ref, new = reference["per_prompt"]["t1"], result["per_prompt"]["t1"]
    if len(ref["r"]) != len(new["r"]):
        raise ValueError(f"the reference has {len(ref['r'])} test puzzles, this model {len(new['r'])}")
    t = lambda d, k: torch.tensor(d[k], dtype=torch.float64)                          # noqa: E731
    _, per = tilt_targets(t(ref, "r"), torch.tensor(ref["modes"]) == 0, (a,))
    return {k: realised(t(ref, k), t(new, k), per[a][j]) for j, k in enumerate(("reward", "true"))}


def by_base_share(reference, result):
    """Where a model stands below the tilt's ceiling: the test puzzles grouped by how many of the base's n
    temperature-1 samples solve each (reference: the base's measure() with many samples, e.g. 64; groups 0, 1,
    2 to n/8, ..., n/2 + 1 to n), and in each group this model's greedy share solved and its temperature-1
    modes. Returns rows of (group, puzzles, greedy solved, t1 true, t1 wrong, t1 other)."""
    base = torch.tensor(reference["per_prompt"]["t1"]["modes"])                     # (P, n)
    solved, n = (base == 0).sum(1), base.shape[1]
    greedy = torch.tensor(result["per_prompt"]["greedy"]["modes"])[:, 0] == 0
    t1 = torch.tensor(result["per_prompt"]["t1"]["modes"])
    if len(solved) != len(greedy):
        raise ValueError(f"the reference has {len(solved)} test puzzles, this model {len(greedy)}")
    rows, edges = [], sorted({0, 1, n // 8, n // 4, n // 2, n})
    for lo, hi in zip([-1] + edges[:-1], edges):
        pick = (solved > lo) & (solved <= hi)
        if pick.any():
            rows.append((f"{hi} of {n}" if hi - lo == 1 else f"{lo + 1}-{hi} of {n}", int(pick.sum()),
                         greedy[pick].double().mean().item(),
                         *((t1[pick] == k).double().mean().item() for k in range(3))))
    return rows


def report(res, name):
    g, t = res["greedy"], res["t1"]
    line = lambda s: " / ".join(f"{s[m]:.3f}" for m in MODES)                         # noqa: E731
    print(f"{name}: greedy true / wrong / other {line(g)}; temperature 1: {line(t)} "
          f"(SE {t['true_se']:.3f}); mean reward at temperature 1 {t['reward']:.3f} ± {t['reward_se']:.3f}; "
          f"pass@{t['pass_at']} (puzzles solved by any of the samples; of the base with many samples: the exact "
          f"tilt's whole-puzzle accuracy as a -> infinity) {t['solved']:.3f} ± {t['solved_se']:.3f}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--model_dir", required=True, help="a small LLaDA made by python -m llada.sft --mix "
                                                      "(its sft.json names the wrong solver)")
    p.add_argument("--adapter", help="a LoRA adapter of llada_finetune.py to fold in")
    p.add_argument("--base_dir", help="where the mixture's record is (default: --model_dir)")
    p.add_argument("--samples", type=int, default=8, help="temperature-1 samples per test puzzle")
    p.add_argument("--limit", type=int, default=0, help="first N test puzzles only (0: all 256)")
    p.add_argument("--reference", help="the base's modes.json: also report how far this model got towards "
                                       "the base's tilt at --a")
    p.add_argument("--a", type=float, default=50.0, help="the tilt of --reference to measure against (a run's a_max)")
    p.add_argument("--gen_length", type=int, default=24, help="as --preset tiny")
    p.add_argument("--block_length", type=int, default=8, help="as --preset tiny")
    p.add_argument("--tokens_per_step", type=int, default=2, help="as --preset tiny")
    p.add_argument("--batch", type=int, default=128, help="sequences per sampling batch")
    p.add_argument("--seed", type=int, default=0, help="seeds the temperature-1 samples")
    p.add_argument("--out", help="write the result as JSON here (default: MODEL_DIR/modes.json, or "
                                 "ADAPTER/../modes.json)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    try:
        _, wrong = mixture(args.base_dir or args.model_dir)
        reference = None
        if args.reference:
            with open(args.reference) as f:
                reference = json.load(f)
        model, tok = load(args.model_dir, args.adapter)
        items = sudoku_test_set()[:args.limit or None]
        res = measure(model, tok, items, wrong, args.samples, args.seed, gen_length=args.gen_length,
                      block_length=args.block_length, tokens_per_step=args.tokens_per_step, batch=args.batch)
        if reference is not None:
            res["realised"] = realised_against(reference, res, args.a)
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    report(res, args.adapter or args.model_dir)
    if reference is None:
        print("the tilt of these temperature-1 samples (mean reward, true share): " + "; ".join(
            f"a = {a}: {v['reward']:.3f}, {v['true']:.3f}" for a, v in res["tilt"].items()))
    else:
        r = res["realised"]
        print(f"realised fraction of the base's tilt at a = {args.a:g}: reward {r['reward']['fraction']:.2f} ± "
              f"{r['reward']['se']:.2f}, true share {r['true']['fraction']:.2f} ± {r['true']['se']:.2f}")
        print("| the base's share of true samples per puzzle | puzzles | this model, greedy: solved | temperature 1:"
              " true / wrong / other |\n|---|---|---|---|")
        for b, n, g, *m in by_base_share(reference, res):
            print(f"| {b} | {n} | {g:.3f} | {' / '.join(f'{x:.3f}' for x in m)} |")
    out = args.out or os.path.join(os.path.dirname(args.adapter.rstrip("/")) if args.adapter else args.model_dir,
                                   "modes.json")
    with open(out, "w") as f:
        json.dump(res, f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
