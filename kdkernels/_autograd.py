"""The autograd of every fused op: the forward pass computes the gradient with the loss, so
backward only scales the saved gradient by grad_output (in place when nothing else can see it);
and the eager fast path that skips torch.library's Python dispatch when nothing traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._fused import OpOptions, fused_fake, op_arguments
from ._validate import Problem

_repeat_backward = False


@contextlib.contextmanager
def allow_repeated_backward() -> Iterator[None]:
    """Backward passes run inside this context scale a copy of the saved gradient instead of
    scaling it in place, so the same graph can be differentiated again (retain_graph=True,
    torch.autograd.gradcheck, Jacobians) at the cost of one [N, C] buffer per backward."""
    global _repeat_backward
    previous, _repeat_backward = _repeat_backward, True
    try:
        yield
    finally:
        _repeat_backward = previous


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    # The gradient output never receives a gradient; without this autograd would materialise
    # an [N, C] zero tensor for it in every backward.
    ctx.set_materialize_grads(False)
    # Teachers come as a list (one None each) or as one stacked tensor (one None).
    ctx.teacher_grads = None if isinstance(inputs[1], Tensor) else [None] * len(inputs[1])


def _is_one(grad_output: Tensor) -> bool:
    """Whether grad_output is the 1.0 that .backward() on a mean/sum loss passes: a 0-dim
    tensor, or one value broadcast to [N]. Reading it is free on the CPU (no device sync), and
    it saves a pass over the gradient."""
    dim = grad_output.dim()
    if dim == 1 and (grad_output.numel() == 0 or grad_output.stride(0) != 0):
        return False
    if torch._C._len_torch_dispatch_stack() > 0:  # under a mode (fake tensors): do not read
        return False
    return float(grad_output if dim == 0 else grad_output[0]) == 1.0


_SCALED_ALREADY = (
    "kdkernels: this distillation loss was differentiated before, and that backward pass scaled "
    "the gradient it saved in place (so that backward allocates nothing [N, C]-sized), or the "
    "gradient was modified since (an in-place op on .grad). To differentiate the same graph "
    "more than once (retain_graph=True, gradcheck, Jacobians), run every backward through it, "
    "the first included, inside `with kdkernels.allow_repeated_backward():`."
)


def saved_gradients(ctx) -> tuple[Tensor, ...]:
    """The gradients a forward pass saved, or _SCALED_ALREADY if a backward scaled them."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:  # autograd's version check: say what happened and what to do
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(_SCALED_ALREADY) from None


_DOUBLE_BACKWARD = "kdkernels: double backward (create_graph=True) is not supported"


def _student_gradient(ctx, grad_loss: Tensor | None) -> Tensor | None:
    """The saved gradient times grad_loss: the gradient of the row losses [N], or of their sum
    (a 0-dim tensor) when the eager path reduced them in forward."""
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    (grad,) = saved_gradients(ctx)
    if grad_loss is None:  # the loss itself received no gradient
        return None
    return scale_saved_gradient(grad, grad_loss)


def _backward(ctx, grad_loss: Tensor | None, _unused: Tensor | None):
    grad = _student_gradient(ctx, grad_loss)
    return (grad, ctx.teacher_grads) + (None,) * (3 + len(OpOptions._fields))


def _row_scale(grad_output: Tensor) -> Tensor:
    """grad_output shaped to scale a gradient [N, C]: a 0-dim one all of it, an [N] one (per-row
    losses) each row."""
    return grad_output.unsqueeze(1) if grad_output.dim() == 1 else grad_output


def _scaled_in_place(grad: Tensor, grad_output: Tensor) -> Tensor:
    """grad times grad_output in place (no new buffer), or grad as it is on the CPU when
    grad_output is 1 (_is_one: a free read there)."""
    if not (grad.is_cpu and _is_one(grad_output)):
        grad.mul_(_row_scale(grad_output))
    return grad


def scale_saved_gradient(grad: Tensor, grad_output: Tensor) -> Tensor:
    """grad times grad_output for a gradient a forward pass saved with save_for_backward (the
    registered fused ops', the hidden-state op's). Traced (torch.compile, AOT) or under
    allow_repeated_backward(): the functional form. Eager: the saved gradient is ours alone, so
    it is scaled in place (_scaled_in_place) and its version moves on, so a later backward
    through the graph (retain_graph=True) raises _SCALED_ALREADY instead of scaling a tensor
    already handed out as a gradient (a leaf's .grad)."""
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling() or _repeat_backward:
        return grad * _row_scale(grad_output)
    torch.autograd.graph.increment_version(grad)
    return _scaled_in_place(grad, grad_output)


_registered: set[int] = set()


def register_fused_autograd(op) -> None:
    """Give a fused op (this one, or another backend's with the same signature) the autograd
    above: backward scales the gradient saved by the forward pass."""
    if id(op) not in _registered:
        op.register_autograd(_backward, setup_context=_setup_context)
        _registered.add(id(op))


def _plain_eager(tensors: list[Tensor]) -> bool:
    """Nothing traces, transforms or intercepts this call: no torch.compile, no function or
    dispatch mode (fake tensors, make_fx, opcheck), no functorch transform, no tensor subclass."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and all(type(t) is Tensor for t in tensors)
    )


def _summed(loss: Tensor, reduce: bool) -> Tensor:
    """A kernel's loss for `reduce` ("mean"/"sum"): the rows' sum, unless the kernel summed them
    already (the CPU kernel asked for sum_rows returns it 0-dim)."""
    return loss.sum() if reduce and loss.dim() else loss


class _EagerFused(torch.autograd.Function):
    """A fused kernel with the fused ops' autograd, minus torch.library's Python dispatch
    (argument defaults, pytree flattening: about 300 us a call, which is what a small
    classification batch costs in all) and the op's input checks (validation, or the CPU fast
    path's own, made them), and with a mean/sum reduction done inside (one autograd node less):
    run_fused's kernel through _reduced_kernel, or the CPU fast path's _run_kernel. Used only
    in plain eager mode; anything else goes through the registered op."""

    # forward takes ctx (no separate setup_context): apply() then skips binding the arguments
    # with inspect.signature, which alone costs tens of microseconds. Everything but the student
    # comes as one tuple (run, arguments), run(student, arguments) returning the loss and the
    # gradient: apply() inspects each argument it is given. The gradient is kept, not returned
    # as the op returns it: one output less to wrap (about 3 us a call).
    @staticmethod
    def forward(ctx, student, call):
        run, arguments = call
        loss, ctx.gradient = run(student, arguments)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # One output, so autograd materialises a missing grad_loss as zeros (the student's
        # gradient is then 0, as for any op); the registered op's None path is _backward's.
        # The gradient is an attribute of ctx rather than a saved tensor: it is neither an input
        # nor an output (so no reference cycle), and nothing traces this path. The first
        # backward takes it (ctx keeps no reference, so autograd hands the buffer itself to a
        # leaf's .grad) and scales it in place; _gradient_again says what a later one gets.
        grad = ctx.gradient
        if grad is None or _repeat_backward or torch.is_grad_enabled():
            return _gradient_again(grad, grad_loss), None
        ctx.gradient = None
        return _scaled_in_place(grad, grad_loss), None


# Function.apply does in Python what only calls under functorch need (binding the arguments
# when setup_context is defined, which _EagerFused does not define; checking for a functorch
# transform, which _plain_eager and the CPU fast path have; unwrapping tensors that escaped
# one), then calls the C++ apply of its base class: called here directly, 1.3 us a call less.
_eager_fused_apply = super(torch.autograd.Function, _EagerFused).apply
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def apply_eager_fused(student: Tensor, run: Callable, arguments: tuple) -> Tensor:
    """The loss of run(student, arguments) -> (loss, gradient of its sum or of the 0-dim loss)
    with _EagerFused's backward, for a call that _plain_eager (or the same checks) passed: no
    functorch transform, nothing tracing."""
    return _eager_fused_apply(_unwrap_if_dead(student), (run, arguments))


def _reduced_kernel(student: Tensor, call: tuple) -> tuple[Tensor, Tensor]:
    """A fused op's kernel as apply_eager_fused runs it: call is (kernel, reduce, the op's
    other arguments); with reduce ("mean"/"sum") the rows' sum (the CPU kernel sums them itself:
    one tensor and one op less), else the rows."""
    kernel, reduce, other_arguments = call
    loss, gradient = kernel(student, *other_arguments, sum_rows=reduce)
    return _summed(loss, reduce), gradient


def _gradient_again(grad: Tensor | None, grad_loss: Tensor) -> Tensor:
    """_EagerFused's gradient where the first backward's way does not apply: an error for a
    double backward and for a second backward through the graph (the first took the gradient);
    under allow_repeated_backward() the gradient stays, scaled into a copy each time."""
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    if grad is None:
        raise RuntimeError(_SCALED_ALREADY)
    return grad * _row_scale(grad_loss)


def register_fused_op(op) -> None:
    """Give a fused op (any backend's, with the fused schema) its fake and its autograd; at
    import, never inside a traced call (Dynamo refuses to trace a registration)."""
    op.register_fake(fused_fake)
    register_fused_autograd(op)


def run_fused(op, kernel, problem: Problem, student: Tensor, teachers: list[Tensor]) -> Tensor:
    """The loss of a fused op on a validated problem, reduced as its options say: a scalar for
    "mean" and "sum", the student's leading shape for "none". `kernel`: the op's implementation
    without its input checks (validation made them), for the eager path."""
    args = op_arguments(problem, student, teachers, problem.weights)
    reduce = problem.options.reduction != "none"
    plain = _plain_eager([student, *teachers])
    # compute_grad: the autograd node. So under forward-mode AD: the node raises for a dual
    # student (no jvp), where the kernel alone would silently drop the tangent.
    if plain and (args[-1] or torch.autograd.forward_ad._current_level >= 0):
        loss = apply_eager_fused(student, _reduced_kernel, (kernel, reduce, args[1:]))
    else:  # traced, or nothing to differentiate (no_grad, a student without requires_grad)
        loss, _ = kernel(*args, sum_rows=reduce) if plain else op(*args)
        loss = _summed(loss, reduce)
    return loss if reduce else loss.reshape(problem.lead_shape)
