"""
Benchmarks for rlsd.py, one subcommand per benchmark:

    python bench.py logprobs     # peak extra memory: chunked token_logprobs vs naive fp32 log-softmax

Memory is measured in a fresh subprocess per variant, so one variant's peak
cannot hide another's: on CUDA with torch.cuda.max_memory_allocated, on CPU
with the process's peak resident set size (getrusage ru_maxrss), each taken
relative to the memory in use just before the call, after the logits exist.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import rlsd

GB = 1e9  # decimal gigabytes, as in "8 x 4096 x 151,936 fp32 = 20 GB"


def _pick_device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _current_rss_bytes():
    """Resident set size right now (Linux /proc), falling back to the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb * (1 if sys.platform == "darwin" else 1024)


def _measure_extra_memory(fn, device):
    """Run fn() once; return (peak extra bytes above the memory in use before it, seconds)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    seconds = time.perf_counter() - t0
    del out
    return peak - before, seconds


# -----------------------------------------------------------------------------
# logprobs: chunked token_logprobs against the naive full fp32 log-softmax


def _logprobs_worker(args):
    """Child process: build bf16 logits [B, T, V], run one variant, print one JSON line."""
    device = _pick_device(args.device)
    B, T, V = args.batch, args.seq, args.vocab
    logits = torch.empty(B, T, V, dtype=torch.bfloat16, device=device).normal_()  # touch every page
    tokens = torch.randint(0, V, (B, T), device=device)                            # [B, T]
    if args.variant == "naive":
        fn = lambda: logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    else:
        fn = lambda: rlsd.token_logprobs(logits, tokens, chunk_size=args.chunk_size)
    with torch.no_grad():  # the teacher pass; the bytes that matter are the fp32 [B, T, V] ones
        extra, seconds = _measure_extra_memory(fn, device)
    print(json.dumps(dict(variant=args.variant, batch=B, seq=T, vocab=V, device=device,
                          logits_bytes=logits.numel() * logits.element_size(),
                          extra_bytes=extra, seconds=seconds)))


def _run_worker(variant, batch, seq, args):
    """Run _logprobs_worker in a fresh Python process and return its JSON result."""
    cmd = [sys.executable, __file__, "_logprobs_worker", "--variant", variant, "--batch", str(batch),
           "--seq", str(seq), "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size),
           "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {variant} {batch}x{seq} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(r, note=""):
    size = f"{r['batch']} x {r['seq']}"
    secs = f"{r['seconds']:6.1f} s" if "seconds" in r else ""
    return (f"  {size:<12} {r['variant']:<8} {r['logits_bytes'] / GB:8.2f} GB "
            f"{r['extra_bytes'] / GB:9.2f} GB  {secs:>8}  {note}")


def bench_logprobs(args):
    """Peak extra memory of rlsd.token_logprobs vs logits.float().log_softmax(-1).gather(...)."""
    device = _pick_device(args.device)
    how = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS of a fresh process"
    print(f"token_logprobs, peak extra memory: bf16 logits, V={args.vocab:,}, "
          f"chunk_size={args.chunk_size}, device={device} ({how})")
    print(f"  {'B x T':<12} {'variant':<8} {'logits':>11} {'extra':>12}  {'time':>8}")
    naive_fit = _run_worker("naive", args.batch, args.fit_seq, args)
    chunked_fit = _run_worker("chunked", args.batch, args.fit_seq, args)
    chunked_full = _run_worker("chunked", args.batch, args.seq, args)
    for r in (naive_fit, chunked_fit, chunked_full):
        print(_row(r))
    if args.naive_full:
        naive_full = _run_worker("naive", args.batch, args.seq, args)
        print(_row(naive_full))
    else:  # the naive extra memory is two fp32 [B, T, V] tensors: linear in B x T
        scale = args.seq / args.fit_seq
        naive_full = dict(naive_fit, seq=args.seq, extra_bytes=naive_fit["extra_bytes"] * scale,
                          logits_bytes=naive_fit["logits_bytes"] * scale)
        naive_full.pop("seconds")
        print(_row(naive_full, f"EXTRAPOLATED from {args.batch} x {args.fit_seq} (x{scale:g}), not measured"))
    small = 100 * chunked_fit["extra_bytes"] / naive_fit["extra_bytes"]
    print(f"chunked / naive extra memory at {args.batch} x {args.fit_seq}: {small:.1f}%  "
          "(the chunked peak is a few [chunk_size, V] fp32 buffers, whatever B x T is)")
    full = 100 * chunked_full["extra_bytes"] / naive_full["extra_bytes"]
    verdict = "PASS" if full < 10 else "FAIL"
    print(f"chunked / naive extra memory at {args.batch} x {args.seq}: {full:.1f}%  (target < 10%: {verdict})")


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0].rstrip(":"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def logprobs_args(p):
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--seq", type=int, default=4096, help="response tokens per row (full size)")
        p.add_argument("--vocab", type=int, default=151_936, help="Qwen3-VL vocabulary")
        p.add_argument("--chunk-size", type=int, default=1024)
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")

    p = sub.add_parser("logprobs", help="chunked token_logprobs vs naive fp32 log-softmax: peak memory")
    logprobs_args(p)
    p.add_argument("--fit-seq", type=int, default=1024, help="size at which the naive variant is measured")
    p.add_argument("--naive-full", action="store_true", help="also measure naive at full size (needs ~50 GB)")
    p.set_defaults(func=bench_logprobs)

    w = sub.add_parser("_logprobs_worker")  # internal, unlisted: one variant in one process
    logprobs_args(w)
    w.add_argument("--variant", choices=["naive", "chunked"], required=True)
    w.set_defaults(func=_logprobs_worker)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
