"""Keras conventions converted by name, and torch <-> bnlab model conversion."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
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
    m, steps, n = 0.9, 5, 16
    bn = bnlab.BatchNorm1d(3, **keras.keras_kwargs(momentum=m))
    keras_mean, keras_var = torch.zeros(3), torch.ones(3)
    for _ in range(steps):
        x = torch.randn(n, 3) * 2 + 1
        bn(x)
        keras_mean = m * keras_mean + (1 - m) * x.mean(0)
        keras_var = m * keras_var + (1 - m) * x.var(0, unbiased=False)
    torch.testing.assert_close(bn.running_mean, keras_mean)
    exact = keras.variance_from_keras(keras_var, n, steps=steps, momentum=m)
    torch.testing.assert_close(bn.running_var, exact, rtol=1e-5, atol=1e-6)
    # without steps the initial 1 is corrected too: too large by exactly m**k / (n - 1)
    approx = keras.variance_from_keras(keras_var, n)
    torch.testing.assert_close(approx - bn.running_var, torch.full((3,), m**steps / (n - 1)),
                               rtol=1e-4, atol=1e-6)


def test_variance_from_keras_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="count .* must be an int >= 2, got 1"):
        keras.variance_from_keras(torch.ones(3), 1)
    with pytest.raises(ValueError, match="steps .* must be an int >= 0 or None, got -1"):
        keras.variance_from_keras(torch.ones(3), 4, steps=-1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        keras.variance_from_keras(torch.ones(3), 4, steps=2, momentum=1.5)


def test_load_keras_weights() -> None:
    bn = bnlab.BatchNorm2d(2, **keras.keras_kwargs())
    keras.load_keras_weights(bn, [2.0, 3.0], [0.5, -0.5], [1.0, 2.0], [4.0, 8.0])
    # Keras evaluates with the moving variance as stored: so does the loaded layer
    torch.testing.assert_close(bn.running_var, torch.tensor([4.0, 8.0]))
    torch.testing.assert_close(bn.weight.data, torch.tensor([2.0, 3.0]))
    keras.load_keras_weights(bn, [2.0, 3.0], [0.5, -0.5], [1.0, 2.0], [4.0, 8.0],
                             variance="unbiased", count=5)
    torch.testing.assert_close(bn.running_var, torch.tensor([5.0, 10.0]))
    keras.load_keras_weights(bn, [2.0, 3.0], [0.5, -0.5], [1.0, 2.0], [4.0, 8.0],
                             variance="unbiased", count=5, steps=2, momentum=0.5)
    torch.testing.assert_close(bn.running_var, 0.25 + (torch.tensor([4.0, 8.0]) - 0.25) * 1.25)
    msg = r"moving_mean must have shape \(2,\) for BatchNorm2d, got \(3,\)"
    with pytest.raises(ValueError, match=msg):
        keras.load_keras_weights(bn, [1, 1], [0, 0], [0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match="count/steps are used only with variance='unbiased'"):
        keras.load_keras_weights(bn, [1, 1], [0, 0], [0, 0], [1, 1], count=5)
    with pytest.raises(ValueError, match="variance='unbiased' needs count"):
        keras.load_keras_weights(bn, [1, 1], [0, 0], [0, 0], [1, 1], variance="unbiased")
    with pytest.raises(ValueError, match="variance must be 'keras' or 'unbiased', got 'biased'"):
        keras.load_keras_weights(bn, [1, 1], [0, 0], [0, 0], [1, 1], variance="biased")
    torch_bn = nn.BatchNorm2d(2)  # eps 1e-5, Keras' is 1e-3
    with pytest.raises(ValueError, match=r"has eps=1e-05 but the Keras layer has epsilon=0.001"):
        keras.load_keras_weights(torch_bn, [1, 1], [0, 0], [0, 0], [1, 1])
    keras.load_keras_weights(torch_bn, [1, 1], [0, 0], [0, 0], [3, 3], epsilon=None)
    torch.testing.assert_close(torch_bn.running_var, torch.tensor([3.0, 3.0]))


# --- against real Keras: tests/fixtures/keras_bn.npz, written by bench/keras_fixture.py -------

FIXTURE = Path(__file__).parent / "fixtures" / "keras_bn.npz"


@pytest.fixture(scope="module")
def kfix() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _bn_kwargs(f, name: str) -> dict:
    return keras.keras_kwargs(momentum=float(f[f"{name}_momentum"]),
                              epsilon=float(f[f"{name}_epsilon"]))


def _keras_model_in_bnlab(f, dtype: torch.dtype, **load_kwargs) -> nn.Module:
    """The fixture's Keras model, rebuilt in torch/bnlab with its trained weights."""
    t = partial(torch.as_tensor, dtype=dtype)
    conv, dense, head = nn.Conv2d(2, 4, 3), nn.Linear(4, 6), nn.Linear(6, 3)
    bn1 = bnlab.BatchNorm2d(4, **_bn_kwargs(f, "bn1"))
    bn2 = bnlab.BatchNorm1d(6, **_bn_kwargs(f, "bn2"))
    model = nn.Sequential(conv, bn1, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          dense, bn2, nn.ReLU(), head).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(t(f["conv_kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
        conv.bias.copy_(t(f["conv_bias"]))
        for lin, name in ((dense, "dense"), (head, "head")):
            lin.weight.copy_(t(f[f"{name}_kernel"]).T)  # (in, out) -> (out, in)
            lin.bias.copy_(t(f[f"{name}_bias"]))
    for bn, name in ((bn1, "bn1"), (bn2, "bn2")):
        keras.load_keras_weights(
            bn, *(f[f"{name}_{w}"] for w in ("gamma", "beta", "moving_mean", "moving_variance")),
            epsilon=float(f[f"{name}_epsilon"]), **load_kwargs)
    return model.eval()


def _eval(model: nn.Module, f, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(f["x_eval"], dtype=dtype).permute(0, 3, 1, 2))  # NHWC


def test_keras_fixture_eval_outputs_equal_keras(kfix) -> None:
    out64 = _eval(_keras_model_in_bnlab(kfix, torch.float64), kfix, torch.float64)
    out32 = _eval(_keras_model_in_bnlab(kfix, torch.float32), kfix, torch.float32)
    want64, want32 = torch.from_numpy(kfix["y_eval64"]), torch.from_numpy(kfix["y_eval32"])
    assert out64.shape == want64.shape == (64, 3)
    torch.testing.assert_close(out64, want64, rtol=0, atol=1e-6)
    torch.testing.assert_close(out32, want32, rtol=0, atol=1e-5)
    assert torch.equal(out64.argmax(1), want64.argmax(1))


def test_keras_fixture_detects_the_unbiased_variance(kfix) -> None:
    # the old conversion (n / (n - 1) on the moving variance) is visibly not Keras
    n1, n2 = int(kfix["bn1_count"]), int(kfix["bn2_count"])
    model = _keras_model_in_bnlab(kfix, torch.float64)
    for bn, n, name in ((model[1], n1, "bn1"), (model[6], n2, "bn2")):
        keras.load_keras_weights(
            bn, *(kfix[f"{name}_{w}"] for w in ("gamma", "beta", "moving_mean",
                                                 "moving_variance")),
            epsilon=float(kfix[f"{name}_epsilon"]), variance="unbiased", count=n)
    out = _eval(model, kfix, torch.float64)
    assert (out - torch.from_numpy(kfix["y_eval64"])).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["bn1", "bn2"])
def test_keras_fixture_moving_statistics_after_n_steps(kfix, name: str) -> None:
    steps, count = int(kfix["steps"]), int(kfix[f"{name}_count"])
    inputs = torch.from_numpy(kfix[f"{name}_inputs"]).double()
    assert inputs.shape[0] == steps == 20
    if inputs.dim() == 5:  # (steps, N, H, W, C) -> (steps, N, C, H, W)
        inputs = inputs.permute(0, 1, 4, 2, 3)
    channels = inputs.shape[2]
    bn = (bnlab.BatchNorm2d if inputs.dim() == 5 else bnlab.BatchNorm1d)(
        channels, **_bn_kwargs(kfix, name), dtype=torch.float64)
    bn.train()
    for batch in inputs:
        assert batch.numel() // channels == count
        bn(batch)
    keras_mean = torch.from_numpy(kfix[f"{name}_replay64_moving_mean"])
    keras_var = torch.from_numpy(kfix[f"{name}_replay64_moving_variance"])
    momentum = float(kfix[f"{name}_momentum"])
    # the float64 replay is Keras' arithmetic; the float32 training run agrees with it
    torch.testing.assert_close(torch.from_numpy(kfix[f"{name}_moving_variance"]).double(),
                               keras_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(bn.running_mean, keras_mean, rtol=1e-6, atol=0)
    exact = keras.variance_from_keras(keras_var, count, steps=steps, momentum=momentum)
    torch.testing.assert_close(bn.running_var, exact, rtol=1e-6, atol=0)
    # ignoring the initial 1 (steps=None) is off by m**k / (n - 1), far above 1e-6
    approx = keras.variance_from_keras(keras_var, count)
    torch.testing.assert_close(approx - bn.running_var,
                               torch.full_like(keras_var, momentum**steps / (count - 1)),
                               rtol=1e-6, atol=0)


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


@pytest.mark.parametrize("act, module", [("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU),
                                         ("elu", nn.ELU)])
def test_convert_to_torch_splits_a_fused_layer_into_bn_and_activation(act, module) -> None:
    torch.manual_seed(0)
    kw = {"negative_slope": 0.2} if act == "leaky_relu" else {"alpha": 0.5} if act == "elu" else {}
    fused = bnlab.BatchNormAct2d(3, act=act, **kw)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), fused)
    for _ in range(2):
        model(torch.randn(8, 1, 6, 6))
    back = bnlab.convert(model, to="torch")
    assert type(back[1]) is nn.Sequential and type(back[1][0]) is nn.BatchNorm2d
    assert type(back[1][1]) is module
    assert not any(isinstance(m, bnlab.NormBase) for m in back.modules())
    assert type(model[1]) is bnlab.BatchNormAct2d  # the input is untouched
    x = torch.randn(4, 1, 6, 6)
    for mode in (False, True):
        model.train(mode), back.train(mode)
        torch.testing.assert_close(back(x), model(x))
    torch.testing.assert_close(back[1][0].running_var, fused.running_var)
    # identity is plain BN: no Sequential, the state-dict keys stay
    plain = bnlab.convert(bnlab.BatchNormAct2d(3, act="identity"), to="torch")
    assert type(plain) is nn.BatchNorm2d


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
