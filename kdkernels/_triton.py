"""The Triton backend: one fused kernel (one program per row, online softmax over blocks of the
vocabulary), registered with torch.library.triton_op so torch.compile sees the kernel, and the
same autograd as the compiled op (the gradient is computed in the forward pass).

The teachers are read in place: up to MAX_TEACHERS pointers, each with its own row stride and
dtype, are separate kernel arguments, so a list of teachers is never stacked and every member is
read at its own precision. Weights and row counts are kernel scalars or device-side sums: a call
makes no host-to-device copy and never synchronises with the host.

Runs on GPUs, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how
CI tests it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._autograd import register_fused_op, run_fused
from ._fused import OpOptions, checked_op_impl
from ._validate import DEFAULT_BETA, Problem, divergence_of, row_counts

try:
    import triton
    import triton.language as tl
except ImportError:  # the triton extra is not installed
    triton = None

MAX_TEACHERS = 8  # teacher pointers are kernel arguments T0..T7


def devices() -> tuple[str, ...]:
    """The device types whose tensors the Triton backend serves in this process."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def missing() -> str | None:
    """Why the Triton backend is not usable here (None when it is)."""
    if triton is None:
        return "Triton is not installed (pip install 'kdkernels[triton]')"
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "installed, but no GPU is available (TRITON_INTERPRET=1 runs it on CPU tensors)"
    return None


if triton is not None:
    _SLOTS = tl.constexpr(MAX_TEACHERS)

    @triton.jit
    def _online_update(m, total, x, scale):
        """Fold a block x into a running max m (in x's units) and a running
        total = sum exp((x - m) * scale): every x enters relative to the max, so a constant
        added to the row cancels exactly."""
        m_new = tl.maximum(m, tl.max(x, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix stays 0
        total = total * tl.exp((m - m_sub) * scale) + tl.sum(tl.exp((x - m_sub) * scale), 0)
        return m_new, total

    @triton.jit
    def _kl_term(p, log_p, d, q):
        """One class's share of KL(p || q), never negative: p f(d) with f(d) = exp(-d) - 1 + d
        and d = log p - log q (the terms sum to the KL because sum(q - p) = 0), and q where
        p = 0. f is a Taylor series where |d| < 1/4 (where exp(-d) - 1 + d cancels), else
        exp(log p - d) - p + p d, the q implied by d, so that an error in d's row constant
        cancels to first order. csrc/kd_row_math.h (kl_term) computes the same."""
        c6 = 1.0 / 720.0 - d * (1.0 / 5040.0)
        c4 = 1.0 / 24.0 - d * (1.0 / 120.0 - d * c6)
        series = d * d * (0.5 - d * (1.0 / 6.0 - d * c4))
        term = tl.where(tl.abs(d) < 0.25, p * series, tl.exp(log_p - d) - p + p * d)
        return tl.where(p == 0.0, q, term)

    @triton.jit
    def _log1p_neg(x):
        """log(1 + x) for x in [-1, 0] without cancelling near 0 (Triton has no log1p):
        log(u) * x / (u - 1) with u = 1 + x, exact where u rounds to 1 (Goldberg's trick)."""
        u = 1.0 + x
        return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))

    @triton.jit
    def _expm1_neg(x):
        """exp(x) - 1 for x <= 0 without cancelling near 0: a Taylor series for |x| < 1/4."""
        c5 = 1.0 / 120.0 + x * (1.0 / 720.0)
        series = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * c5))))
        return tl.where(x > -0.25, series, tl.exp(x) - 1.0)

    @triton.jit
    def _soft_element(p, log_p, d, q, log_q, beta, SOFT_LOSS: tl.constexpr):
        """(term, a, qa): a class's share of the soft term and, for the divergences whose
        gradient needs a row sum, a and q a: the divergence axis of the Triton kernel
        (csrc/kd_row_math.h: KLDivergence, CrossEntropy, ReverseKL, JensenShannon; codes as
        in kd_args.h, jsd at beta 0 and 1 already sent to 0 and 2)."""
        zero = tl.zeros_like(p)
        if SOFT_LOSS == 0:  # KL(p || q)
            term = _kl_term(p, log_p, d, q)
            a = zero
            qa = zero
        elif SOFT_LOSS == 1:  # H(p, q)
            term = tl.where(p == 0.0, 0.0, -p * log_q)  # 0 log 0 = 0, NaN kept
            a = zero
            qa = zero
        elif SOFT_LOSS == 2:  # KL(q || p): the KL's terms with p and q swapped
            term = _kl_term(q, log_q, -d, p)
            a = -d
            qa = term
        else:  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
            p_smaller = d <= 0.0
            x = tl.where(p_smaller, d, -d)
            l_ = -_log1p_neg(tl.where(p_smaller, beta, 1.0 - beta) * _expm1_neg(x))
            e = tl.where(p_smaller, l_, l_ - d)  # log q - log m
            f = tl.where(p_smaller, d + l_, l_)  # log p - log m
            m = beta * p + (1.0 - beta) * q
            kl_qm = _kl_term(q, log_q, e, m)
            term = beta * _kl_term(p, log_p, f, m) + (1.0 - beta) * kl_qm
            a = (1.0 - beta) * e
            qa = (1.0 - beta) * kl_qm
        return term, a, qa

    @triton.jit
    def _teacher_minus_student(
        teachers,
        strides,
        weights,
        row,
        cols,
        mask,
        s,
        M: tl.constexpr,
    ):
        """D = sum_m w_m (t_m - s) over one block (geometric ensemble): the combined teacher
        relative to the student, exact where they are close (where the KL cancels)."""
        diff = tl.zeros(cols.shape, tl.float32)
        for m in tl.static_range(M):
            t_row = teachers[m] + row * strides[m]
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            diff += weights[m] * (t - s)
        return diff

    @triton.jit
    def _member_log_share(row_in, m: tl.constexpr, cols, mask, inv_t, member_max, member_sum):
        """log(w_m softmax(t_m / T)) over one block: member m's share of the arithmetic mean."""
        _, teachers, strides, weights, row = row_in
        lane = tl.arange(0, _SLOTS)
        t = tl.load(teachers[m] + row * strides[m] + cols, mask=mask, other=float("-inf"))
        mt = tl.max(tl.where(lane == m, member_max, float("-inf")), 0)
        lt = tl.sum(tl.where(lane == m, member_sum, 0.0), 0)
        return (t.to(tl.float32) - mt) * inv_t + tl.log(weights[m] / lt)

    @triton.jit
    def _soft_inputs(
        row_in,
        stats,
        cols,
        mask,
        M: tl.constexpr,
        ARITHMETIC: tl.constexpr,
        LOG_SPACE: tl.constexpr,
    ):
        """One block of a row as the soft term sees it: (s, log q, p, log p, d) with
        d = log p - log q formed where it keeps its digits (geometric: D / T + d_const).
        LOG_SPACE (reverse KL, which needs q log p): an arithmetic mixture whose every share
        underflowed gets its log p in log space, finite, instead of log 0.
        row_in = (S, teachers, strides, weights, row): where the row is; stats = (inv_t, m_s,
        log_lu, m_z, log_lz, s_ref, d_const, use_diff, member_max, member_sum): pass 1's."""
        S, teachers, strides, weights, row = row_in
        inv_t, m_s, log_lu, m_z, log_lz, s_ref, d_const, use_diff, member_max, member_sum = stats
        neg_inf = float("-inf")
        s = tl.load(S + cols, mask=mask, other=neg_inf).to(tl.float32)
        log_q = (s - m_s) * inv_t - log_lu
        if ARITHMETIC:
            p = tl.zeros(cols.shape, tl.float32)
            for m in tl.static_range(M):
                p += tl.exp(_member_log_share(row_in, m, cols, mask, inv_t, member_max, member_sum))
            log_p = tl.log(p)
            if LOG_SPACE:
                top = tl.full(cols.shape, neg_inf, tl.float32)
                for m in tl.static_range(M):
                    lp = _member_log_share(row_in, m, cols, mask, inv_t, member_max, member_sum)
                    top = tl.maximum(top, lp)
                top_safe = tl.where(top == neg_inf, 0.0, top)
                total = tl.zeros(cols.shape, tl.float32)
                for m in tl.static_range(M):
                    lp = _member_log_share(row_in, m, cols, mask, inv_t, member_max, member_sum)
                    total += tl.exp(lp - top_safe)
                log_p = tl.where(p > 0.0, log_p, top_safe + tl.log(total))
            d = log_p - log_q
        else:
            finite = (s > neg_inf) & (s < float("inf"))
            s_hat = tl.where(finite, s, s_ref)
            diff = _teacher_minus_student(teachers, strides, weights, row, cols, mask, s_hat, M)
            log_p = (diff + (s_hat - s_ref)) * inv_t - m_z - log_lz
            p = tl.exp(log_p)
            d = tl.where(finite, diff * inv_t + d_const, log_p - log_q)
            d = tl.where(use_diff, d, log_p - log_q)
        return s, log_q, p, log_p, d

    @triton.jit
    def _hard_grad(s, m_s, log_ls, cols, y, in_hard, hard_coef):
        """The hard term's gradient over one block: hard_coef (r - onehot(y))."""
        r = tl.exp(s - m_s - log_ls)
        return tl.where(in_hard, hard_coef * (r - tl.where(cols == y, 1.0, 0.0)), 0.0)

    @triton.jit
    def _soft_block(
        row_in,
        stats,
        cols,
        mask,
        beta,
        M: tl.constexpr,
        ARITHMETIC: tl.constexpr,
        SOFT_LOSS: tl.constexpr,
    ):
        """(s, q, p, term, a, qa) over one block: _soft_inputs, then _soft_element."""
        log_space = SOFT_LOSS == 2  # reverse KL: q log p
        s, log_q, p, log_p, d = _soft_inputs(row_in, stats, cols, mask, M, ARITHMETIC, log_space)
        q = tl.exp(log_q)
        term, a, qa = _soft_element(p, log_p, d, q, log_q, beta, SOFT_LOSS)
        return s, q, p, term, a, qa

    @triton.jit
    def _write_grad(G, cols, mask, soft_g, hard_g, in_soft, bad):
        """Store one block of the gradient: the soft part in soft rows, NaN in bad rows."""
        g = tl.where(in_soft, soft_g, 0.0) + hard_g
        g = tl.where(bad, float("nan"), g)
        tl.store(G + cols, g.to(G.dtype.element_ty), mask=mask)

    @triton.jit
    def _kd_fwd_kernel(
        S,
        s_row_stride,
        T0,
        T1,
        T2,
        T3,
        T4,
        T5,
        T6,
        T7,
        ts0,
        ts1,
        ts2,
        ts3,
        ts4,
        ts5,
        ts6,
        ts7,
        w0,
        w1,
        w2,
        w3,
        w4,
        w5,
        w6,
        w7,
        Y,
        COUNTS,
        LOSS,
        G,
        C,
        inv_t,
        soft_scale,
        hard_scale,
        ignore_index,
        unlabeled_index,
        beta,
        M: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        HAS_UNLABELED: tl.constexpr,
        ARITHMETIC: tl.constexpr,
        SOFT_LOSS: tl.constexpr,
        ROW_SUM_GRADIENT: tl.constexpr,
        DEVICE_COUNTS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Every offset below is int64: the row index is, so row * stride is a 64-bit product.
        row = tl.program_id(0).to(tl.int64)
        S += row * s_row_stride
        G += row * C
        if HAS_LABELS:
            y = tl.load(Y + row)
            in_soft = y != ignore_index
            in_hard = in_soft
            if HAS_UNLABELED:
                in_hard = in_hard & (y != unlabeled_index)
            bad = in_hard & ((y < 0) | (y >= C))  # on the device nothing stops: the row is NaN
        else:
            y = tl.zeros((), dtype=tl.int64)
            in_soft = y == 0
            in_hard = y != 0
            bad = y != 0
        soft_coef = soft_scale
        hard_coef = hard_scale
        if DEVICE_COUNTS:  # "mean": the denominators in device memory (0 gives 0, never NaN)
            soft_count = tl.load(COUNTS)
            hard_count = tl.load(COUNTS + 1)
            soft_coef = tl.where(soft_count > 0, soft_coef / tl.maximum(soft_count, 1.0), 0.0)
            hard_coef = tl.where(hard_count > 0, hard_coef / tl.maximum(hard_count, 1.0), 0.0)

        offs = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        teachers = (T0, T1, T2, T3, T4, T5, T6, T7)  # indexed with compile-time m only
        weights = (w0, w1, w2, w3, w4, w5, w6, w7)
        strides = (ts0, ts1, ts2, ts3, ts4, ts5, ts6, ts7)
        if in_soft | in_hard:
            # Every logit enters relative to a value of its own row (the student's first
            # element, a running max), so a constant added to a row cancels exactly. The
            # geometric teacher is z = (D + s - s_ref) / T with D = sum_m w_m (t_m - s).
            s_ref = tl.load(S).to(tl.float32)
            s_ref = tl.where((s_ref > neg_inf) & (s_ref < float("inf")), s_ref, 0.0)
            # Arithmetic ensembles keep each member's (max, sum) in registers, one lane each.
            lane = tl.arange(0, _SLOTS)
            member_max = tl.full((_SLOTS,), neg_inf, tl.float32)
            member_sum = tl.zeros((_SLOTS,), tl.float32)
            if ARITHMETIC:
                for m in tl.static_range(M):
                    t_row = teachers[m] + row * strides[m]
                    mt = tl.full((), neg_inf, tl.float32)
                    lt = tl.zeros((), tl.float32)
                    for start in range(0, C, BLOCK):
                        cols = start + offs
                        t = tl.load(t_row + cols, mask=cols < C, other=neg_inf).to(tl.float32)
                        mt, lt = _online_update(mt, lt, t, inv_t)
                    member_max = tl.where(lane == m, mt, member_max)
                    member_sum = tl.where(lane == m, lt, member_sum)

            # Pass 1: the student's max and sums (at 1 and at T), the combined teacher's.
            m_s = tl.full((), neg_inf, tl.float32)
            l_s = tl.zeros((), tl.float32)
            l_u = tl.zeros((), tl.float32)
            m_z = tl.full((), neg_inf, tl.float32)
            l_z = tl.zeros((), tl.float32)
            diff_max = tl.zeros((), tl.float32)  # max |D| over the finite entries
            for start in range(0, C, BLOCK):
                cols = start + offs
                mask = cols < C
                s = tl.load(S + cols, mask=mask, other=neg_inf).to(tl.float32)
                m_new = tl.maximum(m_s, tl.max(s, 0))
                m_sub = tl.where(m_new == neg_inf, 0.0, m_new)
                l_s = l_s * tl.exp(m_s - m_sub) + tl.sum(tl.exp(s - m_sub), 0)
                l_u = l_u * tl.exp((m_s - m_sub) * inv_t) + tl.sum(tl.exp((s - m_sub) * inv_t), 0)
                m_s = m_new
                if not ARITHMETIC:
                    s_hat = tl.where((s > neg_inf) & (s < float("inf")), s, s_ref)
                    diff = _teacher_minus_student(
                        teachers, strides, weights, row, cols, mask, s_hat, M
                    )
                    m_z, l_z = _online_update(m_z, l_z, (diff + (s_hat - s_ref)) * inv_t, 1.0)
                    small = tl.where(tl.abs(diff) < float("inf"), tl.abs(diff), 0.0)
                    diff_max = tl.maximum(diff_max, tl.max(small, 0))
            log_ls = tl.log(l_s)
            log_lu = tl.log(l_u)
            log_lz = tl.log(l_z)
            # Geometric: log p - log q = D / T + d_const. Where the student is near its teachers
            # (every |D| / T small) that form keeps d's digits; far from them (|D| / T large,
            # where D / T + d_const would cancel) the two log-softmaxes are subtracted instead.
            d_const = (m_s - s_ref) * inv_t - m_z - log_lz + log_lu
            use_diff = diff_max * inv_t <= 64.0

            # Pass 2: the soft term (and its row sum A), and the gradient unless it needs A.
            row_in = (S, teachers, strides, weights, row)
            stats = (
                inv_t,
                m_s,
                log_lu,
                m_z,
                log_lz,
                s_ref,
                d_const,
                use_diff,
                member_max,
                member_sum,
            )
            soft_sum = tl.zeros((), tl.float32)
            qa_sum = tl.zeros((), tl.float32)
            for start in range(0, C, BLOCK):
                cols = start + offs
                mask = cols < C
                s, q, p, term, a, qa = _soft_block(
                    row_in, stats, cols, mask, beta, M, ARITHMETIC, SOFT_LOSS
                )
                soft_sum += tl.sum(tl.where(mask, term, 0.0), 0)
                qa_sum += tl.sum(tl.where(mask, qa, 0.0), 0)
                if COMPUTE_GRAD and not ROW_SUM_GRADIENT:
                    hard_g = _hard_grad(s, m_s, log_ls, cols, y, in_hard, hard_coef)
                    soft_g = soft_coef * inv_t * (q - p)
                    _write_grad(G, cols, mask, soft_g, hard_g, in_soft, bad)
            if COMPUTE_GRAD and ROW_SUM_GRADIENT:  # pass 3: g = q (a - A), once A is known
                for start in range(0, C, BLOCK):
                    cols = start + offs
                    mask = cols < C
                    s, q, p, term, a, qa = _soft_block(
                        row_in, stats, cols, mask, beta, M, ARITHMETIC, SOFT_LOSS
                    )
                    hard_g = _hard_grad(s, m_s, log_ls, cols, y, in_hard, hard_coef)
                    soft_g = tl.where(q == 0.0, 0.0, soft_coef * inv_t * q * (a - qa_sum))
                    _write_grad(G, cols, mask, soft_g, hard_g, in_soft, bad)

            y_safe = tl.where(in_hard & ~bad, y, 0)
            hard = (m_s - tl.load(S + y_safe).to(tl.float32)) + log_ls
            loss = tl.where(in_soft, soft_coef * soft_sum, 0.0)
            loss += tl.where(in_hard, hard_coef * hard, 0.0)
            tl.store(LOSS + row, tl.where(bad, float("nan"), loss))
        else:  # an excluded row contributes exactly nothing, and is not read
            tl.store(LOSS + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, C, BLOCK):
                    cols = start + offs
                    zero = tl.zeros((BLOCK,), tl.float32)
                    tl.store(G + cols, zero.to(G.dtype.element_ty), mask=cols < C)


def soft_loss_code(soft_loss: str, beta: float | None) -> int:
    """The kernel's SOFT_LOSS constant (csrc/kd_args.h's codes) for the divergence computed."""
    return _SOFT_LOSS_CODES[divergence_of(soft_loss, beta)]


# The SOFT_LOSS constants of the kernel: csrc/kd_args.h's codes (a test checks they agree).
_SOFT_LOSS_CODES = {"kl": 0, "cross_entropy": 1, "reverse_kl": 2, "jsd": 3}


def row_sum_gradient(code: int) -> bool:
    """Whether the divergence's gradient needs its row sum first (kd_row_math.h): a pass 3."""
    return code in (_SOFT_LOSS_CODES["reverse_kl"], _SOFT_LOSS_CODES["jsd"])


def launch_config(c: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of c classes."""
    limit = 4096 if device.type == "cuda" else 512  # the interpreter is slow on wide blocks
    block = min(triton.next_power_of_2(c), limit)
    return block, 4 if block <= 1024 else 8


def _fused_kd_triton_kernel(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    teacher_weights,
    *options,
    sum_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-row losses [N] (float32; always the rows: `sum_rows` asks the C++ kernel for their
    sum) and, if compute_grad, d(sum of them)/d(student) [N, C], on inputs already checked (by
    the op's check_op_inputs, or by validation)."""
    if len(teachers) > MAX_TEACHERS:  # the kernel's fixed teacher slots
        raise ValueError(f"the Triton kernel takes at most {MAX_TEACHERS} teachers")
    o = OpOptions(*options)
    n, c = student.shape
    row_loss = student.new_empty((n,), dtype=torch.float32)
    grad = student.new_empty((n, c) if o.compute_grad else (0,))
    soft_scale = o.soft_weight * (o.temperature**2 if o.scale_soft_by_t2 else 1.0)
    hard_scale = o.hard_weight
    device_counts = o.reduction == "mean" and (labels is not None or num_items is not None)
    if num_items is not None:  # num_items_in_batch: the caller's denominators
        counts = num_items.to(torch.float32)
    elif device_counts:  # summed on the device: no host synchronisation
        counts = row_counts(labels, n, o, student.device).to(torch.float32)
    else:
        counts = row_loss  # not read
        if o.reduction == "mean":  # no labels: every row is soft-only, and n is known here
            soft_scale /= max(n, 1)
    m = len(teachers)
    slots = [*teachers, *[teachers[0]] * (MAX_TEACHERS - m)]  # unused slots are never read
    strides = [t.stride(0) for t in slots]
    weights = [*teacher_weights, *[0.0] * (MAX_TEACHERS - m)]
    block, num_warps = launch_config(c, student.device)
    soft_loss = soft_loss_code(o.soft_loss, o.beta)
    if n > 0:
        torch.library.wrap_triton(_kd_fwd_kernel)[(n,)](
            student,
            student.stride(0),
            *slots,
            *strides,
            *weights,
            labels if labels is not None else row_loss,
            counts,
            row_loss,
            grad,
            c,
            1.0 / o.temperature,
            soft_scale,
            hard_scale,
            o.ignore_index,
            0 if o.unlabeled_index is None else o.unlabeled_index,
            DEFAULT_BETA if o.beta is None else o.beta,
            M=m,
            HAS_LABELS=labels is not None,
            HAS_UNLABELED=o.unlabeled_index is not None,
            ARITHMETIC=o.ensemble == "arithmetic" and m > 1,  # one member: the same p
            SOFT_LOSS=soft_loss,
            ROW_SUM_GRADIENT=row_sum_gradient(soft_loss),
            DEVICE_COUNTS=device_counts,
            COMPUTE_GRAD=o.compute_grad,
            BLOCK=block,
            num_warps=num_warps,
        )
    return row_loss, grad


_fused_kd_triton_impl = checked_op_impl(_fused_kd_triton_kernel, same_dtype=False)

fused_kd_triton = None
if triton is not None:
    fused_kd_triton = torch.library.triton_op("kdkernels::fused_kd_triton", mutates_args=())(
        _fused_kd_triton_impl
    )
    # The explicit fake keeps tracing (torch.compile, fake tensors) from running the kernel,
    # which the interpreter would do on fake data.
    register_fused_op(fused_kd_triton)


def triton_loss(problem: Problem) -> Tensor:
    """The loss of the Triton op on a validated problem, reduced as its options say."""
    return run_fused(
        fused_kd_triton, _fused_kd_triton_kernel, problem, problem.student, problem.teachers
    )
