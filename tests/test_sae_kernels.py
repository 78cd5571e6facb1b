"""The sparse TopK / BatchTopK kernels equal the plain dense computation: forward and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from misfeat.sae import kernels  # noqa: E402
from misfeat.sae.config import SAETrainConfig  # noqa: E402
from misfeat.sae.model import SparseAutoencoder  # noqa: E402


def _module(arch, device="cpu", d_in=24, d_sae=96, k=6, seed=0):
    cfg = SAETrainConfig(hook_name="blocks.0.hook_resid_post", d_sae=d_sae, architecture=arch, k=k,
                         dtype="float64", seed=seed)
    module = SparseAutoencoder(cfg, d_in, loss_variance=2.5, device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move away from the tied initialisation so every term matters
        for p in (module.W_enc, module.b_enc, module.b_dec):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device))
    return module


def _loss_and_grads(module, x, dead, sparse):
    module.zero_grad(set_to_none=True)
    out = module(x, dead, sparse=sparse)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_kernel_matches_dense_reference(arch, with_dead):
    module = _module(arch)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 24, generator=gen, dtype=torch.float64) * 2 + 1
    dead = (torch.rand(96, generator=gen) < 0.3) if with_dead else None
    sparse, g_sparse = _loss_and_grads(module, x, dead, sparse=True)
    dense, g_dense = _loss_and_grads(module, x, dead, sparse=False)
    torch.testing.assert_close(sparse.recon, dense.recon, rtol=1e-10, atol=1e-10)
    for field in ("loss", "mse", "aux", "l0"):
        torch.testing.assert_close(getattr(sparse, field), getattr(dense, field), rtol=1e-10, atol=1e-12)
    assert torch.equal(sparse.fired, dense.fired)
    if with_dead:
        assert float(sparse.aux.detach()) > 0  # the AuxK term is really exercised
    assert set(g_sparse) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for name in g_sparse:
        assert g_dense[name].abs().max() > 0
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-9, atol=1e-11, msg=name)


def test_sparse_backward_touches_only_selected_latents():
    """Encoder and decoder rows of latents that no token selected get exactly zero gradient."""
    module = _module("topk", d_sae=200, k=2)
    x = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, grads = _loss_and_grads(module, x, None, sparse=True)
    with torch.no_grad():
        pre = (x - module.b_dec) @ module.W_enc.t() + module.b_enc
        selected = torch.zeros(200, dtype=torch.bool)
        selected[pre.topk(2, dim=-1).indices.reshape(-1)] = True
    assert (~selected).sum() >= 190
    for name in ("W_enc", "W_dec"):
        assert torch.all(grads[name][~selected] == 0), name
        assert torch.all(grads[name][selected].abs().sum(-1) > 0), name


def test_gather_pre_and_sparse_decode_against_autograd():
    """The two autograd Functions alone, on an irregular (BatchTopK-like) code."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    W_dec = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    pre = (x @ W.t() + b).detach()
    code = kernels.batchtopk_code(pre.relu(), 2.0)
    assert code.k is None and code.cols.numel() == 14
    out = kernels.sparse_decode(kernels.gather_pre(pre, x, W, b, code), W_dec, code)
    ref = kernels.dense_acts(code, (x @ W.t() + b)[code.rows, code.cols], 9) @ W_dec
    torch.testing.assert_close(out, ref)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad((out * weight).sum(), (x, W, b, W_dec))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (x, W, b, W_dec))
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want)


def test_jumprelu_straight_through_gradients():
    """JumpReLU / Step: forward is the gate; the threshold's gradient is the rectangle-kernel estimate."""
    pre = torch.tensor([[0.10, 0.52, 0.49, 0.7]], dtype=torch.float64, requires_grad=True)
    threshold = torch.full((4,), 0.5, dtype=torch.float64, requires_grad=True)
    out = kernels.JumpReLU.apply(pre, threshold, 0.1)
    assert out.tolist() == [[0.0, 0.52, 0.0, 0.7]]
    out.sum().backward()
    assert pre.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    # inside the window |pre - t| < bw / 2 (0.52 and 0.49): -t / bw; outside: 0
    assert threshold.grad.tolist() == pytest.approx([0.0, -5.0, -5.0, 0.0])
    threshold.grad = None
    kernels.Step.apply(pre.detach(), threshold, 0.1).sum().backward()
    assert threshold.grad.tolist() == pytest.approx([0.0, -10.0, -10.0, 0.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_kernel_matches_dense_on_cuda(arch):
    module = _module(arch, device="cuda")
    x = torch.randn(64, 24, dtype=torch.float64, device="cuda") * 2
    dead = torch.rand(96, device="cuda") < 0.3
    sparse, g_sparse = _loss_and_grads(module, x, dead, sparse=True)
    dense, g_dense = _loss_and_grads(module, x, dead, sparse=False)
    torch.testing.assert_close(sparse.loss, dense.loss)
    for name in g_sparse:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-9, atol=1e-11, msg=name)
