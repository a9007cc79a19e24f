"""Tests for rlsd.py (the objective), verify.py (the verifier) and train.py (the trainer).

Run: python -m pytest -q test_rlsd.py
"""
import math
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rlsd
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
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


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
    (lambda: rlsd.evidence_weights(torch.zeros(3), _x, _x), "one advantage per response"),
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
]


@pytest.mark.parametrize("completion, reference, expected", VERIFY_CASES)
def test_verify_table(completion, reference, expected):
    assert verify.verify(completion, reference) == float(expected)


def test_verify_table_is_large():
    assert len(VERIFY_CASES) >= 150


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


def test_command_line_prints_normal_forms_and_verdict():
    out = subprocess.run([sys.executable, verify.__file__, r"so \boxed{\dfrac{6}{8}}", "0.75"],
                         capture_output=True, text=True, check=True).stdout
    assert "3/4" in out and "verdict   : 1.0" in out


def test_normal_forms_are_readable():
    assert verify.normalize(r"\left( 3, \frac{\pi}{2} \right)") == "(3, (pi / 2))"
    assert verify.normalize("3, 1") == "{1, 3}"
    assert verify.normalize(r"\text{(C)}") == "choice:C"
    assert verify.normalize(r"10,\!080") == "10080"


def _fast(completion, reference="1", limit=0.05):
    """verify() within `limit` seconds; a slow call is retried once, so that a loaded
    machine's hiccup is not a failure but a genuinely slow input (slow twice) is."""
    for _ in range(2):
        start = time.perf_counter()
        result = verify.verify(completion, reference)
        if time.perf_counter() - start < limit:
            return result
    raise AssertionError(f"verify took {time.perf_counter() - start:.3f}s on {completion[:60]!r}")


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
])
def test_pathological_inputs_are_fast(completion):
    assert _fast(completion) in (0.0, 1.0)
    assert _fast(completion, r"x^{999}") in (0.0, 1.0)


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
    assert verify.verify(f"\\boxed{{{answer}}}", answer) == 1.0
    assert verify.verify(f"<answer>{answer}</answer>", answer) == 1.0


@settings(max_examples=300, deadline=None)
@given(integers, integers, st.booleans())
def test_different_integers_never_match(a, b, commas):
    if a != b:
        assert verify.verify(f"\\boxed{{{a:,}}}" if commas else f"\\boxed{{{a}}}", str(b)) == 0.0