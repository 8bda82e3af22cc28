"""The two inference engines side by side: eager torch and ONNX Runtime, on one trained model.

For batch sizes 1 and 64 (by default), the median time of a forward pass over normalised MNIST
test images, each engine with the same number of threads (1 by default, as a server with one
worker per core runs), and whether the two predict the whole test set identically. Prints the
hardware, torch and onnxruntime versions.

    python benchmarks/engines.py RUN --data-dir ../shared/data
    python benchmarks/engines.py RUN --data-dir ../shared/data --threads 2 --batches 1,8,64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from torchmnist import data, engines
from torchmnist.commands import bench
from torchmnist.data import loaders


def median_ms(function, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(max(5, repeats // 10)):  # warm up: kernels, allocations, caches
            function(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder or checkpoint")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {engine: engines.load(args.run, engine) for engine in engines.ENGINES}
    import onnxruntime

    session = engines.OnnxRuntime(runs["onnxruntime"].model.model_bytes, threads=args.threads)
    runs["onnxruntime"].model = session
    spec = runs["torch"].spec
    test = data.load(spec.name, args.data_dir, splits=("test",)).test
    x = loaders.normalize(test.images, spec.mean, spec.std)
    with torch.inference_mode():
        same = all(torch.equal(runs["torch"].model(chunk).argmax(1),
                               session(chunk).argmax(1)) for chunk in x.split(1000))
    report = {"environment": bench.environment(torch.device("cpu")),
              "onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "model": runs["torch"].name, "identical_predictions_on_test_set": same,
              "test_images": len(x), "ms_per_batch": {}}
    for size in (int(b) for b in args.batches.split(",")):
        batch = x[:size]
        report["ms_per_batch"][size] = {engine: round(median_ms(runs[engine].model, batch,
                                                                args.repeats), 4)
                                        for engine in engines.ENGINES}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
