"""
Check and record everything GPU-specific in one command (under 8 minutes on one H100/H200):

    python tools/gpu_check.py                 # on a machine with a CUDA GPU -> out-gpucheck/report.md
    python tools/gpu_check.py --dry           # what it would run (also what it does without a GPU)

The steps, each a subprocess with its own time limit; a step that fails or times out is recorded as
such with the end of its output, and the next step runs anyway:

  1. the fast test suite on CUDA (test_all.py: the Triton kernels against the PyTorch reference on the GPU)
  2. the routing kernel table: torch vs torch.compile vs Triton, forward and forward+backward (bench.py)
  3. the whole-model benchmark: dense vs MoE, naive vs sorted, eager vs compiled (bench.py --model)
  4. where an MoE layer's time goes, stage by stage (bf16), and the default run's whole step, dense vs
     MoE: tokens/s, MFU and peak memory of each (bench.py --breakdown; the target: MoE >= 0.85x dense)
  5. sampling with and without the KV cache (bench.py --generate)
  6. a short default run: the GPU preset for 300 steps (train.py), its step time and losses

The report holds the device, the versions, each command with its exit status and time, and its output.
"""

import argparse
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from support.rundir import ArgParser, check_writable_dir, cli  # noqa: E402

STEPS = [  # (title, command, time limit in seconds)
    ("fast tests on CUDA", [sys.executable, "-m", "pytest", "test_all.py", "-q", "-p", "no:cacheprovider"], 90),
    ("routing kernels: torch vs compile vs triton", [sys.executable, "bench.py", "--reps", "25"], 90),
    ("whole model: dense vs MoE, naive vs sorted", [sys.executable, "bench.py", "--model", "--steps", "5"], 90),
    ("an MoE layer stage by stage; the whole step: tokens/s, MFU, memory",
     [sys.executable, "bench.py", "--breakdown", "--steps", "10"], 90),
    ("sampling with and without the KV cache", [sys.executable, "bench.py", "--generate", "--steps", "3"], 30),
    ("a short default run (GPU preset, 300 steps)",
     [sys.executable, "train.py", "--max_iters=300", "--eval_interval=100", "--eval_iters=20", "--log_interval=50",
      "--num_samples=1", "--overwrite=True"], 90),
]


def versions():
    import triton
    lines = [f"- device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)'}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
             f"Python {platform.python_version()}, {platform.platform()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                     f"{p.multi_processor_count} SMs")
    return lines


def main(argv):
    parser = ArgParser(prog="python tools/gpu_check.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out-gpucheck", help="where the report and the short run go")
    parser.add_argument("--dry", action="store_true", help="print the steps, run nothing")
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    steps = [(t, c + ([f"--out_dir={os.path.join(out_dir, 'run')}"] if "train.py" in c else []) +
              ([f"--json={os.path.join(out_dir, 'breakdown.json')}"] if "--breakdown" in c else []), s)
             for t, c, s in STEPS]
    if args.dry or not torch.cuda.is_available():
        print(("dry run: " if args.dry else "no CUDA device here: a dry run. ") +
              f"On a GPU this runs, in {REPO}, and writes {out_dir}/report.md:")
        for title, cmd, limit in steps:
            print(f"  {title} (at most {limit} s):\n    python {' '.join(cmd[1:])}")
        print(f"  {sum(s for _, _, s in steps) / 60:.1f} minutes at most in all")
        return
    check_writable_dir(out_dir)
    report = ["# GPU check", "",
              f"`python tools/gpu_check.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              *versions(), ""]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    for title, cmd, limit in steps:
        print(f"== {title}", flush=True)
        t0 = time.time()
        try:
            res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
            status, output = f"exit status {res.returncode}", res.stdout + res.stderr
        except subprocess.TimeoutExpired as err:
            status = f"stopped after {limit} s (time limit)"
            output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        secs = time.time() - t0
        print(f"   {status}, {secs:.0f} s", flush=True)
        shown = "\n".join(output.strip().splitlines()[-60:])
        report += [f"## {title}", "", f"`{' '.join(cmd[1:])}`: {status}, {secs:.0f} s", "", "```", shown, "```", ""]
        with open(os.path.join(out_dir, "report.md"), "w") as fh:  # written after every step: nothing lost
            fh.write("\n".join(report) + "\n")
    print(f"wrote {out_dir}/report.md")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
