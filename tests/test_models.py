"""The experiment models: shapes, separate norm layers, placement and the norm registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.lab.models import (
    build_model,
    ioffe_mlp,
    mnist1d_cnn,
    mnist1d_mlp,
    small_cnn,
    small_resnet,
)


def test_small_cnn_layout_matches_the_tutorial():
    m = small_cnn("bn")
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d", "Conv2d", "ReLU",
                     "BatchNorm2d", "MaxPool2d", "Flatten", "Linear"]
    assert [m[0].out_channels, m[4].out_channels] == [32, 64]
    assert m[2] is not m[6] and (m[2].num_features, m[6].num_features) == (32, 64)
    assert m[9].in_features == 64 * 5 * 5
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # The Keras model has 34,826 trainable weights besides BN's 2*(32+64) = 192 gamma/beta.
    n = sum(p.numel() for p in m.parameters())
    assert n == 34826 + 192


def test_small_cnn_placement_before():
    m = small_cnn("bn", placement="before")
    assert [type(x).__name__ for x in m][:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    with pytest.raises(ValueError, match="placement must be 'after'.*got 'middle'"):
        small_cnn("bn", placement="middle")


@pytest.mark.parametrize("norm", ["none", "bn", "bn-window", "bn-running", "gn", "ln", "torch-bn"])
def test_every_norm_builds_and_trains_one_step(norm):
    torch.manual_seed(0)
    m = small_cnn(norm)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())


def test_norm_kinds_are_what_the_name_says():
    assert isinstance(small_cnn("bn-window")[2], bnlab.BatchNorm2d)
    assert small_cnn("bn-window")[2].running == "window"
    assert small_cnn("bn-running")[2].normalize_with == "running"
    assert isinstance(small_cnn("torch-bn")[2], nn.BatchNorm2d)
    assert isinstance(small_cnn("none")[2], nn.Identity)


def test_unknown_norm_fails_loudly():
    with pytest.raises(ValueError, match="unknown normaliser 'batchnorm'; valid names: .*bn"):
        small_cnn("batchnorm")
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid names: ioffe_mlp"):
        build_model("vgg")


def test_ioffe_mlp_bn_before_each_sigmoid():
    m = ioffe_mlp("bn")
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Flatten"] + ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]
    assert [x.out_features for x in m if isinstance(x, nn.Linear)] == [100, 100, 100, 10]
    assert m(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    std = m[1].weight.std().item()
    assert 0.09 < std < 0.11  # the small Gaussian init, not PyTorch's uniform


def test_mnist1d_models():
    x = torch.randn(6, 40)
    assert mnist1d_mlp()(x).shape == (6, 10)
    cnn = mnist1d_cnn()
    assert cnn(x).shape == (6, 10) and cnn.linear.in_features == 125
    assert torch.equal(cnn(x), cnn(x.unsqueeze(1)))
    bn = mnist1d_cnn("bn")
    assert sum(isinstance(m, bnlab.BatchNorm1d) for m in bn.modules()) == 3


def test_small_resnet():
    m = small_resnet("bn")
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    n_bn = sum(isinstance(x, bnlab.BatchNorm2d) for x in m.modules())
    assert n_bn == 1 + 3 * 2 + 2  # stem, two per block, two projection shortcuts
    assert not any(isinstance(x, bnlab.BatchNorm2d) for x in small_resnet("none").modules())


def test_old_model_name_still_builds_with_a_one_line_note(capsys):
    import bnlab.lab.models as models
    from bnlab.lab.train import TrainConfig

    models._noted.discard("seed_cnn")
    assert models.seed_cnn is small_cnn  # the old import keeps working
    assert TrainConfig(model="seed_cnn").model == "small_cnn"
    assert [type(x).__name__ for x in build_model("seed_cnn", "bn")] == \
        [type(x).__name__ for x in small_cnn("bn")]
    err = capsys.readouterr().err
    assert err == "bnlab: note: model 'seed_cnn' is now called 'small_cnn'; the old name still " \
                  "works\n"  # once per process
    assert "seed_cnn" not in models.model_names()


def test_placement_reaches_the_small_cnn_through_the_config():
    from bnlab.lab.train import TrainConfig
    from bnlab.lab.train.loop import build_net

    net = build_net(TrainConfig(model="small_cnn", norm="bn", placement="before"))
    assert [type(x).__name__ for x in net][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
