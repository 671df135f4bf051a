"""
Fused top-k routing in Triton: one pass over the router logits gives everything routing and the
router-side losses need, and one backward pass gives the gradient of the logits. Tensors in,
tensors out: of the project this file imports only two shims (support/compat.py). The PyTorch
version of the same function, the one to read and the test oracle, is router.route_reference;
router.topk_route chooses between them (impl = torch | compile | triton) and wraps the outputs in
a router.Routing.

Notation: T tokens, E experts, k experts per token, r ERMoE basis rank; BT/BE/BK block sizes
(rows, experts, k padded to powers of two), RC a chunk of ERMoE coordinates.

    fused_route(a (T, E), k, renormalize) -> gates (T, k) fp32, idx (T, k) int64 (ties -> lower
        index), lse (T,) = logsumexp_e a (z-loss), mass (T,) = top-k mass of the full softmax
        (coupling loss), counts (E,) int32 and psum (E,) = sum_t p_{t,e} (load balancing)
    fused_eigen_route(u (T, E*r), ||x|| (T,), beta, k, r, renormalize) -> the logits a = beta*s,
        s = ||u_e|| / ||x|| (the ERMoE score, fused into the same pass), then the same outputs

The file, top to bottom: the Triton kernels (`_route_tile` routes a tile of logits, `_route_grad_tile`
is its derivative; the ERMoE kernels compute the logits from u first and reuse both), their launch as
custom ops with autograd, and the two entry points with the limits they check (`triton_unsupported`).
Above the kernels Triton 3.6's interpreter is patched, at the end the module gets its __getattr__ (both
from support/compat.py).

Design notes
- One program handles BT rows; the row of E logits (padded to a power of two BE <= 256) sits in
  registers, so a row's max, logsumexp, softmax and k arg-max rounds never touch memory again.
  Top-k is k rounds of "take the largest free column, the lowest one on equal values": exact
  tie-breaking, and k <= 8 rounds of register work is cheaper than a sort.
- Tiles hold ~1k values (TILE = 1024: BT = 1024/BE rows, 128 rows at E=8, 4 at E=256) with 4 warps.
  Measured from the sm_90 binaries (`TRITON_INTERPRET=0 python bench.py --resources`, cuobjdump
  of Triton's cubin, triton 3.9): 64-120 registers per thread and no stack (no spills) for every
  variant up to E=256, k=8, fp32/bf16. With ~4k-value tiles the forward kernels sat at the 255
  register cap and spilled (80-624 bytes of stack per thread); at 2k they reached 247 registers.
  The ERMoE kernels take BT = 256/BE rows and read the coordinates u in chunks of RC (4) columns,
  so a chunk is again ~1k values whatever r is (at E=64, r=128 the old whole-row tile spilled
  1216 bytes per thread); the backward reads u twice (norms, then du) instead of holding it.
- Offsets are 64-bit (the program id is widened first): T*E, or T*E*r for ERMoE, may pass 2^31.
- Edge values follow the reference exactly: a NaN counts as the largest logit (as in torch.sort)
  and gives NaN gates/statistics, a row with fewer than k finite logits still gets k distinct
  experts, +inf / all -inf rows give logsumexp +inf / -inf as torch.logsumexp. A NaN therefore
  surfaces as NaN output (and train.py's guard stops), never as an out-of-range index.
  fp64 logits are refused (the kernel computes in fp32 and could select differently).
- Per-expert counts and sum_t p are written as per-block partial rows and summed by torch: no
  atomics, so the result is deterministic run to run (float atomics are not).
- Backward recomputes p from the logits and the saved lse (one more read of a[T, E]) instead of
  saving p: memory traffic is the whole cost of this op, and p would be as large as a.
- The custom ops have fake (meta) implementations that return contiguous tensors, like the real
  ops, and their derivative is registered with torch.library.register_autograd (the custom-op
  form of an autograd.Function), so torch.compile(fullgraph=True) traces a model through them
  without a graph break.
- The math is fp32 whatever the input dtype (bf16 logits are upcast in registers).
- Not measured: speed on a GPU (no GPU was available to this project yet); the tile size was
  chosen for registers, not tuned for bandwidth.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still get impl="torch" / "compile"
    triton = None

import support.compat as _compat  # the file's one project import: two shims, no kernel code

if triton is not None and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    _compat.patch_triton_interpreter()  # numpy 2.4 with Triton 3.6's CPU interpreter


# ------------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _row_lse(a, colv):
        """logsumexp of each row of a (BT, BE) over the real columns, with torch.logsumexp's
        conventions: +inf if a row holds +inf, -inf if it is all -inf, NaN if it holds a NaN."""
        m = tl.max(tl.where(colv & (a == a), a, -float("inf")), axis=1)
        m = tl.where((m == float("inf")) | (m == -float("inf")), 0.0, m)  # an infinite max is not subtracted
        s = tl.sum(tl.where(colv, tl.exp(a - m[:, None]), 0.0), axis=1)  # a NaN propagates through exp
        return tl.log(s) + m

    @triton.jit
    def _route_tile(a, rows, rmask, cols, pid, E, gates_ptr, idx_ptr, lse_ptr, mass_ptr, counts_ptr, psum_ptr,
                    K: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
        """Route one tile of logits a (BT, BE) fp32 and store every output of that tile."""
        colv = (cols < E)[None, :]                                  # (1, BE) real columns
        lse = _row_lse(a, colv)                                     # (BT,)
        p = tl.where(colv, tl.exp(a - lse[:, None]), 0.0)           # (BT, BE) full softmax
        isnan = a != a
        kcols = tl.arange(0, BK)
        # k rounds of "take the best free column": a NaN counts as the largest value (as in torch.sort),
        # equal values go to the lowest column. A `taken` mask, not -inf, marks what is gone, so a
        # row with fewer than k finite logits still gets k distinct experts.
        taken = tl.broadcast_to(~colv, (BT, BE))
        v = tl.zeros((BT, BK), tl.float32)                          # selected logits, best first
        ix = tl.zeros((BT, BK), tl.int32)                           # selected experts
        for j in tl.static_range(K):
            free = ~taken
            inan = tl.min(tl.where(free & isnan, cols[None, :], BE), axis=1)      # lowest free NaN
            vmax = tl.max(tl.where(free & ~isnan, a, -float("inf")), axis=1)
            ival = tl.min(tl.where(free & (a == vmax[:, None]), cols[None, :], BE), axis=1)
            ij = tl.where(inan < BE, inan, ival)                    # (BT,)
            vj = tl.where(inan < BE, float("nan"), vmax)
            taken = taken | (cols[None, :] == ij[:, None])
            v = tl.where(kcols[None, :] == j, vj[:, None], v)
            ix = tl.where(kcols[None, :] == j, ij[:, None], ix)
        hits = taken & colv                                         # (BT, BE) the k selected
        if RENORM:  # softmax over the selected logits; the first one is their max (as torch.softmax)
            v0 = tl.sum(tl.where(kcols[None, :] == 0, v, 0.0), axis=1)
            g = tl.where(kcols[None, :] < K, tl.exp(v - v0[:, None]), 0.0)
            gates = g / tl.sum(g, axis=1)[:, None]
        else:       # p at the selected experts
            gates = tl.exp(v - lse[:, None])
        kmask = rmask[:, None] & (kcols[None, :] < K)
        tl.store(gates_ptr + rows[:, None] * K + kcols[None, :], gates, mask=kmask)
        tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], ix.to(tl.int64), mask=kmask)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        tl.store(mass_ptr + rows, tl.sum(tl.where(hits, p, 0.0), axis=1), mask=rmask)
        hits = hits & rmask[:, None]
        tl.store(counts_ptr + pid * E + cols, tl.sum(hits.to(tl.int32), axis=0), mask=cols < E)
        tl.store(psum_ptr + pid * E + cols, tl.sum(tl.where(rmask[:, None], p, 0.0), axis=0), mask=cols < E)

    @triton.jit
    def _route_grad_tile(a, rows, rmask, cols, lse_ptr, idx_ptr, gates_ptr, dg_ptr, dlse_ptr, dmass_ptr,
                         dpsum_ptr, E, K: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr,
                         BE: tl.constexpr, BK: tl.constexpr):
        """d(loss)/d(a) for one tile (BT, BE), from the gradients of gates, lse, mass and psum."""
        colv = (cols < E)[None, :]
        kcols = tl.arange(0, BK)
        kmask = rmask[:, None] & (kcols[None, :] < K)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        p = tl.where(colv, tl.exp(a - lse[:, None]), 0.0)           # (BT, BE) recomputed, not stored
        ix = tl.load(idx_ptr + rows[:, None] * K + kcols[None, :], mask=kmask, other=-1).to(tl.int32)
        g = tl.load(gates_ptr + rows[:, None] * K + kcols[None, :], mask=kmask, other=0.0)
        dg = tl.load(dg_ptr + rows[:, None] * K + kcols[None, :], mask=kmask, other=0.0)
        dlse = tl.load(dlse_ptr + rows, mask=rmask, other=0.0)
        dmass = tl.load(dmass_ptr + rows, mask=rmask, other=0.0)
        dpsum = tl.load(dpsum_ptr + cols, mask=cols < E, other=0.0)
        sel = tl.zeros((BT, BE), tl.float32)                        # 1 at the selected experts
        dsel = tl.zeros((BT, BE), tl.float32)                       # gate gradient at the selected
        gdg = tl.sum(g * dg, axis=1)                                # (BT,)
        for j in tl.static_range(K):
            ij = tl.sum(tl.where(kcols[None, :] == j, ix, 0), axis=1)
            gj = tl.sum(tl.where(kcols[None, :] == j, g, 0.0), axis=1)
            dgj = tl.sum(tl.where(kcols[None, :] == j, dg, 0.0), axis=1)
            hit = cols[None, :] == ij[:, None]
            sel = tl.where(hit, 1.0, sel)
            if RENORM:  # gates = softmax over the selected logits: d a_j = g_j (dg_j - <g, dg>)
                dsel = tl.where(hit, (gj * (dgj - gdg))[:, None], dsel)
            else:
                dsel = tl.where(hit, dgj[:, None], dsel)
        dp = dpsum[None, :] + dmass[:, None] * sel                  # gradient w.r.t. p
        if not RENORM:
            dp += dsel                                              # gates = p at the selection
        da = p * (dp - tl.sum(p * dp, axis=1)[:, None]) + dlse[:, None] * p
        if RENORM:
            da += dsel
        return da

    @triton.jit
    def _route_fwd_kernel(a_ptr, T, E, gates_ptr, idx_ptr, lse_ptr, mass_ptr, counts_ptr, psum_ptr,
                          K: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                          BK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)                         # 64-bit offsets: T*E may pass 2^31
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        rmask = rows < T
        a = tl.load(a_ptr + rows[:, None] * E + cols[None, :], mask=rmask[:, None] & (cols[None, :] < E),
                    other=-float("inf")).to(tl.float32)
        a = tl.where(rmask[:, None], a, 0.0)                        # rows past T: finite, never stored
        _route_tile(a, rows, rmask, cols, pid, E, gates_ptr, idx_ptr, lse_ptr, mass_ptr, counts_ptr, psum_ptr,
                    K, RENORM, BT, BE, BK)

    @triton.jit
    def _route_bwd_kernel(a_ptr, T, E, lse_ptr, idx_ptr, gates_ptr, dg_ptr, dlse_ptr, dmass_ptr,
                          dpsum_ptr, da_ptr, K: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr,
                          BE: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        rmask = rows < T
        mask = rmask[:, None] & (cols[None, :] < E)
        a = tl.load(a_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
        da = _route_grad_tile(a, rows, rmask, cols, lse_ptr, idx_ptr, gates_ptr, dg_ptr, dlse_ptr, dmass_ptr,
                              dpsum_ptr, E, K, RENORM, BT, BE, BK)
        tl.store(da_ptr + rows[:, None] * E + cols[None, :], da, mask=mask)

    @triton.jit
    def _eigen_norms(u_ptr, rows, rmask, cols, E, R, BT: tl.constexpr, BE: tl.constexpr, RC: tl.constexpr):
        """||u_e|| (BT, BE) of a tile's rows of u (T, E*R), read in chunks of RC coordinates."""
        rr = tl.arange(0, RC)
        base = rows[:, None, None] * (E * R) + cols[None, :, None] * R   # (BT, BE, 1) int64
        mrow = rmask[:, None, None] & (cols[None, :, None] < E)
        acc = tl.zeros((BT, BE), tl.float32)
        for r0 in range(0, R, RC):
            m3 = mrow & (r0 + rr[None, None, :] < R)
            u = tl.load(u_ptr + base + r0 + rr[None, None, :], mask=m3, other=0.0).to(tl.float32)
            acc += tl.sum(u * u, axis=2)
        return tl.sqrt(acc)

    @triton.jit
    def _eigen_fwd_kernel(u_ptr, xn_ptr, beta_ptr, T, E, R, logits_ptr, gates_ptr, idx_ptr, lse_ptr, mass_ptr,
                          counts_ptr, psum_ptr, K: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr,
                          BE: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        rmask = rows < T
        beta = tl.load(beta_ptr).to(tl.float32)
        unorm = _eigen_norms(u_ptr, rows, rmask, cols, E, R, BT, BE, RC)
        xn = tl.maximum(tl.load(xn_ptr + rows, mask=rmask, other=1.0).to(tl.float32), 1e-6)
        a = tl.where(cols[None, :] < E, beta * unorm / xn[:, None], -float("inf"))  # beta * s
        tl.store(logits_ptr + rows[:, None] * E + cols[None, :], a, mask=rmask[:, None] & (cols[None, :] < E))
        _route_tile(a, rows, rmask, cols, pid, E, gates_ptr, idx_ptr, lse_ptr, mass_ptr, counts_ptr, psum_ptr,
                    K, RENORM, BT, BE, BK)

    @triton.jit
    def _eigen_bwd_kernel(u_ptr, xn_ptr, beta_ptr, T, E, R, lse_ptr, idx_ptr, gates_ptr, dg_ptr, dlse_ptr,
                          dmass_ptr, dpsum_ptr, dlogits_ptr, du_ptr, dxn_ptr, dbeta_ptr,
                          K: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                          BK: tl.constexpr, RC: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        rmask = rows < T
        mask = rmask[:, None] & (cols[None, :] < E)
        beta = tl.load(beta_ptr).to(tl.float32)
        unorm = _eigen_norms(u_ptr, rows, rmask, cols, E, R, BT, BE, RC)
        xraw = tl.load(xn_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
        xn = tl.maximum(xraw, 1e-6)
        s = unorm / xn[:, None]
        a = tl.where(cols[None, :] < E, beta * s, -float("inf"))
        da = _route_grad_tile(a, rows, rmask, cols, lse_ptr, idx_ptr, gates_ptr, dg_ptr, dlse_ptr, dmass_ptr,
                              dpsum_ptr, E, K, RENORM, BT, BE, BK)
        da += tl.load(dlogits_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
        da = tl.where(mask, da, 0.0)
        ds = beta * da                                              # (BT, BE)
        # s = ||u_e|| / max(||x||, 1e-6): ds/du = u / (||u_e|| ||x||); ds/d||x|| = -s / ||x||, and 0
        # where the clamp is active (as torch's clamp_min backward)
        coef = tl.where(unorm > 0, ds / (tl.maximum(unorm, 1e-30) * xn[:, None]), 0.0)
        rr = tl.arange(0, RC)
        base = rows[:, None, None] * (E * R) + cols[None, :, None] * R
        for r0 in range(0, R, RC):                                  # second read of u, chunk by chunk
            m3 = mask[:, :, None] & (r0 + rr[None, None, :] < R)
            u = tl.load(u_ptr + base + r0 + rr[None, None, :], mask=m3, other=0.0).to(tl.float32)
            tl.store(du_ptr + base + r0 + rr[None, None, :], coef[:, :, None] * u, mask=m3)
        dxn = tl.where(xraw >= 1e-6, -tl.sum(ds * s, axis=1) / xn, 0.0)
        tl.store(dxn_ptr + rows, dxn, mask=rmask)
        tl.store(dbeta_ptr + pid, tl.sum(tl.sum(da * s, axis=1), axis=0))


# ------------------------------------------------------------------------------------------------
# launching them: block sizes, and the kernels as torch.library custom ops with autograd

TILE = 1024  # values of the (BT, BE) routing tile a program holds in registers (see the design notes)


def _blocks(E, k, r=None):
    """Block sizes: BE, BK cover E and k; BT rows so that a tile holds ~TILE values. ERMoE (r given)
    takes a quarter of the rows and reads its coordinates in chunks of RC, so that the (BT, BE, RC)
    chunk is ~TILE values too."""
    BE, BK = triton.next_power_of_2(E), triton.next_power_of_2(k)
    if r is None:
        return max(1, TILE // BE), BE, BK, None
    BT = max(1, TILE // 4 // BE)
    return BT, BE, BK, max(1, min(triton.next_power_of_2(r), TILE // (BT * BE)))


def _outputs(T, E, k, n_blocks, device):
    f32 = dict(dtype=torch.float32, device=device)
    return (torch.empty(T, k, **f32), torch.empty(T, k, dtype=torch.int64, device=device),
            torch.empty(T, **f32), torch.empty(T, **f32),
            torch.empty(n_blocks, E, dtype=torch.int32, device=device), torch.empty(n_blocks, E, **f32))


# Every op returns fresh contiguous tensors, and its fake (meta) implementation says exactly that:
# new_empty(shape), never empty_like(input), which would copy a non-contiguous input's strides.

@torch.library.custom_op("nanomoe::route", mutates_args=())
def _route_op(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    T, E = logits.shape
    BT, BE, BK, _ = _blocks(E, k)
    n = triton.cdiv(T, BT)
    gates, idx, lse, mass, counts, psum = _outputs(T, E, k, n, logits.device)
    _route_fwd_kernel[(n,)](logits, T, E, gates, idx, lse, mass, counts, psum,
                            K=k, RENORM=renormalize, BT=BT, BE=BE, BK=BK)
    return gates, idx, lse, mass, counts.sum(0, dtype=torch.int32), psum.sum(0)


@_route_op.register_fake
def _(logits, k, renormalize):
    T, E = logits.shape
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty(T, k, **f32), logits.new_empty(T, k, dtype=torch.int64), logits.new_empty(T, **f32),
            logits.new_empty(T, **f32), logits.new_empty(E, dtype=torch.int32), logits.new_empty(E, **f32))


@torch.library.custom_op("nanomoe::route_backward", mutates_args=())
def _route_bwd_op(logits: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor,
                  d_gates: torch.Tensor, d_lse: torch.Tensor, d_mass: torch.Tensor, d_psum: torch.Tensor,
                  renormalize: bool) -> torch.Tensor:
    logits = logits.contiguous()
    T, E = logits.shape
    k = idx.shape[1]
    BT, BE, BK, _ = _blocks(E, k)
    da = torch.empty(T, E, dtype=logits.dtype, device=logits.device)  # stored in the input dtype
    _route_bwd_kernel[(triton.cdiv(T, BT),)](logits, T, E, lse.contiguous(), idx.contiguous(), gates.contiguous(),
                                             d_gates.contiguous(), d_lse.contiguous(), d_mass.contiguous(),
                                             d_psum.contiguous(), da, K=k, RENORM=renormalize, BT=BT, BE=BE, BK=BK)
    return da


@_route_bwd_op.register_fake
def _(logits, lse, idx, gates, d_gates, d_lse, d_mass, d_psum, renormalize):
    return logits.new_empty(logits.shape)


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad.float()


def _route_setup(ctx, inputs, output):
    logits, k, renormalize = inputs
    gates, idx, lse = output[:3]
    ctx.save_for_backward(logits, lse, idx, gates)
    ctx.renormalize = renormalize


def _route_backward(ctx, d_gates, d_idx, d_lse, d_mass, d_counts, d_psum):
    logits, lse, idx, gates = ctx.saved_tensors
    E = logits.shape[1]
    da = _route_bwd_op(logits, lse, idx, gates, _zeros_if_none(d_gates, gates), _zeros_if_none(d_lse, lse),
                       _zeros_if_none(d_mass, lse), _zeros_if_none(d_psum, lse.new_empty(E)), ctx.renormalize)
    return da, None, None


torch.library.register_autograd("nanomoe::route", _route_backward, setup_context=_route_setup)


@torch.library.custom_op("nanomoe::eigen_route", mutates_args=())
def _eigen_op(u: torch.Tensor, xnorm: torch.Tensor, beta: torch.Tensor, k: int, r: int,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    u, xnorm = u.contiguous(), xnorm.contiguous()
    T, E = u.shape[0], u.shape[1] // r
    BT, BE, BK, RC = _blocks(E, k, r)
    n = triton.cdiv(T, BT)
    logits = torch.empty(T, E, dtype=torch.float32, device=u.device)
    gates, idx, lse, mass, counts, psum = _outputs(T, E, k, n, u.device)
    _eigen_fwd_kernel[(n,)](u, xnorm, beta, T, E, r, logits, gates, idx, lse, mass, counts, psum,
                            K=k, RENORM=renormalize, BT=BT, BE=BE, BK=BK, RC=RC)
    return logits, gates, idx, lse, mass, counts.sum(0, dtype=torch.int32), psum.sum(0)


@_eigen_op.register_fake
def _(u, xnorm, beta, k, r, renormalize):
    T, E = u.shape[0], u.shape[1] // r
    f32 = dict(dtype=torch.float32)
    return (u.new_empty(T, E, **f32), u.new_empty(T, k, **f32), u.new_empty(T, k, dtype=torch.int64),
            u.new_empty(T, **f32), u.new_empty(T, **f32), u.new_empty(E, dtype=torch.int32), u.new_empty(E, **f32))


@torch.library.custom_op("nanomoe::eigen_route_backward", mutates_args=())
def _eigen_bwd_op(u: torch.Tensor, xnorm: torch.Tensor, beta: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor,
                  gates: torch.Tensor, d_logits: torch.Tensor, d_gates: torch.Tensor, d_lse: torch.Tensor,
                  d_mass: torch.Tensor, d_psum: torch.Tensor, renormalize: bool) -> tuple[
                      torch.Tensor, torch.Tensor, torch.Tensor]:
    u, xnorm = u.contiguous(), xnorm.contiguous()
    T, k = idx.shape
    E = d_psum.shape[0]
    r = u.shape[1] // E
    BT, BE, BK, RC = _blocks(E, k, r)
    n = triton.cdiv(T, BT)
    du = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    dxn = torch.empty(T, dtype=torch.float32, device=u.device)
    dbeta = torch.empty(n, dtype=torch.float32, device=u.device)
    _eigen_bwd_kernel[(n,)](u, xnorm, beta, T, E, r, lse.contiguous(), idx.contiguous(), gates.contiguous(),
                            d_gates.contiguous(), d_lse.contiguous(), d_mass.contiguous(), d_psum.contiguous(),
                            d_logits.contiguous(), du, dxn, dbeta, K=k, RENORM=renormalize, BT=BT, BE=BE, BK=BK, RC=RC)
    return du, dxn, dbeta.sum()


@_eigen_bwd_op.register_fake
def _(u, xnorm, beta, lse, idx, gates, d_logits, d_gates, d_lse, d_mass, d_psum, renormalize):
    f32 = dict(dtype=torch.float32)
    return u.new_empty(u.shape, **f32), xnorm.new_empty(xnorm.shape, **f32), beta.new_empty((), **f32)


def _eigen_setup(ctx, inputs, output):
    u, xnorm, beta, k, r, renormalize = inputs
    logits, gates, idx, lse = output[:4]
    ctx.save_for_backward(u, xnorm, beta, lse, idx, gates)
    ctx.renormalize, ctx.E = renormalize, logits.shape[1]


def _eigen_backward(ctx, d_logits, d_gates, d_idx, d_lse, d_mass, d_counts, d_psum):
    u, xnorm, beta, lse, idx, gates = ctx.saved_tensors
    T = u.shape[0]
    du, dxn, dbeta = _eigen_bwd_op(
        u, xnorm, beta, lse, idx, gates, _zeros_if_none(d_logits, lse.new_empty(T, ctx.E)),
        _zeros_if_none(d_gates, gates), _zeros_if_none(d_lse, lse), _zeros_if_none(d_mass, lse),
        _zeros_if_none(d_psum, lse.new_empty(ctx.E)), ctx.renormalize)
    return du.to(u.dtype), dxn.to(xnorm.dtype), dbeta.to(beta.dtype).reshape(beta.shape), None, None, None


torch.library.register_autograd("nanomoe::eigen_route", _eigen_backward, setup_context=_eigen_setup)


# ------------------------------------------------------------------------------------------------
# entry points

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # upcast to fp32 in registers, exactly


def triton_unsupported(E, k, dtype=torch.float32):
    """Why the kernels cannot route E experts top-k of `dtype` logits, or None if they can."""
    if triton is None:
        return "impl='triton' needs triton installed"
    if E > 256 or k > 8:
        return f"impl='triton' supports n_experts <= 256 and top_k <= 8, got {E} and {k}"
    if dtype not in TRITON_DTYPES:  # fp64 would be selected on values rounded to fp32
        return f"impl='triton' takes float32, bfloat16 or float16 logits, got {dtype}"
    return None


def _check(E, k, dtype):
    if not 1 <= k <= E:
        raise ValueError(f"need 1 <= k <= E, got k={k}, E={E}")
    why = triton_unsupported(E, k, dtype)
    if why:
        raise ValueError(why)


def fused_route(logits, k, renormalize=True):
    """logits (T, E) -> (gates, idx, lse, mass, counts, psum), differentiable in the logits."""
    _check(logits.shape[1], k, logits.dtype)
    return _route_op(logits, k, renormalize)


def fused_eigen_route(u, xnorm, beta, k, r, renormalize=True):
    """u (T, E*r), ||x|| (T,), beta () -> (logits, gates, idx, lse, mass, counts, psum)."""
    if r < 1 or u.shape[1] % r != 0:
        raise ValueError(f"u has {u.shape[1]} coordinates per token, not a multiple of the rank r={r}")
    _check(u.shape[1] // r, k, u.dtype)
    return _eigen_op(u, xnorm, beta, k, r, renormalize)


# ------------------------------------------------------------------------------------------------
# one name, two packages: this module also answers for Hugging Face's `kernels`, which transformers imports
# under the same name (support/compat.py says why and how)

__getattr__ = _compat.hub_getattr(globals())
