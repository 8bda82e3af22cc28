"""`torchmnist serve`: a trained model behind a small FastAPI app, and the page to draw on.

    GET  /                the page: a canvas to draw on, a file to drop, the probabilities
    POST /api/predict     an image (multipart field "image", a raw image/* body, or JSON
                          {"image": base64 PNG or data: URL}) -> `predict --json`'s answer
    GET  /api/model, /api/health, /docs (OpenAPI)

Requests that arrive together are classified in one forward pass (`Batcher`). A bad input gets
a 4xx and one sentence as {"error": ...}, and the next request is served as usual.
"""


import asyncio
import base64
import binascii
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchmnist import __version__
from torchmnist.commands.prediction import answer
from torchmnist.config import FOLDER_PREFIX
from torchmnist.data.preprocess import ImageError, normalise, prepare_bytes
from torchmnist.errors import UsageError, printable
from torchmnist.runtime import devices
from torchmnist.storage import checkpoint
from torchmnist.trained import load_model

STATIC = Path(__file__).parent / "static"
MAX_BYTES = 5 * 1024 * 1024  # an upload larger than this is refused (413)
MAX_PIXELS = 25_000_000  # an image with more pixels than this is refused (400)
MAX_PARTS = 16  # a multipart body with more parts than this is refused (400)
MAX_PART_HEADERS = 16 * 1024  # bytes of one header line of a part, likewise
BATCH = 64  # the most requests one forward pass takes
WAIT = 0.002  # seconds a request waits for others to join its batch


class BadInput(Exception):
    """A request the server refuses: a status code and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Pending:
    image: np.ndarray  # (28, 28) float32 in [0, 1], as the model's dataset was made
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """One forward pass for the requests that arrive together."""

    def __init__(self, network: torch.nn.Module, spec, device: torch.device):
        self.network, self.spec, self.device = network, spec, device
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.requests = self.batches = self.largest = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def probabilities(self, image: np.ndarray) -> torch.Tensor:
        pending = _Pending(image)
        await self.queue.put(pending)
        return await pending.done

    async def _serve(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.perf_counter() + WAIT
            while len(batch) < BATCH:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            try:
                # The forward pass in a thread: the event loop goes on taking requests.
                rows = await asyncio.to_thread(self._forward, [p.image for p in batch])
            except Exception as error:  # noqa: BLE001 - each waiting request gets the error
                for pending in batch:
                    if not pending.done.done():  # (a client that left has cancelled it)
                        pending.done.set_exception(error)
                continue
            self.requests += len(batch)
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            for pending, row in zip(batch, rows, strict=True):
                if not pending.done.done():
                    pending.done.set_result(row)

    @torch.inference_mode()
    def _forward(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([normalise(im, self.spec.mean, self.spec.std)
                                       for im in images])).to(self.device)
        return self.network(x).float().exp().cpu()


def _png(image: np.ndarray) -> str:
    """A (28, 28) image in [0, 1] as a PNG data URL, to show what the model saw."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_json_image(body: bytes) -> bytes:
    """The image bytes of a JSON body {"image": base64 PNG or a data: URL}."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(400, "the body is not valid JSON") from None
    except RecursionError:  # [[[[...]]]] nested past Python's stack, in a few megabytes
        raise BadInput(400, "the JSON nests too deeply to read") from None
    if not isinstance(value, dict) or not isinstance(value.get("image"), str):
        raise BadInput(422, 'the JSON must be an object with "image": a base64 PNG or a data: URL')
    text = value["image"]
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise BadInput(422, 'a data: URL in "image" must be base64 (data:image/png;base64,...)')
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(422, '"image" is not valid base64') from None
    if not data:
        raise BadInput(400, '"image" is empty')
    return data


def create_app(checkpoint_path: str | Path, *, device: str = "auto", model: str | None = None,
               dataset: str | None = None, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS, top: int = 3):
    """The FastAPI app serving the model of `checkpoint_path` (a run folder or checkpoint)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import FileResponse, JSONResponse
        from fastapi.staticfiles import StaticFiles
    except ImportError:
        raise UsageError("torchmnist serve needs FastAPI and uvicorn; install them with: "
                         "pip install 'torchmnist[serve]'") from None
    from contextlib import asynccontextmanager

    # A malformed body is answered to its client; python-multipart would also log a warning.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    trained = load_model(checkpoint_path, model=model, dataset=dataset)
    target = devices.resolve_device(device)
    network = trained.model.to(target).eval()
    spec = trained.spec
    about = _about(checkpoint.file_in(checkpoint_path), trained, network)
    batcher = Batcher(network, spec, target)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="torchmnist", version=about["torchmnist_version"], lifespan=lifespan,
                  description=f"The {about['model']} model trained on {about['dataset']}: draw "
                  "a digit at /, or POST an image to /api/predict.")

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, error: BadInput):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    async def health() -> dict:
        """Whether the server is up, and how requests have been batched so far."""
        return {"status": "ok", "requests": batcher.requests, "batches": batcher.batches,
                "largest_batch": batcher.largest}

    @app.get("/api/model")
    async def model_info() -> dict:
        """The model being served: name, dataset, classes, test accuracy, parameters."""
        return about

    @app.post("/api/predict", openapi_extra={"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "description": "base64 PNG or a data: URL"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}}}}})
    async def predict(request: Request) -> dict:
        """Classify one image, as `torchmnist predict --json` does."""
        name, data = await _image_bytes(request, max_bytes)
        try:
            image = await asyncio.to_thread(prepare_bytes, data, spec.name, max_pixels)
        except ImageError as error:
            raise BadInput(400, f"cannot use this image: {error}") from None
        probabilities = await batcher.probabilities(image)
        return {"file": name, **answer(probabilities, spec.classes, top),
                "probabilities": [float(p) for p in probabilities],
                "preprocessed": _png(image)}

    return app


async def _image_bytes(request, max_bytes: int) -> tuple[str, bytes]:
    """(a name, the image's bytes) of a request, read no further than `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadInput(413, f"the body is {int(declared):,} bytes, more than the "
                            f"{max_bytes:,} bytes this server takes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BadInput(413, f"the body is more than the {max_bytes:,} bytes this server "
                                "takes")
    if not body:
        raise BadInput(400, "the body is empty: send an image")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return "<json>", decode_json_image(bytes(body))
    if kind == "multipart/form-data":
        return _multipart_image(request.headers["content-type"], bytes(body))
    if kind.startswith("image/") or kind == "application/octet-stream":
        return "<body>", bytes(body)
    raise BadInput(415, f"the content type {kind or 'none'!r} is not one this server reads: "
                        "send multipart/form-data, application/json or image/*")


def _multipart_image(content_type: str, body: bytes) -> tuple[str, bytes]:
    """The first file of a multipart body: its part named "image" (or "file"), or any file.
    python-multipart reads it, within limits on the parts and their headers, and decodes the
    base64 or quoted-printable that older mail-style clients still send."""
    from python_multipart import FormParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadInput(400, "the multipart body cannot be read: its content type gives no "
                            "boundary")
    parts: list = []

    def take(part) -> None:
        parts.append(part)
        if len(parts) > MAX_PARTS:  # stops the parser here, however many parts follow
            raise BadInput(400, f"the multipart body has more than the {MAX_PARTS} parts this "
                                "server reads: send the image alone")

    # Files are kept in memory: the body, already in memory, is at most --max-bytes.
    parser = FormParser("multipart/form-data", take, take, boundary=boundary, config={
        "MAX_MEMORY_FILE_SIZE": len(body) + 1, "MAX_HEADER_SIZE": MAX_PART_HEADERS})
    try:
        parser.write(body[max(0, body.find(b"--" + boundary)):])  # past any preamble
        parser.finalize()
    except FormParserError as error:
        raise BadInput(400, f"the multipart body cannot be read: {error}") from None
    for part in parts:
        filename = getattr(part, "file_name", None)
        if part.field_name in (b"image", b"file") or filename:
            data = part.file_object.getvalue() if hasattr(part, "file_object") else part.value
            if not data:
                raise BadInput(400, "the uploaded file is empty")
            return printable((filename or b"<upload>").decode("utf-8", "replace")), data
    raise BadInput(422, 'the multipart body has no file: send it in a field named "image"')


def _about(path: Path, trained, network) -> dict[str, Any]:
    tested = [r["test_accuracy"] for r in trained.history if r.get("test_accuracy") is not None]
    # Folders by their own names, not their full paths (folder:letters, run/last.pt): the page
    # may be served to other machines, which have no business learning the server's layout.
    dataset = trained.spec.name
    if dataset.startswith(FOLDER_PREFIX):
        dataset = FOLDER_PREFIX + Path(dataset[len(FOLDER_PREFIX):]).name
    return {"model": trained.name, "dataset": printable(dataset),
            "classes": list(trained.spec.classes),
            "test_accuracy": tested[-1] if tested else None,
            "parameters": sum(p.numel() for p in network.parameters()),
            "checkpoint": printable(str(Path(path.parent.name, path.name))),
            "torchmnist_version": __version__}


def run(app, host: str, port: int) -> None:
    """Serve `app` until Ctrl-C or SIGTERM (uvicorn stops cleanly on both)."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:  # a clear sentence instead of uvicorn's log line
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}; choose "
                             "another --port or --host") from None
    # The wildcard addresses are where to listen, not where a browser can go: show this
    # machine's own address for them, and say who else can reach the page.
    every = host in ("0.0.0.0", "::")
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"torchmnist serve: http://{shown}:{port}/ (the page), /api/predict, /docs"
          + (f"; listening on every interface, so other machines reach it at this machine's "
             f"address, port {port}" if every else "") + "; Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
