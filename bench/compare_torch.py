#!/usr/bin/env python3
"""Times PyTorch and `gpunorm bench` on the same shapes, in the same run.

Usage (from the repository root, with torch installed, e.g. in .venv):

    cargo build --release
    .venv/bin/python bench/compare_torch.py [--iters N] [--gpunorm PATH]
        [--scale K] [--torch-devices cpu,cuda]

For every shape of the criterion benches (the first dimension times
`--scale`: a GPU's L2 holds the 16 MiB tensors of scale 1) it times torch
on the CPU and on CUDA when torch sees a GPU (`--torch-devices` picks),
runs `gpunorm bench --json` on the same shape,
and prints one table: ms, GB/s (the byte model of `gpunorm bench --help`:
input read once, output written once, parameters and statistics),
gpunorm's fraction of its adapter's WGSL copy kernel, and the ratio of
torch's time to gpunorm's (above 1: gpunorm is faster).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

# (label, op, shape, extra gpunorm flags, torch module factory, input layout)
CASES = [
    ("layer-norm", "layer-norm", [4096, 1024], [], lambda s: torch.nn.LayerNorm(s[-1]), None),
    ("layer-norm", "layer-norm", [1024, 16384], [], lambda s: torch.nn.LayerNorm(s[-1]), None),
    ("layer-norm", "layer-norm", [65536, 256], [], lambda s: torch.nn.LayerNorm(s[-1]), None),
    ("rms-norm", "rms-norm", [4096, 4096], [], lambda s: torch.nn.RMSNorm(s[-1]), None),
    ("batch-norm train NCHW", "batch-norm", [32, 64, 56, 56], ["--mode", "train"],
     lambda s: torch.nn.BatchNorm2d(s[1]).train(), None),
    ("batch-norm eval NCHW", "batch-norm", [32, 64, 56, 56], ["--mode", "eval"],
     lambda s: torch.nn.BatchNorm2d(s[1]).eval(), None),
    ("batch-norm train NHWC", "batch-norm", [32, 56, 56, 64],
     ["--mode", "train", "--convention", "keras", "--momentum", "0.9", "--eps", "1e-5"],
     lambda s: torch.nn.BatchNorm2d(s[3]).train(), "channels_last"),
    ("batch-norm eval NHWC", "batch-norm", [32, 56, 56, 64],
     ["--mode", "eval", "--convention", "keras", "--momentum", "0.9", "--eps", "1e-5"],
     lambda s: torch.nn.BatchNorm2d(s[3]).eval(), "channels_last"),
    ("group-norm 32 groups", "group-norm", [8, 256, 32, 32], ["--groups", "32"],
     lambda s: torch.nn.GroupNorm(32, s[1]), None),
    ("group-norm 32 groups NHWC", "group-norm", [8, 32, 32, 256],
     ["--convention", "keras", "--groups", "32", "--eps", "1e-5"],
     lambda s: torch.nn.GroupNorm(32, s[3]), "channels_last"),
    ("instance-norm", "instance-norm", [8, 64, 128, 128], [],
     lambda s: torch.nn.InstanceNorm2d(s[1]), None),
]

# Backward passes (grad_input and the affine gradients from one grad_output),
# timed like the forwards: gpunorm with `--backward`, torch with
# torch.autograd.grad on a graph kept across iterations.
BACKWARD_CASES = [
    ("layer-norm backward", "layer-norm", [4096, 1024], [],
     lambda s: torch.nn.LayerNorm(s[-1]), None),
    ("rms-norm backward", "rms-norm", [4096, 1024], [],
     lambda s: torch.nn.RMSNorm(s[-1]), None),
    ("batch-norm train backward NCHW", "batch-norm", [32, 64, 56, 56], ["--mode", "train"],
     lambda s: torch.nn.BatchNorm2d(s[1]).train(), None),
    ("batch-norm train backward NHWC", "batch-norm", [32, 56, 56, 64],
     ["--mode", "train", "--convention", "keras", "--momentum", "0.9", "--eps", "1e-5"],
     lambda s: torch.nn.BatchNorm2d(s[3]).train(), "channels_last"),
    ("group-norm backward", "group-norm", [8, 256, 32, 32], ["--groups", "32"],
     lambda s: torch.nn.GroupNorm(32, s[1]), None),
    ("group-norm backward NHWC", "group-norm", [8, 32, 32, 256],
     ["--convention", "keras", "--groups", "32", "--eps", "1e-5"],
     lambda s: torch.nn.GroupNorm(32, s[3]), "channels_last"),
    ("instance-norm backward", "instance-norm", [8, 64, 128, 128], [],
     lambda s: torch.nn.InstanceNorm2d(s[1]), None),
]


def torch_input(shape, layout, device):
    if layout == "channels_last":
        n, h, w, c = shape
        x = torch.randn(n, c, h, w, device=device).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(*shape, device=device)
    return x


def median_ms(step, device, iters, warmup=3):
    """Median time of `step()` in ms: CUDA events around each call on a GPU
    (device time, as gpunorm's timestamp queries; a host clock with a
    synchronize per call would add the launch and sync to kernels of a few
    microseconds), the host clock on the CPU."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = sorted(start.elapsed_time(end) for start, end in events)
        return times[len(times) // 2]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def time_torch_backward(factory, shape, layout, device, iters):
    module = factory(shape).to(device)
    x = torch_input(shape, layout, device).requires_grad_()
    y = module(x)
    dy = torch.randn_like(y)
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]
    return median_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), device, iters)


def time_torch(factory, shape, layout, device, iters):
    module = factory(shape).to(device)
    x = torch_input(shape, layout, device)
    with torch.no_grad():
        return median_ms(lambda: module(x), device, iters)


def run_gpunorm(binary, op, shape, flags, iters):
    cmd = [binary, "bench", "--op", op, "--shape", ",".join(map(str, shape)),
           "--iters", str(iters), "--json", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name():
    """The CPU as Linux names it, with its family/model and last-level cache:
    lavapipe's fractions depend on the CPU (a large L3 speeds the copy kernel
    more than the normalizations, which are bound by per-access work)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in f)
                if k.strip() in ("model name", "cpu family", "model")
            )
        cache = ""
        path = "/sys/devices/system/cpu/cpu0/cache/index3/size"
        if os.path.exists(path):
            with open(path) as f:
                cache = f", L3 {f.read().strip()}"
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']}{cache})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--gpunorm", default=os.path.join("target", "release", "gpunorm"))
    parser.add_argument("--scale", type=int, default=1,
                        help="multiply the first dimension of every shape by this")
    parser.add_argument("--torch-devices", default="cpu,cuda",
                        help="torch devices to time, of cpu and cuda (cuda only where torch sees one)")
    args = parser.parse_args()
    if not os.path.exists(args.gpunorm):
        sys.exit(f"error: {args.gpunorm} not found; run `cargo build --release` first")
    if args.scale < 1:
        sys.exit("error: --scale must be at least 1")
    wanted = args.torch_devices.split(",") if args.torch_devices else []
    if any(d not in ("cpu", "cuda") for d in wanted):
        sys.exit(f"error: --torch-devices takes cpu and cuda, got {args.torch_devices!r}")
    devices = [d for d in wanted if d == "cpu" or torch.cuda.is_available()]
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
          + (f", CUDA: {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    header = "| op | shape | gpunorm ms | GB/s | fraction of copy | copy GB/s |"
    for device in devices:
        header += f" torch {device} ms | torch {device} GB/s | torch/gpunorm |"
    # Each row is printed as soon as it is measured, so a failed or
    # interrupted case (a timeout on a lent GPU) loses only itself.
    printed_header = False
    failed = []
    cases = [(case, False) for case in CASES] + [(case, True) for case in BACKWARD_CASES]
    for (label, op, shape, flags, factory, layout), backward in cases:
        shape = [shape[0] * args.scale] + shape[1:]
        extra = ["--backward"] if backward else []
        name = f"{label} {'x'.join(map(str, shape))}"
        try:
            g = run_gpunorm(args.gpunorm, op, shape, flags + extra, args.iters)
            timer = time_torch_backward if backward else time_torch
            torch_ms = {d: timer(factory, shape, layout, d, args.iters) for d in devices}
        except Exception as e:  # noqa: BLE001 - report the case, go on to the next
            failed.append(name)
            print(f"  failed {name}: {e}", file=sys.stderr, flush=True)
            continue
        if not printed_header:
            print(f"gpunorm adapter: {g['adapter']} ({g['timing']} timing)")
            print(header)
            print("|" + "---|" * (header.count("|") - 1))
            printed_header = True
        line = (f"| {label} | {'x'.join(map(str, shape))} | {g['median_ms']:.2f} | "
                f"{g['gbps']:.2f} | {g['fraction_of_copy']:.2f} | {g['copy_gbps']:.2f} |")
        for device in devices:
            t = torch_ms[device]
            line += f" {t:.2f} | {g['bytes'] / t / 1e6:.2f} | {t / g['median_ms']:.2f} |"
        print(line, flush=True)
    if failed:
        sys.exit(f"error: {len(failed)} case(s) failed: {', '.join(failed)}")

if __name__ == "__main__":
    main()
