"""``oftv2`` (Qiu et al. 2025): against a dense formula written here from the paper, with ``R_bd`` built
explicitly and the weight ``W R_bdᵀ`` formed; orthogonality, Neumann convergence, init, fold/export, errors."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.builtin.oftv2 import cayley_neumann, oftv2_transform


# -- the independent reference (paper formula, dense) ------------------------------------------------
def dense_blocks(q: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """R_j = (I+Q_j)(I−Q_j)⁻¹ (k = 0) or (I+Q_j) Σ_{i<k} Q_j^i; Q_j = M_j − M_jᵀ, M_j from triu_indices order."""
    rows, cols = torch.triu_indices(b, b, 1)
    eye = torch.eye(b, dtype=q.dtype)
    blocks = []
    for j in range(q.shape[0]):
        upper = torch.zeros(b, b, dtype=q.dtype)
        for t in range(rows.numel()):
            upper = upper + q[j, t] * torch.outer(eye[rows[t]], eye[cols[t]])
        skew = upper - upper.T
        if k == 0:
            blocks.append((eye + skew) @ torch.linalg.inv(eye - skew))
        else:
            series = sum(torch.linalg.matrix_power(skew, i) for i in range(k))
            blocks.append((eye + skew) @ series)
    return torch.stack(blocks)


def dense_rotation(q: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """R_bd = blockdiag(R_j) as a dense in × in matrix."""
    return torch.block_diag(*dense_blocks(q, b, k))


def dense_forward(model: nn.Sequential, qs: dict[str, torch.Tensor], b: int, k: int, x: torch.Tensor) -> torch.Tensor:
    """The model with each Linear's weight replaced by W′ = W R_bdᵀ."""
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            weight = layer.weight @ dense_rotation(qs[name], b, k).T
            x = F.linear(x, weight, layer.bias)
        else:
            x = layer(x)
    return x


def make_net(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def randomise(m: graphopt.CompiledModel, scale: float = 0.3, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, param in m.trainable_parameters().items():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * scale)
            values[name.split(".")[0]] = param.detach().clone()
    return values


# -- equivalence with the dense formula ----------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k", [0, 1, 4])
def test_output_and_gradient_match_dense_formula(dtype: torch.dtype, tol: float, k: int) -> None:
    net = make_net(dtype)
    x = torch.randn(3, 5, 12, dtype=dtype)
    m = graphopt.compile(net, methods=[f"oftv2(block_size=4, neumann_terms={k})"], example_inputs=(x,),
                         backend="eager")
    qs = randomise(m)
    y = m(x)
    y.square().sum().backward()
    grads = {name.split(".")[0]: p.grad for name, p in m.trainable_parameters().items()}

    leaves = {name: q.to(dtype).requires_grad_() for name, q in qs.items()}
    ref = dense_forward(net, leaves, 4, k, x)
    ref.square().sum().backward()
    assert (y - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())
    assert (y - net(x)).abs().max().item() > 1e-2  # the adapter really acts
    for name, leaf in leaves.items():
        scale = max(1.0, leaf.grad.abs().max().item())
        assert (grads[name] - leaf.grad).abs().max().item() < tol * scale, name


def test_addmm_layer_matches_dense_formula() -> None:
    """transformers-style Conv1D: ``addmm(b, x, W)`` with W stored (in, out); W′ = R_bd W there."""

    class Conv1D(nn.Module):
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_in, d_out, dtype=torch.float64))
            self.bias = nn.Parameter(torch.randn(d_out, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)

    torch.manual_seed(0)
    net = Conv1D(8, 6)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    m = graphopt.compile(net, methods=["oftv2(block_size=4, neumann_terms=3)"], example_inputs=(x,), backend="eager")
    assert [n for n, _ in m.trainable_parameters().items()] == ["oftv2_q"]
    (q,) = m.trainable_parameters().values()
    with torch.no_grad():
        q.normal_(0, 0.3)
    ref = x @ (dense_rotation(q.detach(), 4, 3) @ net.weight) + net.bias
    assert (m(x) - ref).abs().max().item() < 1e-12


# -- the rotation itself ----------------------------------------------------------------------------
def test_exact_cayley_is_orthogonal() -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 28, dtype=torch.float64)  # large Q: far outside the Neumann radius
    rotation = cayley_neumann(q, 8, 0)
    eye = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    assert (rotation.transpose(-1, -2) @ rotation - eye).abs().max().item() < 1e-12
    assert (rotation - cayley_neumann(q, 8, 0, exact="elimination")).abs().max().item() < 1e-10
    assert (torch.block_diag(*rotation) - dense_rotation(q, 8, 0)).abs().max().item() < 1e-12


def test_neumann_error_shrinks_with_terms() -> None:
    torch.manual_seed(0)
    q = torch.randn(4, 28, dtype=torch.float64) * 0.05
    exact = dense_blocks(q, 8, 0)
    errors = [torch.linalg.matrix_norm(cayley_neumann(q, 8, k) - exact, ord=2) for k in range(1, 8)]
    assert all((later < earlier * 0.5).all() for earlier, later in itertools.pairwise(errors))
    # R − R_K = (I+Q) Q^K (I−Q)⁻¹, so ‖R − R_K‖₂ ≤ sqrt(1+s²)·s^K with s = ‖Q‖₂ < 1
    skew = torch.linalg.solve(exact + torch.eye(8, dtype=torch.float64), exact - torch.eye(8, dtype=torch.float64))
    s = torch.linalg.matrix_norm(skew, ord=2)  # Q = (R + I)⁻¹(R − I) recovered from the exact rotation
    assert (s < 0.5).all()
    for k, err in zip(range(1, 8), errors):
        assert (err <= (1 + s**2).sqrt() * s**k * (1 + 1e-9) + 1e-14).all(), k
    assert (errors[-1] < 1e-3).all()
    # the orthogonality defect ‖R_KᵀR_K − I‖ goes with the error (not monotone at small K: R_2 − R = O(Q²)·2)
    defects = [(r.transpose(-1, -2) @ r - torch.eye(8, dtype=torch.float64)).abs().max().item()
               for r in (cayley_neumann(q, 8, k) for k in (1, 4, 7))]
    assert defects[2] < defects[1] < defects[0] and defects[2] < 1e-3


def test_relation_to_peft_series() -> None:
    """The real PEFT's N-term series ``I + 2Σ_{i=1}^{N−2} Q^i + Q^{N−1}`` equals ours with K = N − 1 for N ≥ 4
    (PEFT's default N = 5 ↔ our default K = 4); PEFT's N = 3 computes the same as its N = 4 (documented)."""
    peft_oft = pytest.importorskip("peft.tuners.oft.layer")
    torch.manual_seed(0)
    q = torch.randn(2, 6, dtype=torch.float64) * 0.2
    module = peft_oft.OFTRotationModule(2, 6, 4, 8)
    for n in (4, 5, 7):
        theirs = module._cayley_batch(q, 4, use_cayley_neumann=True, num_neumann_terms=n)
        assert (theirs - cayley_neumann(q, 4, n - 1)).abs().max().item() < 1e-14
    three = module._cayley_batch(q, 4, use_cayley_neumann=True, num_neumann_terms=3)
    assert (three - cayley_neumann(q, 4, 3)).abs().max().item() < 1e-14
    exact = module._cayley_batch(q, 4, use_cayley_neumann=False)   # (I − Q)(I + Q)⁻¹: ours with −q
    assert (exact - cayley_neumann(-q, 4, 0)).abs().max().item() < 1e-12


def test_gradcheck_transform() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    q = (torch.randn(2, 3, dtype=torch.float64) * 0.3).requires_grad_()
    for k in (0, 3):
        assert torch.autograd.gradcheck(lambda a, b, k=k: oftv2_transform(a, b, 3, k), (x, q))
    assert torch.autograd.gradcheck(lambda a, b: oftv2_transform(a, b, 3, 0, exact="elimination"), (x, q))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_computed_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8).to(dtype)
    q = torch.randn(2, 6) * 0.3
    out = oftv2_transform(x, q.to(dtype), 4, 4)
    assert out.dtype == dtype
    ref = (x.float() @ dense_rotation(q.to(dtype).double(), 4, 4).float()).to(dtype)
    # float32 inside: at most one rounding step of the low-precision format apart from the reference
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -7 if dtype is torch.bfloat16 else 2 ** -10, atol=1e-3)
    # computing in the low-precision format itself would be clearly worse for bf16
    if dtype is torch.bfloat16:
        naive = cayley_neumann(q.to(dtype), 4, 4)
        naive = (x.reshape(4, 2, 4).transpose(0, 1) @ naive).transpose(0, 1).reshape(4, 8)
        exact = x.double() @ dense_rotation(q.to(dtype).double(), 4, 4)
        assert (out.double() - exact).abs().max() <= (naive.double() - exact).abs().max()
    # a whole bf16/fp16 model compiles and runs through the adapter, identity at init
    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).to(dtype)
    m = graphopt.compile(net, methods=["oftv2(block_size=4)"], example_inputs=(x,), backend="eager")
    assert next(iter(m.trainable_parameters().values())).dtype == dtype
    assert torch.equal(m(x), net(x))


# -- integration: init, parameters, training, user model ------------------------------------------
class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_identity_at_init_and_parameter_names() -> None:
    torch.manual_seed(0)
    net = Nested()
    x = torch.randn(7, 16)
    m = graphopt.compile(net, methods=["oftv2(block_size=8)"], example_inputs=(x,), backend="eager")
    shapes = {n: tuple(p.shape) for n, p in m.trainable_parameters().items()}
    assert shapes == {"encoder.0.oftv2_q": (2, 28), "encoder.2.oftv2_q": (4, 28), "head.oftv2_q": (4, 28)}
    assert all((p == 0).all() for p in m.trainable_parameters().values())
    assert (m(x) - net(x)).abs().max().item() <= 1e-6
    frozen = [n for n, p in m.graph_module.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted(n for n, _ in net.named_parameters())


def test_targets_select_layers() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 16)
    m = graphopt.compile(Nested(), methods=["oftv2(block_size=16, targets=['encoder.*'])"], example_inputs=(x,),
                         backend="eager")
    assert {n: tuple(p.shape) for n, p in m.trainable_parameters().items()} == {"encoder.0.oftv2_q": (1, 120),
                                                                   "encoder.2.oftv2_q": (2, 120)}


def test_sgd_step_matches_dense_gradient_and_user_model_untouched() -> None:
    torch.manual_seed(0)
    net = make_net(torch.float64)
    before = copy.deepcopy(net.state_dict())
    x, target = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 4, (6,))
    m = graphopt.compile(net, methods=["oftv2(block_size=4, neumann_terms=2)", "sgd(lr=0.5)"],
                         loss_fn=F.cross_entropy, example_inputs=(x,), backend="eager")
    qs = randomise(m, scale=0.1)
    leaves = {name: q.clone().requires_grad_() for name, q in qs.items()}
    ref_loss = F.cross_entropy(dense_forward(net, leaves, 4, 2, x), target)
    ref_loss.backward()
    base = {n: p.detach().clone() for n, p in m.graph_module.named_parameters() if not p.requires_grad}

    loss = m.step(x, target)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    for name, param in m.trainable_parameters().items():
        key = name.split(".")[0]
        expected = qs[key] - 0.5 * leaves[key].grad
        assert (param - expected).abs().max().item() < 1e-12
    for name, value in base.items():  # frozen base weights did not move
        assert torch.equal(dict(m.graph_module.named_parameters())[name], value)
    for name, value in net.state_dict().items():  # the user's model is untouched
        assert torch.equal(value, before[name])
    assert all(p.requires_grad for p in net.parameters())
    assert not any("oftv2" in n for n, _ in net.named_parameters())


def test_inductor_step_matches_eager_and_trains() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x, target = torch.randn(64, 16), torch.randint(0, 4, (64,))
    runs = {}
    for backend in ("inductor", "eager"):
        m = graphopt.compile(net, methods=["oftv2(block_size=8)", "sgd(lr=1.0, momentum=0.9)"],
                             loss_fn=F.cross_entropy, example_inputs=(x,), backend=backend)
        runs[backend] = ([m.step(x, target).item() for _ in range(30)],
                         {n: p.detach().clone() for n, p in m.trainable_parameters().items()})
    (losses, params), (eager_losses, eager_params) = runs["inductor"], runs["eager"]
    assert np.allclose(losses, eager_losses, atol=1e-5, rtol=1e-5)
    assert params.keys() == eager_params.keys() == {"0.oftv2_q", "2.oftv2_q"}
    for name, value in params.items():
        assert (value - eager_params[name]).abs().max().item() < 1e-4
    assert losses[-1] < 0.85 * losses[0]


# -- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [4, 0])
@pytest.mark.parametrize("merge", [True, False])
def test_export_onnx_matches_adapter_model(tmp_path, k: int, merge: bool) -> None:
    import onnxruntime

    net = make_net(torch.float32)
    x = torch.randn(5, 12)
    m = graphopt.compile(net, methods=[f"oftv2(block_size=4, neumann_terms={k})"], example_inputs=(x,),
                         backend="eager")
    qs = randomise(m, scale=0.2)
    with torch.no_grad():
        adapter_out = m(x)
        dense = dense_forward(net, {n: q.float() for n, q in qs.items()}, 4, k, x)
    assert (adapter_out - dense).abs().max().item() < 1e-5

    gm = m.export_graph(merge=merge)
    has_adapter = any(n.op == "call_function" and n.target is oftv2_transform for n in gm.graph.nodes)
    assert has_adapter is (not merge)
    assert any("oftv2_q" in n for n, _ in gm.named_parameters()) is (not merge)

    path = tmp_path / "model.onnx"
    graphopt.export(m, path, example_inputs=(x,), merge=merge)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(9, 12)  # another batch size: the batch dim is dynamic
    for inp in (x, x2):
        (onnx_out,) = session.run(None, {session.get_inputs()[0].name: inp.numpy()})
        with torch.no_grad():
            expected = m(inp).numpy()
        assert np.abs(onnx_out - expected).max() <= 1e-5


# -- errors ---------------------------------------------------------------------------------------
def test_errors() -> None:
    x = torch.randn(2, 12)
    with pytest.raises(graphopt.OptionError, match=r"block_size=5 does not divide in_features=12 of layer '0'.*"
                                                    r"\[2, 3, 4, 6, 12\]"):
        graphopt.compile(make_net(torch.float32), methods=["oftv2(block_size=5)"], example_inputs=(x,),
                         backend="eager")
    with pytest.raises(graphopt.OptionError, match=r"oftv2.*block_size=1.*>= 2"):
        graphopt.compile(make_net(), methods=["oftv2(block_size=1)"])
    with pytest.raises(graphopt.OptionError, match=r"oftv2.*neumann_terms=-1.*>= 0"):
        graphopt.compile(make_net(), methods=["oftv2(neumann_terms=-1)"])
    with pytest.raises(graphopt.OptionError, match=r"oftv2.*no option 'rank'"):
        graphopt.compile(make_net(), methods=["oftv2(rank=4)"])
    with pytest.raises(graphopt.OptionError, match=r"oftv2.*'fc\*' matches no linear or conv2d layer; available "
                                                    r"linear or conv2d layers: 0, 2, 4"):
        graphopt.compile(make_net(torch.float32), methods=["oftv2(block_size=4, targets='fc*')"],
                         example_inputs=(x,), backend="eager")

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    # a layer called twice gets one rotation, applied at both calls (tests/test_shared_weights.py)
    m = graphopt.compile(Twice(), methods=["oftv2(block_size=4)"], example_inputs=(torch.randn(2, 8),),
                         backend="eager")
    assert list(m.trainable_parameters()) == ["fc.oftv2_q"]

    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8))
    # an explicit Conv2d target is adapted (tests/test_peft_conv.py): q has C·kh·kw/b = 27/3 rows
    m = graphopt.compile(conv, methods=["oftv2(block_size=3, targets='0')"], example_inputs=(torch.randn(1, 3, 6, 6),),
                         backend="eager")
    assert {n: tuple(p.shape) for n, p in m.trainable_parameters().items()} == {"0.oftv2_q": (9, 3)}
    # default targets skip the conv and adapt the linear layer
    m = graphopt.compile(conv, methods=["oftv2(block_size=4)"], example_inputs=(torch.randn(1, 3, 6, 6),),
                         backend="eager")
    assert [n for n, _ in m.trainable_parameters().items()] == ["2.oftv2_q"]
