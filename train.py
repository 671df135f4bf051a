"""
Train a GPT-MoE, nanoGPT style. Every setting is declared once, below (TrainConfig), in model.py
(GPTConfig) and, for other MoE families, in families.py (FamilyConfig); config files and --key=value
override them, and --help shows the value each one will take and where it came from.

    python train.py                                   # character-level Shakespeare (the CPU recipe without a GPU)
    python train.py config/facts.py --n_experts=16    # a config file, then overrides
    python train.py --init_from=resume --max_iters=4000   # continue out/ckpt.pt with its own settings
    torchrun --standalone --nproc_per_node=2 train.py # DDP, one process per GPU (gloo on CPU)

Loss (docs/design.md §3): CE + c_lb*L_lb + c_z*L_z + c_sp*R_sp + c_cp*R_cp (+ c_seq*L_seq + mu_ortho * penalty).
Every `eval_interval` steps: train/val loss on fixed batches and per-layer routing metrics
(support/metrics.py), printed and appended to out_dir/log.jsonl; out_dir/ckpt.pt is written, and
best.pt when the val loss is the lowest so far. At the end: the loss on the whole val split, samples
and plots. The run directory is kept safe by support/rundir.py (a lock, atomic checkpoints, a NaN
guard, one `error:` line for any mistake); the device and the processes by support/launch.py.
"""

import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import kernels
from losses import COEFFICIENTS, StepBalance, aux_losses
from families import FamilyConfig, balanced_table, build
from model import GPTConfig, MoE
from router import IMPLS, ROUTERS, choose_impl
from support import launch
from support.checks import check_run
from support.data import open_dataset, standard_error, vocab_of
from support.metrics import RoutingStats
from support.rundir import Diverged, Interrupted, Run, UserError, check_finite, cli, load_checkpoint
from support.settings import Finished, Layered, declared, notes, parse_args, resume_settings
from support.tracking import Tracker, print_eval, samples_and_plots


# ------------------------------------------------------------------------------------------------
# the settings of a run (the model's own are GPTConfig's, in model.py; other families' FamilyConfig's)

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"                 # where ckpt.pt, best.pt, log.jsonl and the plots go
    init_from: str = "scratch"           # 'scratch', 'resume' (continue out_dir/ckpt.pt with its settings) or 'auto'
                                         # (resume if out_dir has a checkpoint, else scratch: a scheduler reruns
                                         # one command)
    overwrite: bool = False              # let a new run replace the run already in out_dir (else refused)
    eval_interval: int = 250             # evaluate, log routing metrics and checkpoint every this many steps
    ckpt_interval_s: float = 0.0         # also write ckpt.pt (no evaluation) this many seconds after the last; 0 = off
    log_interval: int = 10               # print and log a train line every this many steps
    eval_iters: int = 200                # batches per evaluation (the same batches every time)
    num_samples: int = 2                 # text samples printed at the end (0 = none)
    sample_tokens: int = 200             # tokens per sample
    # data
    dataset: str = "shakespeare_char"    # a name under data/ (docs/data.md) or a task of support/tasks.py
    batch_size: int = 64                 # sequences per micro-step and process
    gradient_accumulation_steps: int = 0  # micro-steps per update over all processes; 0 = one per process
    # MoE losses (coefficients; each term is also logged unscaled)
    c_lb: float = 0.01                   # load balancing (a router may default to 0: ermoe, sigmoid, hash)
    c_z: float = 1e-3                    # router z-loss (a router may default to 0: ermoe, sigmoid, hash)
    c_sp: float = 2e-3                   # specialization loss (Hu et al. 2026, Eq. 4); 0 = off
    c_cp: float = 1e-3                   # cross-layer coupling loss (Hu et al. 2026, Eq. 7); 0 = off
    c_seq: float = 0.0                   # DeepSeek-V3's sequence-wise balance loss (its Eq. 17-20; V3: 1e-4); 0 = off
    mu_ortho: float = 1e-2               # soft orthogonality penalty, only with ermoe_basis='penalty'
    # routers held still (course/demos.py hash-why)
    router_frozen_from: int = -1         # the routers' parameters stop learning at this step (0: a random router that
                                         # never learns; StableMoE trains, then freezes it); -1 = never
    hash_balanced: bool = False          # router=hash: Roller et al.'s table balanced by the train split's token counts
    # optimizer: AdamW, linear warmup then cosine decay to min_lr
    learning_rate: float = 1e-3          # peak learning rate
    max_iters: int = 5000                # optimizer steps in all (0 = evaluate only)
    weight_decay: float = 0.1            # AdamW decay on matrices (not on norms and routers)
    beta1: float = 0.9                   # AdamW beta1, in [0, 1)
    beta2: float = 0.95                  # AdamW beta2, in [0, 1)
    grad_clip: float = 1.0               # clip the gradient norm to this; 0 = off
    warmup_iters: int = 100              # linear warmup steps
    lr_decay_iters: int = 0              # cosine decay length; 0 = max_iters
    min_lr: float = 1e-4                 # learning rate at the end of the decay, <= learning_rate
    # system
    device: str = "auto"                 # 'auto' (cuda if present, else cpu with the CPU preset) | 'cpu' | 'cuda[:N]'
    dtype: str = "auto"                  # 'auto' (bfloat16 autocast on CUDA, else float32) | 'bfloat16' | 'float32'
    compile: bool = True                 # torch.compile the model (off in the CPU preset unless set)
    router_impl: str = "auto"            # the routing pass: auto (Triton on CUDA if it fits) | torch | compile | triton
    expert_init: str = "random"          # 'random' | 'upcycle': every expert a copy of one MLP + 1% noise
    seed: int = 1337                     # seed of the initialisation and the training batches
    expert_parallel: int = 1             # N > 1: each MoE layer's experts split over N processes (torchrun)
    balance_stats: str = "global"        # L_lb's statistics: all processes' batches ('global'), each one's ('local'),
                                         # or every micro-batch of the step and every process ('step', Qiu et al.
                                         # 2025)
    # tracking (log.jsonl always; wandb on request, support/tracking.py)
    wandb_log: bool = False              # also send every log record to Weights & Biases (pip install wandb)
    wandb_project: str = "nanomoe-routing"  # the wandb project
    wandb_run_name: str = ""             # the wandb run's name; "" = wandb's own

    def __post_init__(self):
        check_run(self, IMPLS)  # every setting in range (support/checks.py, as GPTConfig's): one error line


def _require(ok, message):
    if not ok:
        raise UserError(message)


# The declared defaults above (and GPTConfig's) are the GPU run: the shape and schedule of nanoGPT's
# train_shakespeare_char (6 x 384, block 256, batch 64, 5000 steps; val 1.4697 on an A100), with MoE
# layers of the same active compute. Not yet run on a GPU. Without a GPU, `python train.py` runs
# nanoGPT's CPU recipe for the same data instead (its README: val ~1.88, 2000 steps). A preset sets
# only what the user did not set in a config file or on the command line.
GPU_PRESET = dict(dropout=0.2, beta2=0.99)
CPU_PRESET = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, eval_interval=250,
                  eval_iters=20, log_interval=100, dropout=0.0, beta2=0.99, compile=False, sample_tokens=200)
NANOGPT = {  # nanoGPT's published results on shakespeare_char, with the settings that decide them
    "val ~1.88 (its README's CPU recipe)": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                                                max_iters=2000),
    "val 1.4697 (train_shakespeare_char on an A100)": dict(n_layer=6, n_head=6, n_embd=384, block_size=256,
                                                           batch_size=64, max_iters=5000),
}
# What a resumed run may change; any other setting comes from the checkpoint, and a different value
# on the command line is refused (it would silently continue another experiment).
RESUMABLE = ("init_from", "out_dir", "overwrite", "max_iters", "lr_decay_iters", "eval_interval", "log_interval",
             "eval_iters", "num_samples", "sample_tokens", "device", "dtype", "compile", "router_impl", "dispatch",
             "expert_parallel", "ckpt_interval_s")


def setup(argv):
    """The settings of this run, in layers (later ones win; the presets, the router's coefficients and
    the dataset's vocabulary never override what a config file or the command line set):
    declared defaults <- the preset of this machine <- the router's own loss coefficients <- the
    dataset's vocabulary <- config files <- --key=value; then the widths left at 0 are derived.
    On resume the checkpoint's settings replace the first four. -> (Layered, checkpoint or None)."""
    settings = Layered(declared(TrainConfig, FamilyConfig))
    for origin, values in parse_args(argv, settings.defaults):
        settings.apply(origin, values, explicit=True)
    out_dir, init_from = settings.values["out_dir"], settings.values["init_from"]
    if init_from == "resume" or (init_from == "auto" and os.path.isfile(os.path.join(out_dir, "ckpt.pt"))):
        ckpt = load_checkpoint(out_dir, hint="nothing to resume; drop --init_from=resume to start a run")
        resume_settings(settings, ckpt, os.path.join(out_dir, "ckpt.pt"), declared(FamilyConfig), RESUMABLE)
        return settings, ckpt
    if settings.values["device"] == "auto":
        settings.apply(*(("GPU preset", GPU_PRESET) if torch.cuda.is_available() else ("CPU preset", CPU_PRESET)))
    router = settings.values["router"]
    if router in ROUTERS:  # an unknown name is refused by GPTConfig, naming it
        settings.apply(f"router {router}", ROUTERS[router].defaults)
    vocab = vocab_of(settings.values["dataset"]) if settings.values["dataset"] else None
    if vocab:
        settings.apply(f"dataset {settings.values['dataset']}", {"vocab_size": vocab})
    return settings, None


def impl_problem(model_cfg, impl):
    """Why the routers of model_cfg cannot run their routing pass with router_impl=impl, or None (no routers: None)."""
    router = ROUTERS[model_cfg.router]
    if model_cfg.n_experts == 0:
        return None
    bias = model_cfg.select_bias
    if impl in ("compile", "triton") and (not router.topk_of_logits or bias):
        return (f"router={model_cfg.router}{' with select_bias' * bias} has no fused routing pass: router_impl={impl} "
                f"does not apply to it (use auto or torch{', or select_bias=False' * bias})")
    return kernels.triton_unsupported(model_cfg.n_experts, model_cfg.top_k) if impl == "triton" else None


# ------------------------------------------------------------------------------------------------
# the pieces of a step

def get_lr(it, cfg):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_model(cfg, model_cfg, device="cpu"):
    """The model of model_cfg (families.py: the core GPT, or with another family's parts), its experts
    upcycled if cfg.expert_init says so, its routers' router_impl decided for the device ('auto'), on it."""
    model = build(model_cfg)
    if cfg.expert_init == "upcycle":
        upcycle(model)
    for router in model.routers():
        router.impl = choose_impl(cfg.router_impl, router.n_experts, router.k, torch.empty(0, device=device))
    return model.to(device)


@torch.no_grad()
def upcycle(model, noise=0.01):
    """Sparse upcycling (Komatsuzaki et al. 2023): in every MoE block each expert starts as a copy of
    expert 0 plus noise of `noise` times the weights' std, so the experts start nearly identical."""
    for moe in (b.mlp for b in model.blocks if isinstance(b.mlp, MoE)):
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.copy_(w[:1] + noise * w[:1].std() * torch.randn_like(w))


def make_optimizer(model, cfg):
    """AdamW; no weight decay on norms, biases and anything of the router (incl. ERMoE P, lambda, beta). With
    router_frozen_from >= 0 the routers' parameters form a third group, whose learning rate is 0 from then on."""
    decay, no_decay, routers = [], [], []
    for name, p in model.named_parameters():
        frozen = cfg.router_frozen_from >= 0 and "router" in name
        (routers if frozen else no_decay if p.dim() < 2 or "router" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.router_frozen_from >= 0:
        groups.append({"params": routers, "weight_decay": 0.0, "frozen_from": cfg.router_frozen_from})
    # fused: one kernel for every parameter, on CPU too
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def train_step(model, optimizer, batches, cfg, env):
    """One optimizer step: env.accum micro-batches of forward, losses and backward, then the NaN/inf
    guard (before the update, so the weights stay finite), clipping, AdamW, and the bias update of the
    routers that select by one (select_bias, e.g. the sigmoid router) with the step's load. model: the
    GPT; env: the processes (support/launch.py; nothing to do with one), whose env.fwd is the module to
    call (compiled, DDP).
    Returns (CE loss, unscaled auxiliary terms), means over the micro-batches and processes."""
    fwd = model if env.fwd is None else env.fwd
    coefs = {c: getattr(cfg, c) for c in COEFFICIENTS.values()}
    ce_sum, total_sum, terms_sum, load = 0.0, 0.0, {}, 0
    routers = model.routers()
    biased = any(r.select_bias for r in routers)  # then the step's load is counted, for the bias update
    if isinstance(env.pool, StepBalance):  # L_lb's counts of this step's micro-batches: none yet
        env.pool.reset()
    for micro in range(env.accum):
        X, Y, _ = batches()
        env.micro_step(micro)
        with env.autocast:
            _, ce, routes = fwd(X, Y)
            # losses.py; a term whose coefficient is 0 is only logged
            aux, terms = aux_losses(routes, coefs, pool=env.pool, seq_len=X.shape[1])
            loss = (ce + aux) / env.accum
        loss.backward()
        ce_sum = ce_sum + ce.detach() / env.accum
        total_sum = total_sum + loss.detach()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / env.accum
        load = load + torch.stack([r.counts for r in routes]) if biased else load  # (L, E) pairs per expert
    ce_f, total_f, *terms_f = env.mean(torch.stack([ce_sum, total_sum, *terms_sum.values()]).float()).tolist()
    if not math.isfinite(total_f):  # (.tolist() is the one host sync of a step: needed to stop before the update)
        raise Diverged(f"loss is {total_f}")
    env.finish_grads(model, cfg.grad_clip)  # expert parallel's gradient sync, then the clipping
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if biased:
        for router, counts in zip(routers, env.step_load(load)):
            router.update(counts)
    return ce_f, dict(zip(terms_sum, terms_f))


@torch.no_grad()
def evaluate(model, data, cfg, model_cfg, env, last_sets=None):
    """Mean loss on the same eval_iters batches of each split, and routing metrics on val (with the sets of
    experts of the last evaluation of the same batches, last_sets: the routing fluctuation since then).
    -> (losses, per-layer metrics, this evaluation's sets of experts)."""
    model.eval()
    result, stats = {}, RoutingStats(n_labels=data.n_labels)
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(1 if split == "train" else 2)  # same batches for every seed
        losses = []
        for _ in range(cfg.eval_iters):
            X, Y, labels = data.batch(split, cfg.batch_size, model_cfg.block_size, gen, env.device)
            with env.autocast:
                _, loss, routes = model(X, Y)
            losses.append(loss.float())
            if split == "val":
                stats.update(routes, labels, X)
        result[f"{split}_loss"] = torch.stack(losses).mean().item()
    model.train()
    return result, with_router_metrics(stats.summary(last_sets), model), stats.sets()


@torch.no_grad()
def evaluate_whole(model, data, cfg, model_cfg, env):
    """The loss on every target of the val split once (for a synthetic task: its fixed sample or its
    whole table), its standard error, the routing metrics on it, and a task's own numbers."""
    model.eval()
    losses, stats = [], RoutingStats(n_labels=data.n_labels)
    # batches of ~16k tokens, fewer where the logits would pass ~256 MB (no gradient here: memory allows)
    rows = max(cfg.batch_size, min(16384, 2 ** 26 // model_cfg.vocab_size) // model_cfg.block_size)
    for X, Y, labels in data.whole_split("val", rows, model_cfg.block_size, env.device):
        with env.autocast:
            logits, _, routes = model(X, Y)
        ce = F.cross_entropy(logits.float().flatten(0, 1), Y.flatten(), reduction="none")  # (B*S,), 0 at -100
        losses.append(ce[Y.flatten() != -100])
        stats.update(routes, labels, X)
    model.train()
    losses = torch.cat(losses).double().cpu()
    whole = {"val_loss": losses.mean().item(), "se": standard_error(losses), "targets": len(losses),
             "layers": with_router_metrics(stats.summary(), model)}
    if hasattr(data, "bits_stored"):  # the facts tasks: the bits of the table the model holds
        whole["bits"] = data.bits_stored(whole["val_loss"])
    return whole


def with_router_metrics(layers, model):
    for m, router in zip(layers, model.routers()):
        m.update(router.metrics())  # each router's own: ERMoE geometry, the sigmoid router's bias, ...
    return layers


# ------------------------------------------------------------------------------------------------
# the run

def main(argv):
    """The run, top to bottom: the settings, the device and processes, the data, the model and its
    optimizer, the out_dir, then the loop; samples and plots at the end."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once in a log file too
    if {"-h", "--help"} & set(argv):
        settings, _ = setup([a for a in argv if a not in ("-h", "--help")])
        settings.build(TrainConfig, FamilyConfig)
        print(__doc__ + "\nsettings (--key=value [where the value comes from] what it is):\n" +
              settings.explain(notes(TrainConfig, GPTConfig, FamilyConfig)))
        return
    try:
        settings, ckpt = setup(argv)
    except Finished as done:  # a scheduler's rerun of a finished run (--init_from=auto): nothing left to do
        if "--init_from=auto" not in argv:
            raise
        print(f"{done}; the run is finished")
        return
    cfg, model_cfg = settings.build(TrainConfig, FamilyConfig)
    why = impl_problem(model_cfg, cfg.router_impl)
    _require(why is None, why)
    env = launch.start(cfg, model_cfg)  # the device, the dtype, the processes: all checked
    preset = {k: v for k, v in settings.values.items() if settings.origin[k].endswith("preset")}
    if env.master and preset:  # (python train.py --help shows every value and its origin)
        which = "no GPU found: the CPU preset" if "CPU preset" in settings.origin.values() else "the GPU preset"
        print(f"{which} ({', '.join(f'{k}={v}' for k, v in preset.items())})")
    try:
        # the data: the first process prepares it (tokenising once), then every process opens it
        data = launch.share(env, open_dataset, cfg.dataset, model_cfg.vocab_size, env.master) or \
            open_dataset(cfg.dataset, model_cfg.vocab_size, False)
        data.check(model_cfg.block_size, model_cfg.vocab_size)
        # the model and its optimizer
        torch.manual_seed(cfg.seed)
        model = make_model(cfg, model_cfg, env.device)
        if cfg.hash_balanced and not ckpt:  # (a resumed run has its table in the checkpoint)
            _require(model_cfg.router == "hash" and hasattr(data, "token_counts"),
                     f"hash_balanced needs router=hash and a text dataset, got router={model_cfg.router}, "
                     f"{cfg.dataset}")
            table = balanced_table(data.token_counts(), model_cfg.n_experts, model_cfg.top_k)  # (V, k)
            for router in model.routers():
                router.table.copy_(table)
        if ckpt:  # checked before the out_dir is touched; a checkpoint always holds the whole model
            load_state(model.load_state_dict, ckpt["model"], "checkpoint weights do not match its model_args")
        env.attach(model, cfg)  # env.fwd, the module to call: this rank's experts, compiled, DDP (support/launch.py)
        if cfg.balance_stats == "step":  # L_lb's f over the step's micro-batches and processes (Qiu et al. 2025)
            env.pool = StepBalance(launch.all_ranks_sum(env), env.world)
        optimizer = make_optimizer(model, cfg)
        if ckpt and ckpt["optimizer"] is not None:  # None: imported weights (tools/convert.py), a fresh optimizer
            state = env.ep.shard_optimizer_state(ckpt["optimizer"], optimizer, model) if env.ep else ckpt["optimizer"]
            load_state(optimizer.load_state_dict, state, "checkpoint optimizer state does not match the model")
        # the out_dir, and where a resumed run stands
        config = {**asdict(cfg), **asdict(model_cfg)}
        run = Run(cfg.out_dir, env.master)
        # lock, refuse to replace another run (auto without a checkpoint starts over), cut the log
        launch.share(env, run.open, ckpt, cfg.overwrite or cfg.init_from == "auto")
        run.tracker = Tracker(cfg, config, env.master)     # wandb, if asked
        batch_gen = torch.Generator().manual_seed(cfg.seed)  # one global batch per step, sliced per process
        batches = functools.partial(data.batch, "train", cfg.batch_size, model_cfg.block_size, batch_gen, env.device,
                                    env.rank, env.world)
        iter_num, best_val, last_sets = 0, float("inf"), None
        if ckpt:
            if ckpt["batch_rng"]:  # (none: imported weights) one state resumes any number of processes
                batch_gen.set_state(ckpt["batch_rng"][0])
            torch.set_rng_state(ckpt["torch_rng"])
            iter_num, best_val = ckpt["iter_num"], ckpt["best_val"]
            run.resumed(iter_num)
            if env.master:
                print(f"resumed from {cfg.out_dir}/ckpt.pt at iter {iter_num}")
        total, active = model.num_params()
        if env.master:
            widths = (f"expert width f={model_cfg.expert_hidden}" if model_cfg.n_experts
                      else f"MLP width {model_cfg.ffn_hidden}")
            print(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token "
                  f"({model_cfg.n_experts} experts, top-{model_cfg.top_k}, {widths}, router={model_cfg.router})")
        tokens_per_iter = cfg.batch_size * model_cfg.block_size * env.accum * env.world
        def snapshot():  # the checkpoint; with expert parallelism every process gathers the state
            weights, opt = env.full_state(model, optimizer)
            return {"model": weights, "optimizer": opt, "model_args": asdict(model_cfg), "config": config,
                    "iter_num": iter_num, "best_val": best_val, "batch_rng": [batch_gen.get_state()],
                    "torch_rng": torch.get_rng_state(), "tokenizer": data.tokenizer}
        t_start = t_last = time.time()
        start_iter = iter_num
        # the loop
        with env.watch(run, lambda: iter_num, config, model) as watch:  # a signal, divergence, out of memory, a process
                                                                  # lost: one line saying where, the checkpoint intact
            while True:
                lr = get_lr(iter_num, cfg)
                for group in optimizer.param_groups:  # (a frozen group: 0 from its step on)
                    group["lr"] = lr if iter_num < group.get("frozen_from", math.inf) else 0.0
                if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                    result, layers, last_sets = evaluate(model, data, cfg, model_cfg, env, last_sets)
                    check_finite(result, model.parameters(), launch.all_ranks_min(env))  # never save a NaN
                    best = result["val_loss"] < best_val
                    best_val = min(best_val, result["val_loss"])
                    if iter_num != run.saved_iter or best:
                        run.checkpoint(snapshot(), iter_num, best)
                    record = {"iter": iter_num, **result, "layers": layers, "final": iter_num >= cfg.max_iters}
                    if record["final"]:
                        record["whole"] = evaluate_whole(model, data, cfg, model_cfg, env)
                        record["params"] = {"total": total, "active": active, "embedding": model.wte.weight.numel()}
                        record["time_s"] = round(time.time() - t_start, 1)   # this process's training and evaluations
                    if env.master:
                        print_eval(record)
                    run.log(record)
                if iter_num >= cfg.max_iters:
                    break
                lossf, terms = train_step(model, optimizer, batches, cfg, env)
                iter_num += 1
                if env.master and iter_num % cfg.log_interval == 0:
                    now = time.time()
                    dt, t_last = (now - t_last) / cfg.log_interval, now
                    eta = (cfg.max_iters - iter_num) * (now - t_start) / (iter_num - start_iter)
                    terms_f = {k: round(float(v), 6) for k, v in terms.items()}
                    shown = ' '.join(f'{k} {v:.3f}' for k, v in terms_f.items())
                    print(f"iter {iter_num}: loss {lossf:.4f} | {shown} | "
                          f"{dt * 1000:.0f} ms, {tokens_per_iter / dt:,.0f} tok/s, eta {eta / 60:.1f} min")
                    scaled = {f"{k}_scaled": round(getattr(cfg, COEFFICIENTS[k]) * v, 6) for k, v in terms_f.items()}
                    run.log({"iter": iter_num, "train_loss": lossf, "lr": lr, **terms_f, **scaled})
                # a signal: checkpoint, one line, exit; --ckpt_interval_s: a checkpoint
                watch.step_end(iter_num, snapshot)
        # the end: samples, plots, and with several processes a check that their weights agree
        if env.master:
            same = [what for what, recipe in NANOGPT.items() if cfg.dataset == "shakespeare_char"
                    and all(settings.values[k] == v for k, v in recipe.items())]
            print(f"done: {iter_num - start_iter} steps in {(time.time() - t_start) / 60:.1f} min, best val loss "
                  f"{best_val:.4f}" + (f"; nanoGPT's published figure for this recipe: {same[0]}" if same else ""))
            if env.ep:  # generation would need every process in step: sample from the checkpoint instead
                print(f"note: no samples with expert_parallel; python sample.py --out_dir={cfg.out_dir} reads the "
                      "checkpoint")
            samples_and_plots(model, cfg, env.device, data.tokenizer if not env.ep else None)
        if env.ddp:  # every replica should hold the same weights: a hash of the whole model per rank
            hashes = launch.weight_hashes(env, env.full_state(model, optimizer)[0])
            if env.master:
                print(f"ranks hold identical weights: {len(set(hashes)) == 1}")
                run.log({"iter": iter_num, "param_hashes": hashes})
        run.tracker.finish()
    except KeyboardInterrupt as err:  # outside the training loop, which says where it stopped (err: Ctrl-C or a signal)
        raise Interrupted("interrupted (the checkpoint in out_dir, if any, is intact)",
                          getattr(err, "signum", None)) from None
    finally:
        env.fwd = None  # DDP's reducer holds the process group: dropped now, before the group (see launch.end)
        launch.end(env)


def load_state(load, state, what):
    """load(state), a mismatch one UserError line (a checkpoint from elsewhere)."""
    try:
        load(state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{what} ({str(err).splitlines()[0]})") from None


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:], quiet=int(os.environ.get("RANK", 0)) != 0))
