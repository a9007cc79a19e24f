#!/usr/bin/env python
"""
train.py: RLSD end to end, in one file that reads top to bottom.

    python train.py                                    # offline built-in demo, a few minutes on 2 CPU cores
    python train.py --model Qwen/Qwen3-VL-8B-Instruct --dataset iieycx/rlsd-train-MMFineReason-123K \
        --prompt-field problem --answer-field answer --image-field images

One training step (the paper's Algorithm 1), one function each below:
    1. rollout    sample G completions per prompt from the policy
    2. reward     verify.verify(): 1.0 if the final answer is right, else 0.0
    3. advantage  group-relative A = (R - mean_G R) / std_G R                         (Eq. 1)
    4. teacher    the same model, with the reference answer in its prompt, scores
                  the very same completion tokens, without gradient                    (Sec. 3)
    5. credit     A_t = A * ((1-lam) + lam * clip(exp(sign(A) * (log P_T - log P_S)))) (Eq. 13-15)
    6. update     the PPO/GRPO clipped surrogate with A_t in place of A               (Eq. 2)
The reward sets the direction of every token's update, the teacher only its size.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time

import torch

import rlsd
import verify

# The format instruction and the teacher's privileged-context wording (spec §3).
FORMAT = "Think step by step, then put the final answer in <answer></answer>."
TEACHER = ("{question}\nHere is a reference solution: {answer}\nAfter understanding the reference solution, "
           "please try to solve this problem using your own approach below.\n{format}")


class ConfigError(ValueError):
    """Bad input from the user: printed as one line that names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------------------------------
# The paper's defaults (spec §2), and the few the built-in CPU demo changes so that it learns within minutes.
PAPER = dict(num_generations=8, prompts_per_step=256, max_prompt_length=4096, max_completion_length=4096,
             temperature=1.0, top_p=1.0, lr=1e-6, weight_decay=0.01, epsilon=0.2, epsilon_high=0.28, dual_clip=3.0,
             eps_w=0.2, lam0=0.5, lam_decay_steps=50, teacher_sync_steps=10, loss_type="dapo", scale_rewards="group",
             max_steps=400, micro_batch_size=8, generation_batch_size=64, eval_steps=50, save_steps=50, eval_size=500,
             log_samples_steps=10)
DEMO = dict(PAPER, prompts_per_step=16, max_prompt_length=128, max_completion_length=40, lr=2e-4, max_steps=120,
            micro_batch_size=128, generation_batch_size=128, eval_steps=20, save_steps=50, eval_size=256,
            log_samples_steps=25)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # knobs say "[paper: ..; demo: ..]" themselves
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RLSD: GRPO whose token credit is reweighted by a self-teacher that sees "
                                "the reference answer. Defaults are the paper's; the built-in demo changes a few.",
                                formatter_class=HelpFormatter)
    add = p.add_argument

    def knob(name, type, help):  # default None = "the paper's value, or the demo's"
        key = name.lstrip("-").replace("-", "_")
        add(name, type=type, default=None, help=f"{help} [paper: {PAPER[key]}; demo: {DEMO[key]}]")

    g = p.add_argument_group("model and data")
    add = g.add_argument
    add("--model", default="builtin", help="hub id, local folder, or 'builtin' (a tiny Qwen3 built and warm-started "
        "in-process, cached on disk)")
    add("--dataset", default="builtin", help="hub id, local .jsonl/.json/.parquet file, or 'builtin' (a generated "
        "multi-step addition task)")
    add("--split", default="train", help="dataset split to train on")
    add("--eval-split", default=None, help="split for held-out accuracy (default: hold out --eval-size training rows)")
    add("--prompt-field", default="problem", help="column holding the question")
    add("--answer-field", default="answer", help="column holding the reference answer (the verifier's gold and the "
        "teacher's privileged context)")
    add("--image-field", default=None, help="column holding images (PIL, paths or bytes; one or a list per row)")
    add("--max-pixels", type=int, default=448 * 448, help="cap on pixels per image for vision-language models")
    add("--cache-dir", default=os.path.expanduser(os.environ.get("RLSD_CACHE", "~/.cache/rlsd")),
        help="where the built-in demo's warm-started base model is cached")
    g = p.add_argument_group("algorithm")
    add = g.add_argument
    add("--algo", choices=["rlsd", "grpo", "opsd"], default="rlsd", help="rlsd (the method), grpo (no teacher), or "
        "opsd (the distillation baseline of Eq. 6, which ignores the reward)")
    knob("--num-generations", int, "G, completions sampled per prompt (>= 2)")
    knob("--prompts-per-step", int, "prompts per optimizer step (one update per rollout batch: fully on-policy)")
    knob("--max-prompt-length", int, "longer prompts are dropped from the data set")
    knob("--max-completion-length", int, "new tokens per completion; longer ones are truncated and flagged")
    knob("--temperature", float, "sampling temperature; log-probs of both passes use it too")
    knob("--top-p", float, "nucleus sampling (1.0 keeps the sampler equal to the scored distribution)")
    knob("--lr", float, "AdamW learning rate, constant after a short warm-up")
    knob("--weight-decay", float, "AdamW weight decay")
    knob("--epsilon", float, "PPO clip, lower side: ratio >= 1 - epsilon")
    knob("--epsilon-high", float, "PPO clip, upper side (clip-higher): ratio <= 1 + epsilon_high")
    knob("--dual-clip", float, "dual clip for A < 0 (0 disables)")
    knob("--eps-w", float, "evidence clip: w_t is confined to [1 - eps_w, 1 + eps_w] (Eq. 15)")
    knob("--lam0", float, "initial lambda, the weight of the teacher's reweighting (Eq. 15)")
    knob("--lam-decay-steps", int, "lambda falls linearly to 0 over this many steps; after that RLSD == GRPO")
    knob("--teacher-sync-steps", int, "teacher = frozen snapshot of the policy, re-synced every N steps (0 = live)")
    knob("--loss-type", str, "grpo (per-sequence mean, Eq. 2), dapo (global token mean), dr_grpo")
    knob("--scale-rewards", str, "divide advantages by the std of the group, the batch, or none")
    add("--opsd-divergence", default="fkl", choices=["fkl", "rkl", "jsd"], help="divergence D(P_T || P_S) for --algo opsd")
    g = p.add_argument_group("run")
    add = g.add_argument
    knob("--max-steps", int, "optimizer steps")
    knob("--micro-batch-size", int, "rows per forward/backward; gradients accumulate over the step")
    knob("--generation-batch-size", int, "rows per generate() call")
    knob("--eval-steps", int, "held-out greedy accuracy every N steps (and at the end)")
    knob("--save-steps", int, "checkpoint every N steps (and at the end)")
    knob("--eval-size", int, "held-out prompts")
    knob("--log-samples-steps", int, "print one right and one wrong completion every N steps")
    add("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    add("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank instead of all weights "
        "(default: 0 = full fine-tuning, or 64 for models over 3B parameters)")
    add("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto = bf16 on a GPU that "
        "supports it, else float32")
    add("--seed", type=int, default=0, help="seeds data order, sampling and the built-in task")
    add("--output-dir", default="runs/rlsd", help="metrics.jsonl and checkpoints go here")
    add("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    add("--show-credit", type=int, default=0, help="after training, render N rollouts coloured by A_t/A "
        "(terminal + output-dir/credit.html)")
    args = p.parse_args(argv)
    defaults = DEMO if args.model == "builtin" else PAPER
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args)
    return args


def check_args(a):
    """Fail at start-up, not after an hour of rollouts."""
    if a.num_generations < 2:
        raise ConfigError(f"--num-generations must be >= 2 (got {a.num_generations}): a group of one has no baseline")
    rows = a.prompts_per_step * a.num_generations
    if rows % a.micro_batch_size:
        raise ConfigError(f"prompts x num_generations = {rows} must divide by --micro-batch-size "
                          f"{a.micro_batch_size}; pick a micro-batch size that divides {rows}")
    if a.loss_type not in ("grpo", "dapo", "dr_grpo"):
        raise ConfigError(f"unknown --loss-type {a.loss_type!r}; use grpo, dapo or dr_grpo")
    if a.scale_rewards not in ("group", "batch", "none"):
        raise ConfigError(f"unknown --scale-rewards {a.scale_rewards!r}; use group, batch or none")
    if not (0 < a.temperature) or not (0 < a.top_p <= 1):
        raise ConfigError("--temperature must be > 0 and --top-p in (0, 1]")
    if a.model == "builtin" and a.dataset != "builtin":
        raise ConfigError("the built-in model only knows the built-in task's words; pass --model with --dataset")


# ---------------------------------------------------------------------------------------------------------------------
# 2. Data: rows of {problem, answer, images}, and the student / teacher prompts built from them
# ---------------------------------------------------------------------------------------------------------------------
def builtin_task(n, seed):
    """A multi-step written calculation: the sum of 3-5 numbers from 1 to 5, worked as a chain of partial sums.
    One wrong partial sum spoils every later step, so some tokens deserve more credit than others."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        terms = [rng.randint(1, 5) for _ in range(rng.randint(3, 5))]
        rows.append({"problem": "What is " + "+".join(map(str, terms)) + "?", "answer": str(sum(terms))})
    return rows


def builtin_solution(problem):
    """The worked solution the warm start imitates: '3+5=8. 8+2=10. <answer>10</answer>'."""
    terms = [int(t) for t in re.findall(r"\d+", problem)]
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}.")
        total += t
    return " ".join(steps) + f" <answer>{total}</answer>"


def load_rows(args, split):
    """Rows as dicts with 'problem', 'answer' and, for images, 'images' (a list). Raises ConfigError on bad data."""
    if args.dataset == "builtin":
        n = 4000 if split == "train" else args.eval_size
        return builtin_task(n, seed=args.seed + (0 if split == "train" else 10_000))
    import datasets
    src = args.dataset
    try:
        if os.path.isfile(src):
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(src)[1])
            if kind is None:
                raise ConfigError(f"--dataset {src}: unknown file type; use .jsonl, .json or .parquet")
            with open(src, "rb") as f:  # the datasets library's own error for this is a bare StopIteration
                if not f.read(1 << 16).strip():
                    raise ConfigError(f"--dataset {src!r} is an empty file; point it at data with at least one row")
            ds = datasets.load_dataset(kind, data_files={split: src}, split=split)
        else:
            ds = datasets.load_dataset(src, split=split)
    except ConfigError:
        raise
    except Exception as e:
        if os.path.isfile(src):
            raise ConfigError(f"cannot parse --dataset {src!r} ({type(e).__name__}: {str(e)[:200]}); "
                              f"check that it is valid {kind}") from None
        raise ConfigError(f"cannot load --dataset {src!r} split {split!r} ({type(e).__name__}): no such local file, "
                          f"and no such hub data set or no network; pass a local .jsonl/.json/.parquet file") from None
    if len(ds) == 0:
        raise ConfigError(f"--dataset {src!r} split {split!r} is empty; point it at data with at least one row")
    for field in (args.prompt_field, args.answer_field, args.image_field):
        if field and field not in ds.column_names:
            raise ConfigError(f"--dataset {src!r} has no column {field!r} (columns: {', '.join(ds.column_names)}); "
                              f"pass --prompt-field/--answer-field/--image-field")
    if args.image_field and undecoded(ds.features[args.image_field]) != ds.features[args.image_field]:
        # keep images as encoded bytes until their row is used: decoding 123K of them up front fills the RAM
        ds = ds.cast_column(args.image_field, undecoded(ds.features[args.image_field]))
    rows = []
    for i, r in enumerate(ds):
        row = {"row": i, "problem": str(r[args.prompt_field]), "answer": str(r[args.answer_field]).strip()}
        if args.image_field:
            imgs = r[args.image_field]
            imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
            here = os.path.dirname(os.path.abspath(src)) if os.path.isfile(src) else "."
            row["images"] = [os.path.join(here, im) if isinstance(im, str) else im for im in imgs]  # relative to file
        rows.append(row)
    return rows


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


def chat(text, n_images=0, vl=False):
    """One user turn. Vision-language processors want typed content parts; images come first."""
    if not vl:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def student_prompt(policy, row):
    msgs = chat(f"{row['problem']}\n{FORMAT}", len(row.get("images") or []), policy.vl)
    return policy.template(msgs)


def teacher_prompt(policy, row):
    """Same template, same images; only the text differs: it also carries the reference answer (spec §3)."""
    text = TEACHER.format(question=row["problem"], answer=row.get("reference", row["answer"]), format=FORMAT)
    return policy.template(chat(text, len(row.get("images") or []), policy.vl))


class Sampler:
    """Epochs of shuffled rows; its state (epoch, position) goes into checkpoints so a resume sees the same data."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def next(self, k):
        out = []
        while len(out) < k:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
            take = order[self.pos:self.pos + k - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out


# ---------------------------------------------------------------------------------------------------------------------
# 3. Model: a Policy bundles the network and its tokenizer/processor
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Policy:
    model: torch.nn.Module
    processor: object          # a tokenizer, or a multimodal processor for vision-language models
    vl: bool = False
    max_pixels: int = 448 * 448

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def template(self, messages):
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, texts, rows=None):
        """Left-padded prompt batch on the model's device: input_ids [b, P], attention_mask [b, P], and for
        vision-language models the images of `rows` as pixel_values [patches, d] + image_grid_thw [n_img, 3]."""
        if self.vl:
            flat = [load_image(im, self.max_pixels, f"row {r.get('row')}") for r in rows
                    for im in r.get("images") or []] or None
            enc = self.processor(text=texts, images=flat, padding=True, padding_side="left", return_tensors="pt")
        else:
            enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                                 add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}


def load_image(image, max_pixels, where="a row"):
    """A PIL image (or a path, raw bytes, or a datasets {'bytes', 'path'} dict) as RGB, shrunk to at most
    max_pixels: one big image must not blow up memory before the processor's own resize."""
    import io
    from PIL import Image, ImageOps
    try:
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"unsupported image type {type(image).__name__}")
        image = ImageOps.exif_transpose(image)  # upright, as the datasets library's own decoding would give it
        image = image.convert("RGB")  # forces a full decode, so a truncated file fails here
    except Exception as e:
        raise ConfigError(f"cannot read the image of {where} ({type(e).__name__}: {e}); fix or drop that row") from None
    w, h = image.size
    if w * h > max_pixels:
        r = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(1, int(w * r)), max(1, int(h * r))))
    return image


def pick_dtype(name):
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_policy(args, path=None):
    """--model as a hub id or a folder. Vision-language or text-only is read off the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    path = path or args.model
    if path == "builtin":
        return builtin_policy(args)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        if os.path.isdir(path):
            raise ConfigError(f"--model {path!r} is a folder without a usable config.json ({e})") from None
        raise ConfigError(f"cannot load --model {path!r}: no such local folder, and the hub is unreachable or has "
                          f"no such model; download it where there is network (hf download {path}) and pass the "
                          f"local folder") from None
    vl = hasattr(config, "vision_config")
    auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=pick_dtype(args.dtype))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    processor = load_processor(path, args.max_pixels) if vl else AutoTokenizer.from_pretrained(path)
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None and getattr(processor, "chat_template", None) is None:
        raise ConfigError(f"{path!r} has no chat template; use an instruct/chat model or add one to its tokenizer")
    return Policy(model, processor, vl, args.max_pixels)


def load_processor(path, max_pixels):
    """The model's own processor, with its image size capped at max_pixels. Qwen's stock processor also builds a
    video processor that needs torchvision; without torchvision we assemble an image-only one from the same parts."""
    from transformers import AutoProcessor
    try:
        proc = AutoProcessor.from_pretrained(path)
        proc.image_processor  # a folder without a known processor class gives back a bare tokenizer
    except (ImportError, AttributeError, ValueError, OSError):
        proc = image_only_processor_class().from_pretrained(path)
    ip = proc.image_processor
    ip.size = {"shortest_edge": min(ip.size.get("shortest_edge", 0) or 0, max_pixels), "longest_edge": max_pixels}
    return proc


def image_only_processor_class():
    """Qwen3-VL's processor minus its video half (which needs torchvision): the library reads the list of
    sub-processors off __init__'s signature, so a subclass without `video_processor` keeps all the image logic,
    and its from_pretrained still finds the folder's image processor, tokenizer and chat template. The video
    settings are carried along unused, so that a saved checkpoint still loads with AutoProcessor elsewhere."""
    from transformers import Qwen3VLProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        video_config = None

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        @classmethod
        def from_pretrained(cls, path, **kwargs):
            proc = super().from_pretrained(path, **kwargs)
            try:
                proc.video_config = BaseVideoProcessor.get_video_processor_dict(path)[0]
            except OSError:  # the folder has none
                pass
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
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, **kw))   # [r, in]
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # [out, r]
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self):
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)


def add_lora(model, rank, alpha):
    """Freeze everything, then wrap the language model's projections. The vision tower stays frozen."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child, layer in list(module.named_children()):
            if child in LORA_TARGETS and isinstance(layer, torch.nn.Linear) and "visual" not in name:
                setattr(module, child, LoRALinear(layer, rank, alpha))


def merged_state_dict(model):
    """The model's weights with every adapter folded in, under the original names: a plain HF checkpoint."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            sd.pop(f"{name}.base.weight")
            sd[f"{name}.weight"] = module.merged().detach()
            if module.base.bias is not None:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    return sd


def prepare_for_training(policy, args):
    """LoRA or full fine-tuning, and gradient checkpointing. Default LoRA rank: 64 above 3B parameters, where
    full fine-tuning with AdamW no longer fits one 80 GB card (see README, "Memory")."""
    n = sum(p.numel() for p in policy.model.parameters())
    rank = args.lora_rank if args.lora_rank is not None else (64 if n > 3e9 else 0)
    if rank > 0:
        add_lora(policy.model, rank, args.lora_alpha or 2.0 * rank)
    if args.gradient_checkpointing:
        # use_reentrant=False: the reentrant variant gives adapters no gradient when the layer inputs don't require
        # grad (frozen embeddings); recent transformers add an input hook to avoid it, this does not depend on it
        enable = getattr(policy.model, "activation_checkpointing_enable", None)  # the newer name, transformers >= 5.2x
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.model.config.use_cache = False
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    print(f"model: {n / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable"
          + (f" (LoRA rank {rank})" if rank else " (full fine-tuning)"))
    return rank


# ---------------------------------------------------------------------------------------------------------------------
# 3b. The built-in demo model: a tiny Qwen3 and a tokenizer, built in-process and warm-started, fully offline
# ---------------------------------------------------------------------------------------------------------------------
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
    corpus = FORMAT + TEACHER + "What is 1+2?" + builtin_solution("What is 1+2?") + "user assistant system 0123456789+-*/=.,:?!()"
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
    """Load the cached warm-started demo model, or build and warm-start it (about a minute on 2 CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    key = hashlib.sha1(json.dumps([DEMO_MODEL, WARM, args.seed, CHAT_TEMPLATE, FORMAT, TEACHER]).encode()).hexdigest()
    folder = os.path.join(args.cache_dir, f"demo-base-{key[:10]}")
    if os.path.isdir(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
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


WARM = dict(lr=3e-3, batch=32, max_steps=1500, check_every=25, target=0.35)


def warm_start(policy, args):
    """Supervised warm start on worked solutions, stopped once the sampled pass rate reaches WARM['target'] so
    that RL starts from groups with mixed rewards. Half the examples carry the reference answer in the teacher's
    prompt, so the model learns to use privileged context the way a real LM already can."""
    rows = builtin_task(4000, seed=args.seed + 20_000)
    probe = builtin_task(64, seed=args.seed + 30_000)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=WARM["lr"], weight_decay=0.0)
    tok, rng = policy.tokenizer, random.Random(args.seed)
    for step in range(1, WARM["max_steps"] + 1):
        batch = rng.sample(rows, WARM["batch"])
        prompts = [(teacher_prompt if i % 2 else student_prompt)(policy, r) for i, r in enumerate(batch)]
        answers = [builtin_solution(r["problem"]) + tok.eos_token for r in batch]
        enc = policy.encode(prompts)
        ans = tok(answers, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
        logits = completion_logits(policy, enc, ans.input_ids, ans.attention_mask)   # [b, C, V]
        logp = rlsd.token_logprobs(logits, ans.input_ids)                             # [b, C]
        loss = -(logp * ans.attention_mask).sum() / ans.attention_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % WARM["check_every"] == 0:
            acc = sum(sample_accuracy(policy, probe, args)) / len(probe)
            print(f"warm start step {step}: loss {loss.item():.3f}, sampled pass rate {acc:.2f}", flush=True)
            if acc >= WARM["target"]:
                break


def sample_accuracy(policy, rows, args):
    """One temperature-1 sample per row, scored: the pass rate RL starts from."""
    prompts = [student_prompt(policy, r) for r in rows]
    ids, mask, _, _ = generate(policy, prompts, rows, args, greedy=False)
    texts = policy.tokenizer.batch_decode(ids * mask, skip_special_tokens=True)
    return [verify.verify(t, r["answer"]) for t, r in zip(texts, rows)]


# ---------------------------------------------------------------------------------------------------------------------
# 4. Forward passes: log-probs of completion tokens given a prompt
# ---------------------------------------------------------------------------------------------------------------------
def completion_logits(policy, enc, completion_ids, completion_mask):
    """Logits that predict each completion token: [b, C, V] for completion_ids [b, C].

    The input is [left-padded prompt ‖ right-padded completion]. Position ids come from the attention mask, so a
    row's completion sits at the same positions whatever its padding; vision-language models compute their own
    M-RoPE positions from the same mask and the image grid."""
    ids = torch.cat([enc["input_ids"], completion_ids], dim=1)                         # [b, P+C]
    attn = torch.cat([enc["attention_mask"], completion_mask.to(enc["attention_mask"])], dim=1)  # [b, P+C]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # Qwen3-VL marks image tokens; completion tokens are text (0)
        extra["mm_token_type_ids"] = torch.nn.functional.pad(extra["mm_token_type_ids"], (0, completion_ids.shape[1]))
    if not policy.vl:
        extra["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)                    # [b, P+C]
    C = completion_ids.shape[1]
    out = policy.model(input_ids=ids, attention_mask=attn, logits_to_keep=C + 1, use_cache=False, **extra)
    return out.logits[:, :-1]                     # position P-1+t predicts completion token t: [b, C, V]


def score(policy, texts, rows, completion_ids, completion_mask, temperature, micro_batch):
    """No-grad log-probs of completion tokens under `texts` as prompts, micro-batched: [B, C] float32."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), micro_batch):
            s = slice(i, i + micro_batch)
            enc = policy.encode(texts[s], rows[s])
            logits = completion_logits(policy, enc, completion_ids[s], completion_mask[s])
            out.append(rlsd.token_logprobs(logits, completion_ids[s], temperature))
    return torch.cat(out)


def score_grouped(policy, texts, rows, completion_ids, completion_mask, temperature, micro_batch, G):
    """score() for rows in groups of G that share one prompt (the teacher pass): run each prompt once, then
    its G completions on top of a copy of its KV cache. Same numbers, fewer FLOPs: the prompt, often the
    longer part, is computed once per group instead of G times. Text models only (M-RoPE caches differ)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), micro_batch):
            s = slice(i, i + micro_batch)
            ids, mask = completion_ids[s], completion_mask[s]                           # [b, C]
            enc = policy.encode(texts[s][::G], rows[s][::G])                            # [b/G, P]
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)                  # [b/G, P]
            pre = policy.model(**enc, position_ids=pos, use_cache=True, logits_to_keep=1)
            logits = pre.logits.repeat_interleave(G, 0)                                 # [b, 1, V]: predicts y_0
            if ids.shape[1] > 1:
                cache = pre.past_key_values
                cache.batch_repeat_interleave(G)
                attn = torch.cat([enc["attention_mask"].repeat_interleave(G, 0), mask.to(pos)], 1)  # [b, P+C]
                cpos = (attn.cumsum(-1) - 1).clamp(min=0)[:, pos.shape[1]:]                          # [b, C]
                rest = policy.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=cpos[:, :-1],
                                    past_key_values=cache, use_cache=True)
                logits = torch.cat([logits, rest.logits], 1)                            # [b, C, V]
            out.append(rlsd.token_logprobs(logits, ids, temperature))
    return torch.cat(out)


def check_finite(x, what, step):
    """Student log-probs of sampled tokens must be finite; a teacher may say -inf (evidence_weights clips it)."""
    bad = torch.isnan(x) | (x == float("inf")) | ((x == float("-inf")) if what == "student" else False)
    if bad.any():
        raise FloatingPointError(f"NaN/inf {what} log-probs at step {step}: the model diverged or the dtype "
                                 f"overflowed; lower --lr, or use --dtype bfloat16/float32 instead of float16")


# ---------------------------------------------------------------------------------------------------------------------
# 5. Rollout: sample G completions per prompt
# ---------------------------------------------------------------------------------------------------------------------
class SampledLogprobs:
    """A logits processor that records log pi(y_t) of each sampled token at the sampling temperature, holding one
    [b, V] row of log-probs at a time (never [b, C, V]). generate() calls it with the raw logits of step t and
    the ids up to t-1, so the token it scores is the one sampled at the previous call."""

    def __init__(self, temperature):
        self.T, self.prev, self.out = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))                     # [b, 1]
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
def generate(policy, texts, rows, args, greedy=False):
    """Completions for prompts `texts`: ids [B, C], mask [B, C] (1 up to and including EOS), truncated [B] and the
    sampler's log-probs [B, C]. Pure temperature / top-p sampling: no top-k, no repetition penalty, so the sampler
    is the distribution the loss scores."""
    from transformers import GenerationConfig, LogitsProcessorList
    tok = policy.tokenizer
    gc = GenerationConfig(do_sample=not greedy, temperature=args.temperature if not greedy else None, top_k=0,
                          top_p=args.top_p if not greedy else None, max_new_tokens=args.max_completion_length,
                          eos_token_id=stop_ids(policy), pad_token_id=tok.pad_token_id)
    ids, logps = [], []
    bs = args.generation_batch_size
    for i in range(0, len(texts), bs):
        enc = policy.encode(texts[i:i + bs], rows[i:i + bs])
        rec = SampledLogprobs(args.temperature)
        seq = policy.model.generate(**enc, generation_config=gc, logits_processor=LogitsProcessorList([rec]))
        comp = seq[:, enc["input_ids"].shape[1]:]                                        # [b, c]
        ids.append(comp)
        logps.append(rec.finish(seq))
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
    batch = [r for r in rows for _ in range(G)]
    prompts = [student_prompt(policy, r) for r in batch]
    ids, mask, truncated, sample_logp = generate(policy, prompts, batch, args)
    texts = policy.tokenizer.batch_decode(ids * mask, skip_special_tokens=True)
    return dict(rows=batch, prompts=prompts, ids=ids, mask=mask, truncated=truncated,
                sample_logp=sample_logp, texts=texts)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Reward: the verifier alone decides right or wrong
# ---------------------------------------------------------------------------------------------------------------------
def reward(ro):
    rewards = torch.tensor([verify.verify(t, r["answer"]) for t, r in zip(ro["texts"], ro["rows"])])  # [B]
    unparseable = sum(verify.extract_answer(t) is None for t in ro["texts"]) / len(ro["texts"])
    return rewards, unparseable


# ---------------------------------------------------------------------------------------------------------------------
# 7. Teacher: a frozen snapshot of the policy, seeing the reference answer, scores the same tokens
# ---------------------------------------------------------------------------------------------------------------------
class Teacher:
    """The teacher is the policy's own weights at the last sync. Instead of a second model we keep a copy of only the
    trainable tensors (all weights for full fine-tuning, just the adapters under LoRA) and swap it in for the
    teacher pass. sync_steps = 0 means the live policy (no copy at all)."""

    def __init__(self, policy, sync_steps):
        self.policy, self.sync_steps, self.weights, self.synced_at = policy, sync_steps, None, None

    def params(self):
        return [(n, p) for n, p in self.policy.model.named_parameters() if p.requires_grad]

    def maybe_sync(self, step):
        if self.sync_steps > 0 and (self.weights is None or step - self.synced_at >= self.sync_steps):
            self.weights = {n: p.detach().clone() for n, p in self.params()}
            self.synced_at = step

    def swap(self):  # swapping tensor storage is free: no copy, no second model in memory
        if self.weights is not None:
            for n, p in self.params():
                p.data, self.weights[n] = self.weights[n], p.data

    @contextlib.contextmanager
    def active(self):
        """Within this block the policy's weights are the teacher's; the live ones come back after, even on error."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def logprobs(self, ro, args):
        """log P_T(y_t | x, r, y_<t): [B, C], no grad, at the sampling temperature."""
        texts = [teacher_prompt(self.policy, r) for r in ro["rows"]]
        G, mb = args.num_generations, args.micro_batch_size
        with self.active():
            if self.policy.vl or mb % G:
                return score(self.policy, texts, ro["rows"], ro["ids"], ro["mask"], args.temperature, mb)
            return score_grouped(self.policy, texts, ro["rows"], ro["ids"], ro["mask"], args.temperature, mb, G)

    def state(self):
        return {"weights": self.weights, "synced_at": self.synced_at}

    def load(self, state):
        self.weights, self.synced_at = state["weights"], state["synced_at"]


# ---------------------------------------------------------------------------------------------------------------------
# 8. Update: token advantages, then the clipped surrogate, micro-batched with a global normaliser
# ---------------------------------------------------------------------------------------------------------------------
def update(policy, opt, sched, ro, adv, teacher_logp, teacher, args, step):
    """One optimizer step over the whole rollout batch. Returns metrics.

    Micro-batch losses are normalised by global counts (tokens, sequences) so that their gradients add up to the
    full batch's gradient whatever the micro-batch size (spec §5)."""
    ids, mask = ro["ids"], ro["mask"].float()                                     # [B, C], [B, C]
    B, mb = ids.shape[0], args.micro_batch_size
    lam = rlsd.rlsd_lambda(step, args.lam0, args.lam_decay_steps)
    sums, n_tok = {}, mask.sum()
    policy.model.train()
    for i in range(0, B, mb):
        s = slice(i, i + mb)
        m = mask[s]
        if args.algo == "opsd":  # the baseline needs the teacher's full distribution at every position
            t0 = time.time()
            with torch.no_grad(), teacher.active():
                t_enc = policy.encode([teacher_prompt(policy, r) for r in ro["rows"][s]], ro["rows"][s])
                t_logits = completion_logits(policy, t_enc, ids[s], ro["mask"][s])            # [b, C, V]
            sums["time/teacher"] = sums.get("time/teacher", 0.0) + time.time() - t0
        enc = policy.encode(ro["prompts"][s], ro["rows"][s])
        logits = completion_logits(policy, enc, ids[s], ro["mask"][s])                      # [b, C, V]
        logp, ent = rlsd.token_logprobs(logits, ids[s], args.temperature, return_entropy=True)  # [b, C] each
        check_finite(logp, "student", step)
        if args.algo == "opsd":
            loss, lm = rlsd.opsd_loss(logits, t_logits, m, args.temperature, args.opsd_divergence, num_tokens=n_tok)
            lm = {k: v * m.sum().item() for k, v in lm.items()}  # a mean over this micro-batch: token-weight it
        else:
            if teacher_logp is not None:  # RLSD, Eq. 13-15: the teacher reweights, the sign stays A's
                tok_adv = rlsd.rlsd_token_advantages(adv[s], teacher_logp[s], logp.detach(), m, lam, args.eps_w)
                w, w_clip = rlsd.evidence_weights(adv[s], teacher_logp[s], logp.detach(), args.eps_w)
                live = m.bool() & (adv[s] != 0)[:, None]
                lm = {"rlsd/mean_abs_delta": (teacher_logp[s] - logp.detach()).abs()[live].sum().item(),
                      "rlsd/weight_mean": w_clip[live].sum().item(),
                      "rlsd/weight_clipped_frac": (w != w_clip)[live].float().sum().item(),
                      "rlsd/_live": live.sum().item()}
            else:                    # GRPO: every token gets its sequence's advantage (Eq. 2)
                tok_adv, lm = adv[s, None] * m, {}
            loss, pm = rlsd.policy_loss(logp, logp.detach(), tok_adv, m, args.epsilon, args.epsilon_high,
                                        args.dual_clip or None, args.loss_type, num_tokens=n_tok,
                                        max_completion_length=args.max_completion_length, num_sequences=B)
            lm.update({k: v * m.sum().item() for k, v in pm.items()})  # token-weighted, averaged below
        loss.backward()
        lm["loss"], lm["entropy"] = loss.item(), (ent * m).sum().item()
        lm["rollout/logp_mismatch"] = ((logp.detach() - ro["sample_logp"][s]).abs() * m).sum().item()
        for k, v in lm.items():
            sums[k] = sums.get(k, 0.0) + v
    params = [p for p in policy.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    ntok, live = n_tok.item(), max(sums.pop("rlsd/_live", 0.0), 1.0)
    out = {"loss": sums.pop("loss"), "grad_norm": grad_norm.item(), "rlsd/lambda": lam if args.algo == "rlsd" else 0.0}
    for k, v in sums.items():
        out[k] = v if k.startswith("time/") else v / (live if k.startswith("rlsd/") else ntok)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 9. Evaluation, checkpoints, logging
# ---------------------------------------------------------------------------------------------------------------------
def evaluate(policy, rows, args):
    """Held-out accuracy with greedy decoding."""
    policy.model.eval()
    prompts = [student_prompt(policy, r) for r in rows]
    ids, mask, _, _ = generate(policy, prompts, rows, args, greedy=True)
    texts = policy.tokenizer.batch_decode(ids * mask, skip_special_tokens=True)
    return sum(verify.verify(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)


def save_atomic(folder, write):
    """Write into a temp folder, then rename: a kill at any moment leaves either the old or the new folder whole."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    old = folder + ".old"
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(policy, opt, sched, sampler, teacher, step, args, lora_rank):
    """A Hugging Face folder (from_pretrained loads it; LoRA adapters merged in) plus trainer_state.pt with all
    that --resume needs: optimizer, scheduler, data position, teacher snapshot, RNG, and the raw adapters."""
    folder = os.path.join(args.output_dir, f"checkpoint-{step}")

    def write(tmp):
        policy.model.save_pretrained(tmp, state_dict=merged_state_dict(policy.model) if lora_rank else None)
        policy.processor.save_pretrained(tmp)
        adapters = {n: p.detach() for n, p in policy.model.named_parameters() if ".lora_" in n}
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "lora_rank": lora_rank, "adapters": adapters,
                    "sampler": (sampler.epoch, sampler.pos), "teacher": teacher.state(), "args": vars(args),
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   os.path.join(tmp, "trainer_state.pt"))

    save_atomic(folder, write)
    for old in checkpoints(args.output_dir)[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoints(output_dir):
    """Finished checkpoint folders, oldest first (a '.tmp' folder is an interrupted write and never counts)."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(output_dir, name, "trainer_state.pt")):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [f for _, f in sorted(found)]


def fmt(metrics):
    keys = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy", "loss", "grad_norm",
            "rlsd/lambda", "rlsd/mean_abs_delta", "rlsd/weight_mean", "rlsd/weight_clipped_frac"]
    short = lambda k: k.split("/")[-1].replace("completions/", "")
    parts = [f"{short(k)} {metrics[k]:.3g}" for k in keys if k in metrics]
    parts.append("time " + "/".join(f"{metrics.get('time/' + p, 0):.1f}" for p in ("rollout", "reward", "teacher",
                                                                                   "update")) + "s")
    return f"step {metrics['step']:>4} | " + " | ".join(parts)


def show_credit(policy, rows, args, n, path):
    """Render n rollouts (a right and a wrong one per prompt) with each token coloured by A_t / A (Eq. 15 at
    lambda = lam0): where the teacher moved credit. Prints ANSI colours and writes a self-contained HTML file.
    Green = reinforced (A > 0), red = penalised (A < 0); the stronger the colour, the more weight the token got."""
    import html
    policy.model.eval()
    ro = rollout(policy, rows, args)
    rewards, _ = reward(ro)
    adv = rlsd.group_advantages(rewards, args.num_generations, args.scale_rewards)               # [B]
    student = score(policy, ro["prompts"], ro["rows"], ro["ids"], ro["mask"], args.temperature,
                    args.micro_batch_size)                                                      # [B, C]
    teacher = Teacher(policy, 0).logprobs(ro, args)                                              # [B, C]
    ratio = rlsd.rlsd_token_advantages(adv, teacher, student, ro["mask"], args.lam0, args.eps_w)
    ratio = ratio / adv.masked_fill(adv == 0, 1)[:, None]                                        # [B, C]
    G, picks = args.num_generations, []
    for g in range(0, len(adv), G):  # a right and a wrong answer to the same prompt, then the next prompt
        a = adv[g:g + G].tolist()
        if max(a) > 0 > min(a):
            picks += [g + a.index(max(a)), g + a.index(min(a))]
    picks = picks[:n]
    span = args.lam0 * args.eps_w or 1.0       # A_t / A lies in [1 - span, 1 + span]
    tok, lines, blocks = policy.tokenizer, [], []
    for i in picks:
        good = adv[i] > 0
        head = f"{'RIGHT' if good else 'WRONG'} A={adv[i]:+.2f}  {ro['rows'][i]['problem']}"
        ansi, spans = [], []
        for t in range(int(ro["mask"][i].sum())):
            piece, r = tok.decode([int(ro["ids"][i, t])]), float(ratio[i, t])
            level = max(0.0, min(1.0, (r - (1 - span)) / (2 * span)))      # 0 = least weight, 1 = most
            shade = 232 + round(level * 23)                                  # ANSI grey ramp
            ansi.append(f"\033[38;5;{shade}m\033[4{'2' if good else '1'}m{piece}\033[0m")
            rgb = "40,167,69" if good else "220,53,69"
            spans.append(f'<span title="{r:.3f}" style="background:rgba({rgb},{level:.2f})">'
                         f"{html.escape(piece)}</span>")
        lines.append(head + "\n" + "".join(ansi))
        blocks.append(f"<h3>{html.escape(head)}</h3><pre>{''.join(spans)}</pre>")
    print("\n\n".join(lines))
    legend = (f"Each token's background is A_t/A (Eq. 15, lambda = {args.lam0}): pale = {1 - span:.2f}, "
              f"full = {1 + span:.2f}. Green: reinforced (A > 0); red: penalised (A < 0). Hover for the value.")
    with open(path, "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><title>RLSD token credit</title>"
                f"<body style='font-family:sans-serif;max-width:60em'><h2>RLSD token credit</h2><p>{legend}</p>"
                + "".join(blocks) + "</body>")
    return picks, ratio


# ---------------------------------------------------------------------------------------------------------------------
# 10. The loop
# ---------------------------------------------------------------------------------------------------------------------
def train(args):
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # our own messages say what matters; silence library chatter
    t_start = time.time()
    ckpts = checkpoints(args.output_dir) if args.resume else []
    state = torch.load(os.path.join(ckpts[-1], "trainer_state.pt"), weights_only=False) if ckpts else None
    lora_resume = bool(state and state["lora_rank"])  # then: the base model again, and the saved adapters on top
    policy = load_policy(args, ckpts[-1] if ckpts and not lora_resume else None)
    random.seed(args.seed)  # after any warm start of the demo model, so a cold cache gives the same run as a warm one
    torch.manual_seed(args.seed)
    args.lora_rank = prepare_for_training(policy, args)
    if lora_resume:
        policy.model.load_state_dict(state["adapters"], strict=False)
    train_rows = load_rows(args, args.split)
    if args.eval_split:
        eval_rows = load_rows(args, args.eval_split)[:args.eval_size]
    elif args.dataset == "builtin":
        eval_rows = load_rows(args, "eval")
    else:  # hold out the last rows of the training split
        n = min(args.eval_size, len(train_rows) // 10)
        train_rows, eval_rows = train_rows[:len(train_rows) - n], train_rows[len(train_rows) - n:]
        if not n:
            print("fewer than 10 rows: no held-out evaluation (pass --eval-split for one)")
    lengths = [len(x) for x in policy.tokenizer([student_prompt(policy, r) for r in train_rows]).input_ids]
    if max(lengths) > args.max_prompt_length:
        print(f"dropping {sum(n > args.max_prompt_length for n in lengths)} prompts longer than "
              f"--max-prompt-length {args.max_prompt_length}")
        train_rows = [r for r, n in zip(train_rows, lengths) if n <= args.max_prompt_length]
    if not train_rows:
        raise ConfigError("no training rows left; check --dataset/--split or raise --max-prompt-length")

    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # 5-step warm-up, then constant
    sampler, teacher, step = Sampler(len(train_rows), args.seed), Teacher(policy, args.teacher_sync_steps), 0
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sampler.epoch, sampler.pos = state["sampler"]
        teacher.load(state["teacher"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        step = state["step"]
        print(f"resumed from {ckpts[-1]} at step {step}")
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "metrics.jsonl")
    if state and os.path.isfile(log_path):  # steps logged after the checkpoint will be run again: drop them
        kept = [line for line in open(log_path) if json.loads(line)["step"] <= step]
        open(log_path, "w").writelines(kept)
    log = open(log_path, "a")
    base_acc = evaluate(policy, eval_rows, args) if step == 0 and eval_rows else None  # no rows: no eval
    if base_acc is not None:
        print(f"base held-out accuracy: {base_acc:.3f} on {len(eval_rows)} prompts (greedy)")
        log.write(json.dumps({"step": 0, "eval/accuracy": base_acc}) + "\n")
    acc, phases, first = base_acc, dict.fromkeys(("rollout", "reward", "teacher", "update"), 0.0), step
    bar = tqdm(total=args.max_steps, initial=step, desc=args.algo, dynamic_ncols=True, file=sys.stdout)
    while step < args.max_steps:
        metrics, t = {}, time.time()
        rows = [train_rows[i] for i in sampler.next(args.prompts_per_step)]
        policy.model.eval()
        ro = rollout(policy, rows, args)                                                 # 1. rollout
        metrics["time/rollout"], t = time.time() - t, time.time()
        rewards, unparseable = reward(ro)                                                # 2. reward [B]
        adv = rlsd.group_advantages(rewards, args.num_generations, args.scale_rewards)   # 3. Eq. 1 [B]
        metrics["time/reward"], t = time.time() - t, time.time()
        teacher.maybe_sync(step)
        teacher_logp = None
        if args.algo == "rlsd" and rlsd.rlsd_lambda(step, args.lam0, args.lam_decay_steps) > 0:  # 4. teacher [B, C]
            teacher_logp = teacher.logprobs(ro, args)  # (once lambda reaches 0, RLSD is GRPO: no teacher needed)
            check_finite(teacher_logp, "teacher", step)
        metrics["time/teacher"], t = time.time() - t, time.time()
        um = update(policy, opt, sched, ro, adv, teacher_logp, teacher, args, step)      # 5-6. credit + update
        metrics["time/update"] = time.time() - t - um.get("time/teacher", 0.0)
        metrics["time/teacher"] += um.pop("time/teacher", 0.0)
        step += 1
        groups = rewards.view(-1, args.num_generations)
        lengths = ro["mask"].sum(1).float()
        metrics.update(um, step=step, reward=rewards.mean().item(), accuracy=rewards.mean().item(),
                       reward_std=groups.std(1).mean().item(),
                       frac_reward_zero_std=(groups.std(1) == 0).float().mean().item(),
                       **{"completions/mean_length": lengths.mean().item(),
                          "completions/clipped_ratio": ro["truncated"].float().mean().item(),
                          "completions/unparseable": unparseable})
        if eval_rows and (step % args.eval_steps == 0 or step == args.max_steps):
            t = time.time()
            acc = metrics["eval/accuracy"] = evaluate(policy, eval_rows, args)
            metrics["time/eval"] = time.time() - t
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        for k in phases:
            phases[k] += metrics[f"time/{k}"]
        bar.update(1)
        bar.write(fmt(metrics) + (f" | eval {acc:.3f}" if "eval/accuracy" in metrics else ""))
        if args.log_samples_steps and step % args.log_samples_steps == 0:
            for want, name in ((1.0, "right"), (0.0, "wrong")):
                i = next((i for i, r in enumerate(rewards.tolist()) if r == want), None)
                if i is not None:
                    bar.write(f"  [{name}, reward {want}] {ro['rows'][i]['problem']!r} -> {ro['texts'][i]!r}")
        if step % args.save_steps == 0 or step == args.max_steps:
            save_checkpoint(policy, opt, sched, sampler, teacher, step, args, args.lora_rank)
    bar.close()
    log.close()
    if args.show_credit:
        show_credit(policy, eval_rows[:args.prompts_per_step], args, args.show_credit,
                    os.path.join(args.output_dir, "credit.html"))
    if step > first:
        total = sum(phases.values())
        print(f"time per step {total / (step - first):.2f}s: " + ", ".join(
            f"{k} {v / total:.0%}" for k, v in phases.items()))
    if base_acc is not None:
        print(f"held-out accuracy: base {base_acc:.3f} -> final {acc:.3f} "
              f"({args.algo}, {step} steps, {time.time() - t_start:.0f}s)")
    return policy, {"base": base_acc, "final": acc}


def main(argv=None):
    try:
        args = parse_args(argv)
        train(args)
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
