"""linear_distillation_loss against the float64 reference applied to materialised logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import kdkernels as kd
from kdkernels import _linear
from kdkernels.testing import backends_here, device_of, rel_error

KERNELS = [b for b in backends_here() if b != "torch"]


@dataclass
class LinearSample:
    name: str
    n: int = 13
    hidden: tuple[int, ...] = (8, 6)  # the student's, then each teacher's hidden size
    v: int = 37
    chunk_size: int | None = 5
    bias: bool = True
    softcap: tuple[float | None, float | None] = (None, None)
    scales: tuple[float, float] = (1.0, 1.0)
    labels: bool = True
    options: dict = field(default_factory=dict)

    def inputs(self, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

        h_s, *h_t = self.hidden
        x = {
            "student_hidden": randn(self.n, h_s),
            "student_weight": randn(self.v, h_s, scale=h_s**-0.5 * 3),
            "student_bias": randn(self.v) if self.bias else None,
            "teacher_hidden": [randn(self.n, h) for h in h_t],
            "teacher_weight": [randn(self.v, h, scale=h**-0.5 * 3) for h in h_t],
            "teacher_bias": [randn(self.v) if self.bias else None for _ in h_t],
        }
        labels = torch.randint(0, self.v, (self.n,), generator=g)
        labels[::4] = -100
        if self.options.get("unlabeled_index") is not None:
            labels[1::4] = self.options["unlabeled_index"]
        x = {k: _to(v, device) for k, v in x.items()}
        return x, labels.to(device) if self.labels else None

    def kwargs(self) -> dict:
        return dict(
            student_softcap=self.softcap[0],
            teacher_softcap=self.softcap[1],
            student_logit_scale=self.scales[0],
            teacher_logit_scale=self.scales[1],
            chunk_size=self.chunk_size,
            **self.options,
        )

    def reference(self, x: dict, labels) -> torch.Tensor:
        """The float64 reference on materialised logits (the student's tensors require grad)."""

        def logits(h, w, b, scale, cap):
            z = h @ w.T + (0 if b is None else b)
            z = z * scale
            return z if cap is None else cap * torch.tanh(z / cap)

        s = logits(
            x["student_hidden"],
            x["student_weight"],
            x["student_bias"],
            self.scales[0],
            self.softcap[0],
        )
        t = [
            logits(h, w, b, self.scales[1], self.softcap[1])
            for h, w, b in zip(
                x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"], strict=True
            )
        ]
        return kd.kd_loss_reference(s, t, labels, **self.options)


def _to(v, device):
    if isinstance(v, list):
        return [_to(t, device) for t in v]
    return None if v is None else v.to(device)


SAMPLES = [
    LinearSample("plain"),
    LinearSample("chunk-divides", n=15, chunk_size=5),
    LinearSample("one-chunk", chunk_size=None),
    LinearSample("chunk-1-no-bias", chunk_size=1, bias=False),
    LinearSample("softcap-scale", softcap=(3.0, 5.0), scales=(0.5, 1.7)),
    LinearSample("no-labels-sum", labels=False, options=dict(reduction="sum")),
    LinearSample("none", options=dict(reduction="none", temperature=2.0)),
    LinearSample("ensemble-geometric", hidden=(8, 12, 5)),
    LinearSample(
        "ensemble-arithmetic-weights",
        hidden=(6, 10, 4),
        options=dict(ensemble="arithmetic", teacher_weights=[0.2, 0.8]),
    ),
    LinearSample("reverse-kl", options=dict(soft_loss="reverse_kl", reduction="none")),
    LinearSample("jsd-unlabeled", options=dict(soft_loss="jsd", beta=0.3, unlabeled_index=-1)),
    LinearSample("ce-num-items", options=dict(soft_loss="cross_entropy", num_items_in_batch=40)),
    LinearSample("odd-sizes", n=29, hidden=(7, 3), v=101, chunk_size=8, softcap=(None, 2.0)),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 4e-3}


def run(sample: LinearSample, dtype: torch.dtype, backend: str, seed: int = 0):
    """(loss, reference, [(grad, reference grad)] for hidden, weight, bias) on random inputs,
    with a random upstream gradient; the reference runs in float64 on the same rounded inputs."""
    device = device_of(backend)
    x, labels = sample.inputs(dtype, device, seed)
    student = ["student_hidden", "student_weight"] + (["student_bias"] if sample.bias else [])
    for k in student:
        x[k].requires_grad_(True)
    out = kd.linear_distillation_loss(**x, labels=labels, backend=backend, **sample.kwargs())
    upstream = torch.randn(
        out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    (out.double() * upstream.to(device)).sum().backward()
    ref_x = {k: _to(v, device) for k, v in x.items()}
    ref_x = {k: _double(v) for k, v in ref_x.items()}
    for k in student:
        ref_x[k].requires_grad_(True)
    ref = sample.reference(ref_x, labels)
    (ref * upstream.to(device)).sum().backward()
    grads = [(x[k].grad, ref_x[k].grad) for k in student]
    return out, ref, grads


def _double(v):
    if isinstance(v, list):
        return [_double(t) for t in v]
    return None if v is None else v.detach().double()


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_matches_the_reference_on_materialised_logits(backend, dtype, sample):
    out, ref, grads = run(sample, dtype, backend)
    tol = TOLERANCE[dtype]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_error(out, ref) < tol, rel_error(out, ref)
    for grad, ref_grad in grads:
        assert grad.dtype == dtype
        assert rel_error(grad, ref_grad) < tol, rel_error(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_float16_and_float64(dtype):
    out, ref, grads = run(SAMPLES[4], dtype, "cpu")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for got, want in [(out, ref), *grads]:
        assert rel_error(got, want) < TOLERANCE[dtype]


def test_the_chunk_size_does_not_change_the_result():
    sample = LinearSample("chunks", n=23)
    results = []
    for chunk_size in (1, 4, 23, None):
        sample.chunk_size = chunk_size
        out, _, grads = run(sample, torch.float32, "cpu")
        results.append([out, *(g for g, _ in grads)])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    sample = LinearSample("gradcheck", n=7, hidden=(4, 3), v=9, chunk_size=3)
    x, labels = sample.inputs(torch.float64)

    def loss(h, w, b, reduction):
        return kd.linear_distillation_loss(
            h,
            w,
            x["teacher_hidden"],
            x["teacher_weight"],
            labels,
            student_bias=b,
            student_softcap=2.0,
            chunk_size=3,
            reduction=reduction,
        )

    args = [x[k].requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias")]
    with kd.allow_repeated_backward():
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(lambda *a, r=reduction: loss(*a, r), args)


def _op_arguments(x: dict, labels, needs_grad: list[bool], reduction: str = "mean") -> tuple:
    """The raw arguments of kdkernels::linear_kd for one teacher on the CPU backend."""
    options = kd._validate.Options(reduction=reduction).as_dict()
    return (
        x["student_hidden"],
        x["student_weight"],
        x["student_bias"],
        x["teacher_hidden"],
        x["teacher_weight"],
        x["teacher_bias"],
        labels,
        None,
        None,
        [1.0],
        [1.0, 1.0],
        [0.0, 3.0],
        4,
        needs_grad,
        "cpu",
        *kd._fused.OpOptions(**options, compute_grad=True),
    )


def test_opcheck():
    sample = LinearSample("opcheck", n=6, hidden=(4, 5), v=11, chunk_size=4)
    for reduction in ("mean", "none"):
        x, labels = sample.inputs(torch.float32)
        x["student_weight"].requires_grad_(True)
        args = _op_arguments(x, labels, [False, True, False], reduction)
        torch.library.opcheck(_linear.linear_kd, args)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    n, d, h, v = 24, 12, 16, 40
    x, teacher_hidden, teacher_head = torch.randn(n, d), torch.randn(n, 20), torch.randn(v, 20)
    labels = torch.randint(0, v, (n,))
    models = [nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, v)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())

    def step(model, x, teacher_hidden, labels):
        hidden = model[1](model[0](x))
        return kd.linear_distillation_loss(
            hidden,
            model[2].weight,
            teacher_hidden,
            teacher_head,
            labels,
            student_bias=model[2].bias,
            chunk_size=7,
            soft_loss="jsd",
        )

    compiled = torch.compile(step, fullgraph=True)
    losses = [
        fn(m, x, teacher_hidden, labels) for fn, m in zip((step, compiled), models, strict=True)
    ]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_teachers_get_no_gradient_and_a_tied_head_only_the_students():
    sample = LinearSample("tied", n=9, hidden=(6, 6), v=15)
    x, labels = sample.inputs(torch.float32)
    head = x["student_weight"].requires_grad_(True)
    teacher_hidden = x["teacher_hidden"][0].requires_grad_(True)
    kd.linear_distillation_loss(x["student_hidden"], head, teacher_hidden, head, labels).backward()
    assert teacher_hidden.grad is None
    ref_head = head.detach().double().requires_grad_(True)
    kd.kd_loss_reference(
        x["student_hidden"].double() @ ref_head.T,
        [teacher_hidden.detach().double() @ head.detach().double().T],
        labels,
    ).backward()
    assert rel_error(head.grad, ref_head.grad) < 1e-5


def test_module_takes_nn_linear_heads():
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 30), nn.Linear(12, 30)
    hidden, teacher_hidden = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    labels = torch.randint(0, 30, (2, 5))
    criterion = kd.LinearDistillationLoss(temperature=2.0, chunk_size=3)
    loss = criterion(hidden, student, teacher_hidden, teacher, labels)
    logits = student(hidden)
    ref = kd.distillation_loss(logits, teacher(teacher_hidden).detach(), labels, temperature=2.0)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    assert "temperature=2.0" in repr(criterion)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(teacher_weight=torch.randn(40, 6)),
            r"vocabulary of 40 .* pass teacher_weight\[:37\]",
        ),
        (dict(teacher_weight=torch.randn(30, 6)), "vocabulary of 30 but the student's is 37"),
        (dict(student_weight=torch.randn(37, 5)), r"student_weight must be \[V, 8\]"),
        (dict(teacher_hidden=torch.randn(12, 6)), "teacher_hidden must be"),
        (dict(student_bias=torch.randn(36)), r"student_bias must be \[37\]"),
        (dict(student_weight=torch.randn(37, 8).double()), "student_weight is torch.float64 but"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(labels=torch.zeros(13, dtype=torch.long, device="meta")), "but student_hidden is"),
        (dict(student_softcap=-1.0), "student_softcap must be None or > 0"),
        (dict(teacher_logit_scale=float("nan")), "teacher_logit_scale must be a finite"),
        (dict(backend="torch"), "backend='torch' has no fused kernel"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    x = dict(
        student_hidden=torch.randn(13, 8),
        student_weight=torch.randn(37, 8),
        teacher_hidden=torch.randn(13, 6),
        teacher_weight=torch.randn(37, 6),
    )
    with pytest.raises((ValueError, TypeError), match=message):
        kd.linear_distillation_loss(**{**x, **change})


def test_default_chunk_size_bounds_the_chunk_memory():
    rows = _linear.default_chunk_size(8192, 128256, 1, torch.device("cpu"))
    assert 3 * 128256 * 4 * rows <= _linear.CHUNK_BYTES["cpu"] and rows >= 64
    assert _linear.default_chunk_size(5, 10, 1, torch.device("cpu")) == 5


def test_teachers_in_another_dtype_than_the_student():
    """A float64 student with a bfloat16 teacher (and the reverse): the teacher's logits are
    converted to the student's logits dtype (float64, or float32 for a half student)."""
    sample = LinearSample("mixed", n=9, hidden=(6, 5), v=21, chunk_size=4)
    for student_dtype, teacher_dtype in (
        (torch.float64, torch.bfloat16),
        (torch.bfloat16, torch.float64),
    ):
        x, labels = sample.inputs(student_dtype)
        teacher, _ = sample.inputs(teacher_dtype)
        for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
            x[k] = teacher[k]
        out = kd.linear_distillation_loss(**x, labels=labels, **sample.kwargs())
        ref = sample.reference({k: _double(v) for k, v in x.items()}, labels)
        assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


def test_zero_rows_give_a_zero_loss_and_gradients():
    for lead in ((0,), (2, 0)):
        h = torch.randn(*lead, 8, requires_grad=True)
        w = torch.randn(37, 8, requires_grad=True)
        loss = kd.linear_distillation_loss(h, w, torch.randn(*lead, 6), torch.randn(37, 6))
        loss.backward()
        assert loss.item() == 0.0 and h.grad.shape == h.shape
        assert torch.count_nonzero(w.grad) == 0


def test_logits_stay_float32_under_autocast():
    """Hugging Face's Trainer(bf16=True) runs the loss under autocast: the chunk's matmuls must
    still give float32 logits (and reduction='none' backward, outside autocast, the same)."""
    sample = LinearSample("autocast", n=11, v=29)
    for reduction in ("mean", "none"):
        sample.options = dict(reduction=reduction)
        x, labels = sample.inputs(torch.float32)
        x["student_weight"].requires_grad_(True)
        plain = kd.linear_distillation_loss(**x, labels=labels, **sample.kwargs())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = kd.linear_distillation_loss(**x, labels=labels, **sample.kwargs())
        torch.testing.assert_close(auto, plain)
        (g_plain,) = torch.autograd.grad(plain.sum(), x["student_weight"])
        (g_auto,) = torch.autograd.grad(auto.sum(), x["student_weight"])
        torch.testing.assert_close(g_auto, g_plain)


def test_opcheck_on_transposed_hidden_states():
    """The gradient of a non-contiguous hidden state is contiguous, as the fake says."""
    sample = LinearSample("strides", n=6, hidden=(5, 4), v=9, chunk_size=4)
    x, labels = sample.inputs(torch.float32)
    x["student_hidden"] = x["student_hidden"].T.contiguous().T.requires_grad_(True)
    torch.library.opcheck(_linear.linear_kd, _op_arguments(x, labels, [True, False, False]))
