"""The documents cannot drift from the code: every `python ...` and `torchrun ...` command in README.md,
llada/README.md and the lab's documents (lab/README.md, FINDINGS_maze.md, FINDINGS_llada.md) parses with
its own script's parser (nothing is run), and every file and figure they name exists. Square brackets in a command mark optional flags ([--seed S]) and
are dropped; a trailing "..." stands for flags given earlier in the same paragraph.
"""
import argparse
import os
import re
import shlex

import pytest

import dtm
import grpo
import llada_finetune
from lab import cache_agreement, capacity, experiments, modes, refit, rft, rl_report, sudoku_report
from llada import sft
from maze import mdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "lab/README.md", "lab/FINDINGS_maze.md", "lab/FINDINGS_llada.md", "llada/README.md"]
PARSERS = {"dtm.py": lambda a: dtm.parser().parse_args(a),
           "grpo.py": lambda a: grpo.parser().parse_args(a),
           "-m lab.rl_report": lambda a: rl_report.parser().parse_args(a),
           "-m lab.experiments": lambda a: experiments.parser().parse_args(a),
           "-m maze.mdm": lambda a: mdm.parser().parse_args(a),
           "-m lab.capacity": capacity.parse,
           "-m lab.refit": lambda a: refit.parser().parse_args(a),
           "-m lab.cache_agreement": lambda a: cache_agreement.parser().parse_args(a),
           "-m llada.sft": lambda a: sft.parser().parse_args(a),
           "-m lab.modes": lambda a: modes.parser().parse_args(a),
           "-m lab.rft": lambda a: rft.parser().parse_args(a),
           "-m lab.sudoku_report": lambda a: sudoku_report.parser().parse_args(a),
           "llada_finetune.py": lambda a: llada_finetune.parser().parse_args(a)}
NO_ARGS = ("lab/tabular.py", "-m maze.env")


def commands(path):
    """(line, command) of every python / torchrun command: fenced lines and inline code spans."""
    text = open(os.path.join(ROOT, path)).read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())
            if line.startswith(("python ", "torchrun ")):
                found.append(line)
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        span = " ".join(span.split())
        if span.startswith(("python ", "torchrun ")):
            found.append(span)
    return found


def split(command):
    """(script, args) of a command, with [optional] parts, a trailing ... and torchrun's own flags gone."""
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", command).replace(" ...", ""))
    if words[0] == "torchrun":
        words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
    words = words[1:]
    if words[0] == "-m":
        return " ".join(words[:2]), words[2:]
    return words[0], words[1:]


ALL = [(doc, c) for doc in DOCS for c in commands(doc)]


def test_the_documents_hold_commands_to_check():
    assert {doc for doc, _ in ALL} == set(DOCS) and len(ALL) > 40


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_every_command_in_the_documents_parses(doc, command):
    script, args = split(command)
    if script == "-m pytest":
        paths = [a for k, a in enumerate(args) if not a.startswith("-") and (k == 0 or args[k - 1] not in ("-m", "-k"))]
        assert all(os.path.exists(os.path.join(ROOT, a.split("::")[0])) for a in paths)   # -m slow: a marker
        return
    if script in NO_ARGS:
        assert not args and (script.startswith("-m") or os.path.isfile(os.path.join(ROOT, script)))
        return
    assert script in PARSERS, f"{doc}: no parser known for {command!r}"
    try:
        PARSERS[script](args)
    except (SystemExit, argparse.ArgumentError):
        pytest.fail(f"{doc}: {command!r} does not parse")


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_and_figure_the_documents_link_exists(doc):
    text = open(os.path.join(ROOT, doc)).read()
    here = os.path.dirname(os.path.join(ROOT, doc))
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(here, target)), f"{doc} links {target}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_the_documents_cite_exists(doc):
    text = open(os.path.join(ROOT, doc)).read()
    defined = set()
    for name in os.listdir(os.path.join(ROOT, "tests")):
        if name.endswith(".py"):
            defined |= set(re.findall(r"def (test_\w+)", open(os.path.join(ROOT, "tests", name)).read()))
    cited = set(re.findall(r"`(test_\w+)`", text)) | set(re.findall(r"\b(test_\w+)\b(?!\.)", text))
    cited = {c for c in cited if not os.path.exists(os.path.join(ROOT, "tests", c + ".py"))
             and not c.startswith(("test_data", "test_sudoku_split"))}
    assert cited <= defined, sorted(cited - defined)


@pytest.mark.parametrize("doc", DOCS)
def test_no_table_row_is_split_by_a_pipe_inside_code(doc):
    """Markdown splits a table row at every unescaped |, also inside `code`: write \\| there."""
    for n, line in enumerate(open(os.path.join(ROOT, doc)), 1):
        if line.startswith("|"):
            for span in re.findall(r"`[^`]*`", line):
                assert not re.search(r"(?<!\\)\|", span), f"{doc}:{n}: {span}"


def test_the_elicit_results_file_has_a_row_per_run_and_the_readme_shows_its_table():
    """figures/elicit.json (python -m lab.sudoku_report --json): one row per run with the fields a reader
    needs, at least 3 seeds per method, and README.md's table is results_table of those rows, line by line."""
    import json
    rows = json.load(open(os.path.join(ROOT, "figures", "elicit.json")))
    fields = {"method", "seed", "base_acc", "final_acc", "base_whole", "final_whole", "true_share", "rollouts",
              "seconds", "curve", "ceiling_whole"}
    assert rows and all(fields <= set(r) for r in rows)
    assert len({r["ceiling_whole"] for r in rows}) == 1 and 0 < rows[0]["ceiling_whole"] <= 1   # one base's pass@64
    for r in rows:                                  # the curve runs from the base to the end, in order
        c = r["curve"]
        assert (c[0]["rollouts"], c[0]["acc"], c[0]["whole"]) == (0, r["base_acc"], r["base_whole"])
        assert (c[-1]["rollouts"], c[-1]["seconds"], c[-1]["acc"]) == (r["rollouts"], r["seconds"], r["final_acc"])
        assert all(a["rollouts"] <= b["rollouts"] and a["seconds"] <= b["seconds"] for a, b in zip(c, c[1:]))
    methods = {r["method"] for r in rows}
    assert methods <= {"dtm", "control", "d1", "rft", "sft"} and {"dtm", "control"} <= methods
    for m in methods:
        assert len({r["seed"] for r in rows if r["method"] == m}) >= 3, m
    readme = open(os.path.join(ROOT, "README.md")).read()
    for line in sudoku_report.results_table(rows):
        assert line in readme, line


def maze_numbers(h):
    """The README's maze numbers, rebuilt from a run's history (the committed figures/metrics_phi1_eta0.1.json)."""
    base, end = h[0], h[-1]
    pm = lambda row, k, d=3: f"{row[k]:.{d}f} ± {row[k + '_se']:.{d}f}"          # noqa: E731
    a = f"a = {end['a']:g}"
    return [f"| the base, {base['n']:,} rollouts | {pm(base, 'validity')} | {pm(base, 'reward')} |",
            f"| after DTM to {a}, {end['n']:,} rollouts | **{pm(end, 'validity')}** | **{pm(end, 'reward')}** |",
            f"| the exact tilt of the base at {a} | {end['exact_validity']:.3f} | {end['exact_reward']:.3f} |",
            f"| realised fraction of the exact gain | **{pm(end, 'realised_validity', 2)}** | "
            f"**{pm(end, 'realised_reward', 2)}** |",
            f"{end['distinct_valid_per_prompt']:.1f} ± {end['distinct_valid_per_prompt_se']:.1f} distinct valid paths "
            f"of 16 per prompt at {a} (base {base['distinct_valid_per_prompt']:.1f})",
            f"a fifth of the exact gain (validity {pm(end, 'realised_validity', 2)}, reward "
            f"{pm(end, 'realised_reward', 2)};"]


def test_the_readmes_maze_numbers_are_the_committed_runs():
    """README.md's maze table and the maze numbers of 'What we reproduce', line by line from the committed
    metrics of the main command (python dtm.py --phi 1 --eta 0.1 --figures figures); its seconds are the run's
    wall time, at least the phases' own training and evaluation seconds."""
    import json
    h = json.load(open(os.path.join(ROOT, "figures", "metrics_phi1_eta0.1.json")))
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert h[-1]["a"] == 1.0 and len(h) == 11                       # the main command: 10 phases of eta 0.1
    for line in maze_numbers(h):
        assert line in readme, line
    seconds = int(re.search(r"seed 0, (\d+) s\)", readme).group(1))
    phases = sum(r.get("train_s", 0) + r.get("eval_s", 0) for r in h)
    assert phases <= seconds <= phases + 30, (phases, seconds)


def imported_modules(path):
    """The top-level names of every module a file imports (import x.y, from x.y import z: x)."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(f"{d}/{f}" for d in ("maze", "llada") for f in os.listdir(os.path.join(ROOT, d))
                                        if f.endswith(".py")))
def test_the_library_imports_no_script_and_not_the_lab(path):
    assert not imported_modules(path) & {"dtm", "grpo", "llada_finetune", "lab"}


@pytest.mark.parametrize("path", ["dtm.py", "grpo.py", "llada_finetune.py"])
def test_the_scripts_do_not_import_the_lab(path):
    assert "lab" not in imported_modules(path)


def test_a_slow_test_named_by_its_node_id_is_collected_and_its_file_alone_leaves_it_out(tmp_path):
    """conftest.py: the default run leaves the slow tests out, but one named by its node id runs (here a copy of
    the conftest beside a file of one slow and one fast test, collected by a pytest of its own)."""
    import shutil
    import subprocess
    import sys
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path)
    (tmp_path / "test_two.py").write_text("import pytest\n\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n\n\n"
                                          "def test_fast():\n    pass\n")

    def collected(*args):
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                           cwd=tmp_path, capture_output=True, text=True)
        return [line for line in r.stdout.splitlines() if "::" in line]
    assert collected("test_two.py") == ["test_two.py::test_fast"]
    assert collected("test_two.py::test_slow") == ["test_two.py::test_slow"]
