"""
Expert parallelism on torch.distributed: every MoE layer's E routed experts are split over N ranks,
and each (token, expert) pair travels to the rank that owns its expert and back, by all_to_all.

Notation: W processes, N = expert_parallel, D = W / N data-parallel replicas, E experts per layer,
E/N local experts per rank, T tokens of a rank, k experts per token, d model width, f expert width.

Layout. Ranks come in blocks of N consecutive ranks: each block (an "EP group") holds all E experts,
E/N per rank; the D blocks are data-parallel replicas of each other.

    ranks   0    1  |  2    3        W = 4, N = 2, D = 2, E = 8
    experts 0-3  4-7|  0-3  4-7      EP groups {0,1} {2,3}; expert-data-parallel groups {0,2} {1,3}

One MoE layer on one rank (`ExpertParallel.dispatch`, the distributed version of MoE.forward_sorted):

    route its T tokens -> sort the T*k pairs by expert: rows for rank 0 | rank 1 | ... (contiguous)
    all_to_all the per-expert counts (E,)  -> each rank learns how many rows it gets, from whom, per expert
    all_to_all the rows (T*k, d_in)        -> the rows of my E/N experts, by source rank
    regroup by local expert, grouped matmul with my experts' weights
    all_to_all the outputs back (and the SwiGLU intermediates z, which the specialization loss needs)
    gate, add to the tokens

Bytes moved per layer per step, per rank: 2 * T*k * (d_in + d + f) * bytes per value (rows out,
outputs and z back) in the forward pass, and as much again in the backward (the backward of an
all_to_all is the all_to_all the other way round), minus the rows that stay on this rank.

Gradients. Attention, embeddings, routers and shared experts are replicated on all W ranks and
all-reduced over all of them; an expert's weights live on D ranks (its expert-data-parallel group)
and are all-reduced over those only. Both sums are divided by W: the loss of a step is the mean of
the W ranks' losses, and every rank's expert weights see the tokens of its whole EP group through
the exchange. DDP cannot do this (it would average different experts with each other), so this
file does the two all-reduces itself.

Checkpoints hold the full model and optimizer state whatever the layout (`full_state`), so a run
saved with expert_parallel=2 resumes with 1 and the other way round.
"""

import functools

import torch
import torch.distributed as dist
import torch.nn as nn


EXPERT_PARAMS = ("w_gate", "w_up", "w_down")  # the per-expert weights of model.MoE, stacked on dim 0


class Exchange(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable: the gradient travels back the other way."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


class AllReduceSum(torch.autograd.Function):
    """Sum over a group, differentiable: the gradient of every rank's input is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x, group=None):
    return AllReduceSum.apply(x, group)


def pooled_balance(group):
    """losses.aux_losses' `pool`: the load-balancing statistics (counts, psum, T) of the batches of every
    process in `group`, i.e. of the global batch (the psum sum is differentiable; counts carry no gradient)."""
    def pool(layer, counts, psum, T):
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
        return counts, all_reduce_sum(psum, group), T * dist.get_world_size(group)
    return pool


class ExpertParallel:
    """The process groups of an expert-parallel layout, and the MoE dispatch across them."""

    def __init__(self, n):
        self.world, self.rank, self.n = dist.get_world_size(), dist.get_rank(), n
        if self.world % n:
            raise ValueError(f"expert_parallel={n} must divide the number of processes ({self.world})")
        self.slot = self.rank % n                         # which E/N experts this rank holds
        self.ep_group = self.edp_group = None
        for g in range(self.world // n):                  # every rank creates every group, in one order
            group = dist.new_group(list(range(g * n, (g + 1) * n)))
            if self.rank // n == g:
                self.ep_group = group
        for j in range(n):
            group = dist.new_group(list(range(j, self.world, n)))
            if self.slot == j:
                self.edp_group = group

    def local(self, E):
        """The experts [lo, hi) this rank holds out of E."""
        per = E // self.n
        return self.slot * per, (self.slot + 1) * per

    def shard(self, model):
        """Keep only this rank's experts in every MoE block (call after loading the full weights)."""
        for moe in moe_blocks(model):
            lo, hi = self.local(moe.w_up.shape[0])
            for name in EXPERT_PARAMS:
                setattr(moe, name, nn.Parameter(getattr(moe, name).data[lo:hi].clone()))
            moe.dispatch = functools.partial(self.dispatch, moe)

    def dispatch(self, moe, x, r):
        """The expert-parallel MoE.forward_sorted: x (T, d), Routing -> y (T, d), acts (T, k, f)."""
        T, k = r.idx.shape
        n, E = self.n, r.counts.numel()
        counts = torch.bincount(r.idx.reshape(-1), minlength=E).to(torch.int32)  # (E,) pairs per expert
        order, inverse, tok, e = moe.sort_pairs(r.idx)              # (T*k,) grouped by expert, hence by rank
        h = x.index_select(0, tok) if r.expert_inputs is None else r.expert_inputs[tok, e].to(x.dtype)  # (T*k, d_in)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)  # counts first: (n, E/n) per source
        recv = recv_counts.view(n, E // n)                          # rows from each source, per local expert
        sizes = torch.stack([counts.view(n, E // n).sum(1), recv.sum(1)])  # (2, n) rows to and from each rank
        send_sizes, recv_sizes = sizes.tolist()                     # the one host sync an EP layer needs
        rows = Exchange.apply(h, send_sizes, recv_sizes, self.ep_group)          # (R, d_in) by source
        local_e = torch.arange(E // n, device=x.device).repeat(n).repeat_interleave(recv.flatten())  # (R,)
        perm = torch.sort(local_e, stable=True).indices             # regroup by local expert
        offs = recv.sum(0).cumsum(0, dtype=torch.int32)             # (E/n,) segment ends
        a, out = moe.experts(rows[perm], offs)                      # (R, f), (R, d): my experts only, ungated
        back = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=x.device))
        out = Exchange.apply(out[back], recv_sizes, send_sizes, self.ep_group)  # (T*k, d) my pairs' outputs
        a = Exchange.apply(a[back], recv_sizes, send_sizes, self.ep_group)      # (T*k, f) for the R_sp loss
        out = out * r.gates.reshape(-1)[order, None].to(out.dtype)  # gate after the expert
        y = torch.zeros(T, x.shape[1], dtype=out.dtype, device=x.device).index_add(0, tok, out)
        return y.to(x.dtype), a[inverse].view(T, k, -1)

    def sync_grads(self, model):
        """Average the gradients of one step: dense over all W ranks, experts over their D replicas."""
        dense, experts = params_with_grads(model)
        for params, group in ((dense, None), (experts, self.edp_group)):
            if params:
                flat = torch.cat([p.grad.reshape(-1) for p in params])  # one all-reduce per kind
                dist.all_reduce(flat, group=group)
                flat /= self.world
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))

    def clip_grad_norm(self, model, max_norm):
        """torch's clip_grad_norm_ on the norm of the whole model's gradient: every expert of the EP group
        counted once (each rank's own norm would clip by different factors, and the replicas would drift)."""
        dense, experts = params_with_grads(model)
        sq = torch.stack([p.grad.pow(2).sum() for p in experts]).sum()
        dist.all_reduce(sq, group=self.ep_group)
        total = (torch.stack([p.grad.pow(2).sum() for p in dense]).sum() + sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in dense + experts:
            p.grad.mul_(coef)
        return total

    def gather(self, local):
        """The full (E, ...) tensor from this rank's (E/N, ...) slice, on every rank of the EP group."""
        parts = [torch.empty_like(local) for _ in range(self.n)]
        dist.all_gather(parts, local.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def full_state(self, model, optimizer):
        """(model state, optimizer state) of the whole model, as a single process would have them."""
        names = optimizer_names(optimizer, model)
        state = {k: (self.gather(v) if is_expert(k) else v) for k, v in model.state_dict().items()}
        opt = optimizer.state_dict()
        opt["state"] = {i: {k: (self.gather(v) if is_expert(names[i]) and torch.is_tensor(v) and v.dim() else v)
                            for k, v in s.items()} for i, s in opt["state"].items()}
        return state, opt

    def shard_optimizer_state(self, opt, optimizer, model):
        """A full optimizer state (a checkpoint's) cut to this rank's experts, for `optimizer` (built on
        the sharded model: the same groups in the same order, so the indices agree)."""
        names = optimizer_names(optimizer, model)
        sharded = dict(opt, state={})
        for i, s in opt["state"].items():
            sharded["state"][i] = {}
            for k, v in s.items():
                if is_expert(names[i]) and torch.is_tensor(v) and v.dim():
                    lo, hi = self.local(v.shape[0])
                    v = v[lo:hi].clone()
                sharded["state"][i][k] = v
        return sharded


def optimizer_names(optimizer, model):
    """The parameter name of every index of optimizer.state_dict() (groups in order)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def params_with_grads(model):
    """(replicated parameters, expert parameters) that have a gradient."""
    dense, experts = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (experts if is_expert(name) else dense).append(p)
    return dense, experts


def is_expert(name):
    return name.rsplit(".", 1)[-1] in EXPERT_PARAMS


def moe_blocks(model):
    return [b.mlp for b in model.blocks if hasattr(b.mlp, "router")]
