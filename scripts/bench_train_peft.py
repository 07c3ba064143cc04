"""The PyTorch + PEFT side of `scripts/bench_train.sh`: the same training steps as retort's
`bench_train` example, printed as the same JSON fields.

    python scripts/bench_train_peft.py MODEL_DIR BATCH_JSON WARMUP STEPS THREADS [--profile]
        [--checkpointing] [--device cpu|cuda] [--precision f32|bf16] [--nf4] [--autocast]

transformers' LlamaForCausalLM in f32 (sdpa attention), PEFT LoRA r=16 alpha=32 on all linear layers,
dropout 0, torch AdamW (lr 1e-4, eps 1e-8, no weight decay), gradients clipped at global norm 1.0, one
fixed batch with every token a label. Peak RSS is the process's VmHWM.

For `scripts/bench_gpu.sh`: `--device cuda` runs on the GPU and adds torch's peak allocated and reserved
device bytes; `--precision bf16` loads the base in bf16 (PEFT keeps the adapters in f32, as retort does);
`--nf4` is QLoRA through bitsandbytes (NF4, double quantization, bf16 compute), as PEFT users run it;
`--autocast` (with bf16) runs the forward under `torch.autocast`, as HF Trainer's `bf16=True` does, so
the adapters' matmuls run in bf16 (retort's `train.autocast`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time


def status_bytes(key: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    model_dir, batch_path, warmup, steps, threads = sys.argv[1:6]
    warmup, steps, threads = int(warmup), int(steps), int(threads)
    rest = sys.argv[6:]
    profile = "--profile" in rest
    checkpointing = "--checkpointing" in rest
    nf4 = "--nf4" in rest
    device = rest[rest.index("--device") + 1] if "--device" in rest else "cpu"
    precision = rest[rest.index("--precision") + 1] if "--precision" in rest else "f32"
    autocast = "--autocast" in rest and precision != "f32"

    import peft
    import torch
    import transformers

    torch.set_num_threads(threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[precision]
    t = time.perf_counter()
    extra = {}
    if nf4:
        extra["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", device_map=device, **extra
    )
    # No `prepare_model_for_kbit_training`: it upcasts every unquantized weight (embeddings, lm_head,
    # norms) to f32, which would only make the peer slower and bigger.
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none")
    if checkpointing:
        # Per decoder layer, as PEFT users enable it; non-reentrant so LoRA inputs need no grad hook.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, cfg)
    model.train()
    load_s = time.perf_counter() - t
    rss_loaded = status_bytes("VmRSS:")

    with open(batch_path) as f:
        ids = torch.tensor(json.load(f)["ids"], dtype=torch.long, device=device)
    tokens = ids.numel()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    losses = []

    def forward():
        if not autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cpu" if device == "cpu" else "cuda", dtype=dtype)

    def step() -> None:
        with forward():
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    s_per_step = (time.perf_counter() - t) / max(steps, 1)  # `.item()` waited for each step's GPU work
    peak_rss = status_bytes("VmHWM:")  # before the profile resets it
    gpu = None
    if device != "cpu":
        gpu = {
            "name": torch.cuda.get_device_name(),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "max_reserved_bytes": torch.cuda.max_memory_reserved(),
        }

    split = None
    if profile:
        t = time.perf_counter()
        with torch.no_grad():
            with forward():
                model(input_ids=ids, labels=ids).loss.item()
        rss_before = status_bytes("VmRSS:")
        reset_peak()
        t1 = time.perf_counter()
        with forward():
            out = model(input_ids=ids, labels=ids)
        out.loss.item()
        t2 = time.perf_counter()
        rss_forward, peak_forward = status_bytes("VmRSS:"), status_bytes("VmHWM:")
        out.loss.backward()
        t3 = time.perf_counter()
        peak_step = status_bytes("VmHWM:")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        split = {
            "forward_no_grad_s": t1 - t,
            "forward_s": t2 - t1,
            "backward_s": t3 - t2,
            "optimizer_s": t4 - t3,
            "rss_before_bytes": rss_before,
            "rss_after_forward_bytes": rss_forward,
            "peak_forward_bytes": peak_forward,
            "peak_forward_backward_bytes": peak_step,
        }

    print(
        json.dumps(
            {
                "impl": "peft",
                "device": device,
                "precision": precision,
                "nf4": nf4,
                "autocast": autocast,
                "gpu": gpu,
                "threads": threads,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
                "tokens": tokens,
                "warmup": warmup,
                "steps": steps,
                "load_s": load_s,
                "seconds_per_step": s_per_step,
                "tokens_per_s": tokens / s_per_step,
                "peak_rss_bytes": peak_rss,
                "rss_after_load_bytes": rss_loaded,
                "losses": losses,
                "profile": split,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            }
        )
    )


if __name__ == "__main__":
    main()
