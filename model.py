"""
A GPT whose feed-forward blocks are top-k routed SwiGLU experts. One file, read top to bottom:
attention, the feed-forward blocks (the dense MLP, the MoE block and its two dispatch paths), the
block, the settings (GPTConfig: the iso-compute rule below; its checks in support/checks.py), the
GPT, which builds its parts by three methods (norm, attention, feed_forward): families.py's hook.

Notation: B batch, S sequence length, T = B*S tokens, d model width (n_embd), E routed experts,
k experts per token, f expert hidden width, r ERMoE basis rank, nh heads, hs head size.

- GPT backbone as in nanoGPT (Radford et al. 2019), modernised like Llama: RMSNorm, rotary position
  embeddings (Su et al. 2021), SwiGLU feed-forward (Shazeer 2020), tied embeddings, SDPA attention,
  a KV cache for sampling. nanoGPT's own parts (learned positions, a 4d GELU MLP, LayerNorm) are
  options, for the ablation that explains the gap to nanoGPT (course/demos.py nanogpt). What other
  MoE families differ in, and the imported checkpoints' backbones, is in families.py.
- MoE block (Shazeer et al. 2017; Switch, Fedus et al. 2021; DeepSeekMoE shared experts, Dai et al.
  2024): E routed SwiGLU experts with stacked weights (E, ., .), a router from router.py's registry
  (the block never asks which one), optional always-on shared experts. Dropless by default; with
  capacity_factor c > 0 each expert takes at most ceil(c*T*k/E) pairs per batch, first come first
  served in token order (Switch, GShard); a dropped pair adds nothing (the residual carries it).
  Not causal: what an expert drops depends on other tokens of the batch, later ones included.
- Two dispatch paths with one semantics, tested against each other in output and every gradient:
  `naive` loops over the experts (the lecture one); `sorted` sorts the T*k (token, expert) pairs
  by expert once and runs all experts as one grouped matmul. n_experts=0 is the dense SwiGLU MLP.
- The forward returns every MoE layer's routing (router.Routing): losses.py makes it auxiliary losses,
  support/metrics.py routing metrics. No module keeps losses in globals.

Iso-compute rule: the dense MLP has width ffn_hidden (default 8/3*d rounded up to a multiple of
64: 3*d*ffn_hidden parameters, the 8d^2 of GPT-2's 4d GELU MLP at d=384 (1024), 9d^2 at d=128 (384,
not 341)); each expert gets width ffn_hidden // (top_k + n_shared), so a token's active expert
compute equals the dense MLP's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from router import ROUTERS, expert_counts
from support.checks import check_and_derive


# ------------------------------------------------------------------------------------------------
# attention

def rotary_cache(block_size, head_size, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)             # (S, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x1, x2) of the two halves of each head by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)                                   # (B, nh, S, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions. With a cache (generation), the keys and
    values of earlier positions are kept and only the new tokens computed."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # the q, k, v projections in one
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, x, cos, sin):
        """x (B, S, d) -> q, k, v (B, nh, S, hs), q and k rotated (cos None: learned positions, in GPT)."""
        q, k, v = (rearrange(t, "b s (nh hs) -> b nh s hs", nh=self.n_head) for t in self.c_attn(x).chunk(3, dim=2))
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(self, x, cos, sin, cache=None):
        q, k, v = self.heads(x, cos, sin)                           # (B, nh, S, hs) (GQA, families.py: fewer k, v)
        mask, causal = None, True
        if cache is not None:  # generation: the keys and values of the earlier positions, then these
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            new, seen = q.shape[2], k.shape[2]
            if new < seen:  # queries at the last `new` positions: causal relative to the end
                causal = False
                mask = torch.ones(new, seen, dtype=torch.bool, device=q.device).tril(seen - new) if new > 1 else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=k.shape[1] != q.shape[1])
        y = rearrange(y, "b nh s hs -> b s (nh hs)")
        return self.resid_dropout(self.c_proj(y))


# ------------------------------------------------------------------------------------------------
# feed-forward: dense SwiGLU and the routed experts

def swiglu(g, u):
    """SwiGLU (Shazeer 2020) of the gate and up projections g, u: silu(g) * u."""
    return F.silu(g) * u


class MLP(nn.Module):
    """Dense SwiGLU: silu(x W_gate) * (x W_up) W_down. Also the shared experts of an MoE block.
    gelu=True: nanoGPT's GELU(x W_fc) W_proj instead."""
    act = staticmethod(swiglu)  # the gated activation (families.py: other families' variants)

    def __init__(self, n_embd, hidden, dropout=0.0, gelu=False):
        super().__init__()
        self.c_gate = None if gelu else nn.Linear(n_embd, hidden, bias=False)
        self.c_up = nn.Linear(n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, ids=None):
        h = F.gelu(self.c_up(x)) if self.c_gate is None else self.act(self.c_gate(x), self.c_up(x))
        return self.dropout(self.c_proj(h)), None


def grouped_matmul(h, w, offs):
    """Row segment i of h (N, a) times w[i] (E, a, b), segments ending at offs (E,) -> (N, b)."""
    if torch.is_autocast_enabled(h.device.type):   # grouped_mm is not on autocast's op list
        dtype = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dtype), w.to(dtype)
    # The grouped GEMM (F.grouped_mm, torch._grouped_mm before it was public) needs rows aligned
    # to 16 bytes. Its CUDA kernel and its meta function (what torch.compile traces) take bf16
    # only; eager CPU also runs fp32.
    gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    aligned = all(n * h.element_size() % 16 == 0 for n in w.shape[1:])
    compiling = torch.compiler.is_compiling()
    if gmm is not None and aligned and (h.dtype == torch.bfloat16 or (h.device.type == "cpu" and not compiling)):
        return gmm(h.contiguous(), w, offs=offs)
    if compiling:
        # Under torch.compile the segment lengths cannot become Python ints (a graph needs static
        # shapes), so every expert multiplies every row and a mask keeps its own: E times the
        # FLOPs of the grouped GEMM. Correct and compilable; use bf16 for the real thing.
        seg = torch.searchsorted(offs, torch.arange(h.shape[0], device=h.device, dtype=offs.dtype), right=True)
        out = h.new_zeros(h.shape[0], w.shape[2])
        for i in range(w.shape[0]):
            out = torch.where((seg == i)[:, None], h @ w[i], out)
        return out
    ends = offs.tolist()  # eager: one matmul per expert segment (one host sync)
    starts = [0] + ends[:-1]
    return torch.cat([h[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends))])


class MoE(nn.Module):
    """E routed SwiGLU experts behind a router, plus optional always-on shared experts."""

    act = staticmethod(swiglu)  # the experts' gated activation (families.py: other families' variants)

    def __init__(self, cfg, router=None):
        super().__init__()
        self.router = ROUTERS[cfg.router](cfg) if router is None else router  # first: the initialisation order
        E, d, f, d_in = cfg.n_experts, cfg.n_embd, cfg.expert_hidden, self.router.read_width
        self.w_gate = nn.Parameter(torch.randn(E, d_in, f) * 0.02)   # (E, d_in, f)
        self.w_up = nn.Parameter(torch.randn(E, d_in, f) * 0.02)     # (E, d_in, f)
        self.w_down = nn.Parameter(torch.randn(E, f, d) * 0.02)      # (E, f, d)
        # n_shared experts of width f side by side = one SwiGLU of width n_shared*f
        self.shared = MLP(d, cfg.n_shared * f) if cfg.n_shared > 0 else None
        self.dropout = nn.Dropout(cfg.dropout)
        # the dispatch: the lecture's loop or the grouped matmul (support/parallel.py swaps in its own
        # when the experts are split over processes)
        self.dispatch = self.forward_naive if cfg.dispatch == "naive" else self.forward_sorted

    def forward(self, x, ids=None):
        """x (B, S, d), token ids (B, S) -> (y (B, S, d), Routing)."""
        B, S, d = x.shape
        x = x.reshape(B * S, d)                                     # (T, d)
        route = self.router(x, None if ids is None else ids.reshape(-1))  # router.py: idx (T, k), gates (T, k)
        y, acts = self.dispatch(x, route)                           # (T, d), (T, k, f)
        if route.kept is not None:                                  # a dropped pair's activations count as 0
            acts = acts * route.kept[..., None]
        if self.shared is not None:
            y = y + self.shared(x)[0]                               # (T, d)
        return self.dropout(y.view(B, S, d)), route._replace(acts=acts)

    def forward_naive(self, x, route):
        """The lecture version: for each expert, find its (token, slot) pairs, run it, add the gated output."""
        T, k = route.idx.shape
        y = torch.zeros_like(x)                                     # (T, d)
        acts = x.new_zeros(T, k, self.w_up.shape[2])                # (T, k, f)
        for e in range(self.w_up.shape[0]):
            tok, slot = torch.where(route.idx == e)                 # (n_e,), (n_e,) in token order
            h = x[tok] if route.expert_inputs is None else route.expert_inputs[tok, e].to(x.dtype)  # (n_e, d_in)
            hidden, out = self.expert(e, h)                         # (n_e, f) SwiGLU activations, (n_e, d)
            y = y.index_add(0, tok, (out * route.gates[tok, slot, None]).to(y.dtype))
            acts = acts.index_put((tok, slot), hidden.to(acts.dtype))
        return y, acts

    def expert(self, e, h):
        """Expert e on its rows h (n, d_in) -> SwiGLU activations (n, f), output (n, d)."""
        hidden = self.act(h @ self.w_gate[e], h @ self.w_up[e])
        return hidden, hidden @ self.w_down[e]

    def forward_sorted(self, x, route):
        """The same by sorting: group the T*k pairs by expert, run all experts as grouped matmuls, un-sort."""
        T, k = route.idx.shape
        order, inverse, tok, e = self.sort_pairs(route.idx)         # (T*k,) each
        offs = expert_counts(route.idx, self.w_up.shape[0]).cumsum(0, dtype=torch.int32)  # (E,) segment ends
        h = x.index_select(0, tok) if route.expert_inputs is None else route.expert_inputs[tok, e].to(x.dtype)
        gate = route.gates.reshape(-1).index_select(0, order)[:, None]  # (T*k, 1)
        hidden, out = self.experts(h, offs, gate)                   # (T*k, f), (T*k, d) gated
        y = torch.zeros(T, x.shape[1], dtype=out.dtype, device=x.device).index_add_(0, tok, out)
        return y.to(x.dtype), hidden.index_select(0, inverse).view(T, k, -1)  # acts back in token order

    @staticmethod
    def sort_pairs(idx):
        """The T*k (token, expert) pairs of idx (T, k), grouped by expert (stable: token order within an
        expert) -> order (pair of each row), inverse (row of each pair), tok and e (token, expert per row)."""
        T, k = idx.shape
        flat = idx.reshape(-1)                                      # (T*k,) expert of each pair
        order = torch.sort(flat, stable=True).indices               # (T*k,) pairs grouped by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T * k, device=idx.device))
        return order, inverse, order // k, flat[order]

    def experts(self, h, offs, gate=None):
        """Every expert on its segment of rows h (N, d_in), segments ending at offs (E,), gated by gate
        (N, 1) if given -> the SwiGLU activations hidden (N, f) and the outputs (N, d). One grouped matmul
        per projection; the gate multiplies the narrower of hidden and the output ((g h) W = g (h W))."""
        f = self.w_up.shape[2]
        if f < self.w_down.shape[2]:  # narrow experts: one matmul of width 2f runs faster than two of f
            g, u = grouped_matmul(h, torch.cat([self.w_gate, self.w_up], dim=2), offs).split(f, dim=1)
        else:                         # (on a CPU: E=64, f=88 1.2x faster; E=8, f=192 1.3x slower with the copy)
            g, u = grouped_matmul(h, self.w_gate, offs), grouped_matmul(h, self.w_up, offs)
        hidden = self.act(g, u)                                                                 # (N, f)
        if gate is None:
            return hidden, grouped_matmul(hidden, self.w_down, offs)
        if hidden.shape[1] < self.w_down.shape[2]:
            return hidden, grouped_matmul(hidden * gate.to(hidden.dtype), self.w_down, offs)     # (N, d)
        out = grouped_matmul(hidden, self.w_down, offs)
        return hidden, out * gate.to(out.dtype)


# ------------------------------------------------------------------------------------------------
# the transformer block

class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x)) (the dense MLP or the MoE block)."""

    def __init__(self, ln_1, attn, ln_2, mlp):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, x, cos, sin, ids, cache=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache)
        h, route = self.mlp(self.ln_2(x), ids)
        return x + h, route


# ------------------------------------------------------------------------------------------------
# the settings of the network

@dataclass
class GPTConfig:
    # the network: nanoGPT's GPT with rotary positions, SwiGLU and RMSNorm
    block_size: int = 256       # context length S
    vocab_size: int = 50304     # token ids; train.py takes the dataset's (GPT-2: 50257 padded to 50304)
    n_layer: int = 6            # transformer blocks
    n_head: int = 6             # attention heads
    n_embd: int = 384           # model width d
    dropout: float = 0.0        # dropout probability in [0, 1)
    ffn_hidden: int = 0         # dense MLP width; 0 = derived: 8/3 * n_embd rounded up to a multiple of 64 (gelu: 4d)
    # the MoE blocks
    n_experts: int = 8          # routed experts E per MoE block; 0 = the dense model
    top_k: int = 2              # experts per token k
    expert_hidden: int = 0      # expert width f; 0 = derived: ffn_hidden // (top_k + n_shared), iso-compute
    n_shared: int = 0           # always-on shared experts (DeepSeekMoE), each of width expert_hidden
    router: str = "softmax"     # a name in router.ROUTERS: softmax | ermoe | sigmoid | hash | ...
    gate_renorm: bool = True    # gates = the router's scores renormalised over the k selected (else: the scores);
                                # at top_k=1 the score itself (one renormalised gate is 1: no router gradient)
    routed_scale: float = 1.0   # the routed experts' gates are multiplied by this (DeepSeek-V3: 2.5)
    capacity_factor: float = 0.0  # 0 = dropless; c > 0: each expert takes at most ceil(c*T*k/E) pairs (not causal)
    dispatch: str = "sorted"    # 'sorted' (grouped matmul) | 'naive' (per-expert loop, reference)
    select_bias: bool = False   # softmax/ERMoE router: the top-k of p + b, b balanced per step (ERNIE-4.5, LongCat)
    bias_update_rate: float = 1e-3  # sigmoid router and select_bias: balancing bias step per optimizer step
    # settings of one router
    n_group: int = 1            # sigmoid router: experts in n_group groups; a token first picks topk_group of them
    topk_group: int = 1         # sigmoid router: groups a token picks (by the sum of each group's 2 best scores)
    ermoe_basis: str = "independent"  # ERMoE: 'independent' | 'partitioned' | 'penalty'
    ermoe_rank: int = 0         # ERMoE basis rank r; 0 = derived: d // 2 (partitioned: d // n_experts, tiling R^d)
    ermoe_input: str = "token"  # ERMoE: what the experts read: 'token' (x) | 'coords' (lambda * P_e^T x, r wide)
    ermoe_beta: float = 10.0    # ERMoE: the initial logit scale beta (logits beta * s, s in [0, 1])
    ermoe_beta_learned: bool = True  # ERMoE: beta learned (at most 100) or fixed at ermoe_beta
    # nanoGPT's parts instead of the modern ones (course/demos.py nanogpt switches them one by one)
    pos_emb: str = "rope"       # 'rope' (rotary) | 'learned' (nanoGPT's position embedding)
    mlp: str = "swiglu"         # dense MLP: 'swiglu' | 'gelu' (nanoGPT's 4d GELU MLP; the experts stay SwiGLU)
    norm: str = "rmsnorm"       # 'rmsnorm' | 'layernorm' (nanoGPT's, without bias)

    def __post_init__(self):  # every field checked (ValueError naming it), the widths left at 0 derived
        check_and_derive(self, ROUTERS)
        self.derive_widths()

    def derive_widths(self):
        """The iso-compute rule (module docstring): a token's active expert compute equals the dense MLP's."""
        if self.ffn_hidden == 0:
            self.ffn_hidden = 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_experts > 0 and self.expert_hidden == 0:
            self.expert_hidden = max(1, self.ffn_hidden // (self.top_k + self.n_shared))

    def param_count(self):
        """Parameters of the model: counted on the meta device, which allocates nothing (train.py refuses a
        model that cannot fit before allocating it)."""
        with torch.device("meta"):  # (draws nothing from the random generator either)
            return sum(p.numel() for p in GPT(self).parameters())


# ------------------------------------------------------------------------------------------------
# the GPT

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None  # nanoGPT's
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(self.norm(cfg), self.attention(cfg), self.norm(cfg),
                                           self.feed_forward(cfg, layer)) for layer in range(cfg.n_layer)])
        self.ln_f = self.norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        cos, sin = rotary_cache(cfg.block_size, cfg.n_embd // cfg.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith("c_proj.weight") or name.endswith("w_down"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    # a block's parts, built in this order (which fixes the initialisation); families.FamilyGPT builds others'
    def norm(self, cfg):  # RMSNorm (eps: the dtype's), or nanoGPT's LayerNorm without bias (eps 1e-5)
        return nn.LayerNorm(cfg.n_embd, bias=False) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.n_embd)

    def attention(self, cfg):
        return CausalSelfAttention(cfg)

    def feed_forward(self, cfg, layer):
        if cfg.n_experts == 0:
            return MLP(cfg.n_embd, cfg.ffn_hidden, cfg.dropout, cfg.mlp == "gelu")
        return MoE(cfg)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def routers(self):
        """The router of every MoE block, in order."""
        return [b.mlp.router for b in self.blocks if isinstance(b.mlp, MoE)]

    def num_params(self):
        """(total, active per token). Active counts k of the E routed experts of each MoE block."""
        total = sum(p.numel() for p in self.parameters())
        cfg, inactive = self.config, 0
        if cfg.n_experts > 0:
            experts = sum(getattr(b.mlp, w).numel() for b in self.blocks if isinstance(b.mlp, MoE)
                          for w in ("w_gate", "w_up", "w_down"))
            inactive = experts * max(cfg.n_experts - cfg.top_k, 0) // cfg.n_experts
        return total, total - inactive

    def flops_per_token(self):
        """Training FLOPs per token: 6 x the active parameters + the attention's 12 L d S (PaLM, App. B)."""
        cfg = self.config
        return 6 * self.num_params()[1] + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def forward(self, idx, targets=None, cache=None):
        """idx (B, S) token ids -> (logits, cross-entropy loss or None, [Routing per MoE layer]).
        cache: a list of one dict per block (generate): idx are the tokens after the cached ones."""
        B, S = idx.shape
        start = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0  # positions already cached
        if start + S > self.config.block_size:
            raise ValueError(f"sequence of length {start + S} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)                                           # (B, S, d)
        cos, sin = self.cos[start:start + S], self.sin[start:start + S]  # (S, hs/2)
        if self.wpe is not None:                                    # learned positions instead of rotary ones
            x, cos, sin = x + self.wpe(torch.arange(start, start + S, device=idx.device)), None, None
        x = self.drop(x)
        routes = []
        for i, block in enumerate(self.blocks):
            x, route = block(x, cos, sin, idx, None if cache is None else cache[i])
            if route is not None:
                routes.append(route)
        x = self.ln_f(x)
        if targets is None:  # inference: only the last position's logits are needed
            return self.lm_head(x[:, [-1], :]), None, routes
        logits = self.lm_head(x)                                    # (B, S, vocab)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, routes

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None, use_cache=True):
        """Sample continuations of idx (B, S); temperature 0 = greedy; n_vocab cuts the padded ids.
        With the KV cache each step computes only the new token, while the context fits in block_size;
        beyond, every step recomputes the last block_size tokens (their positions have shifted). The
        same tokens either way (tested), except with router=expert_choice, whose experts pick among the
        tokens of a step: one token at a time is another routing than the whole sequence."""
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.shape[1] <= self.config.block_size:
                if cache is None:                                          # the prompt, once
                    cache = [{} for _ in self.blocks]
                    logits = self.forward(idx, cache=cache)[0]
                else:                                                      # one new token
                    logits = self.forward(idx[:, -1:], cache=cache)[0]
            else:
                logits = self.forward(idx[:, -self.config.block_size:])[0]
            logits = logits[:, -1, :n_vocab]                                # (B, n_vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)                  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
