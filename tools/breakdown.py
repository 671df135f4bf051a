"""
Where an MoE step's time goes, for bench.py (`--breakdown`, `--malloc`) and its other modes (the
training-step closure and its timer): one MoE layer stage by stage beside the dense MLP of the same
active compute, the whole training step dense vs MoE at a few shapes, and glibc's allocator as it
comes against support/launch.keep_freed_memory. Run through bench.py:

    python bench.py --breakdown --json out/breakdown.json   # the table, its JSON and a figure
    python bench.py --malloc                                # train.py's step with and without kept memory

Notation: T tokens, d model width, E experts, k experts per token, f expert hidden width.
On CUDA: bf16, T=16384, d=768, the GPU default's step, MFU and peak memory; on a CPU: fp32, T=4096,
d=256, the CPU default's step, 1 and 2 threads (a layer's stages at one thread timed by process time,
whole steps by wall time).
"""

import os
import queue
import statistics
import time

import torch

from losses import aux_losses
from model import GPT, GPTConfig

CUDA = torch.cuda.is_available()
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peak


def train_step(fwd, opt, idx, coefs):
    """One training step closure: forward (bf16 autocast on CUDA), all losses, backward, AdamW."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            _, ce, routes = fwd(idx, idx)
            aux, _ = aux_losses(routes, coefs, all_terms=False)
        (ce + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_timer(step, n):
    """Median wall time of n calls of step() after 2 warm-up calls (synchronised on CUDA)."""
    times = []
    for i in range(n + 2):
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if CUDA:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


STAGES = ("router logits", "routing pass", "sort pairs", "gather rows", "gate+up matmuls", "SwiGLU",
          "down matmul+gate", "combine", "acts to tokens", "aux losses")
AUX = dict(c_lb=0.01, c_z=1e-3, c_sp=2e-3, c_cp=1e-3)  # the default run's coefficients


def layer_stages(moe, x):
    """MoE.forward_sorted (router.Router.forward, model.MoE.forward_sorted, losses.aux_losses) cut into
    STAGES: for each, a function that runs it forward and backward on its inputs (leaves that need a
    gradient, as in the model), with a fixed random gradient of its outputs. Also y, to check the cut."""
    import torch.nn.functional as F
    from model import grouped_matmul
    from router import expert_counts, route_reference
    router, k = moe.router, moe.router.k

    def leaf(t):
        return t.detach().requires_grad_(t.is_floating_point())

    def stage(fn, *inputs):
        inputs = [leaf(t) for t in inputs]
        outs = fn(*inputs)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.is_floating_point()]
        grads = [torch.randn_like(o) for o in outs]

        def run():
            res = fn(*inputs)
            res = [o for o in (res if isinstance(res, tuple) else (res,)) if o.is_floating_point()]
            if res:
                torch.autograd.backward(res, grads)
        return outs, run

    def routing(a):
        r = router.finish(route_reference(a, k, router.renorm), x)
        return r.gates, r.lse, r.mass, r.psum, r.idx

    def sort(idx):
        order, inverse, tok, e = moe.sort_pairs(idx)
        return order, inverse, tok, expert_counts(idx, moe.w_up.shape[0]).cumsum(0, dtype=torch.int32)

    (a,), s1 = stage(lambda x: router.logits(x, None), x)
    r = router.finish(route_reference(a.detach(), k, router.renorm), x)
    _, s2 = stage(routing, a)
    order, inverse, tok, offs = sort(r.idx)
    _, s3 = stage(sort, r.idx)
    (h,), s4 = stage(lambda x: x.index_select(0, tok), x)
    f = moe.w_up.shape[2]
    (g, u), s5 = stage(lambda h: grouped_matmul(h, torch.cat([moe.w_gate, moe.w_up], dim=2), offs).split(f, dim=1)
                       if f < x.shape[1] else (grouped_matmul(h, moe.w_gate, offs),
                                               grouped_matmul(h, moe.w_up, offs)), h)
    (act,), s6 = stage(lambda g, u: F.silu(g) * u, g, u)
    gate = r.gates.reshape(-1).index_select(0, order)[:, None]
    narrow = act.shape[1] < moe.w_down.shape[2]
    (down,), s7 = stage(lambda act, gate: grouped_matmul(act * gate, moe.w_down, offs) if narrow else
                        grouped_matmul(act, moe.w_down, offs) * gate, act, gate)
    (y,), s8 = stage(lambda down: torch.zeros(x.shape, dtype=down.dtype, device=down.device).index_add_(0, tok, down),
                     down)
    (acts,), s9 = stage(lambda act: act.index_select(0, inverse).view(*r.idx.shape, -1), act)
    _, s10 = stage(lambda lse, mass, psum, acts: aux_losses(  # two layers, so that R_cp is not 0
        [r._replace(lse=lse, mass=mass, psum=psum, acts=acts)] * 2, AUX, all_terms=False)[0],
        r.lse, r.mass, r.psum, acts)
    return [s1, s2, s3, s4, s5, s6, s7, s8, s9, s10], y


def breakdown_bench(args):
    """One MoE layer, forward + backward, stage by stage (each stage timed alone on its own inputs),
    beside the dense SwiGLU MLP of the same active compute; then the default run's whole training step,
    dense vs MoE. Interleaved, medians; CPU: 1 and 2 threads."""
    import json
    from model import MLP, MoE
    device = "cuda" if CUDA else "cpu"
    T, d = (16384, 768) if CUDA else (4096, 256)
    shapes = [(8, 2), (64, 8), (256, 8)]
    threads = [torch.get_num_threads()] if CUDA else [1, 2]
    result = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__, "T": T, "d": d,
              "layers": [], "step": []}
    print(f"device: {result['device']}, torch {torch.__version__}; one MoE layer, T={T} tokens, d={d}, "
          f"{'bf16' if CUDA else 'fp32'}, "
          f"forward+backward, ms (median of {args.steps}); the layer is the sum of its stages, each timed alone")
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        clock = time.process_time if n_threads == 1 and not CUDA else time.perf_counter
        for E, k in shapes:
            torch.manual_seed(0)
            cfg = GPTConfig(n_layer=1, n_head=4, n_embd=d, n_experts=E, top_k=k)
            dtype = torch.bfloat16 if CUDA else torch.float32  # bf16 on a GPU: its grouped GEMM takes bf16 only
            moe, dense = MoE(cfg).to(device, dtype), MLP(d, cfg.ffn_hidden).to(device, dtype)
            x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
            stages, y = layer_stages(moe, x)
            with torch.no_grad():  # the stages are the model's own code path: the same output
                assert torch.allclose(y.float(), moe(x[None])[0][0].float(), atol=1e-5 if not CUDA else 2e-2)
            arms = dict(zip(STAGES, stages))
            gy = torch.randn(T, d, device=device, dtype=dtype)
            arms["dense"] = lambda: torch.autograd.backward(dense(x)[0], gy)
            arms["MoE.forward"] = lambda: torch.autograd.backward(moe(x[None])[0][0], gy)
            times = {a: [] for a in arms}
            for fn in arms.values():
                fn(), fn()
            for _ in range(args.steps):
                for a, fn in arms.items():
                    if CUDA:
                        torch.cuda.synchronize()
                    t0 = clock()
                    fn()
                    if CUDA:
                        torch.cuda.synchronize()
                    times[a].append(clock() - t0)
            med = {a: statistics.median(v) * 1e3 for a, v in times.items()}
            stage = {name: med[name] for name in STAGES}
            layer = sum(stage.values()) - stage["aux losses"]
            row = {"threads": n_threads, "E": E, "k": k, "f": cfg.expert_hidden, "dense_ms": med["dense"],
                   "moe_ms": layer, "moe_with_aux_ms": layer + stage["aux losses"],
                   "module_ms": med["MoE.forward"], "stages_ms": stage}
            result["layers"].append(row)
            print(f"\nthreads {n_threads}, E={E}, k={k}, f={cfg.expert_hidden}: dense MLP {med['dense']:.1f}, "
                  f"MoE layer {row['moe_ms']:.1f} ({row['moe_ms'] / med['dense']:.2f}x; "
                  f"MoE.forward as one: {med['MoE.forward']:.1f}), "
                  f"with its aux losses {row['moe_with_aux_ms']:.1f} ({row['moe_with_aux_ms'] / med['dense']:.2f}x)")
            for name, ms in stage.items():
                print(f"  {name:<18} {ms:8.2f} ms {100 * ms / row['moe_with_aux_ms']:6.1f}%")
    result["step"] = step_ratios(args, threads)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        breakdown_figure(result, os.path.splitext(args.json)[0] + ".png")
        print(f"wrote {args.json} and its figure")


def breakdown_figure(result, path):
    """One bar per (threads, E, k): the MoE layer's stages stacked, beside the dense MLP's bar; in units
    of the dense MLP's time, so that 1 is break-even."""
    from support.plots import plt
    rows = result["layers"]
    fig, ax = plt.subplots(figsize=(10, 0.55 * 2 * len(rows) + 2.0))
    colors = plt.get_cmap("tab20")
    for i, row in enumerate(rows):
        y, left = 2 * i, 0.0
        for j, name in enumerate(STAGES):
            width = row["stages_ms"][name] / row["dense_ms"]
            ax.barh(y, width, left=left, color=colors(j), label=name if i == 0 else None)
            left += width
        ax.barh(y + 0.8, 1.0, color="0.6", label="dense MLP" if i == 0 else None)
        ax.text(left + 0.02, y, f"{left:.2f}x", va="center", fontsize=8)
    ax.set_yticks([2 * i + 0.4 for i in range(len(rows))],
                  [f"E={r['E']}, k={r['k']}, {r['threads']} thread{'s' * (r['threads'] > 1)}" for r in rows])
    ax.axvline(1.0, color="k", lw=1, ls="--")
    ax.set(xlabel="time / the dense MLP's (forward + backward)", title=f"one MoE layer, T={result['T']}, "
           f"d={result['d']}, {result['device']}: where the time goes")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, ncol=6, loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def step_ratios(args, threads):
    """The default run's whole training step (CPU preset shape; the GPU default on CUDA), dense vs MoE with
    the default auxiliary losses: forward, losses, backward, AdamW. Interleaved, medians. On a CPU also
    wider models, more tokens per step and top-1 routing at one thread: where the MoE's overhead shrinks
    (the crossover on the wall clock needs the step ratio below 1 + what the MoE gains per step)."""
    device = "cuda" if CUDA else "cpu"
    cpu = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)
    runs = [(n, dict(vocab_size=65), 64) for n in threads] if CUDA else \
        [(n, cpu, 12) for n in threads] + [(1, {**cpu, "n_embd": d}, 12) for d in (256, 512)] + \
        [(1, cpu, 48), (1, {**cpu, "top_k": 1}, 48)]  # the last: top-1 routing (Switch), experts as wide as the MLP
    rows = []
    for n_threads, base, B in runs:
        torch.set_num_threads(n_threads)
        steps = {}
        hash_coefs = {k: v for k, v in AUX.items() if k == "c_sp"}  # hash: L_lb, L_z and R_cp are constants
        for name, extra, coefs in (("dense", dict(n_experts=0), {}), ("MoE", {}, AUX), ("MoE, no aux", {}, {}),
                                   ("hash MoE", dict(router="hash"), hash_coefs)):
            torch.manual_seed(0)
            model = GPT(GPTConfig(**base, **extra)).to(device)
            idx = torch.randint(0, 65, (B, model.config.block_size), device=device)
            steps[name] = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), idx, coefs)
        times, memory = {n: [] for n in steps}, {}
        for n, step in steps.items():  # the peak memory of each, alone
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            step()
            memory[n] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
        for _ in range(args.steps):
            for n, step in steps.items():
                times[n].append(step_timer(step, 1))
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        shape = GPTConfig(**base)
        tokens = B * shape.block_size
        row = {"threads": n_threads, "n_embd": shape.n_embd, "top_k": shape.top_k, "batch": B,
               **{f"{n}_ms": v for n, v in med.items()},
               **{f"{n}_tokens_per_s": tokens / v * 1e3 for n, v in med.items()},
               **({f"{n}_peak_GiB": m for n, m in memory.items()} if CUDA else {})}
        peak = next((v for kk, v in PEAK_BF16_TFLOPS.items() if CUDA and kk in torch.cuda.get_device_name()), None)
        if peak:  # MFU by GPT.flops_per_token
            for n, extra in (("dense", dict(n_experts=0)), ("MoE", {})):
                with torch.device("meta"):
                    flops = tokens * GPT(GPTConfig(**base, **extra)).flops_per_token()
                row[f"{n}_mfu"] = flops / (med[n] / 1e3) / (peak * 1e12)
        rows.append(row)
        print(f"\nwhole training step, {base}, batch {B}, threads {n_threads}: dense {med['dense']:.1f} ms, MoE "
              f"{med['MoE']:.1f} ms ({med['MoE'] / med['dense']:.2f}x; tokens/s {med['dense'] / med['MoE']:.2f}x the "
              f"dense model's), MoE without aux losses {med['MoE, no aux']:.1f} ms "
              f"({med['MoE, no aux'] / med['dense']:.2f}x), "
              f"hash MoE {med['hash MoE']:.1f} ms ({med['hash MoE'] / med['dense']:.2f}x)"
              + (f"; peak memory dense {memory['dense']:.2f} GiB, MoE {memory['MoE']:.2f} GiB" if CUDA else "")
              + (f"; MFU dense {100 * row['dense_mfu']:.1f}%, MoE {100 * row['MoE_mfu']:.1f}%" if peak else ""))
    return rows


def default_steps(extra=(), moe=()):
    """train.py's own training step of the CPU default run with the settings `extra` (train.train_step:
    forward, the auxiliary losses, backward, clipping, AdamW), dense and MoE (with the MoE's own settings
    `moe` too) -> {name: step closure}."""
    import train
    from support import launch
    env, steps = launch.Processes("cpu", "float32"), {}
    for name, args in (("dense", [*extra, "--n_experts=0"]), ("MoE", [*extra, *moe])):  # dense whatever extra says
        cfg, model_cfg = train.setup(args)[0].build(train.TrainConfig, train.FamilyConfig)  # the CPU preset
        torch.manual_seed(0)
        model = train.make_model(cfg, model_cfg)  # as train.py builds it: its expert_init, its router_impl
        opt, ids = train.make_optimizer(model, cfg), torch.randint(0, 65, (cfg.batch_size, model_cfg.block_size))
        steps[name] = lambda m=model, o=opt, c=cfg, i=ids: train.train_step(m, o, lambda: (i, i, None), c, env)
    return steps


def interleaved(steps, n, warmup=3):
    """Each closure of `steps` run warmup + n times, in turns (the machine's drift hits all alike) ->
    {name: (median process-time seconds, median minor page faults per step)}, after the warm-up, when
    every page has been touched once (the median: a step that grows the heap faults on its new pages
    whatever the allocator keeps)."""
    import resource
    times, faults = {name: [] for name in steps}, {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
            step()
            if i >= warmup:
                times[name].append(time.process_time() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {name: (statistics.median(times[name]), statistics.median(faults[name])) for name in steps}


def malloc_child(keep, steps, out):
    """In a fresh process: default_steps() interleaved at one thread, with glibc's allocator as it comes or
    as support/launch.keep_freed_memory sets it -> out: {name: (ms, page faults) per step}."""
    from support import launch
    if not keep:
        launch.keep_freed_memory = lambda: None  # launch.Processes sets it on a CPU: the counterfactual
    torch.set_num_threads(1)
    out.put({name: (t * 1e3, f) for name, (t, f) in interleaved(default_steps(), steps).items()})


def malloc_run(keep, steps):
    """malloc_child in a fresh interpreter (spawned: glibc's settings as they come, unless the caller's
    environment preloads another allocator) -> {name: (ms, page faults) per step}."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=malloc_child, args=(keep, steps, out))
    child.start()
    try:
        result = out.get(timeout=600)
    except queue.Empty:
        raise RuntimeError(f"the measuring process ended without a result (exit code {child.exitcode})") from None
    child.join()
    return result


def malloc_bench(args):
    """Why train.py sets glibc's allocator (support/launch.keep_freed_memory): each setting in its own process,
    twice, alternating (the machine drifts)."""
    if CUDA:
        print("--malloc measures the CPU default's steps: on a GPU, PyTorch's caching allocator keeps freed "
              "memory anyway")
        return
    print("train.py's training step of the default run, one thread, dense and MoE interleaved: ms per step "
          "(process time, median; page faults per step, median)")
    for keep in (False, True, False, True):
        r = malloc_run(keep, args.steps)
        print(f"{'kept (train.py)' if keep else 'as glibc comes':<16}: "
              f"dense {r['dense'][0]:6.1f} ({r['dense'][1]:5.0f}), "
              f"MoE {r['MoE'][0]:6.1f} ({r['MoE'][1]:5.0f}), ratio {r['MoE'][0] / r['dense'][0]:.2f}x")
