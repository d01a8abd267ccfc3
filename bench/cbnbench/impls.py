"""Every implementation the benchmark times, as a table of columns and one adapter
per library (cbn, its peers, NumPy, the compiled memory-bound limit).

An adapter imports its library once (or says why it cannot), sets its thread
count, and *binds* a case: it returns no-argument callables keyed by column,
with every conversion (tensors, sessions, layers) done beforehand, so that
only the call itself is timed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cases import EPSILON, CaseData
from .sweep import SweepUnavailable, build_sweep

Call = Callable[[], object]


class Unavailable(Exception):
    """A library that cannot run; the message says why."""


@dataclass(frozen=True)
class Column:
    """One timed implementation. ``output``: ``in-place`` writes over the input,
    ``out=`` into a buffer allocated once, ``fresh`` allocates its result every
    call. ``baseline``: the cbn column a peer's speed-up is taken against (the
    cbn call doing the same job, with the same kind of output)."""

    key: str
    library: str
    output: str
    doc: str
    baseline: str | None = None


COLUMNS: tuple[Column, ...] = (
    Column("lim-ip", "limit", "in-place",
           "memory-bound limit: compiled `y = a*x + b` sweep over the tensor, in place"),
    Column("lim-out", "limit", "out=",
           "the same sweep into a preallocated buffer (infer and train rows); backward rows: "
           "the two-input sweep `z = a*x + b*y` (x and dy into the buffer), the traffic of dx"),
    Column("lim-nt", "limit", "out=",
           "the out-of-place sweep with non-temporal (streaming) stores, which do not read "
           "the output's cache lines first: the real ceiling out of place above cache sizes"),
    Column("cbn-ip", "cbn", "in-place",
           "`cbn.ops.batch_normalization(x, ..., out=x)` (infer) / "
           "`cbn.ops.batch_norm_train(x, ..., out=x)` (train)"),
    Column("cbn-out", "cbn", "out=",
           "`cbn.ops.batch_normalization` (infer) / `cbn.ops.batch_norm_train` (train) / "
           "`cbn.ops.batch_norm_backward(dy, x, mean, var, training=True)` (backward: dx, "
           "dgamma, dbeta) with a preallocated `out=`"),
    Column("cbn-new", "cbn", "fresh", "the same calls without `out=` (a new array each call)"),
    Column("cbn-layer", "cbn", "fresh",
           "`cbn.BatchNormalization` layer call, `training=False` / `True`; backward: "
           "`layer.backward(dy)` after a training call (dx, and dgamma, dbeta in "
           "`layer.gradients`)"),
    Column("torch", "torch", "fresh",
           "`torch.nn.functional.batch_norm`, `training=False` / `True` (no running stats); "
           "backward: `torch.autograd.grad` of a training call's output with respect to input, "
           "weight and bias (fresh gradients), on a graph recorded once and retained; "
           "NCHW/NC rows: contiguous tensor, NHWC rows: channels_last view; no copies",
           baseline="cbn-new"),
    Column("ort", "onnxruntime", "out=",
           "ONNX Runtime, one-node BatchNormalization model, IO binding into a preallocated "
           "output; inference only; channels-first only (no NHWC rows)", baseline="cbn-out"),
    Column("tf", "tensorflow", "fresh",
           "`tf.nn.batch_normalization` (train: after `tf.nn.moments`), eager; "
           "not on backward rows",
           baseline="cbn-new"),
    Column("keras", "keras", "fresh",
           "`keras.layers.BatchNormalization` layer call (TensorFlow backend), eager; "
           "not on backward rows",
           baseline="cbn-layer"),
    *(Column(f"prev-{kind}", "cbn-previous", output,
             f"`--against`'s cbn build, the same call as `cbn-{kind}`", baseline=f"cbn-{kind}")
      for kind, output in (("ip", "in-place"), ("out", "out="), ("new", "fresh"),
                           ("layer", "fresh"))),
    Column("numpy", "numpy", "fresh",
           "NumPy reference: `x*a + b` (train: `x.mean`, `x.var` first); always 1 thread; "
           "not on backward rows",
           baseline="cbn-new"),
)
COLUMN = {c.key: c for c in COLUMNS}
PEERS = tuple(c for c in COLUMNS if c.baseline is not None)


class Library:
    """Adapter base: no threads to set, nothing to bind."""

    name = ""

    def version(self) -> str:
        return ""

    def set_threads(self, n: int) -> None:
        pass

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        return {}

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        """Labelled inference calls for the per-call overhead table (tiny input)."""
        return {}


# ---------------------------------------------------------------------------- cbn


class CbnLibrary(Library):
    name = "cbn"

    def __init__(self) -> None:
        import cbn

        self.cbn = cbn

    def version(self) -> str:
        return self.cbn.__version__

    def set_threads(self, n: int) -> None:
        self.cbn.set_num_threads(n)

    def _layer(self, data: CaseData):
        layer = self.cbn.BatchNormalization(axis=data.case.channel_axis, epsilon=EPSILON)
        layer.build(data.case.shape)
        layer.set_weights([data.gamma, data.beta, data.mean, data.variance])
        return layer

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        return self._calls(data, mode)

    def _calls(self, data: CaseData, mode: str) -> dict[str, Call]:
        """The timed calls, keyed by the ``cbn-*`` columns."""
        ops, x, out, layer = self.cbn.ops, data.x, data.out, self._layer(data)
        kw = {"gamma": data.gamma, "beta": data.beta, "axis": data.case.channel_axis,
              "epsilon": EPSILON}
        if mode == "backward":
            dy, (mean, variance) = data.dy, data.batch_statistics
            del kw["beta"]
            layer(x, training=True)  # the call layer.backward differentiates
            return {
                "cbn-out": lambda: ops.batch_norm_backward(dy, x, mean, variance, out=out, **kw),
                "cbn-new": lambda: ops.batch_norm_backward(dy, x, mean, variance, **kw),
                "cbn-layer": lambda: layer.backward(dy),
            }
        if mode == "infer":
            m, v = data.mean, data.variance
            return {
                "cbn-ip": lambda: ops.batch_normalization(x, m, v, out=x, **kw),
                "cbn-out": lambda: ops.batch_normalization(x, m, v, out=out, **kw),
                "cbn-new": lambda: ops.batch_normalization(x, m, v, **kw),
                "cbn-layer": lambda: layer(x, training=False),
            }
        return {
            "cbn-ip": lambda: ops.batch_norm_train(x, out=x, **kw),
            "cbn-out": lambda: ops.batch_norm_train(x, out=out, **kw),
            "cbn-new": lambda: ops.batch_norm_train(x, **kw),
            "cbn-layer": lambda: layer(x, training=True),
        }

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        calls = self._calls(data, "infer")
        return {
            "cbn.ops.batch_normalization": calls["cbn-new"],
            "cbn.ops.batch_normalization(out=y)": calls["cbn-out"],
            "cbn.BatchNormalization (training=False)": calls["cbn-layer"],
        }


class PreviousCbnLibrary(CbnLibrary):
    """Another build of cbn (``--against``: the directory of its installed ``cbn``
    package), imported under its own name beside the current one, so that the two
    builds are sampled interleaved in one process. Its columns are ``prev-*``."""

    name = "cbn-previous"

    def __init__(self, package_dir: Path) -> None:
        init = package_dir / "__init__.py"
        if not init.is_file():
            raise Unavailable(f"--against {package_dir}: no cbn package there (no __init__.py)")
        spec = importlib.util.spec_from_file_location(
            "cbn_previous", init, submodule_search_locations=[str(package_dir)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["cbn_previous"] = module
        spec.loader.exec_module(module)
        self.cbn = module
        self.package_dir = package_dir

    def version(self) -> str:
        return f"{self.cbn.__version__} from {self.package_dir}"

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        return {key.replace("cbn-", "prev-"): call
                for key, call in super().bind(data, mode).items()}

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        return {f"previous {label}": call
                for label, call in super().overhead_calls(data).items()}


# -------------------------------------------------------------------------- torch


class TorchLibrary(Library):
    name = "torch"

    def __init__(self) -> None:
        import torch
        import torch.nn.functional

        self.torch = torch
        self.batch_norm = torch.nn.functional.batch_norm
        torch.set_grad_enabled(False)  # inference-style calls: no autograd recording

    def version(self) -> str:
        return self.torch.__version__

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)

    def _input(self, data: CaseData, array: np.ndarray | None = None):
        """A view of ``x`` (or ``array``) with channels at dim 1: NHWC becomes a
        channels_last tensor."""
        t = self.torch.from_numpy(data.x if array is None else array)
        return t.permute(0, 3, 1, 2) if data.case.layout == "NHWC" else t

    def _params(self, data: CaseData) -> dict:
        return {k: self.torch.from_numpy(v) for k, v in data.params().items()}

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        bn, t, p = self.batch_norm, self._input(data), self._params(data)
        if mode == "backward":
            return {"torch": self._backward(data, t, p)}
        if mode == "infer":
            return {"torch": lambda: bn(t, p["mean"], p["variance"], p["gamma"], p["beta"],
                                        training=False, eps=EPSILON)}
        return {"torch": lambda: bn(t, None, None, p["gamma"], p["beta"],
                                    training=True, eps=EPSILON)}

    def _backward(self, data: CaseData, t, p: dict) -> Call:
        """The backward of a training call alone: the graph is recorded once (gradients
        are off elsewhere in this benchmark) and kept for repeated calls; ``grad``
        returns fresh gradients, so nothing accumulates between calls."""
        torch = self.torch
        with torch.enable_grad():
            inputs = (t.detach().requires_grad_(), p["gamma"].clone().requires_grad_(),
                      p["beta"].clone().requires_grad_())
            y = self.batch_norm(inputs[0], None, None, inputs[1], inputs[2],
                                training=True, eps=EPSILON)
        dy = self._input(data, data.dy)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        t, p = self._input(data), self._params(data)
        module = self.torch.nn.BatchNorm1d(data.case.channels, eps=EPSILON).eval()
        module.running_mean.copy_(p["mean"])
        module.running_var.copy_(p["variance"])
        module.weight.copy_(p["gamma"])
        module.bias.copy_(p["beta"])
        return {
            "torch F.batch_norm": self.bind(data, "infer")["torch"],
            "torch nn.BatchNorm1d (eval)": lambda: module(t),
        }


# -------------------------------------------------------------------- onnxruntime


class OrtLibrary(Library):
    name = "onnxruntime"

    def __init__(self) -> None:
        import onnx
        import onnxruntime

        self.onnx, self.ort = onnx, onnxruntime
        self.threads = 1

    def version(self) -> str:
        return f"{self.ort.__version__} (onnx {self.onnx.__version__})"

    def set_threads(self, n: int) -> None:
        self.threads = n

    def _model(self, data: CaseData) -> bytes:
        """A one-node BatchNormalization model; parameters are initializers."""
        from onnx import TensorProto, helper, numpy_helper

        shape = list(data.case.shape)
        inits = [numpy_helper.from_array(v, name) for name, v in
                 (("scale", data.gamma), ("B", data.beta),
                  ("mean", data.mean), ("var", data.variance))]
        node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"],
                                ["Y"], epsilon=EPSILON)
        graph = helper.make_graph(
            [node], "bn",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)],
            initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        model.ir_version = 8  # readable by every ONNX Runtime that has opset 15
        return model.SerializeToString()

    def _session(self, data: CaseData):
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        return self.ort.InferenceSession(self._model(data), opts,
                                         providers=["CPUExecutionProvider"])

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        if mode != "infer" or data.case.layout == "NHWC":
            return {}
        session, shape = self._session(data), list(data.case.shape)
        binding = session.io_binding()
        binding.bind_input("X", "cpu", 0, np.float32, shape, data.x.ctypes.data)
        binding.bind_output("Y", "cpu", 0, np.float32, shape, data.out.ctypes.data)
        return {"ort": lambda: session.run_with_iobinding(binding)}

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        session, feeds = self._session(data), {"X": data.x}
        return {"onnxruntime InferenceSession.run": lambda: session.run(None, feeds),
                "onnxruntime run_with_iobinding": self.bind(data, "infer")["ort"]}


# ---------------------------------------------------------- tensorflow and keras


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _probe_import(module: str, timeout: float) -> None:
    """Import ``module`` in a child process first: a broken or very slow import
    (TensorFlow takes seconds) is skipped with its reason instead of hanging here."""
    if importlib.util.find_spec(module) is None:
        raise Unavailable("not installed")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"import took more than {timeout:g} s (--import-timeout)") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        raise Unavailable(f"import failed: {last}")


class TensorFlowLibrary(Library):
    name = "tensorflow"

    def __init__(self, import_timeout: float) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _probe_import("tensorflow", import_timeout)
        with _stderr_silenced():  # absl and oneDNN banners printed by the C++ runtime
            import tensorflow as tf

        self.tf = tf
        self.threads: int | None = None

    def version(self) -> str:
        return self.tf.__version__

    def set_threads(self, n: int) -> None:
        """TensorFlow fixes its thread pools when its runtime starts; a different
        count later needs a fresh eager context (tensors are made after this)."""
        if n == self.threads:
            return
        if self.threads is not None:
            from tensorflow.python.eager import context

            context._reset_context()
        self.tf.config.threading.set_intra_op_parallelism_threads(n)
        self.tf.config.threading.set_inter_op_parallelism_threads(1)
        self.threads = n

    def constant(self, array: np.ndarray):
        return self.tf.constant(array)

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        if mode == "backward":
            return {}
        nn, case, x = self.tf.nn, data.case, self.constant(data.x)
        p = {k: self.constant(v.reshape(case.param_shape)) for k, v in data.params().items()}
        if mode == "infer":
            return {"tf": lambda: nn.batch_normalization(x, p["mean"], p["variance"], p["beta"],
                                                         p["gamma"], EPSILON)}
        axes = list(case.reduce_axes)

        def train():
            mean, variance = nn.moments(x, axes, keepdims=True)
            return nn.batch_normalization(x, mean, variance, p["beta"], p["gamma"], EPSILON)

        return {"tf": train}

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        return {"tf.nn.batch_normalization": self.bind(data, "infer")["tf"]}


class KerasLibrary(Library):
    name = "keras"

    def __init__(self, tensorflow: TensorFlowLibrary | None) -> None:
        if tensorflow is None:
            raise Unavailable("runs on its TensorFlow backend, which is not available")
        if importlib.util.find_spec("keras") is None:
            raise Unavailable("not installed")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        import keras

        if keras.backend.backend() != "tensorflow":
            raise Unavailable(f"backend is {keras.backend.backend()}, not tensorflow")
        self.keras, self.tensorflow = keras, tensorflow

    def version(self) -> str:
        return f"{self.keras.__version__} (backend {self.keras.backend.backend()})"

    def _layer(self, data: CaseData):
        layer = self.keras.layers.BatchNormalization(axis=data.case.channel_axis,
                                                     epsilon=EPSILON)
        layer.build(data.case.shape)
        layer.set_weights([data.gamma, data.beta, data.mean, data.variance])
        return layer

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        if mode == "backward":
            return {}
        layer, x, training = self._layer(data), self.tensorflow.constant(data.x), mode == "train"
        return {"keras": lambda: layer(x, training=training)}

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        return {"keras BatchNormalization (training=False)": self.bind(data, "infer")["keras"]}


# --------------------------------------------------------------- numpy and limit


class NumpyLibrary(Library):
    name = "numpy"

    def version(self) -> str:
        return np.__version__

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        if mode == "backward":
            return {}
        case, x = data.case, data.x
        p = {k: v.reshape(case.param_shape) for k, v in data.params().items()}

        def normalize(mean, variance):
            scale = p["gamma"] / np.sqrt(variance + np.float32(EPSILON))
            y = x * scale
            y += p["beta"] - mean * scale
            return y

        if mode == "infer":
            return {"numpy": lambda: normalize(p["mean"], p["variance"])}
        axes = case.reduce_axes
        return {"numpy": lambda: normalize(x.mean(axis=axes, keepdims=True),
                                           x.var(axis=axes, keepdims=True))}

    def overhead_calls(self, data: CaseData) -> dict[str, Call]:
        return {"numpy reference": self.bind(data, "infer")["numpy"]}


class LimitLibrary(Library):
    name = "limit"

    def __init__(self) -> None:
        try:
            self.sweep = build_sweep()
        except SweepUnavailable as err:
            raise Unavailable(str(err)) from None
        self.threads = 1

    def version(self) -> str:
        return self.sweep.description

    def set_threads(self, n: int) -> None:
        self.threads = n

    def bind(self, data: CaseData, mode: str) -> dict[str, Call]:
        if mode == "backward":
            x, dy, out, n = data.x, data.dy, data.out, self.threads
            return {"lim-out": self.sweep.bind_two_inputs(x, dy, out, n),
                    "lim-nt": self.sweep.bind_two_inputs(x, dy, out, n, streaming=True)}
        calls = {"lim-out": self.sweep.bind(data.x, data.out, self.threads),
                 "lim-nt": self.sweep.bind(data.x, data.out, self.threads, streaming=True)}
        if mode == "infer":
            calls["lim-ip"] = self.sweep.bind(data.x, data.x, self.threads)
        return calls


# ------------------------------------------------------------------------ loading


def _load(make: Callable[[], Library]) -> Library | str:
    """The library, or why it cannot run."""
    try:
        return make()
    except Unavailable as err:
        return str(err)
    except ImportError as err:
        return f"import failed: {err}"


def load_libraries(skip: set[str], import_timeout: float, against: Path | None = None,
                   ) -> tuple[list[Library], dict[str, str]]:
    """cbn first, then every peer that loads (with ``against``, another cbn build
    first among them); ``skipped`` maps a name to the reason."""
    libraries: list[Library] = [CbnLibrary()]
    skipped: dict[str, str] = {}
    if against is not None:
        previous = _load(lambda: PreviousCbnLibrary(against))
        if isinstance(previous, str):
            raise SystemExit(previous)
        libraries.append(previous)

    def loaded_tensorflow() -> TensorFlowLibrary | None:
        return next((lib for lib in libraries if isinstance(lib, TensorFlowLibrary)), None)

    makers: dict[str, Callable[[], Library]] = {
        "limit": LimitLibrary,
        "torch": TorchLibrary,
        "onnxruntime": OrtLibrary,
        "tensorflow": lambda: TensorFlowLibrary(import_timeout),
        "keras": lambda: KerasLibrary(loaded_tensorflow()),  # after tensorflow
        "numpy": NumpyLibrary,
    }
    for name, make in makers.items():
        result = "skipped (--skip)" if name in skip else _load(make)
        if isinstance(result, Library):
            libraries.append(result)
        else:
            skipped[name] = result
    return libraries, skipped
