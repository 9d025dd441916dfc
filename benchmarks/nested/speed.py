"""Fast-weight kernels: chunked (WY / UT transform) vs per-token recurrent forward time, and the
peak memory of a training step (forward + backward) of a fast-weight layer vs softmax attention,
over sequence lengths, in one run.

    python benchmarks/nested/speed.py --json runs/bench/nested/speed.json
    python benchmarks/nested/speed.py --lengths 256 1024 --quick

Time: the gated delta kernels, batch 2, 4 heads, head dim 32 (q, k, v, beta, decay random, k
unit-norm), ``--threads`` threads: best of ``--repeats`` forward passes (no autograd: inference)
and training steps (forward + backward to every input, the chunked form's purpose; the per-token
loop's training step is timed once).
Memory: each (layer, length) runs one training step (batch 1, d_model 128) in a fresh subprocess
and reports (1) the bytes of the tensors autograd saves for backward (counted once per storage,
through ``torch.autograd.graph.saved_tensors_hooks``: exact and machine-independent) and (2) the
growth of peak RSS (``ru_maxrss``) over the RSS just before the step. RSS growth includes
transient buffers such as the attention matrix, but it reads 0 while the step fits in memory
that the allocator already holds from the warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _inputs(T: int, B: int = 2, H: int = 4, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, d, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, d, generator=g), dim=-1)
    v = torch.randn(B, H, T, d, generator=g)
    beta = torch.sigmoid(torch.randn(B, H, T, generator=g))
    decay = torch.sigmoid(torch.randn(B, H, T, generator=g) + 3)
    return q, k, v, beta, decay


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_kernels(lengths: list[int], chunk_size: int, repeats: int, recurrent_max: int, train_max: int) -> list[dict]:
    """Forward only (inference) and one training step (forward + backward to q, k, v, b, a) per form."""
    from edge_glass.nested.fast_weights import delta_rule_chunked, delta_rule_recurrent

    def train_step(fn, inputs, **kw):
        o, S = fn(*inputs, **kw)
        (o.square().mean() + S.square().mean()).backward()

    rows = []
    for T in lengths:
        inputs = _inputs(T)
        with torch.no_grad():
            chunked = _best(lambda: delta_rule_chunked(*inputs, chunk_size=chunk_size), repeats)
            recurrent = (_best(lambda: delta_rule_recurrent(*inputs), max(1, repeats // 2))
                         if T <= recurrent_max else None)
        row = {"length": T, "chunked_ms": round(chunked * 1e3, 2),
               "recurrent_ms": None if recurrent is None else round(recurrent * 1e3, 1),
               "speedup": None if recurrent is None else round(recurrent / chunked, 1)}
        if T <= train_max:
            leaves = [t.clone().requires_grad_() for t in inputs]
            chunked_train = _best(lambda: train_step(delta_rule_chunked, leaves, chunk_size=chunk_size), repeats)
            recurrent_train = _best(lambda: train_step(delta_rule_recurrent, leaves), 1)
            row.update(train_chunked_ms=round(chunked_train * 1e3, 1), train_recurrent_ms=round(recurrent_train * 1e3, 1),
                       train_speedup=round(recurrent_train / chunked_train, 1))
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _memory_child(layer: str, T: int, d_model: int, heads: int) -> None:
    """Runs in a subprocess: prints the peak-RSS growth (MiB) of one training step."""
    torch.manual_seed(0)
    if layer == "softmax":
        from edge_glass.nested.attention import SoftmaxAttention

        module = SoftmaxAttention(d_model, heads)
    else:
        from edge_glass.nested.fast_weights import FastWeightAttention

        module = FastWeightAttention(d_model, heads, rule="gated_delta", chunk_size=64)
    x = torch.randn(1, T, d_model, requires_grad=True)
    module(torch.randn(1, 8, d_model))[0].sum().backward()  # allocator / kernel warm-up
    module.zero_grad()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * resource.getpagesize() // 1024
    base = max(before, rss_now)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # every tensor autograd keeps for backward, once per storage
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module(x)[0].square().mean()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": round(max(peak - base, 0) / 1024, 1), "saved_mib": round(sum(saved.values()) / 2**20, 2)}))


def measure_memory(lengths: list[int], d_model: int, heads: int, threads: int) -> list[dict]:
    rows = []
    for layer in ("gated_delta", "softmax"):
        for T in lengths:
            out = subprocess.run([sys.executable, __file__, "--child", layer, str(T), str(d_model), str(heads)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            got = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"layer": layer, "length": T, "peak_growth_mib": got["growth_mib"], "saved_for_backward_mib": got["saved_mib"]}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--chunk-size", type=int, default=32, help="chunk size of the timed kernel (32: fastest at 1024 on 1-2 cores, 16 / 32 / 64 measured)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recurrent-max", type=int, default=8192, help="longest length timed with the per-token loop")
    p.add_argument("--train-max", type=int, default=4096, help="longest length timed for a training step (forward + backward)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = args.lengths[:2], 1
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "chunk_size": args.chunk_size,
              "kernels": time_kernels(args.lengths, args.chunk_size, args.repeats, args.recurrent_max, args.train_max),
              "memory": measure_memory(args.lengths, args.d_model, args.heads, args.threads)}
    print("| length | forward: chunked ms | recurrent ms | speed-up | training step: chunked ms | recurrent ms | speed-up |\n"
          "|---|---|---|---|---|---|---|")
    for r in result["kernels"]:
        print(f"| {r['length']} | {r['chunked_ms']} | {r['recurrent_ms'] or '-'} | {r['speedup'] or '-'}x | "
              f"{r.get('train_chunked_ms', '-')} | {r.get('train_recurrent_ms', '-')} | {r.get('train_speedup', '-')}x |")
    print("\n| length | gated delta: saved for backward MiB | peak RSS growth MiB | softmax: saved for backward MiB | peak RSS growth MiB |\n"
          "|---|---|---|---|---|")
    mem = {(r["layer"], r["length"]): r for r in result["memory"]}
    for T in args.lengths:
        g, s = mem[("gated_delta", T)], mem[("softmax", T)]
        print(f"| {T} | {g['saved_for_backward_mib']} | {g['peak_growth_mib']} | {s['saved_for_backward_mib']} | {s['peak_growth_mib']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
