"""Write the Keras fixture that ``tests/test_keras_convert.py`` checks bnlab against.

A small Keras model with two ``BatchNormalization`` layers (one after a 2-D convolution, one
after a dense layer) is trained for ``--steps`` steps with a plain ``GradientTape`` loop, one
``model(x, training=True)`` call per step, so that each BN layer's moving statistics are
updated exactly ``steps`` times from Keras' initial values (mean 0, variance 1)::

    Input(4, 4, 2) - Conv2D(4, 3) - BN(momentum 0.9) - ReLU - GlobalAveragePooling2D
                   - Dense(6) - BN(momentum 0.99) - ReLU - Dense(3)

The fixture (``tests/fixtures/keras_bn.npz``) holds:

* every weight after training (``conv_kernel`` ... ``bn2_moving_variance``), float32 as
  Keras stores them, and the BN settings (momenta, epsilon);
* ``x_eval`` and Keras' evaluation outputs ``model(x_eval, training=False)``: ``y_eval32``
  from the trained float32 model, ``y_eval64`` from a float64 copy with the same weights;
* ``bn1_inputs`` / ``bn2_inputs``: what entered each BN layer at every training step (recorded
  in the same forward pass that updated the moving statistics), ``bn1_count`` / ``bn2_count``
  (values per channel in one batch) and ``steps``;
* ``bn1_replay64_*`` / ``bn2_replay64_*``: the moving statistics of a fresh float64 Keras BN
  layer after ``steps`` training calls on those recorded inputs.

It needs TensorFlow but neither torch nor bnlab: run it with a Python that has TensorFlow,
e.g. ``/work/tfvenv/bin/python bench/keras_fixture.py`` (``python -m venv /work/tfvenv &&
/work/tfvenv/bin/pip install tensorflow-cpu``). It prints one JSON line describing the fixture.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests/fixtures/keras_bn.npz"


def build(keras, dtype: str = "float32"):
    """The fixture's model, and a model that also returns what enters each BN layer."""
    layers = keras.layers
    inp = layers.Input((4, 4, 2), dtype=dtype)
    conv = layers.Conv2D(4, 3, name="conv", dtype=dtype)(inp)
    bn1 = layers.BatchNormalization(momentum=0.9, name="bn1", dtype=dtype)
    h = layers.ReLU(dtype=dtype)(bn1(conv))
    h = layers.GlobalAveragePooling2D(dtype=dtype)(h)
    dense = layers.Dense(6, name="dense", dtype=dtype)(h)
    bn2 = layers.BatchNormalization(name="bn2", dtype=dtype)  # Keras' defaults: 0.99, 1e-3
    h = layers.ReLU(dtype=dtype)(bn2(dense))
    out = layers.Dense(3, name="head", dtype=dtype)(h)
    model = keras.Model(inp, out)
    probe = keras.Model(inp, [out, conv, dense])
    return model, probe


WEIGHTS = {
    "conv": ("kernel", "bias"),
    "bn1": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
    "bn2": ("gamma", "beta", "moving_mean", "moving_variance"),
    "head": ("kernel", "bias"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval", type=int, default=64, help="evaluation inputs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import tensorflow as tf
    from tensorflow import keras

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # Inputs with a non-zero mean and a scale far from 1, so that the moving statistics move.
    x_train = (rng.standard_normal((args.steps, args.batch, 4, 4, 2)) * 1.5 + 0.7)
    x_eval = rng.standard_normal((args.eval, 4, 4, 2)) * 1.5 + 0.7
    # Labels from a fixed rule on the inputs, so that the trained model predicts every class.
    rule = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    y_train = (x_train.mean(axis=(2, 3)) @ rule + [0.0, 0.7, 0.5]).argmax(-1)
    x_train, x_eval = x_train.astype("float32"), x_eval.astype("float32")

    model, probe = build(keras)
    opt = keras.optimizers.Adam(0.02)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    bn1_inputs, bn2_inputs = [], []
    for step in range(args.steps):
        with tf.GradientTape() as tape:
            out, conv, dense = probe(x_train[step], training=True)
            loss = loss_fn(y_train[step], out)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        bn1_inputs.append(conv.numpy())
        bn2_inputs.append(dense.numpy())

    fixture: dict[str, np.ndarray] = {}
    for layer_name, names in WEIGHTS.items():
        layer = model.get_layer(layer_name)
        for name, var in zip(names, layer.weights, strict=True):
            assert var.path.endswith(name), (var.path, name)
            fixture[f"{layer_name}_{name}"] = np.asarray(var.numpy())
    for layer_name in ("bn1", "bn2"):
        layer = model.get_layer(layer_name)
        fixture[f"{layer_name}_momentum"] = np.float64(layer.momentum)
        fixture[f"{layer_name}_epsilon"] = np.float64(layer.epsilon)

    fixture["x_eval"] = x_eval
    fixture["y_eval32"] = np.asarray(model(x_eval, training=False))
    model64, _ = build(keras, "float64")
    model64.set_weights([w.astype("float64") for w in model.get_weights()])
    fixture["y_eval64"] = np.asarray(model64(x_eval.astype("float64"), training=False))

    # BN inputs are NHWC for the convolution; the count is the values per channel in a batch.
    fixture["bn1_inputs"] = np.stack(bn1_inputs)
    fixture["bn2_inputs"] = np.stack(bn2_inputs)
    fixture["bn1_count"] = np.int64(args.batch * 2 * 2)
    fixture["bn2_count"] = np.int64(args.batch)
    fixture["steps"] = np.int64(args.steps)

    # The same updates replayed in float64 by fresh Keras BN layers: Keras' own arithmetic,
    # without float32 rounding, for the 1e-6 relative check.
    for layer_name, inputs in (("bn1", bn1_inputs), ("bn2", bn2_inputs)):
        src = model.get_layer(layer_name)
        bn = keras.layers.BatchNormalization(momentum=src.momentum, epsilon=src.epsilon,
                                             dtype="float64")
        for batch in inputs:
            bn(batch.astype("float64"), training=True)
        fixture[f"{layer_name}_replay64_moving_mean"] = np.asarray(bn.moving_mean.numpy())
        fixture[f"{layer_name}_replay64_moving_variance"] = np.asarray(
            bn.moving_variance.numpy())
        # sanity: the float32 training run and the float64 replay agree
        np.testing.assert_allclose(fixture[f"{layer_name}_moving_variance"],
                                   fixture[f"{layer_name}_replay64_moving_variance"],
                                   rtol=1e-5)

    fixture["versions"] = np.array(f"keras {keras.__version__} / tensorflow {tf.__version__}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **fixture)
    print(json.dumps({
        "out": str(args.out), "bytes": args.out.stat().st_size, "steps": args.steps,
        "batch": args.batch, "bn1_count": int(fixture["bn1_count"]),
        "bn2_count": int(fixture["bn2_count"]), "versions": str(fixture["versions"]),
        "eval_classes": np.bincount(fixture["y_eval64"].argmax(1), minlength=3).tolist(),
    }))


if __name__ == "__main__":
    main()
