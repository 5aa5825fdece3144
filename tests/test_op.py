"""The custom op under PyTorch's own checkers: opcheck, gradcheck, torch.compile(fullgraph)."""

import pytest
import torch
from torch import nn

import kdkernels as kd
from kdkernels._fused import kernel_dtypes, op_arguments
from kdkernels._ops import fused_kd
from kdkernels._validate import Options, validate
from kdkernels.testing import sample_inputs

OPCHECK_NAMES = (
    "shape-37x10",
    "opt-arithmetic-cross_entropy-none-t20-mixed-M2",
    "opt-geometric-kl-mean-t21-plain-M5",
    "row-strides",
    "empty-batch",
    "div-reverse_kl-arithmetic-mean-none-M3",
    "div-jsd0.5-geometric-sum-plain-M3",
    "num-items-pair",
)
OPCHECK_CASES = [c for c in sample_inputs(seed=2, small=True) if c.name in OPCHECK_NAMES]


def op_args(case, dtype, requires_grad):
    student, teachers, labels = case.inputs(dtype)
    student.requires_grad_(requires_grad)
    not_options = ("teacher_weights", "num_items_in_batch")
    options = Options(**{k: v for k, v in case.kwargs.items() if k not in not_options})
    weights, items = case.kwargs.get("teacher_weights"), case.kwargs.get("num_items_in_batch")
    problem = validate(student, teachers, labels, weights, options, items)
    s, ts = kernel_dtypes(problem)
    return op_arguments(problem, s, ts, problem.weights)


def test_opcheck_cases_were_found():
    assert sorted(c.name for c in OPCHECK_CASES) == sorted(OPCHECK_NAMES)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(case, dtype, requires_grad):
    torch.library.opcheck(fused_kd, op_args(case, dtype, requires_grad))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ensemble", ["geometric", "arithmetic"])
def test_gradcheck_float64(reduction, ensemble):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    teachers = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 6, -100, 3, -1])
    row_weights = torch.rand(5, dtype=torch.float64, generator=gen)

    def loss(s):
        out = kd.distillation_loss(
            s,
            teachers,
            labels,
            temperature=2.5,
            ensemble=ensemble,
            unlabeled_index=-1,
            reduction=reduction,
            backend="cpu",
        )
        return (out * row_weights).sum() if reduction == "none" else out

    # gradcheck differentiates one graph several times: keep the saved gradient intact.
    with kd.allow_repeated_backward():
        assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(
    "divergence",
    [{}, dict(soft_loss="reverse_kl"), dict(soft_loss="jsd", beta=0.3, num_items_in_batch=20)],
    ids=["kl", "reverse_kl", "jsd-num_items"],
)
def test_compiled_training_step_matches_eager(divergence):
    """torch.compile(fullgraph=True) over a model's forward and the loss, backward through it."""
    torch.manual_seed(0)
    n, d, c = 32, 16, 50
    x, teacher = torch.randn(n, d), torch.randn(3, n, c)
    labels = torch.randint(0, c, (n,))
    labels[:4] = -100
    eager_model = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, c))
    compiled_model = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, c))
    compiled_model.load_state_dict(eager_model.state_dict())

    def step(model, x, teacher, labels):
        return kd.distillation_loss(
            model(x),
            teacher,
            labels,
            temperature=3.0,
            backend="cpu",
            ensemble="arithmetic",
            **divergence,
        )

    compiled = torch.compile(step, fullgraph=True)
    for model, fn in ((eager_model, step), (compiled_model, compiled)):
        fn(model, x, teacher, labels).backward()
    eager_loss = step(eager_model, x, teacher, labels)
    compiled_loss = compiled(compiled_model, x, teacher, labels)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for pe, pc in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-7)


class _Recorder(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_custom_op_dispatch_but_modes_use_it(monkeypatch):
    """Plain eager calls run the kernel through a bare autograd.Function (the custom op's Python
    dispatch costs ~300 us a call); under any function mode (and so under tracing) the
    registered op runs, so compile, export and opcheck see it."""
    import kdkernels._ops as ops

    calls = []

    def counting_op(*args):
        calls.append(1)
        return fused_kd(*args)

    monkeypatch.setattr(ops, "fused_kd", counting_op)
    s = torch.randn(8, 10, requires_grad=True)
    t, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    eager = kd.distillation_loss(s, t, y, backend="cpu")
    eager.backward()
    assert calls == []
    eager_grad, s.grad = s.grad.clone(), None
    with _Recorder():
        traced = kd.distillation_loss(s, t, y, backend="cpu")
    traced.backward()
    assert calls == [1]
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(s.grad, eager_grad)


def test_backend_checks_are_constants_to_torch_compile(monkeypatch):
    """The first call of a process may be inside torch.compile: the backends' availability
    checks (the CUDA one reads the extension's build_info, which dynamo cannot trace) run once,
    outside the graph. With the cache warm, as in every other test, fullgraph compile with
    backend='cuda' failed only on a GPU machine."""
    from kdkernels import _backends

    monkeypatch.setattr(_backends, "_MISSING", {})

    def step(s, t):
        scale = 1.0 if _backends.missing("cuda") is None else 2.0
        return kd.distillation_loss(s, t) * scale

    s, t = torch.randn(6, 9), torch.randn(6, 9)
    compiled = torch.compile(step, fullgraph=True)(s, t)
    assert set(_backends._MISSING) >= {"cuda", "cpu"}
    torch.testing.assert_close(compiled, step(s, t))
