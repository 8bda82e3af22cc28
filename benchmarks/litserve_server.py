"""The same trained network served by LitServe, for the side-by-side load test (serve_load.py).

It reads the same requests as `torchmnist serve`'s /api/predict ({"image": base64 PNG}), makes
the same 28x28 images with torchmnist's preprocessing, and classifies them in batches of up to
--max-batch that wait at most --max-wait-ms, as LitServe batches, in --workers inference worker
processes.

    pip install litserve
    python benchmarks/litserve_server.py RUN --port 8001 --max-batch 64 --max-wait-ms 2
"""

from __future__ import annotations

import argparse
import base64

import litserve
import numpy as np
import torch

from torchmnist.data.preprocess import normalise, prepare_bytes
from torchmnist.trained import load_model


class Digits(litserve.LitAPI):
    def __init__(self, run: str, **batching):
        super().__init__(**batching)
        self.run = run

    def setup(self, device) -> None:
        trained = load_model(self.run)
        self.network, self.spec = trained.model.eval(), trained.spec

    def decode_request(self, request: dict) -> np.ndarray:
        image = prepare_bytes(base64.b64decode(request["image"]), self.spec.name)
        return normalise(image, self.spec.mean, self.spec.std)

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(inputs))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.network(x).float().exp()

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probabilities: torch.Tensor) -> dict:
        best = int(probabilities.argmax())
        return {"class": self.spec.classes[best], "probability": float(probabilities[best]),
                "probabilities": probabilities.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    args = parser.parse_args()
    api = Digits(args.run, max_batch_size=args.max_batch, batch_timeout=args.max_wait_ms / 1000)
    server = litserve.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
