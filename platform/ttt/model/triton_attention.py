"""Triton kernels for chunk attention: forward, backward, and the backward of the backward.

Queries are the last m of n key positions (lower-right aligned); query row r sits at position p = n − m + r
and sees keys c with c ≤ p and p − c < W. Per head, with s = 1/√d:

    S = s·QKᵀ,  P = softmax(S),  O = PV                       forward   (keeps O and the row log-sum-exp)
    dP = dO·Vᵀ,  D = rowsum(dO∘O),  dS = P∘(dP − D)           backward: dQ = s·dS·K, dK = s·dSᵀQ, dV = PᵀdO

The double backward takes the gradients (gQ, gK, gV) of a loss L w.r.t. (dQ, dK, dV) and returns
∂L/∂(Q, K, V, dO). With G = s·(gQ·Kᵀ + Q·gKᵀ) (the gradient w.r.t. dS), C = rowsum(G∘P), and P, dP, D as
above:

    gdP = P∘(G − C)                                            (the D term included)
    gP  = dO·gVᵀ + G∘(dP − D) − C·dP,    E = rowsum(P∘gP) = rowsum(dO∘(P·gV)) + rowsum(P∘G∘dP) − 2·C·D
    gS  = P∘(gP − E)
    ∂Q  = s·gS·K + s·dS·gK          ∂K = s·gSᵀQ + s·dSᵀgQ          ∂V = gdPᵀ·dO          ∂dO = P·gV + gdP·V

Every kernel recomputes P block by block from the saved log-sum-exp (FlashAttention style), so no [m, n]
matrix is ever stored. The query-side kernel of the double backward needs the row sums C and E before gS
exists; it avoids a second pass by accumulating the pieces of gS·K linearly (P∘X·K, P∘dP·K and P·K, with
X = dO·gVᵀ + G∘(dP − D)) and combining them once the row sums are known. The key-side kernel then
recomputes everything with C and E in hand. Accumulation is in ACC (fp32, or fp64 for fp64 inputs);
matrix products take their operands in the input dtype (bf16 on GPU: tensor cores).

All tensors are [B·H, len, d] with unit stride in d and one stride for rows (the output has the queries'
strides); row statistics are [B·H, m].
These kernels run on CUDA, and on CPU under TRITON_INTERPRET=1 (how the tests cover them).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _allowed(rows, cols, m_len, n_len, window):
    """[BM, BN] mask: row r (position n − m + r) may attend to key c."""
    pos = (n_len - m_len + rows)[:, None]
    c = cols[None, :]
    return (c <= pos) & (pos - c < window) & (c < n_len) & (rows[:, None] < m_len)


@triton.jit
def _load(ptr, rows, row_stride, limit, cols, HEAD_DIM: tl.constexpr):
    mask = (rows[:, None] < limit) & (cols[None, :] < HEAD_DIM)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store(ptr, value, rows, row_stride, limit, cols, HEAD_DIM: tl.constexpr):
    mask = (rows[:, None] < limit) & (cols[None, :] < HEAD_DIM)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_block(Q, DO, LSE, DELTA, bh, q_bh, rows, q_row, m_len, dims, HEAD_DIM: tl.constexpr):
    """Queries, output gradients and the row statistics of one block of rows of head bh."""
    q = _load(Q + bh * q_bh, rows, q_row, m_len, dims, HEAD_DIM)
    do = _load(DO + bh * q_bh, rows, q_row, m_len, dims, HEAD_DIM)
    lse = tl.load(LSE + bh * m_len + rows, mask=rows < m_len, other=0.0)
    delta = tl.load(DELTA + bh * m_len + rows, mask=rows < m_len, other=0.0)
    return q, do, lse, delta


@triton.jit
def _key_block(K, V, cols, k_row, n_len, dims, HEAD_DIM: tl.constexpr):
    return _load(K, cols, k_row, n_len, dims, HEAD_DIM), _load(V, cols, k_row, n_len, dims, HEAD_DIM)


@triton.jit
def _second_order_terms(q, k, v, do, gq, gk, lse, delta, rows, cols, m_len, n_len, window, scale, PREC):
    """P, dP − D and G = s·(gQ·Kᵀ + Q·gKᵀ) of one [rows, keys] tile, in the accumulation dtype."""
    p = _probs(q, k, lse, rows, cols, m_len, n_len, window, scale, PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(lse.dtype)
    g = tl.dot(gq, tl.trans(k), input_precision=PREC) + tl.dot(q, tl.trans(gk), input_precision=PREC)
    return p, dp, dp - delta[:, None], g.to(lse.dtype) * scale


@triton.jit
def _key_range(row0, m_len, n_len, window, BM: tl.constexpr, BN: tl.constexpr):
    """Key blocks [lo, hi) that rows row0 .. row0 + BM − 1 can see (lo aligned to BN)."""
    first_pos = n_len - m_len + row0
    last_pos = n_len - m_len + tl.minimum(row0 + BM, m_len) - 1
    lo = tl.maximum(first_pos - window + 1, 0) // BN * BN
    return lo, tl.minimum(last_pos + 1, n_len)


@triton.jit
def _row_range(col0, m_len, n_len, window, BM: tl.constexpr, BN: tl.constexpr):
    """Query-row blocks [lo, hi) that can see keys col0 .. col0 + BN − 1 (lo aligned to BM)."""
    offset = n_len - m_len
    lo = tl.maximum(col0 - offset, 0) // BM * BM
    hi = tl.minimum(col0 + BN - 1 + window - offset, m_len)
    return lo, hi


@triton.jit
def _probs(q, k, lse, rows, cols, m_len, n_len, window, scale, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(lse.dtype) * scale
    return tl.where(_allowed(rows, cols, m_len, n_len, window), tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _forward(
    Q, K, V, OUT, LSE,
    q_bh, q_row, k_bh, k_row,
    m_len, n_len, window, scale,
    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    row0 = tl.program_id(0) * BM
    bh = tl.program_id(1)
    rows = row0 + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    q = _load(Q + bh * q_bh, rows, q_row, m_len, dims, HEAD_DIM)
    # Running max starts finite: a row whose keys are all masked in a block then adds exp(−inf) = 0.
    run_max = tl.full([BM], -1.0e30, ACC)
    run_sum = tl.zeros([BM], ACC)
    acc = tl.zeros([BM, BD], ACC)
    lo, hi = _key_range(row0, m_len, n_len, window, BM, BN)
    for col0 in range(lo, hi, BN):
        cols = col0 + tl.arange(0, BN)
        k = _load(K + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
        v = _load(V + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale
        s = tl.where(_allowed(rows, cols, m_len, n_len, window), s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        p = tl.exp(s - new_max[:, None])
        alpha = tl.exp(run_max - new_max)
        run_sum = run_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(ACC)
        run_max = new_max
    run_sum = tl.where(rows < m_len, run_sum, 1.0)  # padding rows past m: no 0/0 or log 0
    _store(OUT + bh * q_bh, acc / run_sum[:, None], rows, q_row, m_len, dims, HEAD_DIM)
    tl.store(LSE + bh * m_len + rows, run_max + tl.log(run_sum), mask=rows < m_len)


@triton.jit
def _backward_q(
    Q, K, V, DO, LSE, DELTA, DQ,
    q_bh, q_row, k_bh, k_row,
    m_len, n_len, window, scale,
    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    row0 = tl.program_id(0) * BM
    bh = tl.program_id(1)
    rows = row0 + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    q, do, lse, delta = _row_block(Q, DO, LSE, DELTA, bh, q_bh, rows, q_row, m_len, dims, HEAD_DIM)
    dq = tl.zeros([BM, BD], ACC)
    lo, hi = _key_range(row0, m_len, n_len, window, BM, BN)
    for col0 in range(lo, hi, BN):
        cols = col0 + tl.arange(0, BN)
        k, v = _key_block(K + bh * k_bh, V + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
        p = _probs(q, k, lse, rows, cols, m_len, n_len, window, scale, PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(ACC)
    _store(DQ + bh * q_bh, dq * scale, rows, q_row, m_len, dims, HEAD_DIM)


@triton.jit
def _backward_kv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    q_bh, q_row, k_bh, k_row,
    m_len, n_len, window, scale,
    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    col0 = tl.program_id(0) * BN
    bh = tl.program_id(1)
    cols = col0 + tl.arange(0, BN)
    dims = tl.arange(0, BD)
    k, v = _key_block(K + bh * k_bh, V + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
    dk = tl.zeros([BN, BD], ACC)
    dv = tl.zeros([BN, BD], ACC)
    lo, hi = _row_range(col0, m_len, n_len, window, BM, BN)
    for row0 in range(lo, hi, BM):
        rows = row0 + tl.arange(0, BM)
        q, do, lse, delta = _row_block(Q, DO, LSE, DELTA, bh, q_bh, rows, q_row, m_len, dims, HEAD_DIM)
        p = _probs(q, k, lse, rows, cols, m_len, n_len, window, scale, PREC)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC).to(ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC).to(ACC)
    _store(DK + bh * k_bh, dk * scale, cols, k_row, n_len, dims, HEAD_DIM)
    _store(DV + bh * k_bh, dv, cols, k_row, n_len, dims, HEAD_DIM)


@triton.jit
def _double_q(
    Q, K, V, DO, LSE, DELTA, GQ, GK, GV, RQ, RDO, CSUM, ESUM,
    q_bh, q_row, k_bh, k_row,
    m_len, n_len, window, scale,
    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Query side of the double backward: ∂Q, ∂dO and the row sums C, E for the key side."""
    row0 = tl.program_id(0) * BM
    bh = tl.program_id(1)
    rows = row0 + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    q, do, lse, delta = _row_block(Q, DO, LSE, DELTA, bh, q_bh, rows, q_row, m_len, dims, HEAD_DIM)
    gq = _load(GQ + bh * q_bh, rows, q_row, m_len, dims, HEAD_DIM)
    c_sum = tl.zeros([BM], ACC)  # rowsum(G∘P)
    r_sum = tl.zeros([BM], ACC)  # rowsum(P∘G∘dP)
    xk = tl.zeros([BM, BD], ACC)  # (P∘X)·K
    dpk = tl.zeros([BM, BD], ACC)  # (P∘dP)·K
    pk = tl.zeros([BM, BD], ACC)  # P·K
    dsgk = tl.zeros([BM, BD], ACC)  # dS·gK
    gv_acc = tl.zeros([BM, BD], ACC)  # (P∘G)·V
    pv = tl.zeros([BM, BD], ACC)  # P·V (= O, recomputed in ACC)
    pgv = tl.zeros([BM, BD], ACC)  # P·gV
    lo, hi = _key_range(row0, m_len, n_len, window, BM, BN)
    for col0 in range(lo, hi, BN):
        cols = col0 + tl.arange(0, BN)
        k, v = _key_block(K + bh * k_bh, V + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
        gk, gv = _key_block(GK + bh * k_bh, GV + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
        p, dp, centred, g = _second_order_terms(
            q, k, v, do, gq, gk, lse, delta, rows, cols, m_len, n_len, window, scale, PREC
        )
        x = tl.dot(do, tl.trans(gv), input_precision=PREC).to(ACC) + g * centred
        gp = g * p
        c_sum += tl.sum(gp, 1)
        r_sum += tl.sum(gp * dp, 1)
        xk += tl.dot((p * x).to(k.dtype), k, input_precision=PREC).to(ACC)
        dpk += tl.dot((p * dp).to(k.dtype), k, input_precision=PREC).to(ACC)
        pk += tl.dot(p.to(k.dtype), k, input_precision=PREC).to(ACC)
        dsgk += tl.dot((p * centred).to(gk.dtype), gk, input_precision=PREC).to(ACC)
        gv_acc += tl.dot(gp.to(v.dtype), v, input_precision=PREC).to(ACC)
        pv += tl.dot(p.to(v.dtype), v, input_precision=PREC).to(ACC)
        pgv += tl.dot(p.to(gv.dtype), gv, input_precision=PREC).to(ACC)
    e_sum = tl.sum(do.to(ACC) * pgv, 1) + r_sum - 2.0 * c_sum * delta
    rq = (xk - c_sum[:, None] * dpk - e_sum[:, None] * pk + dsgk) * scale
    _store(RQ + bh * q_bh, rq, rows, q_row, m_len, dims, HEAD_DIM)
    _store(RDO + bh * q_bh, pgv + gv_acc - c_sum[:, None] * pv, rows, q_row, m_len, dims, HEAD_DIM)
    tl.store(CSUM + bh * m_len + rows, c_sum, mask=rows < m_len)
    tl.store(ESUM + bh * m_len + rows, e_sum, mask=rows < m_len)


@triton.jit
def _double_kv(
    Q, K, V, DO, LSE, DELTA, GQ, GK, GV, CSUM, ESUM, RK, RV,
    q_bh, q_row, k_bh, k_row,
    m_len, n_len, window, scale,
    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Key side of the double backward: ∂K and ∂V, given the row sums C and E."""
    col0 = tl.program_id(0) * BN
    bh = tl.program_id(1)
    cols = col0 + tl.arange(0, BN)
    dims = tl.arange(0, BD)
    k, v = _key_block(K + bh * k_bh, V + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
    gk, gv = _key_block(GK + bh * k_bh, GV + bh * k_bh, cols, k_row, n_len, dims, HEAD_DIM)
    rk = tl.zeros([BN, BD], ACC)
    rv = tl.zeros([BN, BD], ACC)
    lo, hi = _row_range(col0, m_len, n_len, window, BM, BN)
    for row0 in range(lo, hi, BM):
        rows = row0 + tl.arange(0, BM)
        q, do, lse, delta = _row_block(Q, DO, LSE, DELTA, bh, q_bh, rows, q_row, m_len, dims, HEAD_DIM)
        gq = _load(GQ + bh * q_bh, rows, q_row, m_len, dims, HEAD_DIM)
        c_sum = tl.load(CSUM + bh * m_len + rows, mask=rows < m_len, other=0.0)
        e_sum = tl.load(ESUM + bh * m_len + rows, mask=rows < m_len, other=0.0)
        p, dp, centred, g = _second_order_terms(
            q, k, v, do, gq, gk, lse, delta, rows, cols, m_len, n_len, window, scale, PREC
        )
        ds = p * centred
        gp = tl.dot(do, tl.trans(gv), input_precision=PREC).to(ACC) + g * centred - c_sum[:, None] * dp
        gs = p * (gp - e_sum[:, None])
        gdp = p * (g - c_sum[:, None])
        rk += tl.dot(tl.trans(gs).to(q.dtype), q, input_precision=PREC).to(ACC)
        rk += tl.dot(tl.trans(ds).to(gq.dtype), gq, input_precision=PREC).to(ACC)
        rv += tl.dot(tl.trans(gdp).to(do.dtype), do, input_precision=PREC).to(ACC)
    _store(RK + bh * k_bh, rk * scale, cols, k_row, n_len, dims, HEAD_DIM)
    _store(RV + bh * k_bh, rv, cols, k_row, n_len, dims, HEAD_DIM)
