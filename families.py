"""
The router atlas: how other MoE families differ from the core (model.py, router.py), each difference a
short class beside the core one it changes, family by family. Read the core first; each class here is a
diff against it. docs/routers.md shows each family's routing next to transformers' code;
tests/test_families.py checks every family's block against transformers' own, output and gradients.

Notation as in model.py: T tokens, d model width, E routed experts, k experts per token, f expert width.

How a family enters the core: FamilyConfig (the core's GPTConfig plus the settings below) and FamilyGPT,
a GPT whose parts (its norms, attention and feed-forward blocks: model.GPT's three hooks) are built from
the core's classes with the family's differences mixed in. A difference is a mixin: a small class whose
methods replace one method of a core class (and call the core's with super() where they only add to it);
`compose` stacks the mixins whose settings are on. The default run never builds one (`build`).

  family          what differs from the core                               mixed into          its setting
  gpt-oss         a bias on the router's logits                            SoftmaxRouter       router_bias
                  biased experts; (up + 1) * g * sigmoid(1.702 g), clamped  MoE                 expert_bias, expert_act,
                                                                                               swiglu_limit
  Llama 4         the gate scales the expert's input, not its output       a linear router     gate_input
  LongCat-Flash   zero-compute experts: a pair on one returns the token    MoE (router wider)  zero_experts
  ERNIE-4.5       renormalised gates: scores / max(their sum, floor)       a token's router    renorm_floor
  DeepSeek-V4     s = sqrt(softplus(x W^T)); hash layers first             SigmoidRouter       score_fn, hash_layers
                  the experts and shared expert clamped (limit 10)         MoE                 swiglu_limit
  (the course)    a learned token-id table (a new router)                  router.ROUTERS      router=token_table
                  Roller's frequency-balanced hash table                   HashRouter's table  hash_balanced (train.py)
  Qwen            the shared experts' output times sigmoid(x w)            MoE                 shared_gate
  HF backbones    grouped-query attention, head_dim, q/k norms, qkv bias,  attention, GPT      n_kv_head, head_dim, ...
                  partial rotary, rope_theta, norm_eps, untied embeddings
  GLM-4.5         the first layers have a dense MLP                        FamilyGPT           first_dense_layers

(a linear router: softmax or sigmoid; a token's router: any whose routing pass is Router.forward's, not
ERMoE's or expert choice's.)
"""

import functools
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from model import GPT, MLP, CausalSelfAttention, GPTConfig, MoE, apply_rotary, grouped_matmul, rotary_cache, swiglu
from router import ROUTERS, Router, random_table
from support.checks import check_and_derive, require, require_choices, require_ranges


# ------------------------------------------------------------------------------------------------
# the settings: the core's and each family's

CORE = {f.name for f in fields(GPTConfig)}


@dataclass
class FamilyConfig(GPTConfig):
    # gpt-oss
    router_bias: bool = False   # softmax router: a learned bias on the logits, a = x W^T + b (gpt-oss)
    expert_bias: bool = False   # biases on the experts' three projections (gpt-oss)
    expert_act: str = "swiglu"  # 'swiglu' | 'gpt_oss': (up + 1) * g * sigmoid(1.702 g)
    swiglu_limit: float = 0.0   # clamp g <= limit, |up| <= limit before the activation (gpt-oss 7, DeepSeek-V4 10)
    # Llama 4
    gate_input: bool = False    # the gate scales the expert's input, not its output (Llama 4)
    # LongCat-Flash
    zero_experts: int = 0       # router choices that compute nothing and return the token (LongCat-Flash)
    # ERNIE-4.5
    renorm_floor: float = 0.0   # renormalised gates: scores / max(their sum, this) (ERNIE-4.5: 1e-12); 0 = none
    # DeepSeek-V4
    score_fn: str = "sigmoid"   # sigmoid router's score: 'sigmoid' (DeepSeek-V3) | 'sqrt_softplus' (DeepSeek-V4)
    hash_layers: int = 0        # sigmoid router: the first layers select by a fixed token-id table (DeepSeek-V4)
    # Qwen2-MoE, Qwen3-Next
    shared_gate: bool = False   # scale the shared experts' output by sigmoid(x w) per token (Qwen2-MoE)
    # GLM-4.5
    first_dense_layers: int = 0  # the first layers have a dense MLP of width ffn_hidden, no MoE (GLM-4.5)
    # the backbones of Hugging Face checkpoints (tools/convert.py); the defaults are the core's network
    n_kv_head: int = 0          # key/value heads (grouped-query attention, divides n_head); 0 = n_head
    head_dim: int = 0           # width of a head, even (rotary); 0 = derived: n_embd // n_head (Qwen3: set apart)
    rope_theta: float = 10000.0  # rotary base (Mixtral: 1e6)
    rotary_dim: int = 0         # dims of each head that rotate, the first ones (GLM-4.5: half); 0 = all
    norm_eps: float = 0.0       # norm epsilon; 0 = RMSNorm: the dtype's machine epsilon (torch's), LayerNorm: 1e-5
    tie_embeddings: bool = True  # the output layer reuses the input embedding (Press & Wolf 2017)
    qk_norm: bool = False       # RMSNorm on q and k: over the whole projections (OLMoE) ...
    qk_norm_per_head: bool = False  # ... or, with this, over each head, one weight for all heads (Qwen3)
    qkv_bias: bool = False      # biases on the q, k, v projections (Qwen2-MoE)

    def __post_init__(self):
        check_and_derive(self, ROUTERS, self.head_dim)
        check_family(self)
        self.derive_widths()

    @property
    def changed(self):
        """The family settings away from the core's network: build() needs the atlas where any is."""
        plain = {"n_kv_head": self.n_head, "head_dim": self.n_embd / self.n_head}  # the core's (a true division)
        return [f.name for f in fields(FamilyConfig) if f.name not in CORE and getattr(self, f.name) !=
                plain.get(f.name, f.default)]

    def param_count(self):  # GPTConfig's, of the model build() makes
        with torch.device("meta"):
            return sum(p.numel() for p in build(self).parameters())


def check_family(cfg):
    """The family settings in range and meaningful together (ValueError naming the setting); derives
    n_kv_head and head_dim left at 0."""
    require_ranges(cfg, ("n_kv_head", "head_dim", "zero_experts", "first_dense_layers", "hash_layers", "rotary_dim"),
                   (("rope_theta", 0), ("renorm_floor", None), ("swiglu_limit", None)))
    require(0 <= cfg.norm_eps < 1, f"norm_eps must be in [0, 1) (0 = the dtype's epsilon), got {cfg.norm_eps}")
    cfg.n_kv_head = cfg.n_kv_head or cfg.n_head
    cfg.head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
    require(cfg.n_head % cfg.n_kv_head == 0, f"n_kv_head ({cfg.n_kv_head}) must divide n_head ({cfg.n_head})")
    require(cfg.rotary_dim % 2 == 0 and cfg.rotary_dim <= cfg.head_dim,
            f"rotary_dim must be even and in [0, head size {cfg.head_dim}] (0 = all), got {cfg.rotary_dim}")
    require(not cfg.qk_norm_per_head or cfg.qk_norm, "qk_norm_per_head needs qk_norm=True")
    require(not cfg.shared_gate or cfg.n_shared > 0, "shared_gate needs shared experts (n_shared > 0)")
    require(cfg.first_dense_layers <= cfg.n_layer and cfg.hash_layers <= cfg.n_layer,
            f"first_dense_layers ({cfg.first_dense_layers}) and hash_layers ({cfg.hash_layers}) must be <= n_layer "
            f"({cfg.n_layer})")
    linear = ("softmax", "sigmoid")
    token_routers = tuple(n for n, r in ROUTERS.items() if r.forward is Router.forward)  # a token's router
    for name, on, routers in (("router_bias", cfg.router_bias, ("softmax",)), ("gate_input", cfg.gate_input, linear),
                              ("zero_experts", cfg.zero_experts > 0, linear),
                              ("renorm_floor", cfg.renorm_floor > 0, token_routers),
                              ("hash_layers", cfg.hash_layers > 0, ("sigmoid",)),
                              ("score_fn", cfg.score_fn != "sigmoid", ("sigmoid",))):
        require(not on or cfg.n_experts == 0 or cfg.router in routers,
                f"{name} applies to router={' or '.join(routers)}, not {cfg.router}")
    require_choices(cfg, (("score_fn", ("sigmoid", "sqrt_softplus")), ("expert_act", ("swiglu", "gpt_oss"))))


@functools.lru_cache(maxsize=None)  # one class per combination, shared by the layers that use it
def compose(base, *mixins):
    """The class `base` with the mixins whose setting is on: mixins are (class, on) pairs, outermost first.
    A mixin's method runs before the ones inside it, and calls them with super() (RenormFloor.finish changes
    the gates before the core's finish, InputGate.finish moves them after it); its __init__'s own lines run
    after those of the classes inside it (the core's first)."""
    chosen = tuple(m for m, on in mixins if on)
    return type("+".join(c.__name__ for c in chosen + (base,)), chosen + (base,), {}) if chosen else base


# ------------------------------------------------------------------------------------------------
# gpt-oss: a router bias; biased experts with their own clamped GLU

class LogitBias:
    """gpt-oss's router: a = x W^T + b, b learned."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.logit_bias = nn.Parameter(torch.zeros(self.n_experts))      # (E,)

    def logits(self, x, ids):
        return F.linear(x, self.weight.float(), self.logit_bias.float())  # (T, E)


def gated_act(g, u, kind="swiglu", limit=0.0):
    """A gated activation of the gate and up projections g, u: SwiGLU silu(g) * u, or gpt-oss's
    (u + 1) * g * sigmoid(1.702 g) (kind='gpt_oss'); limit > 0 clamps first, g <= limit and |u| <= limit."""
    if limit > 0:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    if kind == "gpt_oss":
        return (u + 1) * g * torch.sigmoid(1.702 * g)
    return swiglu(g, u)


class ExpertActivation:
    """The experts' and shared experts' activation: gpt-oss's GLU (expert_act), clamped first where swiglu_limit
    is set (gpt-oss: 7; DeepSeek-V4: 10, on SwiGLU)."""

    def __init__(self, cfg, router=None):
        super().__init__(cfg, router)
        self.act = functools.partial(gated_act, kind=cfg.expert_act, limit=cfg.swiglu_limit)
        if self.shared is not None:
            self.shared.act = self.act  # (before SharedGate wraps the shared experts)


class BiasedExperts:
    """gpt-oss's experts: a bias after each projection, h W_gate + b_gate, h W_up + b_up, hidden W_down + b_down;
    the gate multiplies the biased output."""

    def __init__(self, cfg, router=None):
        super().__init__(cfg, router)
        E, d, f = cfg.n_experts, cfg.n_embd, cfg.expert_hidden
        shared = self.shared  # registered again after the biases: the parameter order checkpoints have
        del self.shared
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(E, n)) for n in (f, f, d)])  # gate, up, down
        self.shared = shared

    def expert(self, e, h):
        hidden = self.act(h @ self.w_gate[e] + self.biases[0][e], h @ self.w_up[e] + self.biases[1][e])  # (n, f)
        return hidden, hidden @ self.w_down[e] + self.biases[2][e]                                      # (n, d)

    def experts(self, h, offs, gate=None):  # the core's experts() with the biases (its matmuls alike: same bits)
        e = torch.searchsorted(offs, torch.arange(h.shape[0], device=h.device, dtype=offs.dtype), right=True)  # (N,)
        f = self.w_up.shape[2]
        if f < self.w_down.shape[2]:  # as the core's experts(): one matmul of width 2f for narrow experts
            g, u = grouped_matmul(h, torch.cat([self.w_gate, self.w_up], dim=2), offs).split(f, dim=1)
        else:
            g, u = grouped_matmul(h, self.w_gate, offs), grouped_matmul(h, self.w_up, offs)
        hidden = self.act(g + self.biases[0][e], u + self.biases[1][e])                        # (N, f)
        out = grouped_matmul(hidden, self.w_down, offs) + self.biases[2][e]                    # (N, d)
        return hidden, out if gate is None else out * gate.to(out.dtype)


# ------------------------------------------------------------------------------------------------
# Llama 4: the gate on the expert's input

class InputGate:
    """Llama 4: the experts compute FFN_e(g x), not g FFN_e(x): the gates move onto the rows the experts
    read, and their outputs add ungated."""

    def finish(self, r, x):
        r = super().finish(r, x)
        g = torch.zeros(r.idx.shape[0], self.n_experts, device=x.device).scatter(1, r.idx, r.gates)  # (T, E)
        return r._replace(gates=torch.ones_like(r.gates), expert_inputs=x[:, None, :] * g[..., None])


# ------------------------------------------------------------------------------------------------
# LongCat-Flash: zero-compute experts

class ZeroComputeExperts:
    """LongCat-Flash: the router chooses among E + zero_experts (FamilyGPT widens it); a pair on a zero-compute
    expert (id >= E) adds g * x and runs no expert. Those pairs go to expert 0 with gate 0 (computed, then
    discarded); the Routing keeps their ids."""

    def __init__(self, cfg, router=None):
        super().__init__(cfg, router)
        # around the dispatch (support/launch.py refuses expert parallelism, whose own dispatch would skip this)
        self.compute, self.dispatch = self.dispatch, self.with_zero_experts

    def with_zero_experts(self, x, route):
        zero = route.idx >= self.w_up.shape[0]                      # (T, k)
        y, acts = self.compute(x, route._replace(idx=route.idx.masked_fill(zero, 0),
                                                 gates=route.gates.masked_fill(zero, 0.0)))
        return y + x * (route.gates * zero).sum(dim=-1, keepdim=True).to(x.dtype), acts * ~zero[..., None]


# ------------------------------------------------------------------------------------------------
# ERNIE-4.5: a floor under the renormalising sum

class RenormFloor:
    """ERNIE-4.5: renormalised gates are the scores over max(their sum, floor)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.floor = cfg.renorm_floor

    def finish(self, r, x):
        if self.renorm:
            top = r.logits.gather(-1, r.idx)                                             # (T, k)
            w = top.exp() if self.score_gates else (top - r.lse[:, None]).exp()
            r = r._replace(gates=w / w.sum(dim=-1, keepdim=True).clamp_min(self.floor))
        return super().finish(r, x)


# ------------------------------------------------------------------------------------------------
# DeepSeek-V4: sqrt-softplus scores, hash layers (and clamped experts: ExpertActivation, above)

class SqrtSoftplus:
    """DeepSeek-V4's scores s = sqrt(softplus(x W^T)), as logits a = log s."""

    def logits(self, x, ids):
        return 0.5 * torch.log(F.softplus(F.linear(x, self.weight.float())))  # (T, E)


class HashLayer:
    """DeepSeek-V4's first layers: a fixed random token-id table selects; the learned scores still weight."""

    def __init__(self, cfg):
        super().__init__(cfg)
        real = cfg.n_experts - cfg.zero_experts                      # (LongCat-Flash's wider router: the real ones)
        self.register_buffer("table", random_table(cfg.vocab_size, real, cfg.top_k))  # (V, k) in the checkpoint

    def select(self, a, ids):
        if ids is None:
            raise ValueError("hash layers need the token ids")
        return self.table[ids]                                        # (T, k)


# ------------------------------------------------------------------------------------------------
# the hash router's relatives, for the course's comparison (course/demos.py hash-why): Roller et al.'s
# balanced table (train.py's hash_balanced) and a learned token-id table (router=token_table)

def balanced_table(counts, n_experts, k):
    """Roller et al.'s balanced assignment (§3.2) for k experts per token: the ids in order of frequency (counts
    (V,), ties to the lower id), each to the k experts with the fewest expected pairs so far (ties to the lower
    expert) -> (V, k) table whose load is as even as the token frequencies allow."""
    load, table = [0] * n_experts, torch.empty(len(counts), k, dtype=torch.long)
    for i in torch.sort(counts, descending=True, stable=True).indices.tolist():
        chosen = sorted(range(n_experts), key=lambda e: (load[e], e))[:k]
        table[i] = torch.tensor(chosen)
        for e in chosen:
            load[e] += int(counts[i])
    return table


class TokenTableRouter(Router):
    """A learned logit table indexed by the token id: a = T[id] (V, E), top-k, p renormalised. What a hash
    table has (the routing is tied to the id) and what it lacks (learned). Initialised at the scale of the
    linear router's logits, std 0.02 sqrt(d)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.table = nn.Parameter(torch.randn(cfg.vocab_size, self.n_experts) * 0.02 * math.sqrt(cfg.n_embd))

    def logits(self, x, ids):
        if ids is None:
            raise ValueError("router=token_table needs the token ids")
        return self.table.float()[ids]                                   # (T, E)


ROUTERS["token_table"] = TokenTableRouter  # a new router joins the core's registry (as course/exercises/ex8's does)


# ------------------------------------------------------------------------------------------------
# Qwen: the gated shared expert

class GatedShared(nn.Module):
    """Qwen2-MoE, Qwen3-Next: the shared experts' output times sigmoid(x w), per token."""

    def __init__(self, expert, n_embd):
        super().__init__()
        self.expert, self.gate = expert, nn.Linear(n_embd, 1, bias=False)

    def forward(self, x, ids=None):
        return self.expert(x)[0] * torch.sigmoid(self.gate(x)), None


class SharedGate:
    """The MoE block's shared experts wrapped in GatedShared."""

    def __init__(self, cfg, router=None):
        super().__init__(cfg, router)
        self.shared = GatedShared(self.shared, cfg.n_embd)


# ------------------------------------------------------------------------------------------------
# the backbones of Hugging Face checkpoints: attention options, norms, rotary, untied embeddings

def partial_rotary(x, cos, sin):
    """Rotary positions on the first 2 * cos.shape[-1] dims of each head; the others pass (rotary_dim)."""
    r = 2 * cos.shape[-1]
    return apply_rotary(x, cos, sin) if r == x.shape[-1] else torch.cat([apply_rotary(x[..., :r], cos, sin),
                                                                          x[..., r:]], dim=-1)


class FamilyAttention(CausalSelfAttention):
    """Grouped-query attention (n_kv_head < n_head: each key/value head serves n_head / n_kv_head query
    heads), heads of width head_dim, biases on q, k, v, RMSNorm on q and k (whole or per head)."""

    def __init__(self, cfg):
        nn.Module.__init__(self)  # the core's layers at these widths, each built once (the initialisation order)
        self.n_head, self.n_kv_head, self.dropout, hs = cfg.n_head, cfg.n_kv_head, cfg.dropout, cfg.head_dim
        self.widths = (cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs)   # q, k, v
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.widths), bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(self.widths[0], cfg.n_embd, bias=False)
        eps, self.per_head = cfg.norm_eps or None, cfg.qk_norm_per_head
        self.q_norm = nn.RMSNorm(hs if self.per_head else self.widths[0], eps=eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(hs if self.per_head else self.widths[1], eps=eps) if cfg.qk_norm else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, x, cos, sin):
        q, k, v = self.c_attn(x).split(self.widths, dim=2)
        if self.q_norm is not None and not self.per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rearrange(q, "b s (nh hs) -> b nh s hs", nh=self.n_head)                  # (B, nh, S, hs)
        k, v = (rearrange(t, "b s (nh hs) -> b nh s hs", nh=self.n_kv_head) for t in (k, v))  # (B, nkv, S, hs)
        if self.q_norm is not None and self.per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = partial_rotary(q, cos, sin), partial_rotary(k, cos, sin)
        return q, k, v


class FamilyGPT(GPT):
    """The core GPT with the families' parts: GPT's three hooks build them, then the rotary angles and the
    output layer follow the backbone settings."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cos, self.sin = rotary_cache(cfg.block_size, cfg.rotary_dim or cfg.head_dim, cfg.rope_theta)
        if not cfg.tie_embeddings:  # (an imported checkpoint's: its weights replace this initialisation)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    def norm(self, cfg):  # the core's, with the backbone's epsilon where one is set
        norm = super().norm(cfg)
        norm.eps = cfg.norm_eps or norm.eps
        return norm

    def attention(self, cfg):  # the core's attention where no attention setting differs
        options = {"n_kv_head", "head_dim", "qkv_bias", "qk_norm", "qk_norm_per_head", "rotary_dim"}
        return FamilyAttention(cfg) if options & set(cfg.changed) else super().attention(cfg)

    def feed_forward(self, cfg, layer):
        if cfg.n_experts == 0 or layer < cfg.first_dense_layers:      # GLM-4.5: the first layers dense
            return MLP(cfg.n_embd, cfg.ffn_hidden, cfg.dropout, cfg.mlp == "gelu")
        # outermost first; the order matters where two change one method (compose; check_family refuses the rest)
        router = compose(ROUTERS[cfg.router], (InputGate, cfg.gate_input), (RenormFloor, cfg.renorm_floor > 0),
                         (HashLayer, layer < cfg.hash_layers), (SqrtSoftplus, cfg.score_fn == "sqrt_softplus"),
                         (LogitBias, cfg.router_bias))
        # LongCat-Flash: the router chooses among the experts and the zero-compute ones
        router = router(replace(cfg, n_experts=cfg.n_experts + cfg.zero_experts) if cfg.zero_experts else cfg)
        moe = compose(MoE, (SharedGate, cfg.shared_gate), (ZeroComputeExperts, cfg.zero_experts > 0),
                      (ExpertActivation, cfg.expert_act != "swiglu" or cfg.swiglu_limit > 0),
                      (BiasedExperts, cfg.expert_bias))
        return moe(cfg, router)


def build(cfg):
    """The model of these settings: the core GPT, or FamilyGPT where a family setting is away from its default."""
    return FamilyGPT(cfg) if getattr(cfg, "changed", None) else GPT(cfg)


def from_checkpoint(model_args):
    """A checkpoint's model_args -> (FamilyConfig, the model, untrained: load its weights next)."""
    cfg = FamilyConfig(**model_args)
    return cfg, build(cfg)
