"""The Triton backend: one fused kernel (one program per row, online softmax over blocks of the
vocabulary), registered with torch.library.triton_op so torch.compile sees the kernel, and the
same autograd as the compiled op (the gradient is computed in the forward pass).

Runs on GPUs, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how
CI tests it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._validate import Problem

try:
    import triton
    import triton.language as tl
except ImportError:  # the triton extra is not installed
    triton = None


def triton_unavailable(problem: Problem | None) -> str | None:
    """Why the Triton backend cannot serve `problem` (None when it can)."""
    if triton is None:
        return "Triton is not installed (pip install 'kdkernels[triton]')"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if problem is None:
        if not interpret and not torch.cuda.is_available():
            return "installed, but no GPU is available (TRITON_INTERPRET=1 runs it on CPU tensors)"
        return None
    device = problem.student.device.type
    if device != "cuda" and not (device == "cpu" and interpret):
        where = "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
        return f"it serves {where}; the inputs are on {device}"
    dtypes = {problem.student.dtype} | {t.dtype for t in problem.teachers}
    if torch.float64 in dtypes:
        return "float64 inputs are not supported (float32/float16/bfloat16)"
    return None


if triton is not None:

    @triton.jit
    def _online_update(m, total, x):
        """Fold a block x into a running max m and sum total = sum exp(x - m)."""
        m_new = tl.maximum(m, tl.max(x, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix stays 0
        total = total * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub), 0)
        return m_new, total

    @triton.jit
    def _combined_teacher(T, t_member_stride, W, M, cols, mask, inv_t):
        """z = sum_m w_m t_m / T over one block of columns."""
        z = tl.zeros_like(cols).to(tl.float32)
        for m in range(M):
            w = tl.load(W + m)
            t = tl.load(T + m * t_member_stride + cols, mask=mask, other=float("-inf"))
            z += w * t.to(tl.float32)
        return z * inv_t

    @triton.jit
    def _arithmetic_p(T, t_member_stride, W, STATS, M, cols, mask, inv_t):
        """p = sum_m w_m softmax(t_m / T) over one block, from each member's (max, sum)."""
        p = tl.zeros_like(cols).to(tl.float32)
        for m in range(M):
            w = tl.load(W + m)
            mt = tl.load(STATS + 2 * m)
            lt = tl.load(STATS + 2 * m + 1)
            t = tl.load(T + m * t_member_stride + cols, mask=mask, other=float("-inf"))
            p += (w / lt) * tl.exp(t.to(tl.float32) * inv_t - mt)
        return p

    @triton.jit
    def _kd_fwd_kernel(
        S,
        s_row_stride,
        T,
        t_member_stride,
        t_row_stride,
        W,
        M,
        Y,
        COUNTS,
        LOSS,
        G,
        STATS,
        C,
        inv_t,
        soft_scale,
        hard_scale,
        ignore_index,
        unlabeled_index,
        HAS_LABELS: tl.constexpr,
        HAS_UNLABELED: tl.constexpr,
        ARITHMETIC: tl.constexpr,
        KL: tl.constexpr,
        MEAN: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        S += row * s_row_stride
        T += row * t_row_stride
        STATS += row * 2 * M
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
        if MEAN:  # valid-row counts were computed on the device: no host synchronisation
            soft_coef = soft_coef / tl.maximum(tl.load(COUNTS), 1.0)
            hard_coef = hard_coef / tl.maximum(tl.load(COUNTS + 1), 1.0)

        # Pass 1: running maxima and sums of the student (at T and at 1) and of the teachers.
        offs = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        m_s = tl.full((), neg_inf, tl.float32)
        l_s = tl.zeros((), tl.float32)
        l_u = tl.zeros((), tl.float32)
        m_z = tl.full((), neg_inf, tl.float32)
        l_z = tl.zeros((), tl.float32)
        if ARITHMETIC:
            for m in range(M):  # each member's own softmax statistics
                mt = tl.full((), neg_inf, tl.float32)
                lt = tl.zeros((), tl.float32)
                for start in range(0, C, BLOCK):
                    cols = start + offs
                    mask = cols < C
                    t = tl.load(T + m * t_member_stride + cols, mask=mask, other=neg_inf)
                    mt, lt = _online_update(mt, lt, t.to(tl.float32) * inv_t)
                tl.store(STATS + 2 * m, mt)
                tl.store(STATS + 2 * m + 1, lt)
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
                z = _combined_teacher(T, t_member_stride, W, M, cols, mask, inv_t)
                m_z, l_z = _online_update(m_z, l_z, z)
        log_ls = tl.log(l_s)
        log_lu = tl.log(l_u)
        log_lz = tl.log(l_z)
        m_u = m_s * inv_t

        # Pass 2: the soft term and the gradient.
        soft_sum = tl.zeros((), tl.float32)
        for start in range(0, C, BLOCK):
            cols = start + offs
            mask = cols < C
            s = tl.load(S + cols, mask=mask, other=neg_inf).to(tl.float32)
            log_q = s * inv_t - m_u - log_lu
            if ARITHMETIC:
                p = _arithmetic_p(T, t_member_stride, W, STATS, M, cols, mask, inv_t)
                log_p = tl.log(p)
            else:
                z = _combined_teacher(T, t_member_stride, W, M, cols, mask, inv_t)
                log_p = z - m_z - log_lz
                p = tl.exp(log_p)
            term = p * (log_p - log_q) if KL else -p * log_q
            soft_sum += tl.sum(tl.where(p == 0.0, 0.0, term), 0)  # 0 log 0 = 0, NaN kept
            if COMPUTE_GRAD:
                q = tl.exp(log_q)
                r = tl.exp(s - m_s - log_ls)
                g = tl.where(in_soft, soft_coef * inv_t * (q - p), 0.0)
                g += tl.where(in_hard, hard_coef * (r - tl.where(cols == y, 1.0, 0.0)), 0.0)
                g = tl.where(bad, float("nan"), g)
                tl.store(G + row * C + cols, g.to(G.dtype.element_ty), mask=mask)

        y_safe = tl.where(in_hard & ~bad, y, 0)
        s_y = tl.load(S + y_safe).to(tl.float32)
        hard = m_s + log_ls - s_y
        loss = tl.where(in_soft, soft_coef * soft_sum, 0.0) + tl.where(
            in_hard, hard_coef * hard, 0.0
        )
        tl.store(LOSS + row, tl.where(bad, float("nan"), loss))


def _stacked_teachers(teachers: list[Tensor]) -> Tensor:
    """The teachers as one [M, N, C] tensor: a view when they are equally spaced slices of one
    storage (an ensemble passed stacked), else a stacked copy in the first teacher's dtype."""
    first = teachers[0]
    if len(teachers) == 1:
        return first.unsqueeze(0)
    same = all(
        t.dtype == first.dtype
        and t.stride() == first.stride()
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for t in teachers
    )
    if same:
        step = teachers[1].storage_offset() - first.storage_offset()
        offsets = [t.storage_offset() - first.storage_offset() for t in teachers]
        if step > 0 and offsets == [m * step for m in range(len(teachers))]:
            return first.as_strided((len(teachers), *first.shape), (step, *first.stride()))
    return torch.stack([t.to(first.dtype) for t in teachers])


def block_size(c: int, device: torch.device) -> int:
    limit = 4096 if device.type == "cuda" else 512  # the interpreter is slow on wide blocks
    return min(triton.next_power_of_2(c), limit)


def _fused_kd_triton_impl(
    student: Tensor,
    teachers: Tensor,
    labels: Tensor | None,
    teacher_weights: Tensor,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ensemble: str,
    soft_loss: str,
    scale_soft_by_t2: bool,
    ignore_index: int,
    unlabeled_index: int | None,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row losses [N] (float32) and, if compute_grad, d(sum of them)/d(student) [N, C]."""
    from ._ops import check_op_inputs

    check_op_inputs(student, list(teachers.unbind(0)), labels, teacher_weights.numel())
    n, c = student.shape
    m = teachers.shape[0]
    row_loss = student.new_empty((n,), dtype=torch.float32)
    grad = student.new_empty((n, c) if compute_grad else (0,))
    if labels is None:
        counts = torch.tensor([float(n), 0.0], device=student.device)
    else:
        soft_rows = labels != ignore_index
        hard_rows = (
            soft_rows if unlabeled_index is None else soft_rows & (labels != unlabeled_index)
        )
        counts = torch.stack([soft_rows.sum(), hard_rows.sum()]).to(torch.float32)
    arithmetic = ensemble == "arithmetic"
    stats = student.new_empty((n, m, 2) if arithmetic else (1,), dtype=torch.float32)
    block = block_size(c, student.device)
    if n > 0:
        torch.library.wrap_triton(_kd_fwd_kernel)[(n,)](
            student,
            student.stride(0),
            teachers,
            teachers.stride(0),
            teachers.stride(1),
            teacher_weights,
            m,
            labels if labels is not None else counts,
            counts,
            row_loss,
            grad,
            stats,
            c,
            1.0 / temperature,
            soft_weight * (temperature**2 if scale_soft_by_t2 else 1.0),
            hard_weight,
            ignore_index,
            0 if unlabeled_index is None else unlabeled_index,
            HAS_LABELS=labels is not None,
            HAS_UNLABELED=unlabeled_index is not None,
            ARITHMETIC=arithmetic,
            KL=soft_loss == "kl",
            MEAN=reduction == "mean",
            COMPUTE_GRAD=compute_grad,
            BLOCK=block,
            num_warps=4 if block <= 1024 else 8,
        )
    return row_loss, grad


fused_kd_triton = None
if triton is not None:
    fused_kd_triton = torch.library.triton_op("kdkernels::fused_kd_triton", mutates_args=())(
        _fused_kd_triton_impl
    )


def triton_row_losses(problem: Problem) -> Tensor:
    """Run the Triton op on a validated problem; returns the per-row losses [N]."""
    from ._ops import call_fused, op_arguments, register_fused_autograd

    register_fused_autograd(fused_kd_triton)
    student = problem.student
    weights = torch.tensor(problem.weights, dtype=torch.float32, device=student.device)
    teachers = _stacked_teachers(problem.teachers)
    args = op_arguments(problem, student, teachers, weights)
    row_loss, _ = call_fused(fused_kd_triton, _fused_kd_triton_impl, args)
    return row_loss
