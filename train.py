"""
Train a GPT-MoE. nanoGPT layout: settings are the globals below; override them with config files
and --key=value, e.g.

    python train.py                                   # the teaching run (CPU preset without a GPU)
    python train.py config/ermoe.py --max_iters=500   # a config file, then overrides
    torchrun --standalone --nproc_per_node=2 train.py # DDP, one process per GPU (gloo on CPU)

Model settings (n_layer, n_experts, top_k, router, ...) are the fields of GPTConfig in model.py;
they are overridden the same way and declared only there.

Loss (docs/design.md §3): CE + c_lb*L_lb + c_z*L_z + c_sp*R_sp + c_cp*R_cp (+ mu_ortho * penalty).
Every `eval_interval` steps: val loss and per-layer routing metrics (metrics.py) are printed and
appended to out_dir/log.jsonl, and out_dir/ckpt.pt is written atomically. At the end: samples and
PNG plots (analyze.py).
"""

import ast
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from analyze import plot_run
from data import SyntheticMixture, get_batch, gpt2_encoding, load_split, prepare
from losses import aux_losses
from metrics import RoutingStats
from model import GPT, GPTConfig

# ------------------------------------------------------------------------------------------------
# settings: the default is the GPU teaching run (a 6-layer, 8-expert GPT on tiny Shakespeare)
# I/O
out_dir = "out"
eval_interval = 100         # evaluate, log routing metrics and checkpoint every this many steps
log_interval = 10           # print a train line every this many steps
eval_iters = 40             # batches per evaluation (the same batches every time)
init_from = "scratch"       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
num_samples = 2             # text samples printed at the end
sample_tokens = 120
# data
dataset = "shakespeare"     # data/<dataset>/input.txt (GPT-2 BPE), or 'synthetic' (data.SyntheticMixture)
batch_size = 32
gradient_accumulation_steps = 1
# MoE losses (coefficients; each term is also logged unscaled)
c_lb = 0.01                 # load balancing (0 by default for router=ermoe)
c_z = 1e-3                  # router z-loss (0 by default for router=ermoe)
c_sp = 2e-3                 # specialization loss (Hu et al. 2026, Eq. 4); 0 = off
c_cp = 1e-3                 # cross-layer coupling loss (Hu et al. 2026, Eq. 7); 0 = off
mu_ortho = 1e-2             # soft orthogonality penalty, only with ermoe_basis='penalty'
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 1e-3
max_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # 0 = off
warmup_iters = 100
lr_decay_iters = 0          # 0 = max_iters
min_lr = 1e-4
# system
device = "auto"             # 'auto' (cuda if present, else cpu with the CPU preset) | 'cpu' | 'cuda'
dtype = "auto"              # 'auto' (bfloat16 autocast on CUDA, else float32) | 'bfloat16' | 'float32'
compile = True              # torch.compile the model (ignored by the CPU preset unless set)
seed = 1337

# Without a GPU, `python train.py` runs this small model instead (< 10 min on 2 CPU cores).
# Keys set explicitly in a config file or on the command line still win.
CPU_PRESET = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, n_experts=4, top_k=2,
                  batch_size=16, max_iters=500, eval_interval=100, eval_iters=10, log_interval=20,
                  warmup_iters=50, learning_rate=2e-3, min_lr=2e-4, compile=False, sample_tokens=60)
# Router-specific defaults: ERMoE is claimed not to need a balancing loss (docs/design.md §2).
ERMOE_DEFAULTS = dict(c_lb=0.0, c_z=0.0)
# ------------------------------------------------------------------------------------------------


def parse_config(defaults, argv):
    """Apply config files, then --key=value, over `defaults`; returns (config, explicitly set keys)."""
    config, explicit = dict(defaults), set()

    def assign(key, value, origin):
        if key not in config:
            raise ValueError(f"unknown setting '{key}' ({origin}); known: {', '.join(sorted(config))}")
        want = type(defaults[key])
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ValueError(f"setting '{key}' expects {want.__name__}, got {value!r} ({origin})")
        config[key] = value
        explicit.add(key)

    for arg in sorted(argv, key=lambda a: a.startswith("--")):  # config files first, then --key=value
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"expected --key=value, got '{arg}'")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string
            assign(key, value, "command line")
        else:
            if not os.path.exists(arg):
                raise FileNotFoundError(f"config file not found: {arg}")
            scope = {}
            exec(open(arg).read(), {}, scope)
            for key, value in scope.items():
                if not key.startswith("_"):
                    assign(key, value, arg)
    return config, explicit


def get_lr(it, cfg):
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > decay_iters:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def make_optimizer(model, cfg, device_type):
    """AdamW; no weight decay on norms, biases and anything of the router (incl. ERMoE P, lambda, beta)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "router" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device_type == "cuda")


def load_checkpoint(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        _ = ckpt["model"], ckpt["model_args"], ckpt["iter_num"]
    except Exception as err:
        raise ValueError(f"checkpoint {path} is unreadable or incomplete ({type(err).__name__}: {err})".split("\n")[0])
    return ckpt


def default_settings():
    """The globals above (training) and the GPTConfig fields (model): every key --key=value accepts.
    Model fields come as declared, so derived widths stay 0 ("derive from the final settings") until
    GPTConfig is built from the final values; an instance would carry the default model's widths."""
    train = {k: v for k, v in globals().items()
             if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str))}
    return {**train, **{f.name: f.default for f in fields(GPTConfig)}}


def setting_notes():
    """Each setting's trailing comment where it is declared (the globals above, GPTConfig's fields)."""
    import inspect
    import re
    import model
    text = inspect.getsource(sys.modules[__name__]) + inspect.getsource(model.GPTConfig)
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\w+)(?:\s*:\s*\w+)?\s*=[^#\n]*#\s*(.*)$", text, re.M)}


def setup(argv):
    """Everything that can fail on bad input, before any training: config, device, data, model."""
    cfg, explicit = parse_config(default_settings(), argv)
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg["device"] == "cpu":
            preset = {k: v for k, v in CPU_PRESET.items() if k not in explicit}
            cfg.update(preset)
            print(f"no GPU found: running the CPU preset ({', '.join(f'{k}={v}' for k, v in preset.items())})")
    if cfg["device"] not in ("cpu", "cuda") and not cfg["device"].startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got '{cfg['device']}'")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    if cfg["router"] == "ermoe":
        cfg.update({k: v for k, v in ERMOE_DEFAULTS.items() if k not in explicit})
    if cfg["top_k"] == 1 and cfg["gate_renorm"] and cfg["n_experts"] > 0:
        print("note: top_k=1 with gate_renorm=True makes every gate 1: the router then learns only "
              "from the auxiliary losses (set gate_renorm=False for Switch-style gates = p)")
    if cfg["init_from"] not in ("scratch", "resume"):
        raise ValueError(f"init_from must be scratch or resume, got '{cfg['init_from']}'")
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "bfloat16" if cfg["device"].startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if cfg["dtype"] not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be auto, bfloat16 or float32, got '{cfg['dtype']}'")
    ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt")) if cfg["init_from"] == "resume" else None
    model_args = ckpt["model_args"] if ckpt else {f.name: cfg[f.name] for f in fields(GPTConfig)}
    model_cfg = GPTConfig(**model_args)  # validates: n_embd % n_head, top_k <= n_experts, ...
    cfg.update(asdict(model_cfg))
    return cfg, model_cfg, ckpt


def main(argv):
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once in a log file too
    if {"-h", "--help"} & set(argv):
        notes = setting_notes()
        print(__doc__ + "\nsettings (--key=default  what it is):\n" +
              "\n".join(f"  {f'--{k}={v!r}':<32} {notes.get(k, '')}" for k, v in default_settings().items()))
        return
    try:
        cfg, model_cfg, ckpt = setup(argv)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")

    # distributed data parallel: one process per device, launched by torchrun
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = cfg["device"]
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        if cfg["gradient_accumulation_steps"] % world != 0:
            sys.exit(f"error: gradient_accumulation_steps must be divisible by the {world} processes")
        cfg["gradient_accumulation_steps"] //= world
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if cfg["dtype"] == "bfloat16" else nullcontext()
    out_dir, log_path = cfg["out_dir"], os.path.join(cfg["out_dir"], "log.jsonl")

    B, S = cfg["batch_size"], cfg["block_size"]
    if cfg["dataset"] == "synthetic":  # generated on the fly; the mixture itself is fixed (seed 0)
        mixture = SyntheticMixture(vocab=min(256, model_cfg.vocab_size))
        splits = {"train": None, "val": None}
    else:
        mixture = None
        try:
            folder = prepare(cfg["dataset"]) if master else None
            if ddp:
                dist.barrier()  # rank 0 tokenises, the others wait for the bins
            folder = folder or prepare(cfg["dataset"])
            splits = {split: load_split(folder, split) for split in ("train", "val")}
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")

    def batch(split, gen):
        """(x, y, source labels or None) for one batch of the split."""
        if mixture:
            return mixture.batch(B, S, gen, device)
        return (*get_batch(splits[split], B, S, gen, device), None)

    torch.manual_seed(cfg["seed"])
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device_type)
    batch_gen = torch.Generator().manual_seed(cfg["seed"] + rank)  # training batches, checkpointed
    iter_num, best_val = 0, float("inf")
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batch_gen.set_state(ckpt["batch_rng"][rank % len(ckpt["batch_rng"])])
        torch.set_rng_state(ckpt["torch_rng"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val"]
        print(f"resumed from {out_dir}/ckpt.pt at iter {iter_num}")
    total, active = model.num_params()
    if master:
        os.makedirs(out_dir, exist_ok=True)
        kept = []
        if ckpt and os.path.exists(log_path):  # keep the log up to the checkpoint; the rest is redone
            recs = [json.loads(line) for line in open(log_path)]
            kept = [json.dumps(r) + "\n" for r in recs
                    if r["iter"] < iter_num or (r["iter"] == iter_num and "val_loss" not in r)]
        with open(log_path, "w") as fh:
            fh.writelines(kept)
        widths = f"expert width f={model_cfg.expert_hidden}" if model_cfg.n_experts else f"MLP width {model_cfg.ffn_hidden}"
        print(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token "
              f"({model_cfg.n_experts} experts, top-{model_cfg.top_k}, {widths}, router={model_cfg.router})")
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)
    coefs = {k: cfg[k] for k in ("c_lb", "c_z", "c_sp", "c_cp", "mu_ortho")}

    def log(record):
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate():
        """Mean loss on the same eval_iters batches of each split, and routing metrics on val."""
        model.eval()
        result, stats = {}, RoutingStats(n_labels=mixture.n_sources if mixture else 0)
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(1 if split == "train" else 2)  # same batches for every seed
            losses = []
            for _ in range(cfg["eval_iters"]):
                X, Y, labels = batch(split, gen)
                with autocast:
                    _, loss, routes = raw_model(X, Y)
                losses.append(loss.item())
                if split == "val":
                    stats.update(routes, labels)
            result[f"{split}_loss"] = sum(losses) / len(losses)
        model.train()
        layers = stats.summary()
        routers = [b.mlp.router for b in raw_model.blocks if hasattr(b.mlp, "router")]
        for m, router in zip(layers, routers):
            if hasattr(router, "geometry"):  # ERMoE: orthonormality error, subspace overlap, beta
                m.update(router.geometry())
        return result, layers

    def save_checkpoint():
        ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_args": asdict(model_cfg), "config": cfg, "iter_num": iter_num, "best_val": best_val,
                "batch_rng": [batch_gen.get_state()], "torch_rng": torch.get_rng_state()}
        if ddp:  # every rank draws its own batches: keep all sampler states
            states = [None] * world
            dist.all_gather_object(states, batch_gen.get_state())
            ckpt["batch_rng"] = states
        if master:
            tmp = os.path.join(out_dir, "ckpt.pt.tmp")
            torch.save(ckpt, tmp)
            os.replace(tmp, os.path.join(out_dir, "ckpt.pt"))  # atomic: a crash keeps the old file

    tokens_per_iter = B * S * cfg["gradient_accumulation_steps"] * world
    t_start, t_last, start_iter = time.time(), time.time(), iter_num
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]:
            result, layers = evaluate()
            best_val = min(best_val, result["val_loss"])
            if iter_num > start_iter or not ckpt:
                save_checkpoint()
            if master:
                print(f"eval {iter_num}: train {result['train_loss']:.4f}, val {result['val_loss']:.4f}")
                for i, m in enumerate(layers):
                    extra = f" source NMI {m['source_nmi']:.3f}" if "source_nmi" in m else ""
                    print(f"  moe layer {i}: load cv {m['cv']:.3f} max/mean {m['max_mean']:.2f} "
                          f"dead {m['dead']} entropy {m['entropy_norm']:.3f} top-k mass {m['topk_mass']:.3f}{extra}")
                log({"iter": iter_num, **result, "layers": layers, "final": iter_num >= cfg["max_iters"]})
        if iter_num >= cfg["max_iters"]:
            break

        loss_sum, total_sum, terms_sum = 0.0, 0.0, {}
        for micro in range(cfg["gradient_accumulation_steps"]):
            X, Y, _ = batch("train", batch_gen)
            if ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == cfg["gradient_accumulation_steps"] - 1
            with autocast:
                _, ce, routes = model(X, Y)
                logged = (iter_num + 1) % cfg["log_interval"] == 0  # zero-coefficient terms: log steps only
                aux, terms = aux_losses(routes, **coefs, all_terms=logged)
                loss = (ce + aux) / cfg["gradient_accumulation_steps"]
            loss.backward()
            loss_sum = loss_sum + ce.detach() / cfg["gradient_accumulation_steps"]
            total_sum = total_sum + loss.detach()
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / cfg["gradient_accumulation_steps"]
        # one host sync per step: needed to stop on a NaN/inf (CE or auxiliary) before the update
        lossf, totalf = torch.stack([loss_sum, total_sum]).tolist()
        if not math.isfinite(totalf):
            if master:
                print(f"error: loss is {totalf} at iter {iter_num}; stopped before the update. "
                      f"The last good checkpoint is {out_dir}/ckpt.pt")
            sys.exit(1)
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if master and iter_num % cfg["log_interval"] == 0:
            now = time.time()
            dt = (now - t_last) / cfg["log_interval"]
            t_last = now
            eta = (cfg["max_iters"] - iter_num) * (now - t_start) / (iter_num - start_iter)
            terms_f = {f"{k}": round(float(v), 6) for k, v in terms_sum.items()}
            scaled = " ".join(f"{k} {v:.3f}" for k, v in terms_f.items())
            print(f"iter {iter_num}: loss {lossf:.4f} | {scaled} | {dt * 1000:.0f} ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s, eta {eta / 60:.1f} min")
            log({"iter": iter_num, "train_loss": lossf, "lr": lr, **terms_f,
                 **{f"{k}_scaled": round(coefs[f"c_{k}" if k != "ortho" else "mu_ortho"] * v, 6)
                    for k, v in terms_f.items()}})

    if master:
        print(f"done: {iter_num - start_iter} steps in {(time.time() - t_start) / 60:.1f} min, "
              f"best val loss {best_val:.4f}")
        enc = gpt2_encoding()
        start = torch.tensor([enc.encode_ordinary("\n")], device=device)
        for _ in range(cfg["num_samples"] if not mixture else 0):  # synthetic tokens are not text
            out = raw_model.generate(start, cfg["sample_tokens"], temperature=0.8, top_k=200, n_vocab=enc.n_vocab)
            print("---------------\n" + enc.decode(out[0].tolist()))
        for path in plot_run(out_dir):
            print(f"wrote {path}")
    if ddp:  # a check that DDP kept every replica identical: hash of all weights per rank
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in raw_model.parameters()))
        hashes = [None] * world
        dist.all_gather_object(hashes, digest.hexdigest())
        if master:
            print(f"ranks hold identical weights: {len(set(hashes)) == 1}")
            log({"iter": iter_num, "param_hashes": hashes})
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
