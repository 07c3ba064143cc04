#!/usr/bin/env python3
"""Writes the LoRA training-parity fixtures: PEFT adapters on the tiny Llama fixture model, one AdamW
step's loss, adapter gradients and updated weights, a 20-step loss curve, and PEFT's logits with the
saved adapter, for LoRA, rsLoRA and DoRA.

    /work/venv/bin/python scripts/make_lora_fixtures.py   # rewrites crates/retort-train/tests/fixtures/

Reference versions: torch==2.15.0 transformers==5.23.0 peft==0.21.2. Seeded and deterministic on the
CPU. PEFT initialises B to zeros, which would make every A gradient zero at the first step; B is set to
small random values after init so both gradients are tested, and the initial adapter is saved so
retort starts from exactly the same weights.

The step: loss = sum of token cross-entropies over label tokens / number of label tokens (labels -100
are ignored; logits at position t predict the token at t+1), AdamW(lr=1e-2, betas=(0.9, 0.999),
eps=1e-8, weight_decay=0.01), gradients clipped to a global L2 norm of 0.5 (small enough to clip here).
"""

import json
import shutil
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "crates" / "retort-model" / "tests" / "fixtures" / "llama"
OUT = ROOT / "crates" / "retort-train" / "tests" / "fixtures"

IDS = [[1, 17, 45, 200, 3, 99, 150, 7, 64, 31, 255, 12],
       [1, 250, 9, 33, 120, 77, 4, 18, 0, 0, 0, 0]]
# Loss on the second half of each sequence (the "answer"); padding and prompts ignored.
LABELS = [[-100] * 6 + IDS[0][6:],
          [-100] * 4 + IDS[1][4:8] + [-100] * 4]
MASK = [[1] * 12, [1] * 8 + [0] * 4]
LR, WD, CLIP = 1e-2, 0.01, 0.5
CURVE_STEPS = 20

VARIANTS = {
    "lora": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
}


def loss_fn(model, ids, labels, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    shift = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(shift, target, ignore_index=-100, reduction="sum")
    return nll / (target != -100).sum()


def make(name: str, opts: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager", dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM", **opts)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out / "initial")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    ids, labels, mask = torch.tensor(IDS), torch.tensor(LABELS), torch.tensor(MASK)
    opt = torch.optim.AdamW(trainable.values(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    loss = loss_fn(model, ids, labels, mask)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), CLIP)
    # Gradients as computed (before clipping rescales them in place we saved nothing): recompute raw.
    tensors = {}
    for n, p in trainable.items():
        tensors[f"grad_clipped.{n}"] = p.grad.detach().clone()
    opt.step()
    opt.zero_grad()
    for n, p in trainable.items():
        tensors[f"updated.{n}"] = p.detach().clone()
    # Raw (unclipped) gradients at the initial weights, on a fresh copy.
    fresh = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        BASE, attn_implementation="eager", dtype=torch.float32), out / "initial", is_trainable=True)
    raw = loss_fn(fresh, ids, labels, mask)
    raw.backward()
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            tensors[f"grad.{n}"] = p.grad.detach().clone()
    with torch.no_grad():
        tensors["logits_initial"] = fresh(input_ids=ids[:1]).logits[0].float()

    # 20 steps on the same batch, constant learning rate.
    curve = [float(loss)]
    for _ in range(CURVE_STEPS - 1):
        l = loss_fn(model, ids, labels, mask)
        l.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), CLIP)
        opt.step()
        opt.zero_grad()
        curve.append(float(l))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))
    return {"loss": float(loss), "grad_norm": float(norm), "curve": curve,
            "param_names": sorted(trainable)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = {"torch": torch.__version__, "transformers": transformers.__version__,
             "peft": __import__("peft").__version__, "ids": IDS, "labels": LABELS, "mask": MASK,
             "lr": LR, "weight_decay": WD, "clip": CLIP, "betas": [0.9, 0.999], "eps": 1e-8, "variants": {}}
    for seed, (name, opts) in enumerate(VARIANTS.items()):
        index["variants"][name] = make(name, opts, 2000 + seed)
        print(name, "loss", index["variants"][name]["loss"], "grad norm", index["variants"][name]["grad_norm"],
              "curve end", index["variants"][name]["curve"][-1])
    (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
