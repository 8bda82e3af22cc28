"""The training step and the test pass captured in CUDA graphs (--cuda-graph).

An eager step of these small networks waits on some fifty kernel launches, not on arithmetic; a
CUDA graph records them once and a replay launches them all at once, on the same memory. What
is captured is `training.train_step` itself, so the code a reader follows is the code that runs:
each batch is copied into the graph's input buffers and the graph for its shape replayed. The
step can be captured because nothing in it waits for the device: the learning rate is a tensor
the schedule fills between replays, the weight average and the loss sums never ask the host,
and random numbers come from the default CUDA generator, which advances as in the eager step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from torchmnist.evaluation import Evaluation, test_sums, to_evaluation
from torchmnist.runtime import devices

REHEARSALS = 3  # eager calls before a capture, as torch's own examples make


def reason_not_to_graph(run) -> str | None:
    """Why this run cannot replay its step from a CUDA graph, or None if it can."""
    config = run.config
    if run.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and this run is on {run.device.type}"
    if config.amp == "fp16":
        return "the fp16 loss scaler checks for overflow on the host every step (use --amp bf16)"
    if config.compile:
        return "--compile is not combined with CUDA graphs here"
    if config.detect_anomaly:
        return "anomaly detection checks every backward on the host"
    if run.world.distributed:
        return "DistributedDataParallel's gradient all-reduce is not captured here"
    return None


class _Saved:
    """The state a rehearsal changes, put back in place afterwards: the captured tensors keep
    their addresses and the run continues as if nothing had happened."""

    def __init__(self, run):
        self.model = {k: v.clone() for k, v in run.model.state_dict().items()}
        self.ema = ({k: v.clone() for k, v in run.ema.state_dict().items()}
                    if run.ema is not None else None)
        self.optimizer = {p: {k: v.clone() for k, v in state.items()
                              if isinstance(v, torch.Tensor)}
                          for p, state in run.optimizer.state.items()}
        self.rng = devices.rng_state()

    def restore(self, run) -> None:
        run.model.load_state_dict(self.model)  # copies into the existing tensors
        if run.ema is not None:
            run.ema.load_state_dict(self.ema)
        with torch.no_grad():
            for p, state in run.optimizer.state.items():
                saved = self.optimizer.get(p, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        # State the rehearsal created (momentum, Adam's moments and step count)
                        # starts at zero, which is where each of these optimisers starts it.
                        value.copy_(saved[key]) if key in saved else value.zero_()
        devices.set_rng_state(self.rng)


def rate_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make each learning rate a float32 tensor on the device, which a captured optimiser
    kernel reads at every replay (a Python float would be frozen into the graph)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # the input buffers the captured kernels read
    y: torch.Tensor
    loss: torch.Tensor  # written by every replay
    correct: torch.Tensor


class GraphedStep:
    """`train_step(run, x, y)`, replayed from CUDA graphs: one per batch shape."""

    def __init__(self, run, train_step: Callable, examples: list[tuple[torch.Tensor,
                                                                        torch.Tensor]]):
        self.run, self.train_step = run, train_step
        rate_tensors(run.optimizer, run.device)
        self.rates = [group["lr"] for group in run.optimizer.param_groups]
        saved = _Saved(run)
        for x, y in examples:
            devices.rehearse(lambda x=x, y=y: train_step(run, x, y), REHEARSALS)
        saved.restore(run)
        self.graphs: dict[tuple[int, ...], _Graph] = {}
        for x, y in examples:
            static_x, static_y = x.clone(), y.clone()
            graph, (loss, correct) = devices.capture(
                lambda sx=static_x, sy=static_y: train_step(run, sx, sy))
            self.graphs[tuple(x.shape)] = _Graph(graph, static_x, static_y, loss, correct)
        saved.restore(run)  # a capture computes nothing; this undoes anything done beside it

    @property
    def shapes(self) -> list[int]:
        return [shape[0] for shape in self.graphs]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on (x, y); the loss and count returned are the graph's buffers, overwritten
        by the next replay."""
        for group, rate in zip(self.run.optimizer.param_groups, self.rates, strict=True):
            if group["lr"] is not rate:  # a scheduler that assigned a float instead of filling
                rate.fill_(float(group["lr"]))
                group["lr"] = rate
        captured = self.graphs.get(tuple(x.shape))
        if captured is None:  # a batch shape no graph was made for: the eager step
            return self.train_step(self.run, x, y)
        captured.x.copy_(x)
        captured.y.copy_(y)
        captured.graph.replay()
        return captured.loss, captured.correct


class GraphedTest:
    """The whole test pass over a device-resident test set, replayed from one CUDA graph."""

    def __init__(self, run):
        self.run = run
        model, config = run.tested_model, run.config

        def sums():
            return test_sums(model, run.test_batches, channels_last=config.channels_last)

        model.eval()
        devices.rehearse(sums, 1)
        self.graph, (self.loss_sum, self.correct, self.total) = devices.capture(sums)
        run.model.train()

    def __call__(self) -> Evaluation:
        self.run.tested_model.eval()  # as captured: dropout off, BatchNorm's running statistics
        self.graph.replay()
        return to_evaluation(self.loss_sum, self.correct, self.total)


def install(run, train_step: Callable, examples: list) -> str:
    """Capture the run's step (and its test pass, with the test set on the device); return the
    line to log, which says why if a capture failed and the run goes on eagerly."""
    reason = reason_not_to_graph(run)
    if reason is not None:
        return f"CUDA graphs off: {reason}; the step runs eagerly"
    saved = _Saved(run)
    try:
        run.graphed_step = GraphedStep(run, train_step, examples)
        test = ""
        # The test pass too, where the test set lives on the GPU (the tensor loader) and the
        # model takes one path for every batch (not early-exit's per-image exits).
        if (hasattr(run.test_batches, "images")
                and not getattr(run.tested_model, "data_dependent", False)):
            run.graphed_test = GraphedTest(run)
            test = "; the test pass in one more"
    except RuntimeError as error:
        run.graphed_step = run.graphed_test = None
        torch.cuda.synchronize()  # raises here if the failure broke the device itself
        saved.restore(run)
        for group in run.optimizer.param_groups:  # some eager optimisers take no tensor rate
            group["lr"] = float(group["lr"])
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"CUDA graph capture failed ({first}); the step runs eagerly"
    shapes = ", ".join(str(n) for n in run.graphed_step.shapes)
    return (f"CUDA graphs: the training step captured for batches of {shapes} images"
            f"{test}")
