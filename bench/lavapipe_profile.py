#!/usr/bin/env python3
"""Where a kernel's time goes on lavapipe: a sampling profile of the code
llvmpipe generates for `gpunorm bench`, split by kernel and by kind of code.

    python3 bench/lavapipe_profile.py --op layer-norm --shape 4096,1024 [--backward] ...

Every argument but the profiler's own (--binary, --warmup, --seconds) goes
to `gpunorm bench`. Needs perf and objdump (Debian: linux-perf, binutils),
root or perf_event_paranoid ≤ 1, and lavapipe as the adapter. Development
only: CI does not run it.

Why: on lavapipe a kernel's time follows how many storage accesses it makes
(README, Performance), and timing alone cannot say whether a slow kernel
pays for its accesses, its arithmetic or something else. llvmpipe compiles
each storage access into a loop over the 8 SIMD lanes (a scalar load or
store per lane and component, with a bounds check), so its machine code
shows which samples fall in access loops and which in straight-line code
(arithmetic, spills, subgroup operations). Comparing each kernel with the
bench's copy kernel, sampled in the same process over the same seconds,
gives a ratio that a drifting host moves little.

How: the bench runs with many iterations; after a warm-up, `perf record`
samples it, the process's anonymous executable mappings (llvmpipe's JIT
code) are read from /proc/PID/mem and disassembled, and each sample is
attributed to a JIT function (functions end at `ret`) and, within it, to a
load loop, a store loop or other code. A lane loop is a `cmp $0x8,%reg` /
`jae` pair; it is a load loop if it contains a masked `vpbroadcastd` from
an indexed address, a store loop if it contains a 32-bit store to one.
These patterns are those of llvmpipe 22.3 (LLVM 15) on x86-64 with
AVX-512: another version may need them adjusted. The copy kernel is the
function with 8 load loops and 8 store loops of 4 components each
(copy.wgsl: COPY_PER_THREAD vec4s).
"""
import argparse
import bisect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD = re.compile(r"vpbroadcastd \(%r\w+,%r\w+,4\)")
STORE = re.compile(r"mov +%\w+,\(%r\w+,%r\w+,4\)")
LANE_LOOP = re.compile(r"cmp +\$0x8,%\w+")


def jit_mappings(pid):
    """(start, bytes) of every anonymous executable mapping of `pid`."""
    found = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            fields = line.split()
            if "x" not in fields[1] or len(fields) >= 6:
                continue
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            try:
                mem.seek(lo)
                found.append((lo, mem.read(hi - lo)))
            except OSError:
                pass
    return found


def disassemble(start, code, scratch):
    """[(address, instruction text)] of a mapping."""
    path = os.path.join(scratch, f"jit_{start:x}.bin")
    with open(path, "wb") as f:
        f.write(code)
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={start:#x}", path],
        capture_output=True, text=True, check=True,
    ).stdout
    listing = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip().endswith(":"):
            listing.append((int(parts[0].strip()[:-1], 16), parts[-1].strip()))
    return listing


def functions(listing):
    """Split a mapping's listing into functions: one ends at each `ret`."""
    funcs, current = [], []
    for address, text in listing:
        current.append((address, text))
        if text.startswith("ret"):
            funcs.append(current)
            current = []
    if current:
        funcs.append(current)
    return [f for f in funcs if any(not t.startswith(("nop", "int3", "(bad)", "add    %al,(%rax)")) for _, t in f)]


def lane_loops(func):
    """[(first, end, kind, accesses)] of a function's lane loops."""
    loops = []
    for i, (address, text) in enumerate(func[:-1]):
        if not LANE_LOOP.match(text) or not func[i + 1][1].startswith("jae"):
            continue
        try:
            end = int(func[i + 1][1].split()[-1], 16)
        except ValueError:
            continue
        first = func[i - 1][0] if i > 0 and func[i - 1][1].startswith("inc") else address
        body = [t for a, t in func if first <= a < end]
        loads = sum(1 for t in body if LOAD.search(t))
        stores = sum(1 for t in body if STORE.search(t))
        kind = "load" if loads else ("store" if stores else "other loop")
        loops.append((first, end, kind, loads or stores))
    return loops


def profile(args, bench_args):
    scratch = tempfile.mkdtemp(prefix="gpunorm-profile-")
    env = dict(os.environ)
    env.setdefault("XDG_RUNTIME_DIR", scratch)
    bench = subprocess.Popen(
        [args.binary, "bench", *bench_args, "--iters", "100000", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        time.sleep(args.warmup)
        if bench.poll() is not None:
            sys.exit("gpunorm bench ended before the warm-up did: check its arguments")
        data = os.path.join(scratch, "perf.data")
        subprocess.run(
            ["perf", "record", "-q", "-o", data, "-p", str(bench.pid), "--", "sleep", str(args.seconds)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        mappings = jit_mappings(bench.pid)
    finally:
        bench.kill()
        bench.wait()
    ips = subprocess.run(
        ["perf", "script", "-i", data, "-F", "ip", "-G"], capture_output=True, text=True, check=True,
    ).stdout.split()
    return Counter(int(ip, 16) for ip in ips), mappings, scratch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "target", "release", "gpunorm"))
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds before sampling starts")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds of sampling")
    args, bench_args = ap.parse_known_args()
    for tool in ("perf", "objdump"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (Debian: apt-get install linux-perf binutils)")

    samples, mappings, scratch = profile(args, bench_args)
    total = sum(samples.values())
    rows = []
    for start, code in mappings:
        in_mapping = {a: c for a, c in samples.items() if start <= a < start + len(code)}
        if not in_mapping:
            continue
        for func in functions(disassemble(start, code, scratch)):
            first, last = func[0][0], func[-1][0]
            hits = {a: c for a, c in in_mapping.items() if first <= a <= last}
            n = sum(hits.values())
            if n < 0.01 * total:
                continue
            loops = lane_loops(func)
            starts = [lp[0] for lp in loops]
            kinds = Counter()
            for address, count in hits.items():
                i = bisect.bisect_right(starts, address) - 1
                inside = i >= 0 and address < loops[i][1] + 8
                kinds[loops[i][2] if inside else "other code"] += count
            shape = Counter((kind, accesses) for _, _, kind, accesses in loops)
            is_copy = shape == Counter({("load", 4): 8, ("store", 4): 8})
            rows.append((first, last - first, n, kinds, loops, is_copy))
    shutil.rmtree(scratch, ignore_errors=True)

    jit = sum(r[2] for r in rows)
    copy = sum(r[2] for r in rows if r[5])
    print(f"samples: {total}, in JIT code: {jit} ({jit / max(total, 1):.0%})")
    if copy:
        print(f"op / copy kernel: {(jit - copy) / copy:.2f} (about 1 / fraction_of_copy)")
    print(f"{'function':>14} {'bytes':>7} {'share':>6} {'÷copy':>6} {'loads':>6} {'stores':>6} "
          f"{'other':>6}  lane loops (load/store)")
    for first, size, n, kinds, loops, is_copy in sorted(rows, key=lambda r: -r[2]):
        name = "copy kernel" if is_copy else f"kernel @{first & 0xfffff:05x}"
        share = n / max(jit - copy, 1) if not is_copy else n / copy
        per_copy = f"{n / copy:.2f}" if copy else "-"
        other = kinds["other code"] + kinds["other loop"]
        nl = sum(1 for lp in loops if lp[2] == "load")
        ns = sum(1 for lp in loops if lp[2] == "store")
        print(f"{name:>14} {size:>7} {share:>6.0%} {per_copy:>6} {kinds['load'] / n:>6.0%} "
              f"{kinds['store'] / n:>6.0%} {other / n:>6.0%}  {nl}/{ns}")


if __name__ == "__main__":
    main()
