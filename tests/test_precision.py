"""Recipes that fit the CPU: bf16 only where it is native, and the fast recipe's fp32 variant.

Whether this machine's CPU has native bf16 decides what a plain run does, so the choices are
tested by telling devices.py what the CPU is; one run caps torch's kernels at AVX2 for real.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
from conftest import last_json, run_main

import torchmnist
from torchmnist import config
from torchmnist.errors import UsageError
from torchmnist.runtime import devices
from torchmnist.storage import checkpoint

# The real functions, taken before conftest's fixture puts stand-ins in their place for each
# test (runs read neither in the suite).
ON_CPU_WITHOUT_BF16 = config._on_cpu_without_bf16
BUSY_CORES = devices.busy_cores

CPU = torch.device("cpu")
# What torch's kernels and oneDNN do on a CPU with AVX2 alone, on any x86 CPU.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.fixture
def cpu_kind(monkeypatch):
    """Make the CPU native in bf16 (True) or not (False) as far as torchmnist can tell."""
    def set_kind(native: bool) -> None:
        monkeypatch.setattr(devices, "bf16_native", lambda device: native)
        monkeypatch.setattr(config, "_on_cpu_without_bf16", lambda device: not native)
    return set_kind


def test_auto_is_bf16_where_the_cpu_computes_in_it_and_fp32_where_it_emulates(cpu_kind):
    cpu_kind(True)
    assert devices.precision(CPU, "auto") == (
        "bf16", "precision: bf16 autocast (bf16: native on this CPU)")
    cpu_kind(False)
    assert devices.precision(CPU, "auto") == (
        "none", "precision: fp32 (bf16: emulated on this CPU, so using fp32)")
    # Asked for by name, a choice is kept, and where it is slow the line says so.
    amp, line = devices.precision(CPU, "bf16")
    assert amp == "bf16" and "emulated on this CPU and slower than fp32" in line
    assert devices.precision(CPU, "none") == ("none", "precision: fp32")


def test_native_bf16_needs_the_instructions_and_kernels_that_use_them(monkeypatch):
    def cpu(flags: dict, kernels: str = "AVX512", onednn: bool = True) -> bool:
        monkeypatch.setattr(devices, "_cpu_capabilities", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
        return devices.bf16_native(CPU)

    assert cpu({"avx2": True, "avx512_f": True, "avx512_bf16": True})  # Zen 4, Cooper Lake
    assert cpu({"avx2": True, "avx512_f": True, "amx_bf16": True})  # Sapphire Rapids
    assert not cpu({"avx2": True})  # AVX2 alone: Zen 3, Alder Lake and later laptops
    assert not cpu({"avx2": True, "avx512_f": True})  # AVX-512 without bf16: Skylake-X
    # The instructions, but torch's kernels or oneDNN held below them (ATEN_CPU_CAPABILITY,
    # ONEDNN_MAX_CPU_ISA): emulated.
    assert not cpu({"avx512_bf16": True}, kernels="AVX2")
    assert not cpu({"avx512_bf16": True}, onednn=False)


def test_the_fast_recipe_takes_its_fp32_values_on_a_cpu_without_native_bf16(cpu_kind):
    cpu_kind(True)
    native = torchmnist.TrainConfig(recipe="fast")
    assert (native.model, native.batch_size, native.lr, native.epochs, native.amp) == (
        "fast", 64, 0.15, 0.75, "auto")
    cpu_kind(False)
    fp32 = torchmnist.TrainConfig(recipe="fast")
    assert (fp32.model, fp32.batch_size, fp32.lr, fp32.epochs) == ("fast-narrow", 128, 0.3, 0.85)
    # Given values still win, and the dataset's values still apply on top.
    assert torchmnist.TrainConfig(recipe="fast", batch_size=64).batch_size == 64
    assert torchmnist.TrainConfig(recipe="fast", dataset="fashion-mnist").epochs == 8
    # The recipe's own values are no differences from it: the first lines list none.
    assert config.differences(fp32) == {}
    # The best recipe keeps its network everywhere; only its precision follows the CPU.
    assert torchmnist.TrainConfig(recipe="best").model == "best"


def test_a_cpu_variant_is_for_a_cpu_that_emulates_bf16(monkeypatch):
    def variant(resolved, native: bool) -> bool:
        def resolve(name):
            if isinstance(resolved, Exception):
                raise resolved
            return torch.device(resolved)
        monkeypatch.setattr(devices, "resolve_device", resolve)
        monkeypatch.setattr(devices, "bf16_native", lambda device: native)
        return ON_CPU_WITHOUT_BF16("auto")

    assert variant("cpu", native=False)
    assert not variant("cpu", native=True)
    assert not variant("cuda", native=False)  # a GPU keeps the recipe's network
    # An unavailable device is named by validation and the run, not here.
    assert not variant(UsageError("--device cuda was asked for but ..."), native=False)


def test_a_run_says_and_saves_what_it_trains_in(cpu_kind, capsys):
    cpu_kind(False)
    code, out, err = run_main(["train", "--dry-run", "--recipe", "fast", "--run-dir", "r",
                               "--device", "cpu", "--epochs", "2", "--keep", "2", "--json"],
                              capsys)
    assert code == 0, err
    lines = err.splitlines()
    assert "precision: fp32 (bf16: emulated on this CPU, so using fp32)" in lines[:5]
    # The recipe's own choices for this CPU are not listed as changes to it.
    assert "settings: the fast recipe's, except epochs 2, keep 2 (all in" in lines[2]
    summary = last_json(out)
    saved = checkpoint.load(summary["checkpoint"])
    assert saved["config"]["amp"] == "none" and saved["config"]["model"] == "fast-narrow"
    assert saved["hardware"].endswith("precision: fp32 (bf16: emulated on this CPU, so using "
                                      "fp32)")
    assert json.loads(open("r/config.json").read())["amp"] == "none"

    # Resumed on a CPU with native bf16, the run goes on in the precision it was trained in.
    cpu_kind(True)
    code, out, err = run_main(["train", "--resume", "r/epoch-001.pt", "--json"], capsys)
    assert code == 0, err
    assert "precision: fp32" in err.splitlines()
    assert checkpoint.load("r/last.pt")["config"]["amp"] == "none"


def test_an_explicit_bf16_on_an_emulating_cpu_runs_as_asked_with_a_note(cpu_kind, capsys):
    cpu_kind(False)
    code, out, err = run_main(["train", "--dry-run", "--recipe", "fast", "--amp", "bf16",
                               "--run-dir", "r", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert any(line.startswith("precision: bf16 autocast, as asked (note: bf16 is emulated")
               for line in err.splitlines()[:5])
    assert checkpoint.load(last_json(out)["checkpoint"])["config"]["amp"] == "bf16"


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="ATEN_CPU_CAPABILITY=avx2 caps x86 kernels only")
def test_a_cpu_held_to_avx2_trains_the_fp32_variant(tmp_path):
    # No stand-ins: torch's kernels and oneDNN are capped at AVX2 in a fresh process, as on
    # a CPU that has nothing more.
    result = subprocess.run(
        [sys.executable, "-m", "torchmnist", "train", "--dry-run", "--recipe", "fast",
         "--device", "cpu", "--run-dir", "r", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, **AVX2_ONLY})
    assert result.returncode == 0, result.stderr
    assert "torch kernels AVX2, oneDNN capped at AVX2; bf16 emulated" in result.stderr
    assert "precision: fp32 (bf16: emulated on this CPU, so using fp32)" in result.stderr
    summary = last_json(result.stdout)
    assert summary["model"] == "fast-narrow"
    assert json.loads((tmp_path / "r" / "config.json").read_text())["amp"] == "none"


def test_bench_names_the_cpu_and_the_precision_beside_its_numbers(cpu_kind, capsys):
    cpu_kind(False)
    code, out, err = run_main(["bench", "--dry-run", "--recipe", "fast", "--trials", "1",
                               "--steps", "3", "--accuracy-trials", "0", "--loaders", "tensor",
                               "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["precision"] == "precision: fp32 (bf16: emulated on this CPU, so using fp32)"
    assert report["precision"] in err.splitlines()
    assert report["config"]["amp"] == "none"
    environment = report["environment"]
    assert environment["bf16"] == "emulated"
    assert environment["cpu_extensions"] in environment["hardware"]
    assert f"torch kernels {torch.backends.cpu.get_cpu_capability()}" in \
        environment["cpu_extensions"]


def test_a_run_on_a_crowded_cpu_says_what_its_threads_cost(monkeypatch, capsys):
    monkeypatch.setattr(devices, "busy_cores", lambda window=0.05: 1.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    note = devices.crowding_note(CPU, threads=None)
    assert note == ("note: other work keeps 1.0 of 2 cores busy, and torch runs 2 threads: that "
                    "can take several times as long as --threads 1, which runs beside it")
    # Threads chosen, by flag or OMP_NUM_THREADS, or a GPU: nothing to say.
    assert devices.crowding_note(CPU, threads=2) is None
    assert devices.crowding_note(torch.device("cuda"), threads=None) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert devices.crowding_note(CPU, threads=None) is None
    # A run says it among its first lines.
    monkeypatch.delenv("OMP_NUM_THREADS")
    code, out, err = run_main(["train", "--dry-run", "--run-dir", "r", "--device", "cpu"],
                              capsys)
    assert code == 0, err
    assert note in out.splitlines()[:6]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_busy_cores_sees_a_process_that_spins():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # started and spinning
        assert BUSY_CORES(window=0.3) >= 0.5
    finally:
        spinner.kill()
        spinner.wait()
