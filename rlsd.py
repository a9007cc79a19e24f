"""
RLSD: RL with verifiable rewards + self-distillation (arXiv 2604.03128), the objective.

One RLSD step, in the order it runs (train.py's train_step has the same six steps), and the function for each:

  1. rollout        sample G completions per prompt from the current policy       (train.py)
  2. reward         a verifier scores each completion, R in {0, 1}                 (train.py, verify.py)
  3. group adv.     A = (R - mean_G R) / std_G R, one number per completion        group_advantages       Eq. 1
  4. teacher pass   the same model (a snapshot, re-synced), with the reference answer r in its prompt,
                    scores the *student's* completion token by token, no gradient  token_logprobs
  5. token credit   Delta_t = log P_T - log P_S, w_t = exp(sign(A) Delta_t),       evidence_weights       Eq. 13-14
                    Â_t = A ((1 - lam) + lam clip(w_t, 1 - eps_w, 1 + eps_w))      rlsd_token_advantages  Eq. 15
                    with lam falling from 0.5 to 0 over the first 50 steps         rlsd_lambda
  6. update         the PPO/GRPO clipped loss, with Â_t in place of A              policy_loss            Eq. 2

Sign/magnitude decoupling, the idea in one line: clip(w_t) > 0, so sign(Â_t) == sign(A). The verifier alone picks
the direction of every token's update; the teacher only moves the size of the credit between a completion's tokens.
In code Â_t is `a_hat`. opsd_loss is the OPSD baseline (Eq. 6): plain distillation towards the teacher, which
ignores the reward; it is here for comparison, RLSD does not use it.

Shapes: B completions (rows), C completion tokens (padded), V vocabulary size. Only depends on torch. Every function is
pure: no globals, no in-place edits of inputs. The one optimisation, computing log-softmaxes in chunks of rows so
that no float32 [B, C, V] is ever built, sits at the end of the file.
"""

import math

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")
DIVERGENCES = ("fkl", "rkl", "jsd")
_MAX_LOG = 20.0  # clamp log-ratios / log-weights here before exp: e^20 ~ 5e8, finite in fp32


# -----------------------------------------------------------------------------
# small private helpers


def _check_same_shape(**tensors):
    """Raise a one-line ValueError unless all named tensors share one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        got = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"shape mismatch: {got}; pass [B, C] tensors for the same completions")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; use one of {choices}")


def _masked_mean(x, mask):
    """Mean of x [B, C] over mask [B, C] (bool); 0.0 for an empty mask."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# step 3: group advantages (Eq. 1)


def group_advantages(rewards, group_size, scale="group", eps=1e-6):
    """GRPO advantage of each completion relative to its group (Eq. 1).

    rewards: [N] with N = num_prompts * group_size; rows i*G .. i*G+G-1 are the
             G completions to prompt i.
    scale:   "group" (default, the paper): divide by the group's std (ddof=1);
             "batch": divide by the std of all N rewards (ddof=1);
             "none":  do not divide, just centre (Dr. GRPO).
    returns: A [N] float. A group whose rewards are all equal gets exactly 0: it
             carries no signal about which completion is better (and 0/0 must not
             become NaN).
    """
    _check_choice("scale", scale, SCALES)
    if group_size < 2:
        raise ValueError(f"group_size={group_size} must be >= 2: one sample has no group to compare with")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} is not [num_prompts * group_size] "
                         f"with group_size={group_size}; make the batch a multiple of the group size")
    r = rewards if rewards.is_floating_point() else rewards.float()
    g = r.view(-1, group_size)                                    # [P, G]
    centred = g - g.mean(dim=1, keepdim=True)                     # [P, G]
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)    # ddof=1, as in Eq. 1
    elif scale == "batch":
        centred = centred / (r.std() + eps)
    constant = (g == g[:, :1]).all(dim=1, keepdim=True)           # [P, 1]
    return torch.where(constant, torch.zeros_like(centred), centred).view(-1)  # [N]


# -----------------------------------------------------------------------------
# step 4 (and 6): per-token log-probs of the sampled tokens


def _logp_entropy_rows(x, tokens, temperature, with_entropy):
    """x [c, V] logits (any dtype), tokens [c] -> [c, 1] logp, or [c, 2] logp | entropy (fp32)."""
    logp_all = (x.float() / temperature).log_softmax(-1)           # [c, V] fp32, one chunk only
    logp = logp_all.gather(-1, tokens[:, None]).squeeze(-1)         # [c]
    if not with_entropy:
        return logp[:, None]
    # -sum p log p from the stable log-softmax; lse - E_p[z] would cancel catastrophically
    entropy = -(logp_all.exp() * logp_all).sum(-1)                  # [c]
    return torch.stack([logp, entropy], dim=-1)                     # [c, 2]


def token_logprobs(logits, tokens, temperature=1.0, chunk_size=1024, return_entropy=False):
    """log pi(tokens[b, t]) under softmax(logits[b, t] / temperature), in float32.

    logits: [B, C, V], any dtype (bf16 is fine); already aligned so that
            logits[:, t] predicts tokens[:, t] (shift before calling).
    tokens: [B, C] long.
    temperature: the sampling temperature (default 1.0); divide by it in *both*
            the student and the teacher pass, or Delta (Eq. 13) is skewed.
    chunk_size: rows of the flattened B*C processed at once (default 1024).
            A full float32 log-softmax would be [B, C, V]: 8 x 4096 x 151,936
            x 4 bytes = 20 GB. Chunking caps the extra memory at a few
            [chunk_size, V] float32 buffers, in forward and in backward.
    returns: logp [B, C] float32, or (logp, entropy) [B, C] each when
            return_entropy (entropy of the temperature-scaled distribution).
            Both are differentiable w.r.t. logits (the training forward needs it).
    Tip: pass contiguous logits; a sliced logits[:, :-1] is copied by reshape.
    """
    return token_logprobs_from_hidden(logits, None, tokens, temperature, chunk_size, return_entropy)


def token_logprobs_from_hidden(hidden, weight, tokens, temperature=1.0, chunk_size=1024, return_entropy=False,
                               banned=()):
    """token_logprobs(hidden @ weight.T, tokens, ...) without ever holding the [B, C, V] logits.

    hidden: [B, C, H] last hidden states, aligned as token_logprobs' logits are; weight: [V, H], the LM head's
    (cast to hidden's dtype; None: hidden are the logits). banned: ids whose logits are -1e4, as for the sampler.
    The head runs on chunk_size rows at a time, and again in backward: a few [chunk_size, V] float32 buffers
    whatever B x C, where bf16 logits at 8 x 4096 x 151,936 take 10 GB, and their gradient 10 GB more.
    """
    if hidden.dim() != 3 or tuple(tokens.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"logits or hidden {tuple(hidden.shape)} / tokens {tuple(tokens.shape)}: expected logits "
                         "[B, C, V] or hidden states [B, C, H] (with weight [V, H]), and tokens [B, C]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0; use the sampling temperature, e.g. 1.0")
    B, C, H = hidden.shape
    ban = torch.tensor(list(banned), dtype=torch.long, device=hidden.device)

    def fn(h, w, tok):  # h [c, H] -> [c, K]
        logits = h if w is None else h @ w.T                      # [c, V]: one chunk of the LM head
        return _logp_entropy_rows(logits.index_fill(-1, ban, -1e4) if len(ban) else logits, tok, temperature,
                                  return_entropy)

    weight = None if weight is None else weight.to(hidden.dtype)  # [V, H]
    out = _chunked_rows(hidden.reshape(B * C, H), weight, fn, chunk_size, tokens.reshape(B * C))  # [B*C, K]
    logp = out[:, 0].view(B, C)                                   # [B, C]
    return (logp, out[:, 1].view(B, C)) if return_entropy else logp


# -----------------------------------------------------------------------------
# step 5: evidence weights and token advantages (Eq. 13-15)


def evidence_weights(advantages, teacher_logp, student_logp, eps_w=0.2):
    """How much the reference answer r changes each sampled token's probability (Eq. 13-14).

    advantages:   A [B], one per completion (broadcast over its C tokens).
    teacher_logp: log P_T(y_t | x, r, y<t) [B, C], the teacher pass (prompt includes r).
    student_logp: log P_S(y_t | x, y<t) [B, C], the same tokens without r.
    eps_w:        evidence clip (default 0.2, so clipped w lies in [0.8, 1.2]).
    returns: (w, w_clipped), both [B, C] float32 and detached:
        Delta_t = teacher_logp - student_logp                        (Eq. 13)
        w_t     = exp(sign(A) * Delta_t)                             (Eq. 14)
    For A > 0, tokens that r makes more likely get w > 1 (more credit); for
    A < 0, tokens that r makes less likely get w > 1 (more blame). A = 0 gives w = 1.
    sign(A) * Delta is clamped to +-20 before exp, so w stays finite for any
    teacher (e.g. -inf log-probs); a NaN Delta (both -inf) counts as 0, i.e. w = 1.
    """
    if not 0 <= eps_w < 1:
        raise ValueError(f"eps_w={eps_w} must be in [0, 1) so that clipped w stays > 0; the paper uses 0.2")
    _check_same_shape(teacher_logp=teacher_logp, student_logp=student_logp)
    if advantages.dim() != 1 or advantages.shape[0] != teacher_logp.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] for log-probs "
                         f"{tuple(teacher_logp.shape)}; pass one advantage per completion")
    delta = (teacher_logp.detach().float() - student_logp.detach().float())    # [B, C], Eq. 13
    sign = torch.sign(advantages.detach().float()).to(delta.device)             # [B], where the log-probs are
    s = sign[:, None] * delta                                                   # [B, C]
    s = torch.nan_to_num(s, nan=0.0).clamp(-_MAX_LOG, _MAX_LOG)
    w = s.exp()                                                                 # [B, C], Eq. 14
    return w, w.clamp(1 - eps_w, 1 + eps_w)


def rlsd_token_advantages(advantages, teacher_logp, student_logp, mask, lam, eps_w=0.2, negative_only=False,
                          thought=None):
    """RLSD token advantage Â_t (`a_hat`), which simply replaces A in the GRPO loss (Eq. 15).

    advantages: A [B]; teacher_logp, student_logp, mask: [B, C]; lam in [0, 1]
    (see rlsd_lambda); eps_w: evidence clip (default 0.2).
        Â_t = A * ((1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w))   (Eq. 15)
    written as A * (1 + lam * (clip(w_t) - 1)), the same number, but exactly A
    when lam = 0 or w_t = 1 (teacher == student), with no float round-off.
    Sign/magnitude decoupling: clip(w_t) > 0, so sign(Â_t) == sign(A). The reward picks
    the direction, the teacher only rescales |A| within [1 - lam*eps_w, 1 + lam*eps_w].
    negative_only: reweight only completions with A < 0 (those with A > 0 keep A). The
    authors' released switch against length collapse: completions that grow ever longer,
    or shorter, when the teacher's credit keeps favouring one kind of token.
    thought: optional [B, C] bool (see thought_mask): reweight only these tokens, the
    others keep A (the authors' rlsd_thought_only); a completion with no span is plain GRPO.
    returns: Â_t [B, C] float32, detached, exactly 0 outside the mask.
    (The paper also prints the loss as Eq. 16, a product of detached terms that has no
    gradient as written; use Â_t as the advantage in policy_loss, as its text and code do.)

    Worked example: a right and a wrong completion of the same 3 tokens, lam = 0.5. The reference
    makes token 0 likelier (P_T/P_S = 1.1) and token 1 less likely (0.6). Eq. 14: w_t = P_T/P_S =
    [1.1, 0.6, 1] when A > 0, its inverse [0.91, 1.67, 1] when A < 0; clipped to [0.8, 1.2], Eq. 15
    gives Â_t = A (0.5 + 0.5 clip(w_t)): token 1 gets less credit, or more blame, than A.
    >>> P_S, P_T = torch.tensor([[0.5, 0.5, 0.5]] * 2), torch.tensor([[0.55, 0.3, 0.5]] * 2)
    >>> rlsd_token_advantages(torch.tensor([1.0, -1.0]), P_T.log(), P_S.log(), torch.ones(2, 3), lam=0.5)
    tensor([[ 1.0500,  0.9000,  1.0000],
            [-0.9545, -1.1000, -1.0000]])
    """
    if not 0 <= lam <= 1:
        raise ValueError(f"lam={lam} must be in [0, 1]; get it from rlsd_lambda(step)")
    _check_same_shape(teacher_logp=teacher_logp, student_logp=student_logp, mask=mask)
    _, w_clipped = evidence_weights(advantages, teacher_logp, student_logp, eps_w)  # [B, C]
    a = advantages.detach().float().to(w_clipped.device)[:, None]                   # [B, 1]
    scale = 1 + lam * (w_clipped - 1)                                               # [B, C]
    reweighted = mask.bool() if thought is None else thought.bool()                # [B, C]
    if negative_only:
        reweighted = reweighted & (a < 0)
    a_hat = a * torch.where(reweighted, scale, 1.0)                                 # [B, C]
    return torch.where(mask.bool(), a_hat, torch.zeros_like(a_hat))


def rlsd_lambda(step, lam0=0.5, decay_steps=50, warmup_steps=0):
    """Weight lam of the teacher's evidence at optimizer step `step` (paper: 0.5 -> 0 over 50 steps).

    Linear ramp: lam0 at step 0, 0 at step >= decay_steps. After the ramp RLSD is
    exactly GRPO. decay_steps <= 0 means no ramp: lam0 at every step. warmup_steps (default 0):
    first 0 -> lam0 linearly; the decay then counts from step warmup_steps, as in the authors' code.
    """
    if step < warmup_steps:
        return float(lam0) * step / warmup_steps
    if decay_steps <= 0:
        return float(lam0)
    return float(lam0) * max(0.0, 1.0 - (step - warmup_steps) / decay_steps)


def thought_mask(ids, open_ids, close_ids):
    """Which sampled tokens lie inside a thinking span, for --rlsd-thought-only: bool [B, C].

    ids: [B, C] sampled token ids; open_ids, close_ids: the span markers as token-id lists
    (Qwen3: the ids of <think> and </think>). A span runs from the end of an open marker to the
    start of the next close marker, both outside it. Spans do not nest: inside a span an open
    marker is just text, and the first close marker ends it. An unclosed span runs to the end
    of the row (a thought cut off by the length limit).
    """
    if not open_ids or not close_ids:
        raise ValueError(f"thought markers {open_ids} / {close_ids} must each be at least one token")
    pos = torch.arange(ids.shape[1], device=ids.device)                                   # [C]
    last = []  # [B, C] each: the last position <= t where an open marker ended / a close marker began; -1: none
    for seq, pad in ((open_ids, (len(open_ids) - 1, 0)), (close_ids, (0, len(close_ids) - 1))):
        window = torch.nn.functional.pad(ids, pad, value=-1).unfold(1, len(seq), 1)     # [B, C, len(seq)]
        hit = (window == torch.tensor(seq, device=ids.device)).all(-1)                   # [B, C]
        last.append(torch.where(hit, pos, -1).cummax(1).values)
    opened = torch.nn.functional.pad(last[0], (1, 0), value=-1)[:, :-1]                # [B, C]: ended before t
    return opened > last[1]


# -----------------------------------------------------------------------------
# step 6: the clipped policy loss (Eq. 2, with clip-higher and dual clip)


def _aggregate(per_token, mask, loss_type, num_tokens, max_completion_length, num_sequences):
    """Reduce per-token losses [B, C] to a scalar. Denominators are *global* (all
    micro-batches), so that summing micro-batch losses gives the full-batch loss."""
    B, C = per_token.shape
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":  # Eq. 2: mean over each sequence's own tokens, then over sequences
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)        # [B]
        return per_seq.sum() / (B if num_sequences is None else num_sequences)
    if loss_type == "dapo":  # one token, one vote, across the whole batch
        n = m.sum() if num_tokens is None else num_tokens
        return (per_token * m).sum() / max(float(n), 1.0)
    # dr_grpo: a constant denominator, so no length bias
    n_seq = B if num_sequences is None else num_sequences
    L = C if max_completion_length is None else max_completion_length
    return (per_token * m).sum() / (n_seq * L)


def policy_loss(logp, old_logp, token_advantages, mask, epsilon=0.2, epsilon_high=0.28,
                dual_clip=3.0, loss_type="dapo", num_tokens=None, max_completion_length=None,
                num_sequences=None):
    """PPO/GRPO clipped surrogate (Eq. 2) with clip-higher and dual clip; RLSD passes Â_t.

    logp:             [B, C] log-probs of the sampled tokens under the current policy (has grad).
    old_logp:         [B, C] the same under the rollout policy (no grad).
    token_advantages: [B, C] A broadcast over tokens (GRPO) or Â_t (RLSD).
    mask:             [B, C] 1 for completion tokens, 0 for padding.
    epsilon, epsilon_high: ratio rho clipped to [1 - epsilon, 1 + epsilon_high] (0.2, 0.28).
    dual_clip:        for Â_t < 0 the per-token loss is capped at dual_clip * |Â_t| (3.0; None = off).
    loss_type:        "grpo" (Eq. 2), "dapo" (default) or "dr_grpo"; with micro-batches pass
                      the global num_tokens (dapo) / num_sequences (grpo, dr_grpo) /
                      max_completion_length (dr_grpo, default C).
    returns: (loss scalar, metrics dict of floats over this micro-batch's mask).
    With one optimizer step per rollout batch (the paper, train.py) old_logp is logp itself: the
    ratio is exactly 1 and the gradient is the plain policy gradient -Â_t grad log pi. epsilon,
    epsilon_high and dual_clip bind only in trainers that take several steps on one batch.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_same_shape(logp=logp, old_logp=old_logp, token_advantages=token_advantages, mask=mask)
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (or None to disable); the authors use 3.0")
    # Eq. 2 as a loss, for the G completions y_i of a prompt and rho_t = pi_theta(y_t | x, y<t) / pi_old(y_t | x, y<t):
    #   L = -(1/G) sum_i (1/|y_i|) sum_t min(rho_t Â_t, clip(rho_t, 1 - epsilon, 1 + epsilon_high) Â_t)
    # GRPO's Â_t is A_i and its clip symmetric. per_token is the summand; _aggregate takes the means (loss_type).
    a_hat = token_advantages.detach()                                        # [B, C], Â_t
    ratio = (logp - old_logp.detach()).clamp(-_MAX_LOG, _MAX_LOG).exp()      # [B, C], rho_t
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)                     # [B, C]
    per_token = -torch.minimum(ratio * a_hat, clipped * a_hat)               # [B, C], pessimistic bound
    if dual_clip is not None:  # a huge ratio on a bad token must not blow up the loss
        capped = torch.minimum(per_token, dual_clip * a_hat.abs())
        per_token = torch.where(a_hat < 0, capped, per_token)
    loss = _aggregate(per_token, mask, loss_type, num_tokens, max_completion_length, num_sequences)
    with torch.no_grad():
        mb, r = mask.bool(), ratio.detach()
        low = (a_hat < 0) & (r < 1 - epsilon)
        high = (a_hat > 0) & (r > 1 + epsilon_high)
        dual = (a_hat < 0) & (r > dual_clip) if dual_clip is not None else torch.zeros_like(mb)
        names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "clip_ratio/dual_mean", "ratio_mean"]
        values = [_masked_mean(x.float(), mb) for x in (low, high, low | high, dual, r)]
        metrics = dict(zip(names, torch.stack(values).tolist()))              # one device sync
    return loss, metrics


# -----------------------------------------------------------------------------
# baseline: OPSD, full-distribution self-distillation (Eq. 6)


def _divergence_rows(s, t, temperature, divergence):
    """s, t [c, V] student / teacher logits -> [c, 1] per-row divergence D(P_T || P_S) (fp32).

    Teacher terms are guarded with where(p > 0): a -inf teacher logit has p = 0
    and contributes 0, not 0 * inf = NaN.
    """
    ls = (s.float() / temperature).log_softmax(-1)                # [c, V] student log-probs
    lt = (t.float() / temperature).log_softmax(-1)                # [c, V] teacher log-probs
    pt, ps = lt.exp(), ls.exp()                                   # [c, V]
    zero = torch.zeros((), device=s.device)
    if divergence == "fkl":    # KL(P_T || P_S): cover everything the teacher likes
        d = torch.where(pt > 0, pt * (lt - ls), zero).sum(-1)
    elif divergence == "rkl":  # KL(P_S || P_T): seek the teacher's modes
        d = (ps * (ls - lt)).sum(-1)
    else:                      # Jensen-Shannon, against the mixture M = (P_T + P_S) / 2
        lm = torch.logaddexp(lt, ls) - math.log(2.0)              # [c, V]
        d = 0.5 * torch.where(pt > 0, pt * (lt - lm), zero).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)
    return d[:, None]                                             # [c, 1]


def opsd_loss(student_logits, teacher_logits, mask, temperature=1.0, divergence="fkl",
              num_tokens=None, chunk_size=1024):
    """OPSD baseline (Eq. 6): match the teacher's full next-token distribution at every
    completion position of the student's own rollout. Ignores the reward.

    student_logits, teacher_logits: [B, C, V] (any dtype), aligned on the same completion
                 tokens; teacher_logits is detached (gradient reaches the student only).
    mask:        [B, C] completion-token mask.
    divergence:  "fkl" KL(P_T || P_S) (default, the paper's D(P_T || P_S) in Eq. 6),
                 "rkl" KL(P_S || P_T), or "jsd" Jensen-Shannon.
    num_tokens:  global unmasked-token count across micro-batches (default: mask.sum()).
    chunk_size:  rows of the flattened B*C per chunk (default 1024), as in token_logprobs.
    returns: (loss = sum of masked per-token divergences / num_tokens,
              {"opsd/divergence": mean per-token divergence over this mask}).
    """
    _check_choice("divergence", divergence, DIVERGENCES)
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape \
            or tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
                         f"mask {tuple(mask.shape)}: expected [B, C, V], [B, C, V], [B, C]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0; use the sampling temperature, e.g. 1.0")
    B, C, V = student_logits.shape
    fn = lambda s, _, t: _divergence_rows(s, t, temperature, divergence)
    d = _chunked_rows(student_logits.reshape(B * C, V), None, fn, chunk_size,
                      teacher_logits.detach().reshape(B * C, V)).view(B, C)   # [B, C]
    m = mask.to(d.dtype)
    n = m.sum() if num_tokens is None else num_tokens
    loss = (d * m).sum() / max(float(n), 1.0)
    return loss, {"opsd/divergence": _masked_mean(d.detach(), mask.bool()).item()}


# -----------------------------------------------------------------------------
# optimisation: row-wise functions of [N, V] logits, chunk by chunk (token_logprobs_from_hidden and opsd_loss use it)


class _RowChunked(torch.autograd.Function):
    """Apply a row-wise fn(x_chunk, weight, *extras_chunk) to x [N, D] chunk by chunk; out [N, K] float32.

    Rows are independent, so neither pass needs more than one chunk of
    float32 [chunk, V] at a time:
      forward:  run fn on each chunk with no graph, keep only its small output.
      backward: rebuild each chunk's graph, backprop through it, write the
                chunk's gradient into one [N, D] buffer (gradient checkpointing,
                by hand). `weight` (None, or the LM head's [V, H]) is used whole
                by every chunk; its gradient adds up over the chunks. `extras`
                are per-row tensors that get no gradient (token ids, teacher logits).
    """

    @staticmethod
    def forward(ctx, x, weight, fn, chunk_size, *extras):
        ctx.fn, ctx.chunk_size = fn, chunk_size
        ctx.save_for_backward(x, weight, *extras)
        outs = [fn(x[i:i + chunk_size], weight, *(e[i:i + chunk_size] for e in extras))
                for i in range(0, x.shape[0], chunk_size)]
        return torch.cat(outs)  # [N, K]

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *extras = ctx.saved_tensors
        c = ctx.chunk_size
        grad_x = torch.empty_like(x)  # [N, D], x's dtype: the only full-size allocation
        w = None if weight is None else weight.detach().requires_grad_(ctx.needs_input_grad[1])  # [V, H]
        wanted = [w] if ctx.needs_input_grad[1] else []
        for i in range(0, x.shape[0], c):
            xc = x[i:i + c].detach().requires_grad_()
            with torch.enable_grad():
                out = ctx.fn(xc, w, *(e[i:i + c] for e in extras))  # [c, K]
            torch.autograd.backward(out, grad_out[i:i + c], inputs=[xc, *wanted])  # w.grad sums the chunks'
            grad_x[i:i + c] = xc.grad
        return (grad_x, w.grad if wanted else None, None, None) + (None,) * len(extras)


def _chunked_rows(x, weight, fn, chunk_size, *extras):
    """x [N, D] -> fn(x_chunk, weight, *extras_chunk) in chunks of rows -> [N, K] float32 (differentiable in x
    and weight)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1; try 1024")
    if x.shape[0] == 0:  # no rows: plain autograd on the empty tensor is free
        return fn(x, weight, *extras)
    return _RowChunked.apply(x, weight, fn, chunk_size, *extras)
