"""The seed's Keras CNN, as the seed wrote it, with only its BN-reuse bug fixed.

The seed passes one ``BatchNormalization`` instance after both convolutions; Keras 3 then
fails with ``expected axis -1 of input shape to have value 32, but received input with shape
(None, 11, 11, 64)``. Here each convolution gets its own layer. Everything else is the seed's:
Conv2D(32, 3, relu) - BN - MaxPool - Conv2D(64, 3, relu) - BN - MaxPool - Flatten -
Dense(10, softmax), Adam, batch 128, 10 epochs, validation on the test set.

The data are read from the local IDX files (no download) with bnlab's own IDX reader, loaded
by file path so that this script needs neither torch nor bnlab installed: run it with a
Python that has TensorFlow, e.g. ``/tmp/tfvenv/bin/python bench/seed_keras.py``. It prints one
JSON object: seconds and validation accuracy per epoch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def _idx_module():
    spec = importlib.util.spec_from_file_location("bnlab_idx", ROOT / "src/bnlab/lab/data/idx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(data_dir: Path) -> dict[str, np.ndarray]:
    idx = _idx_module()
    out = {}
    for key, name in FILES.items():
        path = next((p for p in (data_dir / (name + ".gz"), data_dir / name) if p.exists()), None)
        if path is None:
            raise SystemExit(f"{data_dir}: {name}[.gz] not found (apt-get install "
                             "dataset-fashion-mnist, or pass --data-dir)")
        out[key] = idx.read_idx(path)
    out["x_train"] = out["x_train"][..., None].astype("float32") / 255.0  # NHWC, as the seed
    out["x_test"] = out["x_test"][..., None].astype("float32") / 255.0
    return out


def seed_model(keras, bn: bool, reuse_bn: bool = False):
    layers = keras.layers
    bn_layer = layers.BatchNormalization()
    stack = [layers.Input((28, 28, 1)), layers.Conv2D(32, 3, activation="relu")]
    if bn:
        stack.append(bn_layer)
    stack += [layers.MaxPooling2D(), layers.Conv2D(64, 3, activation="relu")]
    if bn:
        # The fix: a second, separate BN layer. --reuse-bn keeps the seed's bug to show it.
        stack.append(bn_layer if reuse_bn else layers.BatchNormalization())
    stack += [layers.MaxPooling2D(), layers.Flatten(), layers.Dense(10, activation="softmax")]
    return keras.Sequential(stack)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--no-bn", action="store_true", help="the same network without BN")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-bn", action="store_true",
                    help="the seed's original bug: one BN layer after both convolutions")
    args = ap.parse_args()

    import tensorflow as tf
    from tensorflow import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    d = load(args.data_dir)
    if args.train_subset:
        n = args.train_subset
        d["x_train"], d["y_train"] = d["x_train"][:n], d["y_train"][:n]

    model = seed_model(keras, bn=not args.no_bn, reuse_bn=args.reuse_bn)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    hist = model.fit(d["x_train"], d["y_train"], batch_size=128, epochs=args.epochs,
                     validation_data=(d["x_test"], d["y_test"]), callbacks=[Clock()], verbose=0)
    print(json.dumps({
        "framework": f"keras {keras.__version__} / tensorflow {tf.__version__}",
        "norm": "none" if args.no_bn else "bn", "epoch_times": times,
        "val_acc": [float(v) for v in hist.history["val_accuracy"]],
        "train_acc": [float(v) for v in hist.history["accuracy"]],
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
