"""
Train a GPT-MoE. nanoGPT layout: the settings are declared once (TrainConfig in settings.py, GPTConfig
in model.py); override them with config files and --key=value, e.g.

    python train.py                                   # the teaching run (CPU preset without a GPU)
    python train.py config/ermoe.py --max_iters=500   # a config file, then overrides
    python train.py --init_from=resume --max_iters=2000   # continue out/ckpt.pt with its own settings
    torchrun --standalone --nproc_per_node=2 train.py # DDP, one process per GPU (gloo on CPU)

Loss (docs/design.md §3): CE + c_lb*L_lb + c_z*L_z + c_sp*R_sp + c_cp*R_cp (+ mu_ortho * penalty).
Every `eval_interval` steps: val loss and per-layer routing metrics (metrics.py) are printed and
appended to out_dir/log.jsonl, and out_dir/ckpt.pt is written atomically. At the end: samples and
PNG plots (analyze.py).

Nothing is lost (rundir.py): every setting, the data and the model size are checked before any
file is touched, and a mistake ends in one `error:` line; a new run refuses an out_dir that holds
another run (unless overwrite=True); one run per out_dir (a lock); the NaN guard runs before every
checkpoint, so a checkpoint on disk is always finite; Ctrl-C stops cleanly at the last checkpoint.
"""

import hashlib
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from losses import COEFFICIENTS, aux_losses
from metrics import RoutingStats
from model import GPT
from rundir import (Interrupted, RunLock, UserError, all_finite, append_log, check_writable_dir, cli,
                    describe_run, read_log, remove_stale_temp_files, rewrite_log, save_checkpoint)
from settings import default_settings, setting_notes, setup


# ------------------------------------------------------------------------------------------------
# what the settings need from this machine: a device, the data, enough memory

def pick_device(cfg, model_cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device} but no CUDA device is available (use --device=cpu)")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise UserError(f"device={device} but there are {torch.cuda.device_count()} CUDA devices")
    if model_cfg.router_impl == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("router_impl=triton needs a CUDA device (on a CPU, TRITON_INTERPRET=1 runs the kernel in "
                        "Triton's interpreter, slowly; or use router_impl=torch)")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def check_memory(model_cfg, device):
    """Refuse a model that cannot fit, before allocating it."""
    n = model_cfg.param_count()
    need = 16 * n  # fp32 weights, gradients and AdamW's two moments
    if device.startswith("cuda"):
        have, where = torch.cuda.get_device_properties(torch.device(device)).total_memory, device
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        raise UserError(f"the model has {n / 1e6:,.0f}M parameters: about {need / 2**30:,.1f} GiB for weights, "
                        f"gradients and AdamW state, more than the {have / 2**30:,.1f} GiB of {where}")


def open_data(cfg, model_cfg, master, rank=0, world=1):
    """-> batch(split, generator, device, rank=0, world=1) -> (x, y, source labels or None), and the
    mixture if synthetic. With world > 1 each process gets its slice of one global batch."""
    from data import SyntheticMixture, get_batch, load_split, max_token_id, prepare
    B, S = cfg.batch_size, model_cfg.block_size
    if cfg.dataset == "synthetic":  # generated on the fly; the mixture itself is fixed (seed 0)
        if model_cfg.vocab_size < 16:
            raise UserError(f"dataset=synthetic needs vocab_size >= 16, got {model_cfg.vocab_size}")
        mixture = SyntheticMixture(vocab=min(256, model_cfg.vocab_size))

        def synthetic(split, gen, device, rank=0, world=1):
            return tuple(t[rank * B:(rank + 1) * B] for t in mixture.batch(B * world, S, gen, device))
        return synthetic, mixture
    folder = prepare(cfg.dataset, verbose=master)
    splits = {split: load_split(folder, split) for split in ("train", "val")}
    for split, data in splits.items():
        if len(data) <= S:
            raise UserError(f"dataset '{cfg.dataset}': the {split} split has {len(data):,} tokens, fewer than "
                            f"block_size+1 = {S + 1} (use a smaller --block_size or more text)")
    top = max_token_id(folder)
    if top >= model_cfg.vocab_size:
        raise UserError(f"dataset '{cfg.dataset}' has token id {top}, outside vocab_size={model_cfg.vocab_size}")
    return (lambda split, gen, device, rank=0, world=1:
            (*get_batch(splits[split], B, S, gen, device, rank, world), None)), None


# ------------------------------------------------------------------------------------------------
# optimisation

def get_lr(it, cfg):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device_type):
    """AdamW; no weight decay on norms, biases and anything of the router (incl. ERMoE P, lambda, beta)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "router" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")


class Diverged(UserError):
    """The loss or the weights became NaN/inf."""


def train_step(model, optimizer, next_batch, accum, coefs, grad_clip, autocast, log_terms, ddp, routers,
               ep=None, balance_group=None):
    """One optimizer step: `accum` micro-batches of forward + losses + backward, then the NaN/inf
    guard (before the update, so the weights stay finite), clipping, the AdamW update, and the
    routers' per-step hooks (e.g. the sigmoid router's bias) with the step's load of every process.
    ep: an expert-parallel layout (parallel.py), which syncs and clips its gradients itself.
    Returns (CE loss, unscaled auxiliary terms) averaged over the micro-batches (and processes)."""
    ce_sum, total_sum, terms_sum, counts = 0.0, 0.0, {}, 0
    hooked = any(r.per_step for r in routers)
    for micro in range(accum):
        X, Y, _ = next_batch()
        if isinstance(model, DDP):  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        with autocast:
            _, ce, routes = model(X, Y)
            aux, terms = aux_losses(routes, **coefs, all_terms=log_terms,  # zero-coefficient terms: log steps only
                                    balance_group=balance_group)
            loss = (ce + aux) / accum
        loss.backward()
        ce_sum = ce_sum + ce.detach() / accum
        total_sum = total_sum + loss.detach()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / accum
        if hooked:
            counts = counts + torch.stack([r.counts for r in routes])    # (L, E) load of the step
    if ep is not None:
        ep.sync_grads(model)
    stats = torch.stack([ce_sum, total_sum, *terms_sum.values()]).float()
    if ddp:  # a NaN on any process stops every process; the logged terms are means over processes
        dist.all_reduce(stats)
        stats /= dist.get_world_size()
    ce_f, total_f, *terms_f = stats.tolist()  # the one host sync of a step: needed to stop before the update
    if not math.isfinite(total_f):
        raise Diverged(f"loss is {total_f}")
    if grad_clip > 0 and ep is not None:
        ep.clip_grad_norm(model, grad_clip)
    elif grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hooked:
        if ddp:  # every process applies the same update from the global load
            dist.all_reduce(counts)
        for router, c in zip(routers, counts):
            router.update(c)
    return ce_f, dict(zip(terms_sum, terms_f))


@torch.no_grad()
def evaluate(model, batch, cfg, autocast, device, mixture):
    """Mean loss on the same eval_iters batches of each split, and routing metrics on val."""
    model.eval()
    result, stats = {}, RoutingStats(n_labels=mixture.n_sources if mixture else 0)
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(1 if split == "train" else 2)  # same batches for every seed
        losses = []
        for _ in range(cfg.eval_iters):
            X, Y, labels = batch(split, gen, device)
            with autocast:
                _, loss, routes = model(X, Y)
            losses.append(loss.float())
            if split == "val":
                stats.update(routes, labels)
        result[f"{split}_loss"] = torch.stack(losses).mean().item()
    model.train()
    layers = stats.summary()
    for m, router in zip(layers, model.routers()):
        m.update(router.metrics())  # each router's own: ERMoE geometry, the sigmoid router's bias, ...
    return result, layers


# ------------------------------------------------------------------------------------------------
# the run

def share(fn, ddp, *args):
    """Run fn on rank 0 only; under DDP every rank raises the same UserError if rank 0 failed."""
    value, message = None, None
    if not ddp or dist.get_rank() == 0:
        try:
            value = fn(*args)
        except UserError as err:
            message = str(err)
    if ddp:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)
    return value


def prepare_out_dir(cfg, ckpt):
    """Lock out_dir, refuse to replace another run, then cut the log back to the checkpoint."""
    check_writable_dir(cfg.out_dir)
    lock = RunLock(cfg.out_dir).acquire()
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if ckpt:
        kept = []
        if os.path.exists(log_path):  # keep the log up to the checkpoint; the rest is redone
            kept = [r for r in read_log(log_path) if r["iter"] < ckpt["iter_num"]
                    or (r["iter"] == ckpt["iter_num"] and "val_loss" not in r)]
    else:
        existing = describe_run(cfg.out_dir)
        if existing and not cfg.overwrite:
            raise UserError(f"{cfg.out_dir} already holds a run ({existing}); resume it with --init_from=resume, "
                            f"choose another --out_dir, or pass --overwrite=True to replace it")
        kept = []
        if os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
            os.remove(os.path.join(cfg.out_dir, "ckpt.pt"))
    lock.mark()
    remove_stale_temp_files(cfg.out_dir)
    rewrite_log(log_path, kept)
    return lock, log_path


def main(argv):
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once in a log file too
    if {"-h", "--help"} & set(argv):
        notes = setting_notes()
        print(__doc__ + "\nsettings (--key=default  what it is):\n" +
              "\n".join(f"  {f'--{k}={v!r}':<34} {notes.get(k, '')}" for k, v in default_settings().items()))
        return
    ddp = "RANK" in os.environ
    try:
        run(argv, ddp, int(os.environ.get("RANK", 0)))
    except KeyboardInterrupt:  # outside the training loop, which says where it stopped
        raise Interrupted("interrupted (the checkpoint in out_dir, if any, is intact)") from None


def run(argv, ddp, rank):
    cfg, model_cfg, ckpt = setup(argv)
    device, dtype = pick_device(cfg, model_cfg)
    check_memory(model_cfg, device)
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    accum = cfg.gradient_accumulation_steps or world
    if accum % world != 0:
        raise UserError(f"gradient_accumulation_steps={accum} must be a multiple of the {world} processes "
                        f"(or 0 = one micro-step per process)")
    accum //= world
    N = cfg.expert_parallel
    if N > 1:  # parallel.py: the experts of every layer split over N processes
        for ok, why in ((ddp, "needs several processes: torchrun --nproc_per_node=N train.py ..."),
                        (world % N == 0, f"must divide the number of processes ({world})"),
                        (model_cfg.n_experts % N == 0, f"must divide n_experts ({model_cfg.n_experts})"),
                        (model_cfg.dispatch == "sorted", "needs dispatch=sorted"),
                        (model_cfg.capacity_factor == 0, "needs capacity_factor=0 (dropless)")):
            if not ok:
                raise UserError(f"expert_parallel={N} {why}")
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    master = rank == 0
    # rank 0 checks the data and tokenises it once; then the other processes open it (cached bins)
    batch, mixture = share(open_data, ddp, cfg, model_cfg, master) or open_data(cfg, model_cfg, master)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    if ckpt:  # checked before the out_dir is touched; a checkpoint always holds the whole model
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"checkpoint weights do not match its model_args ({str(err).splitlines()[0]})") from None
    ep = None
    if N > 1:
        from parallel import ExpertParallel
        ep = ExpertParallel(N)
        ep.shard(model)  # keep this rank's E/N experts of every layer
    optimizer = make_optimizer(model, cfg, "cuda" if device.startswith("cuda") else "cpu")
    if ckpt and ckpt["optimizer"] is not None:  # None: imported weights (convert.py), a fresh optimizer
        try:
            optimizer.load_state_dict(ep.shard_optimizer_state(ckpt["optimizer"], optimizer, model) if ep
                                      else ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"checkpoint optimizer state does not match the model ({str(err).splitlines()[0]})") from None
    lock, log_path = share(prepare_out_dir, ddp, cfg, ckpt) or (None, os.path.join(cfg.out_dir, "log.jsonl"))
    try:
        loop(cfg, model_cfg, ckpt, model, optimizer, device, dtype, accum, world, rank, ddp, ep, batch, mixture,
             log_path)
    finally:
        if ddp:
            dist.destroy_process_group()


def loop(cfg, model_cfg, ckpt, model, optimizer, device, dtype, accum, world, rank, ddp, ep, batch, mixture,
         log_path):
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # one global batch per step, sliced per process
    iter_num, best_val, saved_iter = 0, float("inf"), None
    if ckpt:
        if ckpt["batch_rng"]:  # (none: imported weights) one state resumes any number of processes
            batch_gen.set_state(ckpt["batch_rng"][0])
        torch.set_rng_state(ckpt["torch_rng"])
        iter_num, best_val, saved_iter = ckpt["iter_num"], ckpt["best_val"], ckpt["iter_num"]
        if master:
            print(f"resumed from {cfg.out_dir}/ckpt.pt at iter {iter_num}")
    total, active = model.num_params()
    if master:
        widths = f"expert width f={model_cfg.expert_hidden}" if model_cfg.n_experts else f"MLP width {model_cfg.ffn_hidden}"
        print(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token "
              f"({model_cfg.n_experts} experts, top-{model_cfg.top_k}, {widths}, router={model_cfg.router})")
    fwd = torch.compile(model) if cfg.compile else model
    if ddp and ep is None:  # plain data parallel; expert parallel syncs its gradients itself (parallel.py)
        fwd = DDP(fwd, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)
    balance_group = dist.group.WORLD if ddp and cfg.balance_stats == "global" else None
    coefs = {c: getattr(cfg, c) for c in COEFFICIENTS.values()}
    settings = {**asdict(cfg), **asdict(model_cfg)}

    def checkpoint():
        state, opt = ep.full_state(model, optimizer) if ep else (model.state_dict(), optimizer.state_dict())
        if master:
            save_checkpoint({"model": state, "optimizer": opt, "model_args": asdict(model_cfg), "config": settings,
                             "iter_num": iter_num, "best_val": best_val, "batch_rng": [batch_gen.get_state()],
                             "torch_rng": torch.get_rng_state()}, cfg.out_dir)

    def last_checkpoint():
        return f"the last good checkpoint is {cfg.out_dir}/ckpt.pt (iter {saved_iter})" if saved_iter is not None \
            else "no checkpoint was written"

    def stop(why):
        return f"{why} at iter {iter_num}; stopped without saving: {last_checkpoint()}"

    tokens_per_iter = cfg.batch_size * model_cfg.block_size * accum * world
    t_start = t_last = time.time()
    start_iter = iter_num
    try:
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                result, layers = evaluate(model, batch, cfg, autocast, device, mixture)
                finite = torch.tensor(float(all_finite(model.parameters())))
                if ddp:  # every process decides alike (an expert-parallel rank holds only its experts)
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not (math.isfinite(result["train_loss"]) and math.isfinite(result["val_loss"]) and finite.item()):
                    raise Diverged(stop(f"evaluation loss is train {result['train_loss']}, val {result['val_loss']} "
                                        f"or the weights are not finite"))
                best_val = min(best_val, result["val_loss"])
                if iter_num != saved_iter:
                    checkpoint()
                    saved_iter = iter_num
                if master:
                    print(f"eval {iter_num}: train {result['train_loss']:.4f}, val {result['val_loss']:.4f}")
                    for i, m in enumerate(layers):
                        extra = f" source NMI {m['source_nmi']:.3f}" if "source_nmi" in m else ""
                        print(f"  moe layer {i}: load cv {m['cv']:.3f} max/mean {m['max_mean']:.2f} dead {m['dead']} "
                              f"entropy {m['entropy_norm']:.3f} top-k mass {m['topk_mass']:.3f}{extra}")
                    append_log(log_path, {"iter": iter_num, **result, "layers": layers,
                                          "final": iter_num >= cfg.max_iters})
            if iter_num >= cfg.max_iters:
                break
            log_step = (iter_num + 1) % cfg.log_interval == 0
            try:
                lossf, terms = train_step(fwd, optimizer, lambda: batch("train", batch_gen, device, rank, world), accum,
                                          coefs, cfg.grad_clip, autocast, log_step, ddp, model.routers(), ep,
                                          balance_group)
            except Diverged as err:
                raise Diverged(stop(str(err))) from None
            iter_num += 1
            if master and log_step:
                now = time.time()
                dt = (now - t_last) / cfg.log_interval
                t_last = now
                eta = (cfg.max_iters - iter_num) * (now - t_start) / (iter_num - start_iter)
                terms_f = {k: round(float(v), 6) for k, v in terms.items()}
                scaled = " ".join(f"{k} {v:.3f}" for k, v in terms_f.items())
                print(f"iter {iter_num}: loss {lossf:.4f} | {scaled} | {dt * 1000:.0f} ms, "
                      f"{tokens_per_iter / dt:,.0f} tok/s, eta {eta / 60:.1f} min")
                append_log(log_path, {"iter": iter_num, "train_loss": lossf, "lr": lr, **terms_f,
                                      **{f"{k}_scaled": round(coefs[COEFFICIENTS[k]] * v, 6)
                                         for k, v in terms_f.items()}})
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at iter {iter_num}; {last_checkpoint()}") from None

    if master:
        print(f"done: {iter_num - start_iter} steps in {(time.time() - t_start) / 60:.1f} min, best val loss {best_val:.4f}")
        if ep:  # generation would need every process in step: sample from the checkpoint instead
            print(f"note: no samples with expert_parallel; python sample.py --out_dir={cfg.out_dir} reads the checkpoint")
        finish(model, cfg, device, samples=not mixture and not ep)  # synthetic tokens are not text
    if ddp:  # a check that every replica holds the same weights: a hash of the whole model per rank
        state = ep.full_state(model, optimizer)[0] if ep else model.state_dict()
        digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in state.values()))
        hashes = [None] * world
        dist.all_gather_object(hashes, digest.hexdigest())
        if master:
            print(f"ranks hold identical weights: {len(set(hashes)) == 1}")
            append_log(log_path, {"iter": iter_num, "param_hashes": hashes})


def finish(model, cfg, device, samples):
    """Samples and plots at the end (the checkpoint is already safe on disk)."""
    from analyze import plot_run
    from data import load_tokenizer
    if samples and cfg.num_samples > 0:
        enc = load_tokenizer(cfg.out_dir)  # an imported model's own tokenizer.json, else GPT-2's
        start = torch.tensor([enc.encode_ordinary("\n")], device=device)
        for _ in range(cfg.num_samples):
            out = model.generate(start, cfg.sample_tokens, temperature=0.8, top_k=200, n_vocab=enc.n_vocab)
            print("---------------\n" + enc.decode(out[0].tolist()))
    for path in plot_run(cfg.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:], quiet=int(os.environ.get("RANK", 0)) != 0))
