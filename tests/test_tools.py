"""
The tools a user runs on runs and models, end to end: analyze, ablate, bench, corpus preparation,
and the compiled training step. The references: the eager step (the compiled one, loss and gradients),
the demo tables' cells worked by formula (the mean, and t_{0.975,1} * d / 2 for two seeds d apart), a
one-shot encoding of the same text (the streamed corpus), and the files' hashes before a refused command.
"""

import json
import re
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# first: it sets TRITON_INTERPRET before triton loads
from tests.helpers import REPO, ROUTERS, TINY, cli, require, train
from losses import aux_losses  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from families import ROUTERS as ROUTER_CLASSES  # noqa: E402  (the registry with the course's token table)

@pytest.mark.parametrize("args", [[], ["--losses", "--steps=1"], ["--model", "--steps=1"], ["--generate", "--steps=1"],
                                  ["--malloc", "--steps=1"]])
def test_bench_smoke_runs(args):
    code, out, err = cli("bench", *args)
    assert code == 0, err[-2000:]
    assert {"": "vs compile", "--losses": "overhead", "--model": "MFU", "--generate": "speed-up",
            "--malloc": "page faults"}[args[0] if args else ""] in out


def test_keep_freed_memory_stops_the_page_faults_of_fresh_tensors(monkeypatch):
    """train.py's own default step (tools/breakdown.malloc_run, what `bench.py --malloc` measures), in a
    fresh process with glibc as it comes and with launch.Processes keeping freed memory."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator settings: Linux only")
    from tools.breakdown import malloc_run
    for key in [k for k in os.environ if k == "LD_PRELOAD" or k.startswith(("MALLOC_", "GLIBC_TUNABLES"))]:
        monkeypatch.delenv(key)  # glibc as it comes: no other allocator, no tunables
    faults = {keep: malloc_run(keep, 10)["MoE"][1] for keep in (False, True)}  # median page faults per step
    # glibc as it comes: the default MoE step gives back and faults in again hundreds to thousands of pages
    assert faults[False] > 500 and faults[True] < faults[False] / 10, faults


def test_bench_breakdown_writes_its_table_json_and_figure(tmp_path):
    path = tmp_path / "breakdown.json"
    code, out, err = cli("bench", "--breakdown", "--steps=1", "--reps=5", f"--json={path}")
    assert code == 0, err[-2000:]
    result = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 0 and "whole training step" in out
    for layer in result["layers"]:  # every stage timed, each a share of the layer
        assert len(layer["stages_ms"]) >= 8 and all(v > 0 for v in layer["stages_ms"].values()), layer


def test_gpu_check_without_a_gpu_says_what_it_would_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run for real")
    code, out, err = cli("tools.gpu_check", f"--out_dir={tmp_path / 'check'}")
    assert code == 0, err
    assert "no CUDA device here: a dry run" in out and "minutes at most in all" in out
    for what in ("pytest test_all.py", "bench.py --reps 25", "bench.py --model", "bench.py --breakdown",
                 "bench.py --generate", "train.py"):
        assert what in out, what
    minutes = float(out.split(" minutes at most")[0].split()[-1])
    assert minutes <= 8.0 and not (tmp_path / "check").exists()   # a dry run writes nothing


def test_a_cpu_run_keeps_freed_memory(monkeypatch):
    """train.py's processes (launch.Processes) set it on a CPU, and only there."""
    from support import launch
    calls = []
    monkeypatch.setattr(launch, "keep_freed_memory", lambda: calls.append(1))
    launch.Processes("cpu", "float32")
    assert calls == [1]
    launch.Processes("cuda:0", "bfloat16")
    assert calls == [1]


def test_triton_kernels_do_not_spill_on_h100():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--resources"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[0].endswith(("_fwd", "_bwd"))]
    assert len(rows) >= 20
    for row in rows:
        regs, stack, wide = int(row[-3]), int(row[-2]), row[-1]
        assert stack == 0 and regs <= 255 and wide == "yes", row
    assert "no spills" in res.stdout and "64-bit row offsets everywhere" in res.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_train_step_with_inductor(dtype):
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2))

    def step(idx):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, ce, routes = model(idx, idx)
            aux, _ = aux_losses(routes, dict(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3))
        return ce + aux

    idx = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(step, fullgraph=True)          # inductor, the default backend
    loss = compiled(idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(idx)
    eager.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-3)
    assert torch.allclose(loss, eager, **tol)
    assert all(torch.allclose(a, p.grad, **tol) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("router", ROUTERS)
def test_analyze_writes_every_plot_for_every_router(tmp_path, router):
    import matplotlib.image
    from support.rundir import read_log
    out = tmp_path / router
    train(out, "config/synthetic.py", "--vocab_size=256", "--max_iters=2", "--eval_interval=2", f"--router={router}")
    code, stdout, err = cli("tools.analyze", out)
    assert code == 0, err
    for name in ("loss", "expert_load", "load_history", "routing_curves", "expert_cosine", "transitions", "tokens",
                 "router"):
        assert f"{name}.png" in stdout
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, name
    index = (out / "index.html").read_text()
    assert "tokens.png" in index and "each token coloured and numbered by its top-1 expert" in index  # captions
    layers = read_log(out / "log.jsonl")[-1]["layers"]
    assert all("source_nmi" in m for m in layers)
    own = set(ROUTER_CLASSES[router](GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_experts=4,
                                               router=router)).metrics())
    assert own <= set(layers[0])  # the router's own metrics reach the log (and the curves)


@pytest.fixture(scope="module")
def tiny_logs(tmp_path_factory):
    """The log of a real tiny run of each kind of task a demo trains on."""
    from support.rundir import read_log
    root = tmp_path_factory.mktemp("tiny")
    kinds = {"text": [], "synthetic": ["config/synthetic.py", "--vocab_size=256"], "facts": ["config/facts.py"],
             "facts_binary": ["config/facts_binary.py"]}
    logs = {}
    for kind, args in kinds.items():
        train(root / kind, *args, "--max_iters=2", "--eval_interval=2", "--n_layer=2", "--batch_size=4")
        logs[kind] = read_log(root / kind / "log.jsonl")
    return logs


@pytest.mark.parametrize("demo", ["default", "nanogpt", "hash", "hash-why", "hash-bpe", "ermoe", "ermoe-search",
                                  "balance", "wallclock", "crossover", "crossover-top1", "capacity",
                                  "capacity-exposures", "routing",
                                  "regularisers", "regularisers-facts", "collapse", "coupling", "specialization"])
def test_demo_tables_and_figures_from_finished_runs(tmp_path, demo, tiny_logs):
    """demos.py on runs that are already finished (copies of a real tiny run's log, with known val
    losses and bits): it trains nothing, and its table holds each variant's mean over the seeds ± the
    half-width of its 95 % t interval, from the numbers of the whole split. Two seeds a distance d
    apart have a sample standard deviation d / sqrt(2), so the half-width is t_{0.975, 1} * d / 2."""
    from course import demos
    variants = demos.DEMOS[demo]["variants"]
    if callable(variants):  # wallclock, crossover(-top1): the step-time ratio as if measured already
        os.makedirs(tmp_path / "runs")
        (tmp_path / "runs" / f"{demo}.json").write_text(json.dumps({"ratio": 1.3}))
        (tmp_path / "runs" / f"{demo}-hash.json").write_text(json.dumps({"ratio": 1.1}))
        variants = variants(str(tmp_path / "runs"))
        assert any(f"{1.3 * (2000 if demo == 'wallclock' else 500):,.0f} steps" in name for name in variants)
    for i, (name, args) in enumerate(variants.items()):
        kind = next((k for k in ("facts_binary", "facts", "synthetic") if f"config/{k}.py" in args), "text")
        kind = "synthetic" if "config/collapse.py" in args else kind
        for seed in (0, 1):
            where = demos.run_dir(str(tmp_path / "runs"), args, seed)
            os.makedirs(where)
            with open(os.path.join(where, "log.jsonl"), "w") as fh:
                for r in tiny_logs[kind]:
                    if "whole" in r:
                        whole = {**r["whole"], "val_loss": 1 + 0.1 * i + 0.01 * seed}
                        if "bits" in whole:
                            whole["bits"] = 1000.0 * (i + 1) + 10 * seed
                        r = {**r, "whole": whole}
                    fh.write(json.dumps(r) + "\n")
    (tmp_path / "docs").mkdir()
    code, out, err = cli("course.demos", demo, "--seeds", "0", "1", "--out_dir", tmp_path / "runs",
                         "--docs", tmp_path / "docs")
    assert code == 0, err
    assert out.count("already done") == 2 * len(variants)
    table = (tmp_path / "docs" / f"demo_{demo}.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| variant |")).split(" | ")
    digits = 3 if demo in ("routing", "collapse", "coupling", "specialization") else 4
    column, want = ((header.index("bits stored"), lambda i: f"{1000 * (i + 1) + 5:.0f} ± {12.706 * 10 / 2:.0f}")
                    if demo.startswith("capacity") else
                    (next(j for j, h in enumerate(header) if h.startswith("val loss")),
                     lambda i: f"{1 + 0.1 * i + 0.005:.{digits}f} ± {12.706 * 0.01 / 2:.{digits}f}"))
    for i, name in enumerate(variants):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.split(" | ")[column] == want(i), (row, want(i))
    assert not re.search(r"\bnan\b", table)
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "docs" / f"demo_{demo}.png")
    assert image.shape[0] > 100 and image.std() > 0
    # the per-seed JSON beside the table rebuilds it, and the figure, with no run left to read
    doc = json.loads((tmp_path / "docs" / f"demo_{demo}.json").read_text())
    assert set(doc["runs"]) == set(variants) and all(len(v) == 2 for v in doc["runs"].values())
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "docs" / f"demo_{demo}.png").unlink()
    code, out, err = cli("course.demos", demo, "--tables_only", "--docs", tmp_path / "docs")
    assert code == 0 and "already done" not in out, err
    assert (tmp_path / "docs" / f"demo_{demo}.md").read_text() == table and \
        (tmp_path / "docs" / f"demo_{demo}.png").exists()


def test_ablation_harness_dry_run_has_every_router():
    code, out, err = cli("tools.ablate", "--quick", "--dry")
    assert code == 0, err
    cmds = out.strip().splitlines()
    from tools.ablate import VARIANTS
    assert len(cmds) == len(VARIANTS) * 2 and all("train.py config/synthetic.py" in c for c in cmds)
    for name in ROUTERS[1:]:  # every router of the registry is a row (hash: the no-learning baseline)
        assert sum(f"--router={name}" in c for c in cmds) >= 2, name
    assert sum("--n_experts=0" in c for c in cmds) == 2


def stream_corpus(path, megabytes):
    """A generated corpus: Shakespeare's text repeated with a counter, `megabytes` MB."""
    base = open(os.path.join(REPO, "data", "shakespeare", "input.txt")).read()
    with open(path, "w") as fh:
        for i in range(int(megabytes * 1e6 / len(base)) + 1):
            fh.write(f"Part {i}.\n" + base)


PEAK_RSS = """
import resource, sys
sys.argv = ["tools/prepare.py", *sys.argv[1:]]
import runpy
try:
    runpy.run_path("tools/prepare.py", run_name="__main__")
except SystemExit:
    pass
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, \
resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_prepare_streams_equals_a_one_shot_encoding_with_flat_memory_and_is_atomic(tmp_path):
    from support.data import gpt2_encoding, load_split, prepare
    names = [f"stream-test-{os.getpid()}-{i}" for i in range(3)]
    try:
        stream_corpus(tmp_path / "small.txt", 2)
        stream_corpus(tmp_path / "large.txt", 10)
        peaks = []
        for name, src in zip(names, ("small.txt", "large.txt")):
            res = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / src), name, "--workers=2"],
                                 cwd=REPO, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0 and "peak" in res.stdout, res.stderr[-2000:]
            peaks.append([int(v) for v in res.stdout.split("peak")[1].split()])
        text = open(tmp_path / "small.txt").read()
        folder = prepare(names[0])
        stream = np.concatenate([load_split(folder, "train"), load_split(folder, "val")])
        assert stream[-1] == 50256 and np.array_equal(stream[:-1], np.array(gpt2_encoding().encode_ordinary(text)))
        (main_small, worker_small), (main_large, worker_large) = peaks   # KiB: 5x the corpus, the same memory
        assert main_large - main_small < 30_000 and worker_large - worker_small < 30_000, peaks
        # kill -9 in the middle: nothing that loads is left behind
        proc = subprocess.Popen([sys.executable, "tools/prepare.py", str(tmp_path / "large.txt"), names[2],
                                 "--workers=2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
        proc.stderr.read(20)                                # it has started writing progress
        proc.kill()
        proc.wait()
        code, _, err = cli("train", *TINY, f"--dataset={names[2]}", f"--out_dir={tmp_path / 'run'}")
        assert code == 1 and "no prepared bins" in err and not (tmp_path / "run").exists()
    finally:
        import shutil
        for name in names:
            shutil.rmtree(os.path.join(REPO, "data", name), ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# corpora from outside: each bad file one error line, the set already prepared unchanged

def parquet_file(path, texts):
    pa = require("pyarrow", "parquet is optional")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path, row_group_size=64)


def test_prepare_reads_parquet_shards_like_text(tmp_path):
    from support.data import gpt2_encoding, load_split, prepare
    texts = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(300)]
    (tmp_path / "shards").mkdir()
    parquet_file(tmp_path / "shards" / "a.parquet", texts[:150])
    parquet_file(tmp_path / "shards" / "b.parquet", texts[150:])
    name = f"parquet-test-{os.getpid()}"
    try:
        code, _, err = cli("tools.prepare", tmp_path / "shards", name, "--workers=1")
        assert code == 0, err
        folder = prepare(name)
        got = np.concatenate([load_split(folder, "train"), load_split(folder, "val")])
        enc = gpt2_encoding()
        want = [t for text in texts for t in enc.encode_ordinary(text) + [50256]]  # documents end with end-of-text
        assert got.tolist() == want
    finally:
        import shutil
        shutil.rmtree(os.path.join(REPO, "data", name), ignore_errors=True)


def test_every_bad_corpus_is_one_error_line_and_the_prepared_set_is_unchanged(tmp_path, monkeypatch):
    import shutil
    from tests.helpers import file_hashes
    name = f"bad-corpus-{os.getpid()}"
    folder = os.path.join(REPO, "data", name)
    good = tmp_path / "good.txt"
    good.write_text("To be, or not to be, that is the question.\n" * 200)
    cases = {  # what to write -> what the error says
        "not_utf8.txt": (b"hello world\n" * 50 + b"caf\xe9 au lait\n", "not_utf8.txt is not UTF-8 at byte 603"),
        "number.jsonl": (b'{"text": "fine"}\n{"text": 42}\n',
                         "number.jsonl line 2: the 'text' field is int, not a string"),
        "broken.jsonl": (b'{"text": "fine"}\n{"text": "cut\n',
                         "broken.jsonl line 2: not a JSON object with a 'text' field"),
        "bad_line.jsonl": (b'{"text": "fine"}\n\xff\xfe\n', "bad_line.jsonl is not UTF-8 at byte 17"),
        "empty_dir": (None, "holds no .txt, .jsonl or .parquet file"),
    }
    try:
        assert cli("tools.prepare", good, name, "--workers=1")[0] == 0
        before = file_hashes(folder)
        for fname, (content, message) in cases.items():
            path = tmp_path / fname
            if content is None:
                path.mkdir()
            else:
                path.write_bytes(content)
            code, out, err = cli("tools.prepare", path, name, "--workers=1")
            lines = err.strip().splitlines()
            assert code == 1 and lines[-1].startswith("error:") and message in lines[-1], (fname, err)
            assert file_hashes(folder) == before, fname
        code, _, err = cli("tools.prepare", tmp_path / "not_utf8.txt", name, "--workers=1", "--errors=replace")
        assert code == 0, err                              # undecodable bytes replaced, on request
        code, _, err = cli("tools.prepare", good, name, "--workers=0")
        assert code == 1 and "--workers must be >= 1, got 0" in err
        if importlib_util_find("pyarrow"):
            parquet_file(tmp_path / "nulls.parquet", ["fine", None])
            for path, message in ((tmp_path / "nulls.parquet", "nulls.parquet row 2: the 'text' field is NoneType"),):
                code, _, err = cli("tools.prepare", path, name, "--workers=1")
                assert code == 1 and message in err, err
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
            code, _, err = cli("tools.prepare", tmp_path / "notext.parquet", name, "--workers=1")
            assert code == 1 and "has no 'text' column (columns: body)" in err, err
            (tmp_path / "cut.parquet").write_bytes((tmp_path / "nulls.parquet").read_bytes()[:40])
            code, _, err = cli("tools.prepare", tmp_path / "cut.parquet", name, "--workers=1")
            assert code == 1 and "is not a readable parquet file" in err, err
            monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
            code, _, err = cli("tools.prepare", tmp_path / "nulls.parquet", name, "--workers=1")
            assert code == 1 and "reading parquet needs the pyarrow package" in err, err
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def importlib_util_find(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def test_the_error_line_comes_after_the_progress_line(tmp_path):
    """A corpus that fails late: the progress line is ended before the error, which is the last line."""
    (tmp_path / "corpus").mkdir()
    stream_corpus(tmp_path / "corpus" / "a.txt", 8)
    (tmp_path / "corpus" / "b.jsonl").write_text('{"text": "fine"}\n{"oops": 1}\n')
    name = f"late-error-{os.getpid()}"
    try:
        res = subprocess.run([sys.executable, "tools/prepare.py", str(tmp_path / "corpus"), name, "--workers=1"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = res.stderr.split("\n")
        assert res.returncode == 1 and lines[-1] == "" and lines[-2].startswith("error: ")
        assert "b.jsonl line 2" in lines[-2] and "tokens/s" in lines[-3] and "error" not in lines[-3], res.stderr[-500:]
        assert not os.path.exists(os.path.join(REPO, "data", name))   # nothing left behind
    finally:
        import shutil
        shutil.rmtree(os.path.join(REPO, "data", name), ignore_errors=True)
