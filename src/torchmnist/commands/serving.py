"""`torchmnist serve`: a trained model behind a small FastAPI app, and the page to draw on.

    GET  /                the page: a canvas to draw on, a file to drop, the probabilities
    POST /api/predict     an image (multipart field "image", a raw image/* body, or JSON
                          {"image": base64 PNG or data: URL}) -> `predict --json`'s answer
    GET  /api/health      liveness: the process answers (and how requests were batched)
    GET  /api/ready       readiness: 200 once the model is loaded and warmed and while the
                          batching task runs, else 503
    GET  /metrics         Prometheus metrics
    /v2/...               the Open Inference Protocol (inference_protocol.py)
    GET  /api/model, /docs (OpenAPI)

Requests that arrive together are classified in one forward pass (`Batcher`). Every error, a
bad input or an unknown path alike, is a status and one sentence as {"error": ...}.
"""


import asyncio
import base64
import binascii
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchmnist import __version__, engines
from torchmnist.commands import inference_protocol
from torchmnist.commands.prediction import answer
from torchmnist.config import FOLDER_PREFIX
from torchmnist.data.preprocess import ImageError, normalise, prepare_bytes
from torchmnist.errors import UsageError, printable
from torchmnist.storage import checkpoint

STATIC = Path(__file__).parent / "static"
MAX_BYTES = 5 * 1024 * 1024  # an upload larger than this is refused (413)
MAX_PIXELS = 25_000_000  # an image with more pixels than this is refused (400)
MAX_PARTS = 16  # a multipart body with more parts than this is refused (400)
MAX_PART_HEADERS = 16 * 1024  # bytes of one header line of a part, likewise
MAX_BATCH = 64  # the most images one forward pass takes (--max-batch)
MAX_WAIT_MS = 2.0  # how long a request waits for others to join its batch (--max-wait-ms)
RESTART_DELAY = 1.0  # seconds before a batching task that died is started again


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
    """One forward pass for the images that arrive together, in a task that is watched: until
    it has warmed the model up, and while it is dead, the server is not ready; a task that died
    is logged and started again after RESTART_DELAY seconds (the process goes on)."""

    def __init__(self, network: torch.nn.Module, spec, device: torch.device, *,
                 max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS, metrics: "_Metrics"):
        self.network, self.spec, self.device = network, spec, device
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.requests = self.batches = self.largest = self.restarts = 0
        self.ready = False  # warmed up, and the task is running
        self.failed = False  # the task died, and is not running again yet

    async def run(self) -> None:
        """Warm up, then batch for ever; a failure is told and the batching begins again."""
        warmed = False
        while True:
            try:
                if not warmed:
                    await asyncio.to_thread(self.warm_up)
                    warmed = True
                self._set_ready(True)
                await self._serve()
            except Exception as error:  # noqa: BLE001 - any failure: not ready, then restart
                self._set_ready(False)
                self.restarts += 1
                self.metrics.restarts.inc()
                print(f"torchmnist serve: the batching task failed ({type(error).__name__}: "
                      f"{error}); starting it again in {RESTART_DELAY:g} s", file=sys.stderr,
                      flush=True)
                await asyncio.sleep(RESTART_DELAY)

    def _set_ready(self, ready: bool) -> None:
        self.ready, self.failed = ready, not ready
        self.metrics.ready.set(ready)

    def warm_up(self) -> None:
        """One forward pass at each size the batches come in at most, so that the first
        requests do not pay for loading kernels."""
        blank = np.zeros((28, 28), dtype=np.float32)
        for size in {1, self.max_batch}:
            self._forward([blank] * size)

    async def probabilities(self, image: np.ndarray) -> torch.Tensor:
        if self.failed:
            raise BadInput(503, "the model is not ready: its batching task failed and is being "
                                "started again; try again in a moment")
        pending = _Pending(image)
        await self.queue.put(pending)
        self._count_queue()
        return await pending.done

    def _count_queue(self) -> None:
        self.metrics.queue_depth.set(self.queue.qsize())

    async def take_batch(self) -> list[_Pending]:
        """The next request, and those that arrive within max_wait of it."""
        batch = [await self.queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:  # (not the builtin TimeoutError on Python 3.10)
                break
        return batch

    async def _serve(self) -> None:
        while True:
            batch = await self.take_batch()
            self._count_queue()
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
            self.metrics.batch_size.observe(len(batch))
            for pending, row in zip(batch, rows, strict=True):
                if not pending.done.done():
                    pending.done.set_result(row)

    @torch.inference_mode()
    def _forward(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([normalise(im, self.spec.mean, self.spec.std)
                                       for im in images])).to(self.device)
        return self.network(x).float().exp().cpu()


class _Measured:
    """ASGI middleware counting each HTTP request and its time by route pattern and status (a
    plain ASGI layer: Starlette's BaseHTTPMiddleware costs a task and two streams a request)."""

    def __init__(self, app, metrics: "_Metrics"):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or (
                "static" if scope["path"].startswith("/static/") else "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app). With several
    worker processes (--workers) each writes its values into PROMETHEUS_MULTIPROC_DIR, and
    /metrics, whichever worker answers it, adds up all of theirs."""

    def __init__(self, about: dict[str, Any]):
        try:
            import prometheus_client as prometheus
        except ImportError:
            raise UsageError("torchmnist serve needs prometheus-client; install it with: "
                             "pip install 'torchmnist[serve]'") from None
        self.registry = registry = prometheus.CollectorRegistry()
        self.requests = prometheus.Counter(
            "torchmnist_requests", "HTTP requests answered, by route and status",
            ("route", "status"), registry=registry)
        self.latency = prometheus.Histogram(
            "torchmnist_request_seconds", "Time to answer a request, by route", ("route",),
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=registry)
        self.batch_size = prometheus.Histogram(
            "torchmnist_batch_size", "Images in each forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=registry)
        self.queue_depth = prometheus.Gauge(
            "torchmnist_queue_depth", "Images waiting for a forward pass", registry=registry,
            multiprocess_mode="livesum")
        self.ready = prometheus.Gauge("torchmnist_ready", "1 when the server (every worker) is "
                                      "ready", registry=registry, multiprocess_mode="livemin")
        self.restarts = prometheus.Counter(
            "torchmnist_batcher_restarts", "Times a batching task died and was started again",
            registry=registry)
        keys = ("model", "dataset", "checkpoint", "engine", "torchmnist_version")
        prometheus.Gauge("torchmnist_model_info", "The model served", keys, registry=registry,
                         multiprocess_mode="max").labels(*(str(about[k]) for k in keys)).set(1)
        self._prometheus = prometheus
        self.content_type = prometheus.CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        prometheus = self._prometheus
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return prometheus.generate_latest(self.registry)
        from prometheus_client import multiprocess

        every = prometheus.CollectorRegistry()
        multiprocess.MultiProcessCollector(every)
        return prometheus.generate_latest(every)


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
               max_pixels: int = MAX_PIXELS, top: int = 3, max_batch: int = MAX_BATCH,
               max_wait_ms: float = MAX_WAIT_MS, engine: str = "torch"):
    """The FastAPI app serving the model of `checkpoint_path` (a run folder or checkpoint)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, JSONResponse, Response
        from fastapi.staticfiles import StaticFiles
        from starlette.exceptions import HTTPException
    except ImportError:
        raise UsageError("torchmnist serve needs FastAPI and uvicorn; install them with: "
                         "pip install 'torchmnist[serve]'") from None
    from contextlib import asynccontextmanager

    # A malformed body is answered to its client; python-multipart would also log a warning.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    target = engines.device_for(engine, device)
    trained = engines.load(checkpoint_path, engine, model=model, dataset=dataset)
    network = trained.model.to(target).eval()
    spec = trained.spec
    about = _about(checkpoint.file_in(checkpoint_path), trained, network, engine)
    metrics = _Metrics(about)
    batcher = Batcher(network, spec, target, max_batch=max_batch, max_wait_ms=max_wait_ms,
                      metrics=metrics)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="torchmnist", version=about["torchmnist_version"], lifespan=lifespan,
                  description=f"The {about['model']} model trained on {about['dataset']}: draw "
                  "a digit at /, or POST an image to /api/predict.")
    app.state.batcher = batcher

    def error(status: int, sentence: str, headers: dict | None = None):
        return JSONResponse({"error": sentence}, status_code=status, headers=headers)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, refused: BadInput):
        return error(refused.status, str(refused))

    @app.exception_handler(HTTPException)  # FastAPI's own: an unknown path, a wrong method
    async def http_error(request: Request, refused: HTTPException):
        sentence = {404: f"there is no {request.url.path} here (see /docs)",
                    405: f"{request.method} is not how {request.url.path} is asked (see /docs)"
                    }.get(refused.status_code, str(refused.detail))
        return error(refused.status_code, printable(sentence), getattr(refused, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, refused: RequestValidationError):
        first = refused.errors()[0]
        return error(422, printable(f"{'.'.join(map(str, first['loc']))}: {first['msg']}"))

    @app.exception_handler(Exception)  # a fault of the server's own, still in one shape
    async def failed(request: Request, fault: Exception):
        return error(500, printable(f"the server failed on this request: "
                                    f"{type(fault).__name__}: {fault}"))

    app.add_middleware(_Measured, metrics=metrics)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    async def health() -> dict:
        """Liveness: the process answers. Also whether it is ready, and how requests have been
        batched so far."""
        return {"status": "ok", "ready": batcher.ready, "process": os.getpid(),
                "requests": batcher.requests,
                "batches": batcher.batches, "largest_batch": batcher.largest,
                "batcher_restarts": batcher.restarts}

    @app.get("/api/ready")
    async def ready():
        """Readiness: 200 once the model is loaded and warmed up and while its batching task
        runs; 503 otherwise (a load balancer then sends requests elsewhere)."""
        if not batcher.ready:
            return error(503, "not ready: the model is warming up, or its batching task is "
                              "being started again")
        return {"ready": True}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=metrics.content_type)

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
        image = await _prepared(data, spec.name, max_pixels)
        probabilities = await batcher.probabilities(image)
        return {"file": name, **answer(probabilities, spec.classes, top),
                "probabilities": [float(p) for p in probabilities],
                "preprocessed": _png(image)}

    _open_inference_routes(app, batcher, about, max_bytes, max_pixels, error)
    return app


async def _prepared(data: bytes, dataset: str, max_pixels: int) -> np.ndarray:
    """An image file's bytes as the model's kind of 28x28 image, prepared in a thread."""
    try:
        return await asyncio.to_thread(prepare_bytes, data, dataset, max_pixels)
    except ImageError as error:
        raise BadInput(400, f"cannot use this image: {error}") from None


def _open_inference_routes(app, batcher: Batcher, about: dict, max_bytes: int, max_pixels: int,
                           error) -> None:
    """The Open Inference Protocol's endpoints (v2), beside the /api ones."""
    from fastapi import Request

    name, classes = about["model"], about["classes"]

    def known(model_name: str) -> None:
        if model_name != name:
            raise BadInput(404, f"there is no model {printable(model_name)!r} here; this server "
                                f"serves {name!r}")

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "torchmnist", "version": __version__,
                "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        return {"ready": True} if batcher.ready else error(503, "not ready")

    @app.get("/v2/models/{model_name}")
    async def model_metadata(model_name: str) -> dict:
        known(model_name)
        return inference_protocol.model_metadata(name, classes, "pytorch")

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str):
        known(model_name)
        return {"name": name, "ready": True} if batcher.ready else error(503, "not ready")

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> dict:
        """Classify images given as FP32 pixels [N, 1, 28, 28] in [0, 1] or as BYTES image
        files, in JSON or with the binary tensor data extension."""
        known(model_name)
        body = await _read_body(request, max_bytes)
        try:
            asked = inference_protocol.decode(
                body, request.headers.get("inference-header-content-length"))
        except inference_protocol.ProtocolError as refused:
            raise BadInput(refused.status, str(refused)) from None
        images = (list(asked.pixels) if asked.pixels is not None else
                  [await _prepared(f, batcher.spec.name, max_pixels) for f in asked.files])
        rows = await asyncio.gather(*(batcher.probabilities(image) for image in images))
        return inference_protocol.encode(name, asked, torch.stack(rows).numpy(), classes)


async def _read_body(request, max_bytes: int) -> bytes:
    """The request's body, read no further than `max_bytes`."""
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
    return bytes(body)


async def _image_bytes(request, max_bytes: int) -> tuple[str, bytes]:
    """(a name, the image's bytes) of a request, read no further than `max_bytes`."""
    body = await _read_body(request, max_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return "<json>", decode_json_image(body)
    if kind == "multipart/form-data":
        return _multipart_image(request.headers["content-type"], body)
    if kind.startswith("image/") or kind == "application/octet-stream":
        return "<body>", body
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


def _about(path: Path, trained, network, engine: str) -> dict[str, Any]:
    tested = [r["test_accuracy"] for r in trained.history if r.get("test_accuracy") is not None]
    # Folders by their own names, not their full paths (folder:letters, run/last.pt): the page
    # may be served to other machines, which have no business learning the server's layout.
    dataset = trained.spec.name
    if dataset.startswith(FOLDER_PREFIX):
        dataset = FOLDER_PREFIX + Path(dataset[len(FOLDER_PREFIX):]).name
    return {"model": trained.name, "dataset": printable(dataset),
            "classes": list(trained.spec.classes),
            "test_accuracy": tested[-1] if tested else None,
            "parameters": (sum(p.numel() for p in network.parameters()) if engine == "torch"
                           else network.parameters_count),
            "engine": engine,
            "checkpoint": printable(str(Path(path.parent.name, path.name))),
            "torchmnist_version": __version__}


_APP_ARGUMENTS = "TORCHMNIST_SERVE_APP"  # create_app's arguments, for each worker process


def app_from_environment():
    """The app of one of --workers' processes, made as the command's own was."""
    return create_app(**json.loads(os.environ[_APP_ARGUMENTS]))


def run(app, host: str, port: int, workers: int = 1, app_arguments: dict | None = None) -> None:
    """Serve `app` until Ctrl-C or SIGTERM (uvicorn stops cleanly on both). With `workers` > 1,
    that many processes, each making its own app from `app_arguments` (create_app's), share
    the port: each has its model, its batches and its GIL, and /metrics adds all of them up."""
    import shutil
    import socket
    import tempfile

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
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    metrics = tempfile.mkdtemp(prefix="torchmnist-serve-metrics-")
    os.environ.update({_APP_ARGUMENTS: json.dumps(app_arguments),
                       "PROMETHEUS_MULTIPROC_DIR": metrics})
    try:
        uvicorn.run(f"{__name__}:app_from_environment", factory=True, host=host, port=port,
                    workers=workers, log_level="warning")
    finally:
        shutil.rmtree(metrics, ignore_errors=True)
