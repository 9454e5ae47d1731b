# Triton reduction kernels on a GPU: kernel time from CUDA-graph replays over rotated input copies (> L2), so
# Python launch overhead is excluded (measured separately). Produced bench/results/triton-reduce-h100-2026-11-27.json.
# Run: OUT=bench/results python bench/triton_reduce_graph_timing.py
import json, math, os
import torch, triton
from triton.testing import do_bench, do_bench_cudagraph
from fused_ensemble.kernels import ensemble_reduce as er
from fused_ensemble.reference import reduce_reference, stats_reference
OUT = os.environ.get("OUT", ".")
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}

def graph_ms(fn, xs):
    return do_bench_cudagraph(lambda: [fn(x) for x in xs], rep=40) / len(xs)

buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(buf)
copy_gbs = 2 * buf.numel() / graph_ms(lambda b: dst.copy_(b), [buf]) / 1e6
res["copy_GBps"] = copy_gbs; print(f"device copy {copy_gbs:.0f} GB/s", flush=True); del buf, dst
tiny = torch.randn(2, 2, 10, device="cuda")
for wrap in (True, False):
    saved = er._wrap_triton
    if not wrap: er._wrap_triton = None
    us = do_bench(lambda: er.reduce_forward(tiny, "mean_probs"), rep=100) * 1e3
    er._wrap_triton = saved
    print(f"launch+call overhead wrap_triton={wrap}: {us:.1f} us (tiny input)", flush=True)
    res[f"overhead_us_wrap_{wrap}"] = us
print("eager tiny:", do_bench(lambda: reduce_reference(tiny, "mean_probs"), rep=100) * 1e3, "us", flush=True)

def inputs(N, R, K, dt):
    x = torch.randn(N, R, K, device="cuda").to(dt)
    return [x] + [torch.randn_like(x) for _ in range(max(0, math.ceil(200e6 / (x.numel() * x.element_size())) - 1))]

shapes = [(16, 65536, 10, torch.float32), (8, 4096, 1000, torch.float32), (8, 256, 32000, torch.float32),
          (8, 64, 128256, torch.float32), (8, 256, 128256, torch.float32), (8, 8192, 1000, torch.bfloat16),
          (16, 65536, 10, torch.bfloat16), (8, 128, 128256, torch.bfloat16), (4, 512, 32000, torch.bfloat16)]
for N, R, K, dt in shapes:
    xs = inputs(N, R, K, dt); x = xs[0]
    nbytes = x.numel() * x.element_size() + R * K * 4
    for op in list(er.REDUCTIONS) + ["stats"]:
        ours = (lambda x: er.stats_forward(x)) if op == "stats" else (lambda x, op=op: er.reduce_forward(x, op))
        eager = (lambda x: stats_reference(x)) if op == "stats" else (lambda x, op=op: reduce_reference(x, op))
        t = graph_ms(ours, xs); te = graph_ms(eager, xs)
        row = dict(N=N, R=R, K=K, dtype=str(dt), op=op, MB=x.numel() * x.element_size() / 2**20, us=t * 1e3,
                   GBps=nbytes / t / 1e6, frac_copy=nbytes / t / 1e6 / copy_gbs, eager_us=te * 1e3, speedup=te / t)
        res["rows"].append(row)
        print(f"{N:3d} {R:6d} {K:7d} {str(dt)[6:]:8s} {op:16s} {row['MB']:6.0f}MB {t*1e3:8.1f}us "
              f"{row['GBps']:6.0f}GB/s {row['frac_copy']:.2f}copy eager {te*1e3:8.1f}us x{te/t:.2f}", flush=True)
    del xs, x
json.dump(res, open(os.path.join(OUT, "triton_reduce_bench.json"), "w"), indent=1)

def sweep(shape, op, configs):
    xs = inputs(*shape, torch.float32); x = xs[0]; nb = x.numel() * 4 + shape[1] * shape[2] * 4
    for cfg in configs:
        t = graph_ms(lambda x: er.reduce_forward(x, op, **cfg), xs)
        print(f"sweep {shape[:3]} {op} {cfg}: {nb / t / 1e6:.0f} GB/s", flush=True)

# sweep((16, 65536, 10), "mean_probs", [dict(block_r=br, num_warps=nw) for br in (64, 128, 256, 512) for nw in (2, 4, 8)])
# sweep((8, 4096, 1000), "mean_probs", [dict(block_r=br, num_warps=nw) for br in (1, 2, 4, 8) for nw in (4, 8, 16)])
# sweep((8, 256, 128256), "mean_probs", [dict(block_k=bk, num_warps=nw) for bk in (2048, 4096, 8192) for nw in (4, 8, 16)])
for op in ("log_mean_probs", "stats"):
    xs = inputs(16, 65536, 10, torch.float32)
    for br in (16, 32, 64):
        for nw in (1, 2, 4):
            f = (lambda x: er.stats_forward(x, block_r=br, num_warps=nw)) if op == "stats" else (lambda x: er.reduce_forward(x, op, block_r=br, num_warps=nw))
            t = graph_ms(f, xs); print(f"sweep K=10 {op} block_r={br} warps={nw}: {(xs[0].numel()*4 + 65536*40)/t/1e6:.0f} GB/s", flush=True)
