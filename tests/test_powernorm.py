"""PowerNorm against a direct float64 transcription of the paper's Algorithm 1 (with the
authors' warm-up and group scaling), written on the ``(|V|, C)`` matrix of valid positions."""

from __future__ import annotations

import contextlib

import pytest
import torch

import bnlab

N, C, L = 4, 6, 5
W = 3  # warmup_iters: steps 1-3 use the batch's quadratic mean, steps 4+ the running one
D = torch.float64


def _mask(seed: int) -> torch.Tensor:
    """A random mask with one sample of padding only and one of a single valid position."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, L, generator=g) < 0.6
    mask[0] = False
    mask[1] = False
    mask[1, 2] = True
    mask[2, :2] = True
    return mask


class PaperReference:
    """Algorithm 1 of Shen et al. 2020 in its own notation: ``psi2`` (running quadratic mean),
    ``nu`` (the backward's running correction), ``t`` (batches seen); the warm-up, the
    cumulative-then-EMA update and the group scaling as in the authors' code."""

    def __init__(self, eps=1e-5, a_f=0.9, a_b=0.9, warmup=W, groups=1):
        self.eps, self.a_f, self.a_b, self.warmup, self.groups = eps, a_f, a_b, warmup, groups
        self.psi2 = torch.ones(C, dtype=D)
        self.nu = torch.zeros(C, dtype=D)
        self.t = 0

    def _group_scale(self, rows):
        v = rows.shape[0]
        g = rows.reshape(v, self.groups, C // self.groups)
        ms = (g**2).mean(dim=2, keepdim=True)
        return (g / torch.sqrt(ms + self.eps)).reshape(v, C)

    def step(self, x, mask, gy, gamma, beta):
        """One training iteration: returns ``(y, dL/dx, dL/dgamma, dL/dbeta)``."""
        rows = x.transpose(1, 2)[mask].detach().requires_grad_(True)  # X, (|V|, C)
        grows = gy.transpose(1, 2)[mask]
        xt = self._group_scale(rows)
        self.t += 1
        batch = (xt.detach() ** 2).mean(dim=0)  # psi_B^2
        denom = batch if self.t <= self.warmup else self.psi2  # psi_{t-1}^2 after the warm-up
        xhat = xt.detach() / torch.sqrt(denom + self.eps)
        y_rows = gamma * xhat + beta
        if self.t < self.warmup:
            self.psi2 = self.psi2 * (self.t - 1) / self.t + batch / self.t
        self.psi2 = self.a_f * self.psi2 + (1 - self.a_f) * batch
        # backward, Algorithm 1: dL/dxhat, X~ = dL/dxhat - nu * xhat, dL/dX = X~ / psi
        g_hat = gamma * grows
        x_tilde = g_hat - self.nu * xhat
        d_xt = x_tilde / torch.sqrt(denom + self.eps)
        big_gamma = (xhat**2).mean(dim=0)
        big_lambda = (xhat * g_hat).mean(dim=0)
        self.nu = self.nu * (1 - (1 - self.a_b) * big_gamma) + (1 - self.a_b) * big_lambda
        (d_rows,) = torch.autograd.grad(xt, rows, d_xt)  # the group scaling, exactly
        y = torch.zeros(N, L, C, dtype=D)
        dx = torch.zeros(N, L, C, dtype=D)
        y[mask], dx[mask] = y_rows, d_rows
        return (y.transpose(1, 2), dx.transpose(1, 2), (grows * xhat).sum(0), grows.sum(0))

    def evaluate(self, x, mask, gamma, beta):
        rows = self._group_scale(x.transpose(1, 2)[mask])
        y = torch.zeros(N, L, C, dtype=D)
        y[mask] = gamma * rows / torch.sqrt(self.psi2 + self.eps) + beta
        return y.transpose(1, 2)


def _layer(**kw) -> bnlab.PowerNorm:
    layer = bnlab.PowerNorm(C, warmup_iters=W, dtype=D, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, C, dtype=D))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, C, dtype=D))
    return layer


def _close(a, b):
    return torch.allclose(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("alphas", [(0.9, 0.9), (0.6, 0.3)], ids=["a0.9", "a0.6-0.3"])
def test_training_matches_the_paper_across_the_warmup(masked, groups, alphas):
    torch.manual_seed(groups)
    layer = _layer(alpha_fwd=alphas[0], alpha_bkw=alphas[1], group_num=groups)
    ref = PaperReference(a_f=alphas[0], a_b=alphas[1], groups=groups)
    normalisers = []
    for step in range(1, 7):
        mask = _mask(step) if masked else torch.ones(N, L, dtype=torch.bool)
        x = (torch.randn(N, C, L, dtype=D) * torch.linspace(0.5, 3, C, dtype=D)[:, None]
             + 0.3).requires_grad_(True)  # fmt: skip
        gy = torch.randn(N, C, L, dtype=D)
        gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
        y = layer(x, mask=mask) if masked else layer(x)
        y.backward(gy)
        ry, rdx, rdg, rdb = ref.step(x, mask, gy, gamma, beta)
        assert _close(y, ry), step
        assert _close(x.grad, rdx), step
        assert _close(layer.weight.grad, rdg) and _close(layer.bias.grad, rdb), step
        assert _close(layer.running_phi, ref.psi2), step
        # the layer keeps the authors' scaling of the correction: nu = (1 - alpha_bkw) ema_gz
        assert _close((1 - alphas[1]) * layer.ema_gz, ref.nu), step
        assert int(layer.num_batches_tracked) == step
        normalisers.append(step <= W)
        with torch.no_grad():  # an optimiser step: the next backward sees new weights
            layer.weight -= 0.1 * layer.weight.grad
            layer.bias -= 0.1 * layer.bias.grad
        layer.zero_grad()
    assert normalisers == [True, True, True, False, False, False]
    x = torch.randn(N, C, L, dtype=D)
    mask = _mask(99) if masked else torch.ones(N, L, dtype=torch.bool)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x, mask=mask) if masked else layer(x)
    assert _close(y, ref.evaluate(x, mask, layer.weight.detach(), layer.bias.detach()))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_running_normaliser_differs_from_the_batch_one():
    """After the warm-up a batch far from the running quadratic mean is not rescaled to 1."""
    layer = _layer(group_num=1)
    x = torch.randn(N, C, L, dtype=D)
    for _ in range(W):
        layer(x)
    big = torch.randn(N, C, L, dtype=D) * 5
    y_warm = _layer(group_num=1)(big)
    y_run = layer(big)
    assert not torch.allclose(y_warm, y_run, atol=1e-3)


def test_eval_gradient_is_exact_and_leaves_ema_gz():
    layer = _layer(group_num=2)
    layer(torch.randn(N, C, L, dtype=D), mask=_mask(1)).backward(torch.randn(N, C, L, dtype=D))
    layer.eval()
    ema = layer.ema_gz.clone()
    x = torch.randn(N, C, L, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, mask=_mask(2)), (x,))
    layer(x, mask=_mask(2)).sum().backward()
    assert torch.equal(layer.ema_gz, ema)


def test_without_affine_is_unit_weight_and_zero_bias():
    bare = bnlab.PowerNorm(C, affine=False, warmup_iters=1, dtype=D)
    unit = bnlab.PowerNorm(C, warmup_iters=1, dtype=D)
    assert bare.weight is None and bare.bias is None
    for i in range(3):  # the second and third steps normalise with running_phi
        x = torch.randn(N, C, L, dtype=D)
        gy = torch.randn(N, C, L, dtype=D)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = bare(xa, mask=_mask(i)), unit(xb, mask=_mask(i))
        ya.backward(gy), yb.backward(gy)
        assert _close(ya, yb) and _close(xa.grad, xb.grad)
        assert _close(bare.ema_gz, unit.ema_gz) and _close(bare.running_phi, unit.running_phi)


def test_layouts_and_lengths_agree():
    x = torch.randn(N, C, L, dtype=D)
    lengths = torch.tensor([5, 1, 0, 3])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    ncl, nlc = _layer(), _layer(layout="nlc")
    y = ncl(x, lengths=lengths)
    assert _close(y, nlc(x.transpose(1, 2).contiguous(), mask=mask).transpose(1, 2))
    assert _close(ncl.running_phi, nlc.running_phi)
    flat, seq = _layer(), _layer()
    x2 = torch.randn(7, C, dtype=D)
    assert _close(flat(x2), seq(x2[:, :, None])[:, :, 0])
    assert _close(flat.running_phi, seq.running_phi)


def test_padding_is_zero_gets_no_gradient_and_stays_out_of_statistics():
    mask = _mask(3)
    x = torch.randn(N, C, L, dtype=D)
    poisoned = x.clone()
    poisoned[~mask[:, None, :].expand_as(x)] = float("nan")
    a, b = _layer(), _layer()
    xa, xb = x.clone().requires_grad_(True), poisoned.clone().requires_grad_(True)
    gy = torch.randn(N, C, L, dtype=D)
    ya, yb = a(xa, mask=mask), b(xb, mask=mask)
    ya.backward(gy), yb.backward(gy)
    assert (yb[~mask[:, None, :].expand_as(yb)] == 0).all()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert (xb.grad[~mask[:, None, :].expand_as(xb)] == 0).all()
    assert torch.equal(a.running_phi, b.running_phi) and torch.equal(a.ema_gz, b.ema_gz)


def test_state_dict_resumes_exactly_across_the_warmup():
    torch.manual_seed(0)
    batches = [(torch.randn(N, C, L, dtype=D), _mask(i), torch.randn(N, C, L, dtype=D))
               for i in range(6)]  # fmt: skip

    def run(layer, some):
        out = []
        for x, mask, gy in some:
            x = x.clone().requires_grad_(True)
            y = layer(x, mask=mask)
            y.backward(gy)
            out.append((y.detach(), x.grad))
        return out

    full = _layer(group_num=2)
    expected = run(full, batches)
    first = _layer(group_num=2)
    run(first, batches[:2])  # stop at step 2 of a 3-step warm-up
    state = first.state_dict()
    assert set(state) == {"weight", "bias", "running_phi", "ema_gz", "num_batches_tracked"}
    resumed = bnlab.PowerNorm(C, warmup_iters=W, group_num=2, dtype=D)
    resumed.load_state_dict(state)
    got = run(resumed, batches[2:])
    for (ye, ge), (yg, gg) in zip(expected[2:], got, strict=True):
        assert torch.equal(ye, yg) and torch.equal(ge, gg)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    fresh = _layer(group_num=2)  # the test can fail: a restart is not a resume
    assert not torch.allclose(run(fresh, batches[2:])[-1][0], expected[-1][0])


def test_nonfinite_batches_and_gradients_are_not_absorbed():
    layer = _layer()
    x0 = torch.randn(N, C, L, dtype=D, requires_grad=True)
    layer(x0).backward(torch.randn(N, C, L, dtype=D))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert (state["ema_gz"] != 0).all()
    x = torch.randn(N, C, L, dtype=D)
    x[0, 1, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="PowerNorm: a training batch produced non-finite"):
        layer(x)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
    x = torch.randn(N, C, L, dtype=D, requires_grad=True)
    gy = torch.randn(N, C, L, dtype=D)
    gy[1, 0, 0] = float("nan")
    layer(x).backward(gy)
    assert torch.equal(layer.ema_gz, state["ema_gz"])  # the NaN gradient stayed out
    assert int(layer.num_batches_tracked) == 2  # the finite batch counted
    raising = _layer(nonfinite="raise")
    x = torch.randn(N, C, L, dtype=D)
    x[0, 0, 0] = float("nan")
    with pytest.raises(bnlab.NonFiniteStatisticsError, match="running_phi was not updated"):
        raising(x)
    assert int(raising.num_batches_tracked) == 0 and torch.equal(raising.running_phi,
                                                                 torch.ones(C, dtype=D))


def test_empty_batch_and_low_precision():
    layer = bnlab.PowerNorm(C)
    y = layer(torch.randn(0, C, L))
    assert y.shape == (0, C, L) and int(layer.num_batches_tracked) == 0
    x = torch.randn(N, C, L, dtype=torch.bfloat16)
    y = layer(x, mask=_mask(0))
    assert y.dtype == torch.bfloat16 and layer.running_phi.dtype == torch.float32
    ref = bnlab.PowerNorm(C)
    assert torch.allclose(y.float(), ref(x.float(), mask=_mask(0)), atol=3e-2)
    assert torch.allclose(layer.running_phi, ref.running_phi, rtol=1e-5)


def test_compile_fullgraph_one_graph_for_every_step_and_mask():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = []
    aot = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot(gm, example_inputs)

    eager, compiled = _layer(group_num=2), _layer(group_num=2)
    step = torch.compile(compiled, backend=backend, fullgraph=True)
    counters.clear()
    for i in range(6):  # across the warm-up boundary (W = 3), a new mask every step
        mask = _mask(10 + i)
        x = torch.randn(N, C, L, dtype=D)
        if i == 4:
            x[2, 0, 0] = float("nan")  # kept out of the statistics inside the graph too
            mask[2, 0] = True
        gy = torch.randn(N, C, L, dtype=D)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with pytest.warns(RuntimeWarning) if i == 4 else contextlib.nullcontext():
            eager(xe, mask=mask).backward(gy)
        step(xc, mask=mask).backward(gy)
        if i != 4:
            assert _close(xe.grad, xc.grad), i
        for k, v in eager.state_dict().items():
            assert torch.allclose(v, compiled.state_dict()[k], atol=1e-12), (i, k)
    assert int(compiled.num_batches_tracked) == 5
    assert len(graphs) == 1
    plain, plain_eager = _layer(), _layer()
    plain_step = torch.compile(plain, backend=backend, fullgraph=True)
    for _ in range(5):  # without a mask: one more graph, for every step
        x = torch.randn(N, C, L, dtype=D)
        assert _close(plain_step(x), plain_eager(x))
    assert torch.allclose(plain.running_phi, plain_eager.running_phi, atol=1e-12)
    assert len(graphs) == 2
    assert sum(counters["graph_break"].values()) == 0
    explained = torch._dynamo.explain(bnlab.PowerNorm(C, warmup_iters=1))(
        torch.randn(N, C, L), mask=_mask(0))  # fmt: skip
    assert explained.graph_break_count == 0 and explained.graph_count == 1
