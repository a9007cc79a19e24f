"""RLSD inside TRL's own GRPOTrainer (trl==1.16.0): a subclass that adds the teacher pass and trains on Â_t.

Copy this file and rlsd.py into your project; docs/in-trl.md explains it, examples/test_rlsd_trl.py checks it (at
lambda = 0 it is TRL's GRPO step; above 0 its gradient is train.py's). Text models, one process or DDP.
"""
import contextlib

import torch
from trl import GRPOTrainer
from trl.trainer.utils import pad

import rlsd


class RLSDTrainer(GRPOTrainer):
    """GRPOTrainer + RLSD (arXiv 2604.03128). `teacher_prompt(example)` turns a data set row into the teacher's
    prompt, in the format of its "prompt" column: the same question with the reference answer in it. The teacher is
    the policy's own trainable weights as they were at the last sync, every `teacher_sync_steps` optimizer steps
    (0: the live policy). lam0, lam_decay_steps, eps_w: the paper's 0.5, 50 and 0.2 (rlsd.py)."""

    def __init__(self, *args, teacher_prompt, lam0=0.5, lam_decay_steps=50, eps_w=0.2, teacher_sync_steps=10, **kw):
        super().__init__(*args, **kw)
        self.teacher_prompt, self.lam0, self.lam_decay_steps, self.eps_w = teacher_prompt, lam0, lam_decay_steps, eps_w
        self.teacher_sync_steps, self.snapshot, self.synced_at = teacher_sync_steps, None, None

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)  # TRL's rollout, rewards and A [B] (Eq. 1)
        if not self.model.training:  # evaluation: no update, no teacher
            return out
        lam = rlsd.rlsd_lambda(self.state.global_step, self.lam0, self.lam_decay_steps)
        self._metrics["train"]["rlsd/lambda"].append(lam)
        if lam == 0:  # after the decay RLSD is GRPO: no teacher pass
            return out
        ids, mask = out["completion_ids"], out["completion_mask"]                          # [B, C]
        student = self._logprobs(out["prompt_ids"], out["prompt_mask"], ids, mask)         # log P_S [B, C]
        prompt_ids = self._tokenize_prompts([self.teacher_prompt(x) for x in inputs])[0]
        rows = [torch.tensor(p, device=ids.device) for p in prompt_ids]
        t_ids = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left")   # [B, P']
        t_mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left")
        with self._teacher_weights():
            teacher = self._logprobs(t_ids, t_mask, ids, mask)                              # log P_T [B, C]
        # Eq. 13-15; TRL's loss takes a [B, C] advantage as it is
        out["advantages"] = rlsd.rlsd_token_advantages(out["advantages"], teacher, student, mask, lam, self.eps_w)
        return out

    @torch.no_grad()
    def _logprobs(self, prompt_ids, prompt_mask, ids, mask):
        """log pi(ids | prompt) [B, C] at TRL's temperature, through TRL's fused LM head."""
        ids_all, mask_all = torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask], 1)
        return self._get_per_token_logps_and_entropies(self.model, ids_all, mask_all, ids.shape[1])[0]

    @contextlib.contextmanager
    def _teacher_weights(self):
        """Within this block the trainable weights (the adapters under PEFT) are the snapshot's."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        step = self.state.global_step
        if not self.teacher_sync_steps:
            yield
            return
        if self.snapshot is None or step - self.synced_at >= self.teacher_sync_steps:
            self.snapshot, self.synced_at = [p.detach().clone() for p in params], step
        live = [p.detach().clone() for p in params]
        for p, s in zip(params, self.snapshot):
            p.data.copy_(s)
        try:
            yield
        finally:
            for p, w in zip(params, live):
                p.data.copy_(w)
