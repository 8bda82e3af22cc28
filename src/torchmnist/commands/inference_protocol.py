"""The Open Inference Protocol (v2: KServe's and Triton's REST API) for `torchmnist serve`.

A v2 client (tritonclient, KServe's, a hand-made POST) asks `POST /v2/models/{name}/infer` with
one input, either:
- FP32 `pixels`, shape [N, 1, 28, 28]: 28x28 images in [0, 1], as torchvision's ToTensor gives
  them (the server normalises them with the model's dataset's mean and std), or
- BYTES `image`, shape [N]: image files (PNG, JPEG, ...), each preprocessed as `predict` does;
  in JSON each element is the file in base64.
Tensors come in JSON ("data", row-major, flat or nested) or, with the binary tensor data
extension, as raw bytes after the JSON header. The answer holds the outputs `probabilities`
(FP32 [N, classes]), `prediction` (INT64 [N]) and `class` (BYTES [N]), or those asked for.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_IMAGES = 4096  # images in one request; the body's byte cap comes first for files
OUTPUTS = ("probabilities", "prediction", "class")


class ProtocolError(ValueError):
    """A request the protocol's rules refuse: a status and one sentence."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    id: str | None
    pixels: np.ndarray | None  # (N, 28, 28) float32 in [0, 1], or None
    files: list[bytes] | None  # image files, or None
    outputs: tuple[str, ...]  # the outputs asked for, in order


def model_metadata(name: str, classes: list[str], platform: str) -> dict[str, Any]:
    return {"name": name, "versions": ["1"], "platform": platform,
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]},
                       {"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, len(classes)]},
                        {"name": "prediction", "datatype": "INT64", "shape": [-1]},
                        {"name": "class", "datatype": "BYTES", "shape": [-1]}]}


def decode(body: bytes, header_length: str | None) -> Request:
    """An inference request, checked: its JSON (the first `header_length` bytes when the
    binary extension is used) and its one input's values."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError("Inference-Header-Content-Length must be the length of the JSON "
                                "that begins the body")
        body, binary = body[:int(header_length)], body[int(header_length):]
    else:
        binary = b""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("the request is not valid JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ProtocolError('the request must be a JSON object with "inputs": a list of tensors')
    if len(request["inputs"]) != 1 or not isinstance(request["inputs"][0], dict):
        raise ProtocolError('give one input: "pixels" (FP32 [N, 1, 28, 28]) or "image" '
                            "(BYTES [N])")
    given = request["inputs"][0]
    shape, datatype = given.get("shape"), given.get("datatype")
    if not (isinstance(shape, list) and shape and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ProtocolError("the input's shape must be a list of whole numbers")
    count = math.prod(shape)
    size = (given.get("parameters") or {}).get("binary_data_size")
    if size is not None and not (isinstance(size, int) and 0 <= size <= len(binary)):
        raise ProtocolError("the input's binary_data_size does not fit the body")
    raw = binary[:size] if size is not None else None
    if datatype == "FP32":
        pixels = _pixels(given.get("data"), raw, shape, count)
        files = None
    elif datatype == "BYTES":
        pixels, files = None, _files(given.get("data"), raw, count)
    else:
        raise ProtocolError(f"the input's datatype must be FP32 (pixels) or BYTES (image files), "
                            f"not {str(datatype)[:20]!r}")
    return Request(_id(request.get("id")), pixels, files, _outputs(request.get("outputs")))


def _pixels(data: Any, raw: bytes | None, shape: list[int], count: int) -> np.ndarray:
    if len(shape) != 4 or shape[1:] != [1, 28, 28] or not 1 <= shape[0] <= MAX_IMAGES:
        raise ProtocolError(f"FP32 pixels must have the shape [N, 1, 28, 28] with N from 1 to "
                            f"{MAX_IMAGES}, not {shape}")
    if raw is not None:
        if len(raw) != 4 * count:
            raise ProtocolError(f"the binary pixels are {len(raw)} bytes, not the {4 * count} "
                                f"that {shape} takes in FP32")
        values = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            values = np.asarray(data, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise ProtocolError('the pixels\' "data" must be numbers') from None
        if values.size != count:
            raise ProtocolError(f'the pixels\' "data" holds {values.size} numbers, not the '
                                f"{count} of {shape}")
    values = values.reshape(shape[0], 28, 28)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ProtocolError("pixels must be in [0, 1], as ToTensor gives them (not normalised: "
                            "the server normalises them)")
    return values.astype(np.float32)


def _files(data: Any, raw: bytes | None, count: int) -> list[bytes]:
    if not 1 <= count <= MAX_IMAGES:
        raise ProtocolError(f"give from 1 to {MAX_IMAGES} image files, not {count}")
    if raw is not None:  # each element: its length (4 bytes, little-endian), then its bytes
        files, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise ProtocolError("the binary image files are cut short")
            (length,) = struct.unpack_from("<I", raw, at)
            files.append(raw[at + 4:at + 4 + length])
            at += 4 + length
            if at > len(raw):
                raise ProtocolError("the binary image files are cut short")
    else:
        if not isinstance(data, list):
            raise ProtocolError('the image files\' "data" must be a list of base64 strings')
        flat = list(_flattened(data))
        if not all(isinstance(item, str) for item in flat):
            raise ProtocolError('each image file in "data" must be a base64 string')
        try:
            files = [base64.b64decode(item, validate=True) for item in flat]
        except (binascii.Error, ValueError):
            raise ProtocolError("an image file in \"data\" is not valid base64") from None
    if len(files) != count:
        raise ProtocolError(f"the input holds {len(files)} image files, not the {count} its "
                            "shape says")
    return files


def _flattened(data: list) -> Any:
    for item in data:
        if isinstance(item, list):
            yield from _flattened(item)
        else:
            yield item


def _id(value: Any) -> str | None:
    if value is None or isinstance(value, str) and len(value) <= 256:
        return value
    raise ProtocolError('the request\'s "id" must be a string of at most 256 characters')


def _outputs(asked: Any) -> tuple[str, ...]:
    if asked is None:
        return OUTPUTS
    names = [o.get("name") for o in asked if isinstance(o, dict)] if isinstance(asked, list) else []
    if not names or len(names) != len(asked) or not set(names) <= set(OUTPUTS):
        raise ProtocolError(f'"outputs" must name some of {", ".join(OUTPUTS)}')
    return tuple(dict.fromkeys(names))


def encode(name: str, request: Request, probabilities: np.ndarray,
           classes: list[str]) -> dict[str, Any]:
    """The inference response: each output asked for, as a JSON tensor."""
    n = len(probabilities)
    predictions = probabilities.argmax(1)
    tensors = {
        "probabilities": {"datatype": "FP32", "shape": [n, len(classes)],
                          "data": probabilities.astype(np.float32).reshape(-1).tolist()},
        "prediction": {"datatype": "INT64", "shape": [n], "data": predictions.tolist()},
        "class": {"datatype": "BYTES", "shape": [n],
                  "data": [classes[int(i)] for i in predictions]}}
    response = {"model_name": name, "model_version": "1",
                "outputs": [{"name": output, **tensors[output]} for output in request.outputs]}
    if request.id is not None:
        response["id"] = request.id
    return response
