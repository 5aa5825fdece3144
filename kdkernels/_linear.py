"""The hidden-state loss as the torch.library custom op ``kdkernels::linear_kd``: the chunk loop,
its fake, its autograd. Per chunk of rows the framework's matmul (MKL, cuBLAS) forms the
student's and the teachers' logits in float32, a backend's fused kernel (the same one as
`distillation_loss`) computes the chunk's row losses and the gradient over the student's
logits, and that gradient is multiplied back into the hidden-state, weight and bias gradients.
Only one chunk's [chunk, V] logits ever exist.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _autograd
from ._fused import OpOptions, loss_dtype, op_signature

HALF = (torch.float16, torch.bfloat16)
# The memory the chunk loop may use for one chunk's float32 logits, gradient and teacher logits:
# enough rows that each matmul runs at full speed (on a 2-core CPU at V = 128256, N = 2048, 174-row
# chunks ran 12% over the matmuls' time and one 2048-row chunk 3%; a GPU's tensor cores want
# about 1k rows) and still little next to the [N, V] buffers of the eager loss (at N = 8192,
# V = 128256 eager PyTorch holds over 25 GB).
CHUNK_BYTES = {"cuda": 2 << 30, "cpu": 2 << 30}


def default_chunk_size(n: int, v: int, num_teachers: int, device: torch.device) -> int:
    """Rows per chunk: the device's budget (CHUNK_BYTES) over the float32 bytes of a row's
    student logits, their gradient and the teachers' logits."""
    per_row = (2 + num_teachers) * v * 4
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    return max(1, min(n, budget // max(per_row, 1)))


def _mm_float32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with float32 (float64 for float64 inputs) accumulation and result. Half-precision
    operands stay half on a GPU (cuBLAS's out_dtype), so the tensor cores do the work."""
    if a.dtype in HALF and a.dtype == b.dtype and a.is_cuda and _out_dtype_mm():
        return torch.mm(a, b, out_dtype=torch.float32)
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return torch.mm(a.to(acc), b.to(acc))


def _addmm_float32_(out: Tensor, grad_t: Tensor, hidden: Tensor) -> None:
    """out += grad_t @ hidden for the float32 (float64) accumulator `out`, in place (no [V, H]
    temporary), except for half hidden states on a GPU: the gradient is rounded to their dtype
    for cuBLAS's half-in, float32-out product, then added."""
    if hidden.dtype in HALF and hidden.is_cuda and _out_dtype_mm():
        out += torch.mm(grad_t.to(hidden.dtype), hidden, out_dtype=out.dtype)
    else:
        out.addmm_(grad_t, hidden.to(out.dtype))


_OUT_DTYPE_MM: list[bool] = []


def _out_dtype_mm() -> bool:
    """Whether this torch has torch.mm(..., out_dtype=) for CUDA half inputs (torch >= 2.8)."""
    if not _OUT_DTYPE_MM:
        try:
            a = torch.ones(1, 1, dtype=torch.bfloat16, device="cuda")
            _OUT_DTYPE_MM.append(torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32)
        except (TypeError, RuntimeError):
            _OUT_DTYPE_MM.append(False)
    return _OUT_DTYPE_MM[0]


class _Head:
    """One lm_head: logits = softcap((hidden @ weight.T + bias) * scale). On a CPU, a half
    weight is converted to float32 once per call (MKL has no half-in, float32-out product)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None):
        keep = weight.dtype not in HALF or (weight.is_cuda and _out_dtype_mm())
        self.weight = weight if keep else weight.float()
        self.bias, self.scale, self.softcap = bias, scale, softcap

    def logits(self, hidden: Tensor) -> Tensor:
        z = _mm_float32(hidden, self.weight.t())
        if self.bias is not None:
            z += self.bias
        if self.scale != 1.0:
            z *= self.scale
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def to_pre_activation(self, grad: Tensor, logits: Tensor) -> Tensor:
        """d loss / d (hidden @ weight.T + bias), in place over the gradient of the logits."""
        if self.softcap is not None:  # d/dz softcap tanh(z / softcap) = 1 - tanh^2
            slope = logits / self.softcap  # one chunk-sized temporary
            grad *= slope.square_().neg_().add_(1.0)
        if self.scale != 1.0:
            grad *= self.scale
        return grad


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(n, start + chunk_size))


_HEAD = 15  # the op's arguments before the loss options (op_signature gives their names)


@op_signature(
    [
        ("student_hidden", Tensor),
        ("student_weight", Tensor),
        ("student_bias", Tensor | None),
        ("teacher_hidden", list[Tensor]),
        ("teacher_weight", list[Tensor]),
        ("teacher_bias", list[Tensor]),
        ("labels", Tensor | None),
        ("num_items", Tensor | None),
        ("grad_rows", Tensor | None),
        ("teacher_weights", list[float]),
        ("logit_scales", list[float]),
        ("softcaps", list[float]),
        ("chunk_size", int),
        ("needs_grad", list[bool]),
        ("backend", str),
    ],
    tuple[Tensor, Tensor, Tensor, Tensor],
)
def _linear_kd_impl(*arguments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, d loss/d student_hidden, d/d student_weight, d/d student_bias) for [N, H] hidden
    states. The loss is the sum of the row losses (mean: the kernel divides by the counts in
    `num_items`, taken over all rows) or, for reduction "none", the [N] row losses, which
    carry no gradient here: backward calls the op again with `grad_rows`, the upstream
    gradient of each row. A gradient not asked for in `needs_grad` (hidden, weight, bias) is
    an empty tensor. logit_scales and softcaps: (student, teachers); a softcap of 0 is none."""
    # The logits are float32 whatever the caller's autocast says (HF Trainer(bf16=True) runs
    # the loss under autocast; backward's recomputation for "none" runs outside it).
    with torch.autocast(arguments[0].device.type, enabled=False):
        return _chunk_loop(*arguments[:_HEAD], OpOptions(*arguments[_HEAD:]))


def _chunk_loop(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: list[Tensor],
    teacher_weight: list[Tensor],
    teacher_bias: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    grad_rows: Tensor | None,
    teacher_weights: list[float],
    logit_scales: list[float],
    softcaps: list[float],
    chunk_size: int,
    needs_grad: list[bool],
    backend: str,
    o: OpOptions,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ._backends import REGISTRY  # the registry imports this module's users

    need_hidden, need_weight, need_bias = _gradients_computed(needs_grad, o, grad_rows)
    compute_grad = need_hidden or need_weight or need_bias
    kernel_options = o._replace(compute_grad=compute_grad)
    impl = REGISTRY[backend].impl
    student = _Head(student_weight, student_bias, logit_scales[0], softcaps[0] or None)
    teachers = [
        _Head(w, b, logit_scales[1], softcaps[1] or None)
        for w, b in zip(teacher_weight, teacher_bias, strict=True)
    ]
    n = student_hidden.shape[0]
    acc = loss_dtype(student_hidden)
    # Contiguous whatever the input's strides, as the fake says.
    grad_hidden = student_hidden.new_empty(student_hidden.shape if need_hidden else 0)
    # The weight and bias gradients accumulate over the chunks in float32 (float64 for float64
    # inputs) and are cast once at the end.
    grad_weight = student_weight.new_zeros(student_weight.shape if need_weight else 0, dtype=acc)
    grad_bias = student_weight.new_zeros(student_weight.shape[0] if need_bias else 0, dtype=acc)
    rows = student_hidden.new_empty(n, dtype=acc)
    for chunk in _chunks(n, chunk_size):
        logits = student.logits(student_hidden[chunk])
        # One logits dtype for all (the C++ kernel takes float64 only all together).
        targets = [
            t.logits(h[chunk]).to(logits.dtype)
            for t, h in zip(teachers, teacher_hidden, strict=True)
        ]
        chunk_labels = None if labels is None else labels[chunk]
        loss, grad = impl(
            logits, targets, chunk_labels, num_items, teacher_weights, *kernel_options
        )
        rows[chunk] = loss
        if not compute_grad:
            continue
        del targets
        if grad_rows is not None:
            grad *= grad_rows[chunk].unsqueeze(1)
        grad = student.to_pre_activation(grad, logits)
        del logits
        if need_hidden:
            grad_hidden[chunk] = _mm_float32(grad.to(student.weight.dtype), student.weight)
        if need_weight:
            _addmm_float32_(grad_weight, grad.t(), student_hidden[chunk])
        if need_bias:
            grad_bias += grad.sum(0)
        del grad  # unreferenced, the next chunk's gradient reuses its memory (_gradient_buffers)
    loss = rows if o.reduction == "none" else rows.sum()
    bias_dtype = acc if student_bias is None else student_bias.dtype
    return loss, grad_hidden, grad_weight.to(student_weight.dtype), grad_bias.to(bias_dtype)


def _gradients_computed(
    needs_grad: list[bool], o: OpOptions, grad_rows: Tensor | None
) -> tuple[bool, bool, bool]:
    """Which of the (hidden, weight, bias) gradients a call computes: those asked for, except
    in the forward pass of reduction "none" (backward recomputes them with `grad_rows`)."""
    if o.reduction == "none" and grad_rows is None:
        return False, False, False
    return tuple(needs_grad)


def _linear_kd_fake(student_hidden, student_weight, student_bias, teacher_hidden, *rest):
    grad_rows, needs_grad, options = rest[4], rest[9], rest[11:]
    o = OpOptions(*options)
    acc = loss_dtype(student_hidden)
    n = student_hidden.shape[0]
    need_hidden, need_weight, need_bias = _gradients_computed(needs_grad, o, grad_rows)
    bias_dtype = acc if student_bias is None else student_bias.dtype
    return (
        student_hidden.new_empty((n,) if o.reduction == "none" else (), dtype=acc),
        student_hidden.new_empty(student_hidden.shape if need_hidden else 0),
        student_weight.new_empty(student_weight.shape if need_weight else 0),
        student_weight.new_empty(student_weight.shape[0] if need_bias else 0, dtype=bias_dtype),
    )


linear_kd = torch.library.custom_op("kdkernels::linear_kd", mutates_args=())(_linear_kd_impl)
linear_kd.register_fake(_linear_kd_fake)


def _setup_context(ctx, inputs, output) -> None:
    m = len(inputs[3])
    o = OpOptions(*inputs[_HEAD:])
    ctx.num_teachers, ctx.reduction = m, o.reduction
    ctx.needs_grad = inputs[13]
    if o.reduction == "none":  # backward recomputes each chunk with the rows' upstream gradient
        sh, sw, sb, th, tw, tb, labels, num_items = inputs[:8]
        ctx.save_for_backward(sh, sw, sb, labels, num_items, *th, *tw, *tb)
        ctx.arguments = inputs[9:]
    else:  # the forward pass computed the gradients: backward scales them
        ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss: Tensor | None, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError("kdkernels: double backward (create_graph=True) is not supported")
    m = ctx.num_teachers
    nothing = (None, None, None, [None] * m, [None] * m, [None] * m) + (None,) * (
        _HEAD - 6 + len(OpOptions._fields)
    )
    if grad_loss is None:
        return nothing
    if ctx.reduction == "none":
        sh, sw, sb, labels, num_items, *heads = ctx.saved_tensors
        th, tw, tb = heads[:m], heads[m : 2 * m], heads[2 * m :]
        _, *grads = linear_kd(
            sh, sw, sb, th, tw, tb, labels, num_items, grad_loss.contiguous(), *ctx.arguments
        )
    else:
        grads = [
            _autograd.scale_saved_gradient(g, grad_loss) for g in _autograd.saved_gradients(ctx)
        ]
    grads = [g if need else None for g, need in zip(grads, ctx.needs_grad, strict=True)]
    return (*grads, *nothing[3:])


linear_kd.register_autograd(_backward, setup_context=_setup_context)
