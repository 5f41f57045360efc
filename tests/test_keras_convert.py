"""Keras conventions converted by name, and torch <-> bnlab model conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab import keras


def test_keras_momentum_and_epsilon() -> None:
    assert keras.momentum_from_keras(0.99) == 0.01
    assert keras.momentum_to_keras(0.1) == 0.9
    assert keras.keras_kwargs() == {"eps": 1e-3, "momentum": 0.01}
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\], got 1.5"):
        keras.momentum_from_keras(1.5)


def test_keras_update_rule_matches_after_conversion() -> None:
    # Keras: new = m * old + (1 - m) * batch, with the biased batch variance.
    m = 0.9
    bn = bnlab.BatchNorm1d(3, **keras.keras_kwargs(momentum=m))
    keras_mean, keras_var = torch.zeros(3), torch.ones(3)
    keras_count = 0
    for _ in range(5):
        x = torch.randn(16, 3) * 2 + 1
        bn(x)
        keras_mean = m * keras_mean + (1 - m) * x.mean(0)
        keras_var = m * keras_var + (1 - m) * x.var(0, unbiased=False)
        keras_count = x.shape[0]
    torch.testing.assert_close(bn.running_mean, keras_mean)
    # the initial variance 1 was never a biased estimate; correct only the batch part
    init_weight = m**5
    want = init_weight * 1 + keras.variance_from_keras(keras_var - init_weight, keras_count)
    torch.testing.assert_close(bn.running_var, want, rtol=1e-5, atol=1e-6)


def test_variance_from_keras_rejects_bad_count() -> None:
    with pytest.raises(ValueError, match="count .* must be an int >= 2, got 1"):
        keras.variance_from_keras(torch.ones(3), 1)


def test_load_keras_weights() -> None:
    bn = bnlab.BatchNorm2d(2)
    keras.load_keras_weights(bn, [2.0, 3.0], [0.5, -0.5], [1.0, 2.0], [4.0, 8.0], count=5)
    torch.testing.assert_close(bn.running_var, torch.tensor([5.0, 10.0]))
    torch.testing.assert_close(bn.weight.data, torch.tensor([2.0, 3.0]))
    msg = r"moving_mean must have shape \(2,\) for BatchNorm2d, got \(3,\)"
    with pytest.raises(ValueError, match=msg):
        keras.load_keras_weights(bn, [1, 1], [0, 0], [0, 0, 0], [1, 1], count=5)


def _model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=None, affine=False)),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8, eps=1e-3),
    )


def test_convert_to_bnlab_and_back_keeps_outputs() -> None:
    model = _model()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 1, 8, 8))
    model[1].weight.requires_grad_(False)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    ours = bnlab.convert(model)
    assert isinstance(model[1], nn.BatchNorm2d) and not isinstance(model[1], bnlab.BatchNorm2d)
    kinds = [type(m) for m in ours.modules() if isinstance(m, bnlab._base._NormBase)]
    assert kinds == [bnlab.BatchNorm2d, bnlab.BatchNorm2d, bnlab.BatchNorm1d]
    assert ours[3][1].momentum is None and ours[6].eps == 1e-3
    assert not ours[1].weight.requires_grad and not ours.training
    torch.testing.assert_close(ours(x), model(x))
    back = bnlab.convert(ours, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back[6]) is nn.BatchNorm1d
    torch.testing.assert_close(back(x), model(x))
    # training continues identically after conversion
    ours.train()
    model.train()
    xt = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(ours(xt), model(xt))
    torch.testing.assert_close(ours[1].running_var, model[1].running_var)


def test_convert_root_module_and_refusals() -> None:
    assert type(bnlab.convert(nn.BatchNorm2d(3))) is bnlab.BatchNorm2d
    cum = bnlab.convert(bnlab.BatchNorm2d(3, running="cumulative"), to="torch")
    assert type(cum) is nn.BatchNorm2d and cum.momentum is None
    with pytest.raises(ValueError, match="layer 1 uses running='window'"):
        bnlab.convert(nn.Sequential(nn.Identity(), bnlab.BatchNorm2d(3, running="window",
                                                                     window_size=2)), to="torch")
    with pytest.raises(ValueError, match="to must be 'bnlab' or 'torch', got 'keras'"):
        bnlab.convert(nn.BatchNorm2d(3), to="keras")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        bnlab.convert("model")


def test_convert_inplace() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    out = bnlab.convert(model, inplace=True)
    assert out is model and type(model[0]) is bnlab.BatchNorm1d


def test_registry_fails_loudly() -> None:
    assert isinstance(bnlab.make_norm("bn", 4, dim=2), bnlab.BatchNorm2d)
    assert bnlab.make_norm("bn-window", 4, dim=1).running == "window"
    with pytest.raises(ValueError, match=r"unknown normaliser 'batchnorm'; valid names: .*bn, "):
        bnlab.make_norm("batchnorm", 4)
    with pytest.raises(ValueError, match="'bn' is already registered"):
        bnlab.register_norm("bn", lambda c, d: nn.Identity())
