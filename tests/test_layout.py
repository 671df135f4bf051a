"""
The house, checked against the files themselves (their imports, their syntax trees, a trace of one
training step) and the README's own table: imports run one way, the atlas stays out of the core, every
file the docs name exists, the reading order points at what it names, and lines stay short.
"""

import ast
import os
import re
from dataclasses import fields

from tests.helpers import REPO

CORE = {"model", "router", "losses", "kernels", "train", "families"}  # families: the atlas, above model and router
ENTRY = {"sample", "bench"}  # top-level scripts beside the core, nanoGPT's convention


def project_modules():
    """{module name: path} of every Python file of the project (tests aside)."""
    found = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "data", "__pycache__")
                   and not os.path.exists(os.path.join(root, d, "pyvenv.cfg"))]  # a venv in the clone
        for f in files:
            if f.endswith(".py") and f != "__init__.py":
                rel = os.path.relpath(os.path.join(root, f), REPO)[:-3]
                found[rel.replace(os.sep, ".")] = os.path.join(root, f)
    return found


def imports_of(path, modules):
    """The project modules a file imports, anywhere in it (also inside functions)."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n in modules}


def layer(module):
    if module in CORE:
        return "core"
    if module.startswith("support."):
        return "support"
    return "tools"  # sample, bench, tools/, course/: the users of the core


def test_imports_run_one_way_without_loops():
    modules = project_modules()
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    assert graph["kernels"] == {"support.compat"}, graph["kernels"]  # tensors in, tensors out (and two shims)
    for core in ("model", "router", "losses", "kernels"):               # the atlas builds on them, never back
        assert "families" not in graph[core], f"{core} imports families"
    rank = {"support": 0, "core": 1, "tools": 2}
    for m, deps in graph.items():
        for d in deps:
            assert rank[layer(d)] <= rank[layer(m)], f"{m} imports {d}: an upward import"
            assert not (m.startswith("tools.") and d.startswith("course.")), f"{m} imports {d}"
    state = {}

    def visit(m, path):  # depth-first search for a cycle
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import loop: {' -> '.join(path + [m, d])}"
            if d not in state:
                visit(d, path + [m])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [])
    top = sorted(f for f in os.listdir(REPO) if f.endswith(".py"))
    assert set(top) <= {f"{m}.py" for m in CORE | ENTRY} | {"test_all.py"}, top


EXTERNAL = {"moe.py", "configurator.py", "modeling_mixtral.py", "modeling_deepseek_v3.py"}  # other projects' files


def test_every_file_the_docs_name_exists():
    """README, docs/*.md and every docstring and comment: a path into this repository's folders, a bare
    Python file name, or an image a page shows, names a file that exists (paths from the repository
    root). Paths into other places (an out_dir, a student's package) are not checked."""
    texts = [os.path.join(REPO, "README.md")] + [os.path.join(REPO, "docs", f)
                                                 for f in os.listdir(os.path.join(REPO, "docs"))
                                                 if f.endswith(".md")]
    texts += [p for p in project_modules().values()] + [os.path.join(REPO, "course", "exercises", "README.md")]
    ours = ("support/", "tools/", "course/", "tests/", "config/", "docs/", "data/")
    missing, seen = [], 0
    for path in texts:
        text = open(path, encoding="utf-8").read()
        names = set(re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|md))\b", text))
        names |= set(re.findall(r"\]\(((?:[\w-]+/)*[\w-]+\.png)\)", text))     # markdown images
        for name in names:
            if ("/" in name and not name.startswith(ours)) or ("/" not in name and not name.endswith(".py")) \
                    or "NAME" in name or name in EXTERNAL:
                continue
            seen += 1
            if not os.path.exists(os.path.join(REPO, name)) and not (
                    path.endswith(".md") and os.path.exists(os.path.join(os.path.dirname(path), name))):
                missing.append(f"{os.path.relpath(path, REPO)}: {name}")
    assert seen > 50 and not missing, missing


def test_no_setting_of_the_atlas_is_named_in_model_or_router():
    """model.py and router.py know nothing of the families: no setting that families.FamilyConfig adds to
    GPTConfig appears in them as a word, in code or comments."""
    import families
    from model import GPTConfig
    core = {f.name for f in fields(GPTConfig)}
    atlas = [f.name for f in fields(families.FamilyConfig) if f.name not in core]
    assert len(atlas) >= 20 and len(core) <= 28, (len(atlas), len(core))
    for name in ("model.py", "router.py"):
        text = open(os.path.join(REPO, name)).read()
        named = [s for s in atlas if re.search(rf"\b{s}\b", text)]
        assert not named, f"{name} names the atlas's settings {named}"


def test_one_step_of_the_default_run_is_short_and_flat():
    """The student's path, traced: one training step of the default run (train.train_step down to the top-k)
    runs at most 25 distinct project functions (lambdas counted; comprehensions are expressions, not
    counted), none from the atlas (families.py), none with more than 5 parameters, none a wrapper whose
    body only forwards its arguments to another call; the top-k is at most three calls below MoE.forward."""
    import sys
    import torch
    import train
    from support import launch
    settings, _ = train.setup([])                                   # the default run (the CPU preset)
    cfg, model_cfg = settings.build(train.TrainConfig, train.FamilyConfig)
    cfg.compile = False
    env = launch.Processes("cpu", "float32")
    torch.manual_seed(0)
    model = train.make_model(cfg, model_cfg)                        # as train.py builds it
    opt = train.make_optimizer(model, cfg)
    ids = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.block_size))
    calls, stack, hops = {}, [], []
    ours = set(project_modules().values())  # not the packages of a .venv inside the clone
    comprehensions = ("<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")

    def profile(frame, event, arg):
        code = frame.f_code
        if code.co_filename not in ours or code.co_name in comprehensions:  # the project's frames only
            return
        if event == "call":
            where = (os.path.relpath(code.co_filename, REPO), code.co_firstlineno, code.co_qualname)
            calls[where] = code.co_argcount + code.co_kwonlyargcount - (code.co_varnames[:1] == ("self",))
            stack.append(code.co_qualname)
            if code.co_name == "select_topk" and "MoE.forward" in stack:
                hops.append(len(stack) - 1 - stack.index("MoE.forward"))   # project frames in between
        elif event == "return" and stack:
            stack.pop()
    sys.setprofile(profile)
    try:
        train.train_step(model, opt, lambda: (ids, ids, None), cfg, env)
    finally:
        sys.setprofile(None)
    assert hops and max(hops) <= 3, hops                                # MoE.forward -> ... -> select_topk
    assert not [k for k in calls if k[0] == "families.py"], sorted(calls)
    assert len(calls) <= 25, (len(calls), sorted(calls))
    for (path, line, name), n in calls.items():
        assert n <= 5, f"{path}:{line} {name} takes {n} parameters"
        if name.endswith("<lambda>"):
            continue
        fn = next(f for f in ast.walk(ast.parse(open(os.path.join(REPO, path)).read()))
                  if isinstance(f, ast.FunctionDef) and f.lineno == line or
                  isinstance(f, ast.FunctionDef) and f.decorator_list and f.decorator_list[0].lineno == line)
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        forwards = (len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Call)
                    and [a.id for a in body[0].value.args if isinstance(a, ast.Name)] ==
                    [a.arg for a in fn.args.args if a.arg != "self"] and not body[0].value.keywords)
        assert not forwards, f"{path}:{line} {name} only forwards its arguments"


def reading_order_rows():
    """The README's reading-order table: (file, [(first, last), ...], what to look for), and the line count
    its header states."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    stated = int(re.search(r"^(\d[\d,]*) lines", section, re.M).group(1).replace(",", ""))
    rows = []
    for line in section.splitlines():
        m = re.match(r"\| \d+ \| `([\w/.]+)` \| ([\d, -]+) \| (.*) \|$", line)
        if m:
            ranges = [tuple(int(n) for n in r.split("-")) for r in m.group(2).split(", ")]
            rows.append((m.group(1), ranges, m.group(3)))
    return rows, stated


def statements(path):
    """(first line with decorators, last line, qualified name or None) of every statement of a file."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                named = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                first = min([child.lineno] + [d.lineno for d in getattr(child, "decorator_list", [])])
                found.append((first, child.end_lineno, prefix + child.name if named else None))
                visit(child, prefix + child.name + "." if named else prefix)
    visit(ast.parse(open(path).read()), "")
    return found


def test_the_reading_order_ranges_start_at_what_they_name_and_end_at_its_end():
    """Each range of the README's reading-order table starts at a definition its row names in backticks
    (`name` or `Class.name`), or at a comment line right above a statement (the loop), and ends on the
    last line of a definition that starts inside it (or of that statement); the header's count is the sum."""
    rows, stated = reading_order_rows()
    assert len(rows) >= 9, rows
    total = 0
    for path, ranges, what in rows:
        lines = open(os.path.join(REPO, path)).read().splitlines()
        found = statements(os.path.join(REPO, path))
        named = set(re.findall(r"`([\w.]+)`", what))
        for first, last in ranges:
            total += last - first + 1
            starts = [name for a, _, name in found if a == first and name is not None
                      and (name in named or name.split(".")[-1] in named)]
            anchored = lines[first - 1].strip().startswith("#") and any(a == first + 1 for a, _, _ in found)
            assert starts or anchored, f"{path} {first}-{last}: line {first} starts nothing that `{what}` names"
            ends = [b for a, b, name in found if (first <= a and name is not None) or (anchored and a == first + 1)]
            assert last in ends, (f"{path} {first}-{last}: line {last} ends no definition inside it "
                                  f"(nor the anchored one)")
    assert total == stated, f"the README says {stated} lines, its ranges sum to {total}"


def test_every_line_of_the_project_is_at_most_120_characters():
    """So that no file meets a line budget by packing (the docs' tables aside: markdown)."""
    long = [f"{os.path.relpath(path, REPO)}:{n}" for path in project_modules().values() if "/tests/" not in path
            for n, line in enumerate(open(path, encoding="utf-8"), 1) if len(line.rstrip("\n")) > 120]
    tests = os.path.join(REPO, "tests")
    long += [f"tests/{f}:{n}" for f in os.listdir(tests) if f.endswith(".py")
             for n, line in enumerate(open(os.path.join(tests, f), encoding="utf-8"), 1)
             if len(line.rstrip("\n")) > 120]
    assert not long, long
