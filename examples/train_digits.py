"""Train a small network with cbn.BatchNormalization on scikit-learn's digits.

    python examples/train_digits.py                 # 20 epochs, about 97% test accuracy
    python examples/train_digits.py --epochs 5 --quiet
    OMP_NUM_THREADS=1 mpiexec -n 2 python examples/train_digits.py --distributed

The network is Dense(64→128) → BatchNormalization → ReLU → Dense(128→10) →
softmax cross-entropy, trained with SGD with momentum. Everything except the batch
normalization is plain NumPy, float32. The 8x8 digit images ship with
scikit-learn, so nothing is downloaded. The test accuracy is measured with
``training=False``: the layer normalizes with its moving statistics, so each
prediction depends on its own image only, not on the rest of the batch.

With ``--distributed`` (under ``mpiexec``, mpi4py from ``pip install "cbn[mpi]"``) every
rank takes its slice of each batch: the batch normalization statistics are those of
the whole batch (``synchronized=True``, one allreduce per forward and per backward),
and the weight gradients are summed over the ranks before each update, so every rank
trains the same network as one process would on the whole batch.
"""

from __future__ import annotations

import argparse
import sys
import time

import cbn
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HIDDEN = 128
LEARNING_RATE = 0.05
MOMENTUM = 0.9
# An epoch is only 23 steps at the default batch size. With Keras' default BN momentum
# (0.99) the moving statistics would still be half their initial values after 3 epochs.
BN_MOMENTUM = 0.9


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits split 80/20 (stratified), standardized with the training set's statistics."""
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images.astype(np.float32), labels, test_size=0.2, stratify=labels, random_state=seed
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are blank in every training image
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


class Network:
    """Dense → BatchNormalization → ReLU → Dense, with a hand-written backward pass."""

    def __init__(self, n_inputs: int, n_hidden: int, n_classes: int, rng: np.random.Generator,
                 allreduce=None):
        def he_normal(fan_in: int, fan_out: int) -> np.ndarray:
            return (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(
                np.float32
            )

        # No bias before batch normalization: its mean is subtracted, and beta shifts instead.
        self.w1 = he_normal(n_inputs, n_hidden)
        self.bn = cbn.BatchNormalization(momentum=BN_MOMENTUM, synchronized=allreduce is not None,
                                         allreduce=allreduce)
        self.bn.build((None, n_hidden))
        self.w2 = he_normal(n_hidden, n_classes)
        self.b2 = np.zeros(n_classes, np.float32)

    @property
    def weights(self) -> list[np.ndarray]:
        """The trainable arrays themselves (updated in place), gamma and beta included."""
        return [self.w1, *self.bn.trainable_weights, self.w2, self.b2]

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Logits; a training call keeps what the backward pass needs."""
        normalized = self.bn(x @ self.w1, training=training)
        hidden = np.maximum(normalized, 0.0)
        if training:
            self._saved = (x, normalized > 0, hidden)
        return hidden @ self.w2 + self.b2

    def backward(self, d_logits: np.ndarray) -> list[np.ndarray]:
        """Gradients of the last training forward, aligned with :attr:`weights`."""
        x, active, hidden = self._saved
        d_normalized = (d_logits @ self.w2.T) * active
        d_pre = self.bn.backward(d_normalized)  # sets bn.gradients = [dgamma, dbeta]
        # Sums over the batch in float64, so a batch split over ranks gives the same
        # gradients as one process to the last bits.
        x, hidden, d_logits = (a.astype(np.float64) for a in (x, hidden, d_logits))
        return [x.T @ d_pre, *self.bn.gradients, hidden.T @ d_logits, d_logits.sum(axis=0)]


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, batch_size: int
) -> tuple[float, np.ndarray]:
    """Summed cross-entropy of these rows and the gradient of the batch's mean loss
    (over ``batch_size`` rows, possibly spread over ranks) with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(-np.log(probs[rows, labels] + 1e-12).sum())
    probs[rows, labels] -= 1.0
    return loss, probs / batch_size


class SGDMomentum:
    """``v ← μ·v − lr·g; w ← w + v``, on the weight arrays in place."""

    def __init__(self, learning_rate: float, momentum: float):
        self.learning_rate, self.momentum = learning_rate, momentum
        self.velocities: list[np.ndarray] | None = None

    def apply(self, weights: list[np.ndarray], gradients: list[np.ndarray]) -> None:
        if self.velocities is None:
            self.velocities = [np.zeros_like(w) for w in weights]
        for w, g, v in zip(weights, gradients, self.velocities, strict=True):
            v *= self.momentum
            v -= self.learning_rate * g
            w += v


def train_step(net: Network, optimizer: SGDMomentum, x: np.ndarray, labels: np.ndarray,
               batch_size: int, allreduce=None) -> tuple[float, int]:
    """One update from this rank's rows of a batch of ``batch_size`` rows; returns the
    batch's summed loss and number of correct guesses."""
    logits = net.forward(x, training=True)
    loss, d_logits = softmax_cross_entropy(logits, labels, batch_size)
    gradients = net.backward(d_logits)
    hits = int((logits.argmax(axis=1) == labels).sum())
    if allreduce is not None:
        # One collective: every rank's gradients, loss and hits summed.
        flat = np.concatenate([g.ravel() for g in gradients] + [np.array([loss, hits])])
        flat = flat.astype(np.float64)
        summed = allreduce(flat)
        flat = flat if summed is None else summed
        sizes = np.cumsum([g.size for g in gradients])
        gradients = [part.reshape(g.shape).astype(g.dtype)
                     for part, g in zip(np.split(flat[:-2], sizes[:-1]), gradients, strict=True)]
        loss, hits = float(flat[-2]), int(flat[-1])
    optimizer.apply(net.weights, gradients)
    return loss, hits


def accuracy(net: Network, x: np.ndarray, labels: np.ndarray) -> float:
    return float((net.forward(x, training=False).argmax(axis=1) == labels).mean())


def progress(epoch: int, epochs: int, done: int, total: int, loss: float, acc: float) -> str:
    width = 30
    filled = width * done // total
    bar = "#" * filled + "-" * (width - filled)
    return f"\repoch {epoch}/{epochs} [{bar}] loss {loss:.3f} acc {acc:.3f}"


def train(net: Network, x: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int,
          rng: np.random.Generator, quiet: bool = False, rank: int = 0, ranks: int = 1,
          allreduce=None) -> None:
    """Shuffled mini-batch epochs with a progress bar per epoch (redrawn after every
    batch on a terminal; only its final state when the output is a file or pipe). With
    several ranks, rank r trains on the r-th of ``ranks`` slices of each batch (every
    rank draws the same shuffle from the same seed)."""
    optimizer = SGDMomentum(LEARNING_RATE, MOMENTUM)
    redraw = not quiet and sys.stdout.isatty()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        loss_sum, correct, seen = 0.0, 0, 0
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            mine = np.array_split(batch, ranks)[rank]
            loss, hits = train_step(net, optimizer, x[mine], labels[mine], len(batch), allreduce)
            loss_sum += loss
            correct += hits
            seen += len(batch)
            if redraw or (not quiet and seen == len(order)):
                bar = progress(epoch, epochs, seen, len(order), loss_sum / seen, correct / seen)
                print(bar, end="", flush=True)
        if not quiet:
            print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per step (the global batch with --distributed)")
    p.add_argument("--seed", type=int, default=0, help="data split, initial weights, shuffling")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the result")
    p.add_argument("--distributed", action="store_true",
                   help="split each batch over the MPI ranks (run under mpiexec)")
    p.add_argument("--stats-out", metavar="FILE",
                   help="write the moving statistics and the test accuracy (.npz)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size take positive integers")
    return args


def main(argv: list[str] | None = None) -> float:
    """Train, print the test accuracy and return it."""
    args = parse_args(argv)
    rank, ranks, allreduce = 0, 1, None
    if args.distributed:
        from cbn.distributed import MPIAllreduce

        allreduce = MPIAllreduce()
        rank, ranks = allreduce.comm.Get_rank(), allreduce.comm.Get_size()
    rng = np.random.default_rng(args.seed)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    net = Network(x_train.shape[1], HIDDEN, 10, rng, allreduce)
    start = time.perf_counter()
    train(net, x_train, y_train, args.epochs, args.batch_size, rng, args.quiet or rank > 0,
          rank, ranks, allreduce)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(net, x_test, y_test)
    if rank == 0:
        where = f" on {ranks} ranks" if args.distributed else ""
        print(f"test accuracy {test_accuracy:.4f} on {len(y_test)} images (moving statistics); "
              f"trained in {seconds:.1f} s{where}")
        if args.stats_out:
            np.savez(args.stats_out, moving_mean=net.bn.moving_mean,
                     moving_variance=net.bn.moving_variance, accuracy=test_accuracy)
    return test_accuracy


if __name__ == "__main__":
    main()
