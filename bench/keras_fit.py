"""``model.fit`` step time of a small CNN: keras.layers.BatchNormalization against
cbn.keras.BatchNormalization, on each training Keras backend.

    python bench/keras_fit.py                       # jax, tensorflow, torch; the real run
    python bench/keras_fit.py --steps 2 --repeats 1 # a smoke run

Each backend runs in its own process (Keras picks its backend at import). In it, the two
models (same architecture and weights) are compiled and warmed up, then timed alternately:
``repeats`` rounds of ``steps`` ``train_on_batch`` calls each; the table gives the median
time per step and the speed-up (Keras' time / cbn's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def build_model(keras, norm_cls, shape, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(shape[1:]),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        norm_cls(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(64, 3, padding="same", use_bias=False),
        norm_cls(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def measure(args) -> dict[str, float]:
    """In a process whose KERAS_BACKEND is set: median seconds per step of each layer."""
    import cbn.keras
    import keras
    import numpy as np

    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, 10, shape[0])
    models = {}
    for label, cls in (("keras", keras.layers.BatchNormalization),
                       ("cbn", cbn.keras.BatchNormalization)):
        model = build_model(keras, cls, shape)
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
        models[label] = model
    times = {label: [] for label in models}
    for _ in range(args.repeats):
        for label, model in models.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(x, y)
            times[label].append((time.perf_counter() - start) / args.steps)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 28, 28, 1],
                        help="input batch shape, channels last (default 64 28 28 1)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per layer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    print("| backend | keras BN ms/step | cbn.keras ms/step | speed-up |")
    print("| --- | --- | --- | --- |")
    forwarded = ["--shape", *map(str, args.shape), "--steps", str(args.steps),
                 "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    for backend in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run([sys.executable, __file__, "--worker", *forwarded], env=env,
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"| {backend} | failed: {run.stderr.strip().splitlines()[-1:]} | | |")
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"| {backend} | {result['keras'] * 1e3:.2f} | {result['cbn'] * 1e3:.2f} | "
              f"{result['keras'] / result['cbn']:.2f}x |")


if __name__ == "__main__":
    main()
