"""Classify image files with an ONNX model from `torchmnist export`, without PyTorch.

    pip install onnxruntime numpy pillow   # and torchmnist, for its preprocess module
    python examples/onnx_predict.py runs/.../last.onnx my_digit.jpg another.png

Only onnxruntime, NumPy and Pillow run here: `torchmnist.data.preprocess` needs no torch, and the
model file carries its own normalisation and class names as metadata. Prints one JSON object
per image, as `torchmnist predict --json` does.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime

from torchmnist.data.preprocess import ImageError, normalise, prepare


def main(model_path: str, images: list[str]) -> int:
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    mean, std = float(meta["mean"]), float(meta["std"])
    classes = json.loads(meta["classes"])
    failed = 0
    for path in images:
        try:
            x = normalise(prepare(path, meta["dataset"]), mean, std)[None]  # (1, 1, 28, 28)
        except ImageError as error:
            print(json.dumps({"file": path, "error": str(error)}))
            failed += 1
            continue
        logits = session.run(None, {session.get_inputs()[0].name: x})[0][0]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        best = int(probabilities.argmax())
        print(json.dumps({"file": path, "prediction": best, "class": classes[best],
                          "probability": float(probabilities[best])}))
    return 2 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python onnx_predict.py MODEL.onnx IMAGE [IMAGE ...]")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
