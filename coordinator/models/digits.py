"""A small real model built from data scikit-learn ships: an MLP on the 8x8 digits.

The MLP is trained with scikit-learn and exported to ONNX by hand with MatMul + Add
(+ Relu) nodes: not Gemm, which the INT4 MatMulNBits quantizer does not touch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from agent.evaldata import save_eval_data
from coordinator.models import save_calibration_inputs

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PIXEL_MAX = 16.0  # digits pixels are 0..16; the model takes pixels / 16
OPSET = 17
IR_VERSION = 8
DEFAULT_HIDDEN_LAYERS = (256, 256)
TEST_FRACTION = 0.3
CALIBRATION_EXAMPLES = 200
MAX_TRAINING_ITERATIONS = 200


@dataclass(frozen=True)
class TrainedDigits:
    """A trained classifier with its (scaled, float32) train and test splits."""

    classifier: MLPClassifier
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    converged: bool


@dataclass(frozen=True)
class DigitsBundle:
    """The files of a built digits model and what is known about them."""

    model_path: Path  # model.onnx, FP32
    eval_path: Path  # eval.npz: inputs, labels, reference (see agent.evaldata)
    calibration_path: Path  # calibration.npz: inputs, drawn from the training split
    seed: int
    hidden_layers: tuple[int, ...]
    num_features: int
    num_classes: int
    train_examples: int
    test_examples: int
    calibration_examples: int
    training_iterations: int
    converged: bool
    sklearn_test_accuracy: float  # MLPClassifier.score on the test split
    onnx_test_accuracy: float  # top1 of the exported ONNX model (onnxruntime) on the test split

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-ready provenance of the build."""
        return {
            "dataset": "sklearn.datasets.load_digits",
            "input_scaling": f"pixels / {PIXEL_MAX:g}",
            "seed": self.seed,
            "hidden_layers": list(self.hidden_layers),
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "train_examples": self.train_examples,
            "test_examples": self.test_examples,
            "calibration_examples": self.calibration_examples,
            "training_iterations": self.training_iterations,
            "converged": self.converged,
            "sklearn_test_accuracy": self.sklearn_test_accuracy,
            "onnx_test_accuracy": self.onnx_test_accuracy,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "opset": OPSET,
            "sklearn_version": sklearn.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": ort.__version__,
        }


def train_digits_mlp(
    seed: int = 0, hidden_layers: tuple[int, ...] = DEFAULT_HIDDEN_LAYERS
) -> TrainedDigits:
    """Train the ReLU MLP on a stratified split of the digits (deterministic for a seed)."""
    digits = load_digits()
    x = (digits.data / PIXEL_MAX).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    clf = MLPClassifier(
        hidden_layer_sizes=hidden_layers,
        activation="relu",
        max_iter=MAX_TRAINING_ITERATIONS,
        random_state=seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return TrainedDigits(clf, x_train, y_train, x_test, y_test, converged)


def export_mlp_onnx(
    weights: list[np.ndarray], biases: list[np.ndarray], path: Path
) -> onnx.ModelProto:
    """Write a ReLU MLP as ONNX: MatMul + Add per layer, Relu between layers.

    Input ``input`` is float32 ``[batch, features]`` with a dynamic batch; output
    ``logits`` is float32 ``[batch, classes]`` (pre-softmax).
    """
    if not weights or len(weights) != len(biases):
        raise ValueError("need one bias per weight matrix, and at least one layer")
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = INPUT_NAME
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        initializers.append(numpy_helper.from_array(np.asarray(w, np.float32), f"fc{i}.weight"))
        initializers.append(numpy_helper.from_array(np.asarray(b, np.float32), f"fc{i}.bias"))
        nodes.append(
            helper.make_node(
                "MatMul", [current, f"fc{i}.weight"], [f"fc{i}.mm"], name=f"fc{i}_matmul"
            )
        )
        added = OUTPUT_NAME if i == last else f"fc{i}.out"
        nodes.append(
            helper.make_node("Add", [f"fc{i}.mm", f"fc{i}.bias"], [added], name=f"fc{i}_add")
        )
        if i != last:
            nodes.append(helper.make_node("Relu", [added], [f"fc{i}.relu"], name=f"fc{i}_relu"))
            current = f"fc{i}.relu"
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, ["batch", weights[0].shape[0]]
            )
        ],
        [
            helper.make_tensor_value_info(
                OUTPUT_NAME, TensorProto.FLOAT, ["batch", weights[-1].shape[1]]
            )
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edgefarm",
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def onnx_outputs(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run an ONNX model on CPU (one thread) and return its first output."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: np.asarray(inputs, np.float32)})[0])


def build_digits_model(
    out_dir: Path, seed: int = 0, hidden_layers: tuple[int, ...] = DEFAULT_HIDDEN_LAYERS
) -> DigitsBundle:
    """Train, export and write ``model.onnx``, ``eval.npz`` and ``calibration.npz``.

    The eval set is the held-out test split; its ``reference`` is the FP32 ONNX
    model's output computed with onnxruntime. Calibration examples come from the
    training split only.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = train_digits_mlp(seed, hidden_layers)
    clf = trained.classifier
    model_path = out_dir / "model.onnx"
    export_mlp_onnx(list(clf.coefs_), list(clf.intercepts_), model_path)

    reference = onnx_outputs(model_path, trained.x_test).astype(np.float32)
    eval_path = out_dir / "eval.npz"
    save_eval_data(eval_path, trained.x_test, trained.y_test, reference)

    rng = np.random.default_rng(seed)
    count = min(CALIBRATION_EXAMPLES, len(trained.x_train))
    picked = np.sort(rng.choice(len(trained.x_train), size=count, replace=False))
    calibration_path = out_dir / "calibration.npz"
    save_calibration_inputs(calibration_path, trained.x_train[picked])

    return DigitsBundle(
        model_path=model_path,
        eval_path=eval_path,
        calibration_path=calibration_path,
        seed=seed,
        hidden_layers=tuple(hidden_layers),
        num_features=int(trained.x_train.shape[1]),
        num_classes=len(clf.classes_),
        train_examples=len(trained.x_train),
        test_examples=len(trained.x_test),
        calibration_examples=count,
        training_iterations=int(clf.n_iter_),
        converged=trained.converged,
        sklearn_test_accuracy=float(clf.score(trained.x_test, trained.y_test)),
        onnx_test_accuracy=float(np.mean(np.argmax(reference, axis=1) == trained.y_test)),
    )
