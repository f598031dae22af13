"""Benchmark of multi-scale deformable attention: native kernel vs the PyTorch reference.

Cases (M=8 heads, D=32 channels, L=4 levels, P=4 points, realistic locations: reference points plus
Gaussian offsets of 2 pixels, see detr/ops/inputs.py):

  a  encoder, batch 2, 512x512 image:  levels 64x64 32x32 16x16 8x8      (Lq = S = 5440)
  b  encoder, batch 1, 800x1333 image: levels 100x167 50x84 25x42 13x21  (Lq = S = 21685)
  c  decoder, batch 1, 800x1333 image, 300 queries

On the CPU, every (case, dtype, backend, mode) runs in a fresh subprocess that builds the inputs,
runs one warm-up call and ``--repeats`` timed calls (the best is reported) at the same thread count
(``torch.set_num_threads``); a second subprocess measures the peak memory of the calls: peak RSS
(VmHWM, reset just before the first call, with glibc returning large blocks to the OS on free) minus
the RSS at that moment (Linux). On CUDA all measurements share one process (the caching allocator's
peak counter is reset for each): times from CUDA events, memory as ``torch.cuda.max_memory_allocated``
minus the inputs. "fwd+bwd" is one forward plus ``torch.autograd.grad`` for value,
sampling_locations and attention_weights. ``--dtypes bf16`` runs value (and the gradients) in
bfloat16 with float32 locations and weights, as the model does under autocast.

On the CPU the table also gives the native time over the arithmetic floor: the multiply-adds a call
cannot avoid (per sample point and channel 4 bilinear corner FMAs and 1 attention-weight FMA in the
forward; the backward adds 4 FMAs for the corner dot products with the output gradient and 4 for the
value gradient) at the float32 FMA rate of AVX2 measured in the same run at the same thread count (a
1536x1536 matmul in a subprocess with MKL_ENABLE_INSTRUCTIONS=AVX2: the kernel uses AVX2, not
AVX-512).

On CUDA the table also gives the achieved bandwidth of the native kernel: the bytes a call must move
at the least (each input read once, each output and gradient written once) over its time, against the
device-to-device copy bandwidth measured in the same run (the practical peak of the memory system).

    python bench/msda.py              # CPU cases, and CUDA ones when a GPU is visible
    python bench/msda.py --quick      # fewer repeats
    python bench/msda.py --cases a --threads 1 --device cpu
    python bench/msda.py --threads 1 --clock process   # CPU time: robust on a busy machine
    python bench/msda.py --cases a,b --rounds 3        # each cell's best of 3 interleaved processes
    python bench/msda.py --device cuda --dtypes fp32,bf16

Results are in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "a": ("encoder N=2 512x512 (S=5440)", [(64, 64), (32, 32), (16, 16), (8, 8)], 2, None),
    "b": ("encoder N=1 800x1333 (S=21685)", [(100, 167), (50, 84), (25, 42), (13, 21)], 1, None),
    "c": ("decoder N=1 800x1333, 300 queries", [(100, 167), (50, 84), (25, 42), (13, 21)], 1, 300),
}
HEADS, CHANNELS, POINTS = 8, 32, 4
MODES = ("fwd", "fwd+bwd")
FORWARD_FMAS = 5  # per sample point and channel: 4 bilinear corners + the attention weight
BACKWARD_FMAS = 8  # 4 corner dot products with the output gradient + 4 value-gradient updates
BACKENDS = ("native", "reference")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak since the last reset (VmHWM) resident memory of this process."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 resets VmHWM to the current RSS, so input construction does not count.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _worker(case: str, backend: str, mode: str, device: str, threads: int, repeats: int, clock: str,
            dtype: str = "fp32") -> dict:
    """On the CPU it runs in its own process so that peak memory belongs to this measurement alone."""
    import torch

    from detr.ops import ms_deform_attn
    from detr.ops.dispatch import choose_backend
    from detr.ops.inputs import make_inputs

    torch.set_num_threads(threads)
    _, levels, batch, queries = CASES[case]
    choose_backend(backend, device)  # build/load outside the measurement
    inputs = make_inputs(levels, batch=batch, heads=HEADS, channels=CHANNELS, points=POINTS, queries=queries)
    args = [t.to(device) for t in inputs.as_tuple()]
    value_dtype = getattr(torch, DTYPES[dtype])
    # Reduced-precision value with float32 locations and weights: what the model passes under autocast.
    args[0] = args[0].to(value_dtype)
    training = mode == "fwd+bwd"
    if training:
        for index in (0, 3, 4):
            args[index].requires_grad_(True)
    grad_output = torch.randn(batch, args[3].shape[1], HEADS * CHANNELS, device=device, dtype=value_dtype)

    def call() -> None:
        out = ms_deform_attn(*args, backend=backend)
        if training:
            torch.autograd.grad(out, (args[0], args[3], args[4]), grad_output)

    # What a call must hand back whatever the implementation: the output, and with fwd+bwd the
    # gradients of value, sampling_locations and attention_weights (each as large as its input).
    element = args[0].element_size()
    result_bytes = grad_output.numel() * element
    if training:
        result_bytes += sum(args[i].numel() * args[i].element_size() for i in (0, 3, 4))
    # The least a call must move: each input read once and the output written once; the backward
    # then reads the inputs and the output's gradient again and writes the three gradients.
    input_bytes = sum(args[i].numel() * args[i].element_size() for i in (0, 3, 4))
    output_bytes = grad_output.numel() * element
    min_bytes = input_bytes + output_bytes
    if training:
        min_bytes += input_bytes + output_bytes + input_bytes

    # Multiply-adds (2 FLOPs each) per sample point and channel, see the module docstring.
    sample_points = args[4].numel()
    flops = 2 * sample_points * CHANNELS * (FORWARD_FMAS + (BACKWARD_FMAS if training else 0))

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # "process" counts CPU seconds of this process (all threads): on a shared machine it leaves out
        # the time spent waiting for a core, which wall-clock time includes.
        now = time.process_time if clock == "process" else time.perf_counter
        base = _rss_bytes()
        _reset_peak_rss()
        call()
        times = []
        for _ in range(repeats):
            started = now()
            call()
            times.append(now() - started)
        peak = _rss_bytes("VmHWM") - base
    return {"best_s": min(times), "median_s": statistics.median(times), "peak_bytes": max(peak, 0),
            "result_bytes": result_bytes, "min_bytes": min_bytes, "flops": flops}


def _run_worker(case: str, backend: str, mode: str, device: str, threads: int, repeats: int, clock: str,
                dtype: str, env: dict[str, str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", case, backend, mode, device,
               str(threads), str(repeats), clock, dtype]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {case}/{backend}/{mode}/{device} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker_env() -> dict[str, str]:
    """The environment of a worker process: this checkout's package first on its path."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _measure(case: str, backend: str, mode: str, device: str, threads: int, repeats: int, clock: str,
             dtype: str) -> dict:
    """CPU: times from one subprocess with the allocator as users run it; peak memory from a second one.
    CUDA: in this process (the device's peak counter is per measurement; a process start costs seconds)."""
    if device == "cuda":
        return _worker(case, backend, mode, device, threads, repeats, clock, dtype)
    env = _worker_env()
    timed = _run_worker(case, backend, mode, device, threads, repeats, clock, dtype, env)
    # A fixed mmap threshold makes glibc return every large block to the OS when freed, so resident
    # memory follows live tensors (the default adaptive threshold keeps freed blocks resident). It
    # also makes each large allocation page-fault afresh, hence a separate run for the timings.
    memory_env = dict(env, MALLOC_MMAP_THRESHOLD_="65536")
    memory = _run_worker(case, backend, mode, device, threads, 1, clock, dtype, memory_env)
    timed["peak_bytes"] = memory["peak_bytes"]
    return timed


def _measure_rounds(case: str, device: str, threads: int, repeats: int, clock: str, dtype: str,
                    rounds: int) -> dict[tuple[str, str], dict]:
    """Every (backend, mode) measured ``rounds`` times, round-robin (native fwd, native fwd+bwd,
    reference fwd, ...), keeping each one's best: on a shared machine a busy stretch then slows one
    round of each rather than every call of one backend. Peak memory comes from the first round."""
    results: dict[tuple[str, str], dict] = {}
    for round_index in range(rounds):
        for backend in BACKENDS:
            for mode in MODES:
                if round_index == 0:
                    results[backend, mode] = _measure(case, backend, mode, device, threads, repeats, clock, dtype)
                    continue
                again = _run_worker(case, backend, mode, device, threads, repeats, clock, dtype, _worker_env())
                best = results[backend, mode]
                best["best_s"] = min(best["best_s"], again["best_s"])
                best["median_s"] = min(best["median_s"], again["median_s"])
    return results


def avx2_flops_per_second(threads: int, size: int = 1536, repeats: int = 10) -> float:
    """float32 FLOP/s of a matmul restricted to AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2) at ``threads``: the
    practical FMA peak of the instruction set the native CPU kernel uses, measured in a subprocess."""
    code = (
        "import sys, time, torch\n"
        f"torch.set_num_threads({threads})\n"
        f"a = torch.randn({size}, {size}); b = torch.randn({size}, {size})\n"
        "for _ in range(3): a @ b\n"
        "best = float('inf')\n"
        f"for _ in range({repeats}):\n"
        "    started = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - started)\n"
        f"print(2 * {size} ** 3 / best)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2"))
    return float(done.stdout.strip().splitlines()[-1])


def _format_row(label: str, cells: list[str]) -> str:
    return f"{label:<40}" + "".join(f"{cell:>14}" for cell in cells)


def copy_bandwidth(gigabytes: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy in bytes/s (read plus written), the best of ``repeats``: the bandwidth a
    memory-bound kernel can reach on this GPU, measured rather than taken from a datasheet."""
    import torch

    source = torch.empty(int(gigabytes * 2**30) // 4, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del source, target
    torch.cuda.empty_cache()
    return 2 * gigabytes * 2**30 / best


def run(cases: list[str], devices: list[str], threads: int, repeats: int, clock: str, dtypes: list[str],
        rounds: int = 1) -> None:
    import torch

    print(f"torch {torch.__version__}, threads {threads}, repeats {repeats}, CPU clock {clock}, "
          f"M={HEADS} D={CHANNELS} L=4 P={POINTS}" + (f", best of {rounds} rounds (CPU)" if rounds > 1 else ""))
    for device in devices:
        peak_bandwidth = None
        if device == "cuda":
            peak_bandwidth = copy_bandwidth()
            print(f"device: {torch.cuda.get_device_name(0)} (times from CUDA events); device-to-device copy "
                  f"{peak_bandwidth / 1e9:.0f} GB/s")
        else:
            peak_flops = avx2_flops_per_second(threads)
            print(f"device: cpu ({os.cpu_count()} logical cores visible); AVX2 float32 matmul at {threads} "
                  f"thread(s): {peak_flops / 1e9:.0f} GFLOP/s")
        for dtype in dtypes:
            print(f"value dtype {dtype}" + ("" if dtype == "fp32" else " (locations and weights float32)"))
            print(_format_row("case / backend", ["fwd ms", "fwd+bwd ms", "fwd peak MB", "f+b peak MB",
                                                 "f+b extra MB"]))
            for case in cases:
                if device == "cpu":
                    results = _measure_rounds(case, device, threads, repeats, clock, dtype, rounds)
                else:
                    results = {(b, m): _measure(case, b, m, device, threads, repeats, clock, dtype)
                               for b in BACKENDS for m in MODES}
                print(CASES[case][0])
                for backend in BACKENDS:
                    cells = [f"{results[backend, m]['best_s'] * 1e3:.2f}" for m in MODES]
                    cells += [f"{results[backend, m]['peak_bytes'] / 2**20:.1f}" for m in MODES]
                    cells.append(f"{_extra_bytes(results[backend, 'fwd+bwd']) / 2**20:.1f}")
                    print(_format_row(f"  {backend}", cells))
                speed = [results["reference", m]["best_s"] / results["native", m]["best_s"] for m in MODES]
                memory = [results["native", m]["peak_bytes"] / max(results["reference", m]["peak_bytes"], 1)
                          for m in MODES]
                memory.append(_extra_bytes(results["native", "fwd+bwd"])
                              / max(_extra_bytes(results["reference", "fwd+bwd"]), 1))
                print(_format_row("  native speed-up / memory fraction",
                                  [f"{s:.1f}x" for s in speed] + [f"{f:.2f}" for f in memory]))
                if device == "cpu":
                    floors = [results["native", m]["flops"] / peak_flops for m in MODES]
                    print(_format_row("  arithmetic floor ms (FMAs / AVX2 peak)", [f"{f * 1e3:.2f}" for f in floors]))
                    print(_format_row("  native / floor", [f"{results['native', m]['best_s'] / f:.2f}"
                                                           for m, f in zip(MODES, floors)]))
                if peak_bandwidth is not None:
                    achieved = [results["native", m]["min_bytes"] / results["native", m]["best_s"] for m in MODES]
                    print(_format_row("  native GB/s (least bytes / time)", [f"{a / 1e9:.0f}" for a in achieved]))
                    print(_format_row("  fraction of the copy bandwidth", [f"{a / peak_bandwidth:.2f}"
                                                                           for a in achieved]))


def _extra_bytes(result: dict) -> int:
    """Peak memory beyond the tensors the call returns (output and gradients): its working memory."""
    return max(result["peak_bytes"] - result["result_bytes"], 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cpu, and cuda when a GPU is visible")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 timed calls per measurement")
    parser.add_argument("--rounds", type=int, default=1,
                        help="CPU: measure every cell this many times, round-robin, each in its own process, and "
                             "keep the best (a shared machine's busy stretches then spread over both backends)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="CPU timing: wall clock (default) or CPU time of the process (shared machines)")
    parser.add_argument("--dtypes", default="fp32", help=f"comma-separated value dtypes: {', '.join(DTYPES)}")
    parser.add_argument("--worker", nargs=8, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, backend, mode, device, threads, repeats, clock, dtype = args.worker
        print(json.dumps(_worker(case, backend, mode, device, int(threads), int(repeats), clock, dtype)))
        return

    import torch

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else (
        ["cpu"] if args.device == "auto" else [args.device])
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes {args.dtypes!r}: choose from {', '.join(DTYPES)}")
    repeats = args.repeats or (2 if args.quick else 5)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    run(cases, devices, args.threads or torch.get_num_threads(), repeats, args.clock, dtypes, args.rounds)


if __name__ == "__main__":
    main()
