"""Tests of examples/rlsd_trl.py against TRL 1.16's own GRPOTrainer and train.py (fp32, CPU): CI's TRL lane.

Run: python -m pytest -q examples/test_rlsd_trl.py (needs pip install trl==1.16.0; skipped without it, except
under RLSD_REQUIRE_TRL=1, which the lane sets). One prompt per step with G = 4 answers, so no prompt is padded:
TRL numbers positions from the first column, train.py from the first real token, and the two agree only then.
"""
import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
if not os.environ.get("RLSD_REQUIRE_TRL"):
    pytest.importorskip("trl", reason="needs TRL: pip install trl==1.16.0 (docs/in-trl.md)")

import datasets  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import rlsd  # noqa: E402
import train  # noqa: E402
from rlsd_trl import RLSDTrainer  # noqa: E402
from test_rlsd import save_tiny_qwen3  # noqa: E402

G = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer Qwen3 over the built-in tokenizer, and a data set of its prompts in train.py's format."""
    folder = save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), layers=1)
    policy = train.load_policy(train.parse_args(["--model", folder, "--dataset", "builtin"]))
    rows = train.builtin_task(8, seed=1)
    data = datasets.Dataset.from_list([dict(r, prompt=train.student_prompt(policy, r)) for r in rows])
    return folder, policy, data


def alternating(prompts, completions, **kw):  # 1, 0, 1, 0: every group is mixed, so A != 0
    return [float(i % 2 == 0) for i in range(len(completions))]


class Seen(TrainerCallback):
    """The gradient before the optimizer step (TRL's clip at 1e9 leaves it as it is)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append(torch.cat([p.grad.flatten() for p in self.model.parameters() if p.requires_grad]))


def run(cls, folder, data, out, steps=1, **kw):
    """Optimizer steps of cls on a fresh copy of the tiny model; returns (trainer, each step's gradient, weights)."""
    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=G, num_generations=G, max_completion_length=8,
                        max_steps=steps, learning_rate=1e-2, max_grad_norm=1e9, report_to="none", save_strategy="no",
                        use_cpu=True, bf16=False, seed=0, loss_type="dapo", temperature=1.0, logging_steps=1,
                        lr_scheduler_type="constant", optim="sgd")  # SGD: no round-off amplified by Adam
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    seen = Seen()
    seen.model, seen.grads = model, []
    trainer = cls(model=model, reward_funcs=alternating, args=config, train_dataset=data,
                  processing_class=train.builtin_tokenizer(), callbacks=[seen], **kw)
    trainer.train()
    return trainer, seen.grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_at_lambda_0_and_with_the_evidence_clip_at_0_an_rlsd_step_is_trls_own_grpo_step(tiny, tmp_path):
    folder, policy, data = tiny
    _, g_trl, w_trl = run(GRPOTrainer, folder, data, tmp_path / "grpo")
    teacher = functools.partial(train.teacher_prompt, policy)
    for name, kw in {"lam0": dict(lam0=0.0), "eps_w": dict(lam0=0.5, eps_w=0.0)}.items():  # no pass; w_t clipped to 1
        _, g, w = run(RLSDTrainer, folder, data, tmp_path / name, teacher_prompt=teacher, **kw)
        assert g_trl[0].abs().max() > 1e-3
        torch.testing.assert_close(g[0], g_trl[0], rtol=1e-5, atol=1e-7)
        assert max((w[k] - w_trl[k]).abs().max().item() for k in w) < 1e-6, name


class Keep(RLSDTrainer):
    """RLSDTrainer that keeps each step's batch (completions, A and Â_t) for the comparison."""

    def _generate_and_score_completions(self, inputs):
        self.kept = getattr(self, "kept", []) + [(inputs, super()._generate_and_score_completions(inputs))]
        return self.kept[-1][1]


@pytest.mark.parametrize("sync", [0, 10], ids=["live", "snapshot"])
def test_above_lambda_0_its_gradient_is_train_steps_on_the_same_model_completions_and_rewards(
        sync, tiny, tmp_path, monkeypatch):
    """Two steps, so that at the second the snapshot teacher (synced at step 0) is not the live policy."""
    folder, policy, data = tiny
    teacher = functools.partial(train.teacher_prompt, policy)
    trainer, g_trl, _ = run(Keep, folder, data, tmp_path / "rlsd", steps=2, teacher_prompt=teacher,
                            teacher_sync_steps=sync)
    batches = []
    for inputs, batch in trainer.kept:
        assert batch["advantages"].shape == batch["completion_ids"].shape  # Â_t [B, C], not A [B]
        ids, mask = batch["completion_ids"], batch["completion_mask"]
        batches.append(dict(rows=list(inputs), prompts=[x["prompt"] for x in inputs], ids=ids, mask=mask,
                            truncated=torch.zeros(G, dtype=torch.bool), sample_logp=torch.zeros(ids.shape),
                            texts=[""] * G))
    monkeypatch.setattr(train, "rollout", lambda policy, rows, args: batches.pop(0))
    monkeypatch.setattr(train, "reward", lambda args, texts, rows: (torch.tensor(alternating(None, texts)), 0))
    monkeypatch.setattr(rlsd, "group_advantages", functools.partial(rlsd.group_advantages, eps=1e-4))  # TRL's ε
    grads, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: (
        grads.append(torch.cat([p.grad.flatten() for p in params])), clip(params, max_norm))[1])
    args = train.parse_args(["--model", folder, "--dataset", "builtin", "--num-generations", str(G),
                             "--micro-batch-size", str(G), "--max-completion-length", "8", "--temperature", "1.0",
                             "--teacher-sync-steps", str(sync), "--loss-type", "dapo", "--lr", "1e-2",
                             "--max-grad-norm", "1e9"])
    ours = train.load_policy(args)
    train.prepare_for_training(ours, args)
    opt = torch.optim.SGD(ours.model.parameters(), lr=args.lr)  # TRL's optimizer and lr, as configured in run()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    teacher = train.Teacher(ours, sync)
    for step in (0, 1):
        metrics, _, _ = train.train_step(ours, opt, sched, teacher, [None], args, step)
        assert metrics["rlsd/lambda"] == rlsd.rlsd_lambda(step) and metrics["rlsd/mean_abs_delta"] > 1e-3
        assert g_trl[step].abs().max() > 1e-3
        torch.testing.assert_close(grads[step], g_trl[step], rtol=1e-4, atol=1e-6)
