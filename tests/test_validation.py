"""Every bad input of docs/DESIGN.md section 2 raises TypeError or ValueError naming the problem."""

import math
import subprocess
import sys

import pytest
import torch
from kernel_args import raw_kernel_args

import kdkernels as kd
from kdkernels import _C
from kdkernels._fused import CALL_ARGUMENT_NAMES, OPTION_ARGUMENT_NAMES

N, C = 4, 10


def good():
    return dict(
        student_logits=torch.randn(N, C),
        teacher_logits=torch.randn(N, C),
        labels=torch.randint(0, C, (N,)),
    )


BAD_INPUTS = [
    # (what changes, exception, words the message must contain)
    (dict(student_logits=torch.tensor(1.0)), ValueError, "at least one dimension"),
    (
        dict(student_logits=torch.randn(N, 0), teacher_logits=torch.randn(N, 0)),
        ValueError,
        "0 classes",
    ),
    (
        dict(student_logits=torch.randint(0, 3, (N, C))),
        TypeError,
        "student_logits must be a floating",
    ),
    (dict(student_logits=[[1.0] * C] * N), TypeError, "student_logits must be a torch.Tensor"),
    (
        dict(teacher_logits=torch.randint(0, 3, (N, C))),
        TypeError,
        "teacher_logits must be a floating",
    ),
    (dict(teacher_logits="logits"), TypeError, "teacher_logits must be a tensor"),
    (dict(teacher_logits=torch.randn(N, C + 6)), ValueError, "teacher_logits[..., :10]"),
    (dict(teacher_logits=torch.randn(3, N, C + 6)), ValueError, "larger vocabulary (16)"),
    (dict(teacher_logits=torch.randn(N, C - 1)), ValueError, "expected the student's shape"),
    (dict(teacher_logits=torch.randn(N + 1, C)), ValueError, "expected the student's shape"),
    (dict(teacher_logits=[]), ValueError, "empty ensemble"),
    (dict(teacher_logits=torch.randn(0, N, C)), ValueError, "empty ensemble"),
    (
        dict(teacher_logits=[torch.randn(N, C), torch.randn(N, C + 1)]),
        ValueError,
        "teacher_logits[1]",
    ),
    (
        dict(teacher_logits=[torch.randn(N, C), torch.randn(N, C, dtype=torch.float64).long()]),
        TypeError,
        "teacher_logits[1] must be a floating",
    ),
    (dict(teacher_logits=torch.randn(N, C, device="meta")), ValueError, "is on meta"),
    (dict(labels=torch.randn(N)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.ones(N, dtype=torch.bool)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, "labels has shape (5,)"),
    (dict(labels=torch.tensor([0, 1, C, 2])), ValueError, "found 10 at flat position 2"),
    (dict(labels=torch.tensor([0, -5, 1, 2])), ValueError, "class indices in [0, 10)"),
    (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
    (dict(labels=torch.zeros(N, dtype=torch.long, device="meta")), ValueError, "labels is on meta"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite"),
    (dict(temperature="4"), TypeError, "temperature must be a real number"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(soft_weight=-0.5), ValueError, "soft_weight must be finite and >= 0"),
    (dict(hard_weight=math.nan), ValueError, "hard_weight must be finite"),
    (dict(hard_weight=None), TypeError, "hard_weight must be a real number"),
    (
        dict(teacher_logits=torch.randn(2, N, C), teacher_weights=[1.0, -1.0]),
        ValueError,
        "teacher_weights[1] must be finite and >= 0",
    ),
    (
        dict(teacher_logits=torch.randn(2, N, C), teacher_weights=[1.0, math.inf]),
        ValueError,
        "teacher_weights[1] must be finite",
    ),
    (
        dict(teacher_logits=torch.randn(2, N, C), teacher_weights=[0.0, 0.0]),
        ValueError,
        "all be zero",
    ),
    (
        dict(teacher_logits=torch.randn(2, N, C), teacher_weights=[1.0]),
        ValueError,
        "1 entries for 2 teachers",
    ),
    (
        dict(teacher_logits=torch.randn(2, N, C), teacher_weights=torch.ones(2, 1)),
        ValueError,
        "must be 1-D",
    ),
    (
        dict(teacher_logits=torch.randn(2, N, C), teacher_weights="uniform"),
        TypeError,
        "teacher_weights must be",
    ),
    (dict(ensemble="harmonic"), ValueError, "ensemble must be one of ['geometric', 'arithmetic']"),
    (dict(soft_loss="js"), ValueError, "soft_loss must be one of"),
    (dict(beta=0.5), ValueError, "beta is the mixture weight of soft_loss='jsd'"),
    (dict(soft_loss="jsd", beta=1.5), ValueError, "beta must be in [0, 1]"),
    (dict(soft_loss="jsd", beta=-0.1), ValueError, "beta must be finite and >= 0"),
    (dict(soft_loss="jsd", beta="half"), TypeError, "beta must be a real number"),
    (dict(num_items_in_batch=4, reduction="sum"), ValueError, "with reduction='sum' it must be"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch must be >= 0"),
    (dict(num_items_in_batch=4.0), TypeError, "num_items_in_batch must be an int"),
    (dict(num_items_in_batch=torch.tensor([4])), TypeError, "0-dim integer tensor"),
    (dict(num_items_in_batch=torch.tensor(4.0)), TypeError, "0-dim integer tensor"),
    (dict(num_items_in_batch=(1, 2, 3)), ValueError, "or a pair (soft_rows, hard_rows)"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of ['mean', 'sum', 'none']"),
    (dict(reduction=None), TypeError, "reduction must be a string"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend='cuda' cannot serve these inputs"),
    (
        dict(
            backend="triton",
            student_logits=torch.randn(N, C, dtype=torch.float64),
            teacher_logits=torch.randn(N, C, dtype=torch.float64),
        ),
        ValueError,
        "backend='triton' cannot serve these inputs",
    ),
    (dict(scale_soft_by_t2="yes"), TypeError, "scale_soft_by_t2 must be a bool"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (
        dict(unlabeled_index=-100),
        ValueError,
        "unlabeled_index (-100) must differ from ignore_index",
    ),
]


@pytest.mark.parametrize(("change", "error", "words"), BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_message(change, error, words):
    args = {**good(), **change}
    with pytest.raises(error) as info:
        kd.distillation_loss(**args)
    assert words in str(info.value)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        kd.DistillationLoss(temperature=0)
    with pytest.raises(TypeError, match="unknown options"):
        kd.DistillationLoss(temprature=2.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_zero_loss_and_zero_gradient(reduction):
    student = torch.randn(0, C, requires_grad=True)
    loss = kd.distillation_loss(
        student,
        torch.randn(0, C),
        torch.zeros(0, dtype=torch.long),
        reduction=reduction,
        backend="cpu",
    )
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert not loss.isnan().any() and (loss == 0).all()
    loss.sum().backward()
    assert student.grad.shape == (0, C)


def _raw_args(**change):
    return raw_kernel_args(N, C, **change)


RAW_BAD = [
    (dict(student=0), "student pointer is null"),
    (dict(teachers=[0]), "teacher pointer is null"),
    (dict(row_loss=0), "row_loss pointer is null"),
    (dict(num_rows=0, sum_rows=True, row_loss=0), "row_loss pointer is null"),  # was a crash
    (dict(student_row_stride=-1), "student row stride"),
    (dict(teacher_row_strides=[2**62]), "teacher row stride"),
    (dict(num_classes=0), "num_classes must be >= 1"),
    (dict(num_rows=-1), "num_rows must be >= 0"),
    (dict(num_rows=2**40, num_classes=2**30), "overflows"),
    (dict(student_dtype=7), "unknown dtype code"),
    (dict(student_dtype=3), "dtypes must be"),
    (
        dict(teachers=[1] * 65, teacher_row_strides=[C] * 65, teacher_weights=[1 / 65] * 65),
        "[1, 64]",
    ),
    (dict(teacher_weights=[0.5]), "sum to 1"),
    (dict(teacher_weights=[1.0, 0.0]), "differ in length"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(soft_weight=-1.0), "soft_weight"),
    (dict(ensemble=5), "ensemble code"),
    (dict(reduction=-1), "reduction code"),
    (dict(soft_loss=4), "soft_loss code"),
    (dict(soft_loss=3, beta=math.nan), "beta must be in [0, 1]"),
    (dict(soft_loss=3, beta=1.5), "beta must be in [0, 1]"),
    (dict(num_threads=0), "num_threads"),
]


def _run_cpu(args: dict) -> None:
    """The eager path's entry: the options converted once (kernel_options), then run_cpu with
    them and the call's own arguments."""
    options = _C.kernel_options(*(args[name] for name in OPTION_ARGUMENT_NAMES))
    _C.run_cpu(options, *(args[name] for name in CALL_ARGUMENT_NAMES))


@pytest.mark.parametrize(("change", "words"), RAW_BAD, ids=[b[1] for b in RAW_BAD])
def test_extension_boundary_refuses_unsafe_arguments(change, words):
    """The C++ side trusts nothing: a bad struct is a ValueError, never a crash."""
    _keep, args = _raw_args(**change)
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        _C.make_args(**args)
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):  # the eager path's entry
        _run_cpu(args)


def test_forward_cpu_checks_the_struct_it_gets():
    """kernel_options' struct holds no call (no pointers, no rows): forward_cpu refuses it as it
    refuses any struct check_args would."""
    _keep, args = _raw_args()
    options = _C.kernel_options(*(args[name] for name in OPTION_ARGUMENT_NAMES))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        _C.forward_cpu(options)


def test_extension_boundary_accepts_good_arguments():
    (s, t, row_loss), args = _raw_args(reduction=1)  # sum
    _C.forward_cpu(_C.make_args(**args))
    ref = kd.kd_loss_reference(s.double(), [t.double()], temperature=2.0, reduction="sum")
    assert abs(row_loss.sum().item() - ref.item()) < 1e-4 * abs(ref.item())
    first = row_loss.clone()
    row_loss.fill_(float("nan"))
    _run_cpu(args)
    assert torch.equal(row_loss, first)


@pytest.mark.parametrize(
    "labels",
    [[0, 9, 3], [0, 10, 3], [-1, 0, 0], [9], [-(2**63)], [2**63 - 1], [5] * 1000 + [10], []],
)
def test_cpu_label_check_agrees_with_torch(labels, monkeypatch):
    """The extension's one-pass label check (the CPU fast path of validation) and the torch
    fallback (no extension, or GPU labels) say what torch says, at both ends of the class range
    and of int64."""
    from kdkernels import _validate

    flat = torch.tensor(labels, dtype=torch.int64)
    expected = bool(((flat >= 0) & (flat < 10)).all())
    assert _C.labels_in_range(flat.data_ptr(), flat.numel(), 10) == expected
    if flat.numel() > 0:  # validation checks non-empty labels only
        assert _validate._all_classes(flat, 10) == expected
        monkeypatch.setattr(_validate, "load_extension", lambda: (None, "not built"))
        assert _validate._all_classes(flat, 10) == expected


def test_cpu_label_check_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n must be >= 0"):
        _C.labels_in_range(0, -1, 10)
    with pytest.raises(ValueError, match="null labels pointer"):
        _C.labels_in_range(0, 3, 10)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        _C.labels_in_range(0, 0, -1)


def _fused_ops():
    from kdkernels import _emulated, _ops, _triton

    ops = [_ops.fused_kd]
    ops += [_emulated.fused_kd_emulated] if _emulated.missing() is None else []
    return ops + ([_triton.fused_kd_triton] if _triton.fused_kd_triton is not None else [])


@pytest.mark.parametrize("fused_kd", _fused_ops(), ids=str)
def test_op_called_directly_checks_shapes_before_reading_pointers(fused_kd):
    """Each backend's op checks its inputs (the eager path skips the checks: validation made
    them), so a direct call with mismatched tensors is an error before any pointer is read."""
    s, t = torch.randn(4, 10), torch.randn(3, 10)
    args = (None, None, [1.0], 4.0, 0.9, 0.1, "geometric", "kl", None, True, -100, None, "mean")
    args = (*args, False)
    with pytest.raises(ValueError, match="every teacher must be"):
        fused_kd(s, [t], *args)
    with pytest.raises(ValueError, match="labels must be a contiguous int64"):
        fused_kd(s, [torch.randn(4, 10)], torch.zeros(3, dtype=torch.long), *args[1:])
    # One row's label may have any stride (as validation lets it through to the eager path).
    s1, t1 = torch.randn(1, 10), torch.randn(1, 10)
    label = torch.tensor([[3, 7]])[:, 0]
    assert label.stride(0) == 2
    row_loss, _ = fused_kd(s1, [t1], label, *args[1:])
    expected = kd.kd_loss_reference(s1.double(), [t1.double()], label.contiguous())
    torch.testing.assert_close(row_loss.sum().double(), expected, rtol=1e-5, atol=0)


def test_option_names_and_codes_agree_with_the_extension():
    """The C++ enums and limits are reached by name, and the Python choices are exactly them."""
    from kdkernels import _triton
    from kdkernels._validate import ENSEMBLES, REDUCTIONS, SOFT_LOSSES, TEMPERATURE_RANGE

    assert set(_C.ENSEMBLE_CODES) == set(ENSEMBLES)
    assert set(_C.SOFT_LOSS_CODES) == set(SOFT_LOSSES)
    assert _triton._SOFT_LOSS_CODES == _C.SOFT_LOSS_CODES  # the Triton kernel's constants
    assert set(_C.REDUCTION_CODES) == set(REDUCTIONS)
    assert _C.TEMPERATURE_RANGE == TEMPERATURE_RANGE


def test_module_options_are_attributes_that_take_effect():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    criterion = kd.DistillationLoss(temperature=2.0, backend="cpu")
    criterion.temperature = 3.0  # a schedule written the natural way
    assert "temperature=3.0" in repr(criterion)
    torch.testing.assert_close(criterion(s, t), kd.distillation_loss(s, t, temperature=3.0))
    with pytest.raises(ValueError, match="temperature must be"):
        criterion.temperature = 0.0
    with pytest.raises(AttributeError, match="no option 'temprature'"):
        criterion.temprature = 3.0
    assert criterion.temperature == 3.0


def test_distillation_loss_passes_its_options_in_the_order_of_options_fields():
    """distillation_loss hands its options to the remembered validation as one positional
    tuple: its parameters must name them in the order of Options' fields."""
    import inspect

    from kdkernels._validate import OPTION_NAMES

    names = [p for p in inspect.signature(kd.distillation_loss).parameters if p in OPTION_NAMES]
    assert tuple(names) == OPTION_NAMES


@pytest.mark.parametrize(
    "good, bad, error",
    [
        ({"temperature": 1.0}, {"temperature": True}, TypeError),
        ({"scale_soft_by_t2": True}, {"scale_soft_by_t2": 1}, TypeError),
        ({"ignore_index": 1}, {"ignore_index": True}, TypeError),
        ({"temperature": 2.0}, {"temperature": torch.tensor(float("nan"))}, ValueError),
    ],
)
def test_remembered_options_still_refuse_equal_values_of_a_wrong_type(good, bad, error):
    """The options of earlier calls are remembered, keyed by value and type: True == 1 == 1.0
    in Python, but only some of them are valid, and a tensor value is checked on every call."""
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    kd.distillation_loss(s, t, **good)
    with pytest.raises(error) as raised:
        kd.distillation_loss(s, t, **bad)
    assert raised.value.__context__ is None  # the error alone, not chained to a cache miss


def test_an_unhashable_option_gets_the_validation_error_alone():
    with pytest.raises(TypeError, match="temperature must be a real number") as raised:
        kd.distillation_loss(torch.randn(3, 5), torch.randn(3, 5), temperature=[4.0])
    assert raised.value.__context__ is None


def test_cpu_outputs_ignore_the_default_device():
    """A default device in force while kdkernels is imported (torch.set_default_device) does not
    move the CPU kernel's outputs later: they follow the inputs (the summed loss, which the CPU
    kernel writes through its pointer, was once copied from a tensor made at import)."""
    code = """
import torch
torch.set_default_device("meta")
import kdkernels as kd
torch.set_default_device(None)  # (while one is set, calls take the registered op's path)
gen = torch.Generator().manual_seed(0)
s = torch.randn(5, 7, generator=gen, device="cpu").requires_grad_(True)
t = torch.randn(5, 7, generator=gen, device="cpu")
y = torch.tensor([0, 1, 2, 3, 6], device="cpu")
loss = kd.distillation_loss(s, t, y)
loss.backward()
r = s.detach().double().requires_grad_(True)
ref = kd.kd_loss_reference(r, [t.double()], y)
ref.backward()
assert loss.device.type == "cpu" and abs(loss.item() - ref.item()) < 1e-5, (loss, ref)
assert torch.allclose(s.grad.double(), r.grad, rtol=1e-4, atol=1e-6)
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
