"""
Benchmarks (speed is measured here, never in tests). All ratios come from one process, side by side.

    python bench.py              # routing: torch vs compile vs triton, forward and forward+backward
    python bench.py --losses     # training-step overhead of the specialization + coupling losses
    python bench.py --model      # whole-model training step: dense vs MoE, naive vs sorted dispatch
    TRITON_INTERPRET=0 python bench.py --resources   # registers/spills of every kernel on an H100, no GPU needed
    python bench.py --parallel   # expert parallelism: memory and traffic per rank (computed), CPU step times
    python bench.py --generate   # sampling with and without the KV cache: tokens/s, side by side
    python bench.py --breakdown --json out/breakdown.json   # one MoE layer stage by stage; the whole step
    python bench.py --malloc     # the default step, glibc's allocator as it comes and as train.py sets it, twice each
(--breakdown and --malloc, and the training-step closure the modes share, are in tools/breakdown.py.)

On CUDA: timings by triton.testing.do_bench (CUDA events, warm-up, L2 cache cleared before every
call, median). Achieved bandwidth counts the bytes the op must move at least: forward reads the
logits a[T, E] and writes gates/idx (T, k) and lse/mass (T,); backward also reads a, the saved
lse/idx/gates and the incoming gradients, and writes d(a). Without a GPU: a small smoke shape
with wall-clock timing (Triton then runs in its interpreter, so its number means nothing).
"""

import argparse
import os
import statistics
import sys
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from router import topk_route  # noqa: E402  (imports after TRITON_INTERPRET is set)
from model import GPT, GPTConfig  # noqa: E402
from tools.breakdown import PEAK_BF16_TFLOPS, breakdown_bench, malloc_bench, step_timer, train_step  # noqa: E402

# peak HBM bandwidth (GB/s) by device name; pass --bw for another device
PEAK_BW = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039}


def timer(fn, reps):
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median") * 1e3  # us
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def routing_bench(args):
    device = "cuda" if CUDA else "cpu"
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    bw = args.bw or next((v for k, v in PEAK_BW.items() if k in name), None)
    shapes = [(T, E, k) for T in (4096, 16384, 65536, 262144, 1048576) for E, k in ((8, 2), (64, 8), (256, 8))]
    if not CUDA:
        shapes = [(256, 8, 2)]
    import triton
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}"
          f"{'' if bw else ' (peak bandwidth unknown: pass --bw)'}")
    print(f"{'dtype':>8} {'T':>8} {'E':>4} {'k':>2} {'pass':>8} | {'torch us':>9} {'compile us':>10} {'triton us':>9}"
          f" | {'vs eager':>8} {'vs compile':>10} | {'GB/s':>7} {'% peak':>6}")
    for dtype in (torch.float32, torch.bfloat16):
        for T, E, k in shapes:
            logits = torch.randn(T, E, device=device).to(dtype)
            grads = [torch.randn(T, k, device=device), torch.randn(T, device=device),
                     torch.randn(T, device=device), torch.randn(E, device=device)]
            s = logits.element_size()
            fwd_bytes = T * E * s + T * k * (4 + 8) + T * 8
            bwd_bytes = 2 * T * E * s + T * k * (8 + 4 + 4) + T * 12 + E * 4
            for mode in ("fwd", "fwd+bwd"):
                res = {}
                for impl in ("torch", "compile", "triton"):
                    if mode == "fwd":
                        def fn():
                            with torch.no_grad():
                                topk_route(logits, k, impl)
                    else:
                        a = logits.detach().requires_grad_(True)

                        def fn():
                            r = topk_route(a, k, impl)
                            torch.autograd.grad((r.gates, r.lse, r.mass, r.psum), a, grads)
                    res[impl] = timer(fn, args.reps)
                moved = fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0)
                gbs = moved / res["triton"] / 1e3
                pct = f"{100 * gbs / bw:6.1f}" if bw else "     -"
                print(f"{str(dtype)[6:]:>8} {T:>8} {E:>4} {k:>2} {mode:>8} | {res['torch']:9.1f} {res['compile']:10.1f}"
                      f" {res['triton']:9.1f} | {res['torch'] / res['triton']:7.2f}x"
                      f" {res['compile'] / res['triton']:9.2f}x"
                      f" | {gbs:7.1f} {pct}")


def model_bench(args):
    """Whole training steps: dense vs MoE (E=8,k=2) vs fine-grained MoE (E=64,k=8), naive vs sorted."""
    device = "cuda" if CUDA else "cpu"
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    if CUDA:  # GPT-2 small
        base, B, compiles = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), 8, (False, True)
    else:     # smoke shape
        base, B, compiles = dict(n_layer=2, n_head=2, n_embd=64, block_size=64), 4, (False,)
    variants = [("dense", dict(n_experts=0), ("-",))] + [
        (f"moe E={E} k={k}", dict(n_experts=E, top_k=k), ("naive", "sorted")) for E, k in ((8, 2), (64, 8))]
    peak = next((v for kk, v in PEAK_BF16_TFLOPS.items() if kk in name), None)
    coefs = dict(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3)
    print(f"device: {name}, torch {torch.__version__}, {base}, batch {B}, losses {coefs}")
    print(f"{'model':>14} {'dispatch':>8} {'compiled':>8} | {'step ms':>8} {'tok/s':>9} {'peak GiB':>8} {'MFU':>6}"
          f" | {'active M':>8} {'total M':>8}")
    for label, extra, dispatches in variants:
        for dispatch in dispatches:
            for compiled in compiles:
                cfg = GPTConfig(**base, **extra, **({} if dispatch == "-" else {"dispatch": dispatch}))
                torch.manual_seed(0)
                model = GPT(cfg).to(device)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                idx = torch.randint(0, 50257, (B, cfg.block_size), device=device)
                step = train_step(torch.compile(model) if compiled else model, opt, idx, coefs)
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                dt = step_timer(step, args.steps)
                total, active = model.num_params()
                tokens = B * cfg.block_size
                flops = tokens * model.flops_per_token()
                mfu = f"{100 * flops / dt / (peak * 1e12):5.1f}%" if peak else "     -"
                mem = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
                print(f"{label:>14} {dispatch:>8} {str(compiled):>8} | {dt * 1e3:8.1f} {tokens / dt:9.0f} {mem:8.2f}"
                      f" {mfu} | {active / 1e6:8.1f} {total / 1e6:8.1f}")
                del model, opt, step


RESOURCE_JOBS = [  # (kernel, E, k, r, logits dtype, renormalize): the corners of what the model launches
    *[(kind, E, k, None, "fp32", True) for E, k in ((1, 1), (2, 1), (8, 2), (16, 4), (64, 8), (256, 8))
      for kind in ("route_fwd", "route_bwd")],
    *[(kind, E, 8, None, dtype, renorm) for E in (64, 256) for dtype, renorm in (("bf16", True), ("fp32", False))
      for kind in ("route_fwd", "route_bwd")],
    *[(kind, E, k, r, "fp32", True) for E, k, r in ((2, 1, 64), (8, 2, 16), (64, 8, 128), (256, 8, 1024))
      for kind in ("eigen_fwd", "eigen_bwd")],
]


# ------------------------------------------------------------------------------------------------
# where an MoE layer's time goes

def resources(args):
    """
    Compile every kernel variant in RESOURCE_JOBS for an H100 (sm_90) without a GPU and read the
    registers per thread and the stack frame from the cubin (cuobjdump -res-usage, both shipped with
    triton). Register spills go to the stack, so STACK > 0 means spills. (PTX cannot show spills:
    it has unlimited virtual registers; only ptxas decides.) Also checks in the Triton IR that the
    program id is widened to 64 bits before it scales any address (T*E may pass 2^31).
    Run with TRITON_INTERPRET=0.
    """
    import re
    import subprocess
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import kernels as K
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    fns = {"route_fwd": K._route_fwd_kernel, "route_bwd": K._route_bwd_kernel,
           "eigen_fwd": K._eigen_fwd_kernel, "eigen_bwd": K._eigen_bwd_kernel}
    int_ptrs = {"idx_ptr": "*i64", "counts_ptr": "*i32"}
    print(f"{'kernel':>9} {'E':>4} {'k':>2} {'r':>5} {'dtype':>5} {'renorm':>6} | {'BT':>4} {'RC':>3} | "
          f"{'regs':>4} {'stack B':>7} {'64-bit rows':>11}")
    worst, narrow = 0, 0
    for kind, E, k, r, dtype, renorm in RESOURCE_JOBS:
        fn = fns[kind]
        BT, BE, BK, RC = K._blocks(E, k, r)
        const = {"K": k, "RENORM": renorm, "BT": BT, "BE": BE, "BK": BK, **({"RC": RC} if r else {})}
        sig = {n: "constexpr" if n in const else
               int_ptrs.get(n, f"*{dtype}" if n in ("a_ptr", "u_ptr", "da_ptr") else "*fp32") if n.endswith("_ptr")
               else "i32" for n in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
        pid = re.search(r"%(\S+) = tt.get_program_id x : i32", compiled.asm["ttir"]).group(1)
        wide = f"arith.extsi %{pid} : i32 to i64" in compiled.asm["ttir"]
        narrow += not wide
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(compiled.asm["cubin"])
            fh.flush()
            out = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
        regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", out).groups())
        worst = max(worst, stack)
        print(f"{kind:>9} {E:>4} {k:>2} {r or '-':>5} {dtype:>5} {str(renorm):>6} | {BT:>4} {RC or '-':>3} | "
              f"{regs:>4} {stack:>7} {'yes' if wide else 'NO':>11}", flush=True)
    print("no spills" if worst == 0 else f"SPILLS: up to {worst} bytes of stack per thread")
    print("64-bit row offsets everywhere" if narrow == 0 else f"32-BIT ROW OFFSETS in {narrow} kernels")


def losses_bench(args):
    """Median train-step time with c_sp = c_cp = 0 vs the paper's coefficients, interleaved."""
    device = "cuda" if CUDA else "cpu"
    if CUDA:
        cfg, B = GPTConfig(vocab_size=65), 64  # the GPU default run
    else:
        cfg, B = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), 12  # the CPU default run
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), device=device)
    settings = {"without": dict(c_lb=0.01, c_z=1e-3), "with": dict(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3)}
    steps = {name: train_step(model, opt, idx, coefs) for name, coefs in settings.items()}
    times = {k: [] for k in settings}
    for _ in range(args.steps):  # A/B interleaved, one step at a time, so drift hits both alike
        for name, step in steps.items():
            times[name].append(step_timer(step, 1))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu'}, torch {torch.__version__}, "
          f"{cfg.n_layer} layers, d={cfg.n_embd}, E={cfg.n_experts}, k={cfg.top_k}, {B}x{cfg.block_size} tokens")
    print(f"step without R_sp/R_cp: {med['without']:.1f} ms, with: {med['with']:.1f} ms "
          f"-> overhead {100 * (med['with'] / med['without'] - 1):+.1f}% (median of {args.steps})")


def parallel_table(args):
    """Parameters, optimizer memory and bytes moved per rank for N = 1, 2, 4, 8 (computed from the
    configs; the per-rank parameter count is also read off an actually sharded model), then CPU
    step times of one global batch over 2 processes: N = 1 (plain DDP) beside N = 2."""
    from support import parallel
    from support.stopping import CAUGHT
    B, S = 64, 256  # the default GPU run's batch: tokens T = B*S per rank
    models = {"default GPU model (E=8, k=2)": GPTConfig(vocab_size=65),
              "64 experts (E=64, k=8)": GPTConfig(vocab_size=65, n_experts=64, top_k=8)}
    print(f"per rank, fp32 weights + gradients + AdamW (16 B/param), {B}x{S} tokens per rank, balanced routing")
    print(f"{'model':>30} {'N':>2} | {'params M':>8} {'of which experts':>16} {'weights+opt GiB':>15} | "
          f"{'expert activations MiB/layer':>28} | {'exchanged MiB/layer/step':>24}")
    for label, cfg in models.items():
        with torch.device("meta"):
            model = GPT(cfg)
        expert = sum(p.numel() for n, p in model.named_parameters() if parallel.is_expert(n))
        total = sum(p.numel() for p in model.parameters())
        T, k, d, f = B * S, cfg.top_k, cfg.n_embd, cfg.expert_hidden
        act = T * k * (d + 3 * f + d) * 4 / 2**20          # rows in, gate/up/z, rows out (fp32)
        for N in (1, 2, 4, 8):
            per_rank = total - expert + expert // N
            moved = 2 * T * k * (d + d + f) * 4 * (1 - 1 / N) / 2**20  # forward + backward, pairs that leave
            print(f"{label:>30} {N:>2} | {per_rank / 1e6:8.2f} {expert // N / 1e6:16.2f} "
                  f"{16 * per_rank / 2**30:15.2f} | "
                  f"{act:28.1f} | {moved:24.1f}")
    print()
    import torch.multiprocessing as mp
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    times = mp.Manager().dict()
    cfg = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, n_experts=8, top_k=2)
    for n in (1, 2):
        mp.spawn(_parallel_steps, args=(2, n, port + n, cfg, args.steps, times), nprocs=2)
    print(f"CPU, 2 processes (gloo), {cfg}, 8 sequences per process, median of {args.steps} steps:")
    with torch.device("meta"):
        small = GPT(GPTConfig(**cfg))
    expert = sum(p.numel() for n, p in small.named_parameters() if parallel.is_expert(n))
    for n in (1, 2):
        step, params, rss = times[n]
        assert params == sum(p.numel() for p in small.parameters()) - expert + expert // n  # = the table's formula
        print(f"  expert_parallel={n}: {step * 1e3:.1f} ms per step, {params / 1e6:.3f}M parameters on rank 0 "
              f"(measured), peak RSS {rss / 1024:.0f} MiB "
              f"({'DDP: every rank holds all 8 experts' if n == 1 else 'each rank holds 4 experts, all_to_all'})")
    without, with_asks = times["flag"]
    print(f"  the step's all-reduce of its 6 logged numbers: {without * 1e6:.0f} us; with the {len(CAUGHT) + 1} stop "
          f"requests in it (signals, timed checkpoint: support/stopping.py): {with_asks * 1e6:.0f} us (median of 300, "
          f"alternating; {100 * (with_asks - without) / times[1][0]:+.2f} % of the DDP step)")


def _parallel_steps(rank, world, n, port, cfg, steps, times):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from types import SimpleNamespace
    from support import launch
    from support.parallel import ExpertParallel, pooled_balance
    from train import train_step
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    ep = ExpertParallel(n) if n > 1 else None
    if ep:
        ep.shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = model if ep else DDP(model)
    idx = torch.randint(0, cfg["vocab_size"], (8, cfg["block_size"]))
    settings = SimpleNamespace(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3, c_seq=0.0, mu_ortho=0.0, grad_clip=1.0)
    env = launch.Processes("cpu", "float32", rank, world, accum=1, ddp=True)
    env.ep, env.pool, env.fwd = ep, pooled_balance(dist.group.WORLD), fwd  # what env.attach sets in train.py

    def step():  # train.py's step as it runs under torchrun: losses, gradient sync, NaN guard, clipping
        train_step(model, opt, lambda: (idx, idx, None), settings, env)
    measured = []
    for i in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        if i >= 2:
            measured.append(time.perf_counter() - t0)
    if rank == 0:
        import resource
        times[n] = (statistics.median(measured), sum(p.numel() for p in model.parameters()),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    if n == 1:  # what the stop requests add to the step's all-reduce of the logged numbers (env.mean), alternating
        from support.stopping import CAUGHT
        stats, cost = torch.ones(6), {False: [], True: []}   # (CE, total, 4 auxiliary terms: the default run's)
        for _ in range(300):
            for asks in (False, True):
                env.asks = (lambda: [0.0] * (len(CAUGHT) + 1)) if asks else None
                dist.barrier()
                t0 = time.perf_counter()
                env.mean(stats.clone())
                cost[asks].append(time.perf_counter() - t0)
        if rank == 0:
            times["flag"] = (statistics.median(cost[False]), statistics.median(cost[True]))
    dist.destroy_process_group()


def generate_bench(args):
    """Tokens/s of GPT.generate with and without the KV cache, alternating in one process: a prompt of
    one token, then block_size - 1 new tokens (greedy), batch 1 and 8; the tokens are checked equal."""
    device = "cuda" if CUDA else "cpu"
    shape = dict(n_layer=6, n_head=6, n_embd=384, block_size=256) if CUDA else \
        dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
    cfg = GPTConfig(**shape, vocab_size=65, n_experts=8, top_k=2)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu'}, torch {torch.__version__}, {shape}, "
          f"E=8, k=2, vocab 65; median of {args.steps} calls")
    print(f"{'batch':>5} {'new tokens':>10} | {'cached tok/s':>12} {'uncached tok/s':>14} | {'speed-up':>8}")
    for B in (1, 8):
        prompt = torch.zeros(B, 1, dtype=torch.long, device=device)
        n = cfg.block_size - 1
        out = {c: model.generate(prompt, n, temperature=0, use_cache=c) for c in (True, False)}  # also the warm-up
        assert torch.equal(out[True], out[False])
        times = {True: [], False: []}
        for _ in range(args.steps):  # alternating, so that drift hits both alike
            for cached in (True, False):
                if CUDA:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(prompt, n, temperature=0, use_cache=cached)
                if CUDA:
                    torch.cuda.synchronize()
                times[cached].append(time.perf_counter() - t0)
        rate = {c: B * n / statistics.median(t) for c, t in times.items()}
        print(f"{B:>5} {n:>10} | {rate[True]:12,.0f} {rate[False]:14,.0f} | {rate[True] / rate[False]:7.1f}x")


def main(argv):
    from support.rundir import ArgParser, UserError
    parser = ArgParser(prog="python bench.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--losses", action="store_true", help="overhead of the two regularisers")
    mode.add_argument("--model", action="store_true", help="whole-model training steps, dense vs MoE")
    mode.add_argument("--resources", action="store_true", help="registers and spills of the kernels on sm_90 (no GPU)")
    mode.add_argument("--parallel", action="store_true", help="expert parallelism: memory, traffic, CPU step times")
    mode.add_argument("--generate", action="store_true", help="sampling tokens/s with and without the KV cache")
    mode.add_argument("--breakdown", action="store_true", help="one MoE layer stage by stage, and the whole step")
    mode.add_argument("--malloc", action="store_true", help="the default step with and without keeping freed memory")
    parser.add_argument("--json", default=None, help="--breakdown: also write the numbers to this JSON file")
    parser.add_argument("--reps", type=int, default=100, help="do_bench time budget per measurement (ms)")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed train steps per setting (--losses, --model, --parallel, --breakdown, --malloc)")
    parser.add_argument("--bw", type=float, default=None, help="peak memory bandwidth of the device, GB/s")
    args = parser.parse_args(argv)
    if not CUDA:  # as train.py runs on a CPU (support/launch.py); --malloc compares it with glibc's default
        from support.launch import keep_freed_memory
        keep_freed_memory()
    if args.reps < 1 or args.steps < 1:
        raise UserError(f"--reps and --steps must be >= 1, got {args.reps} and {args.steps}")
    if args.bw is not None and not 0 < args.bw < float("inf"):
        raise UserError(f"--bw must be a positive bandwidth in GB/s, got {args.bw}")
    if args.resources and os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("--resources compiles real kernels: run it with TRITON_INTERPRET=0")
    if args.resources:
        resources(args)
    elif args.parallel:
        parallel_table(args)
    elif args.generate:
        generate_bench(args)
    elif args.model:
        model_bench(args)
    elif args.breakdown:
        breakdown_bench(args)
    elif args.malloc:
        malloc_bench(args)
    elif args.losses:
        losses_bench(args)
    else:
        routing_bench(args)


if __name__ == "__main__":
    from support.rundir import cli
    sys.exit(cli(main, sys.argv[1:]))
