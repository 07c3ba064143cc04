"""Second half of make_export_fixtures.py: tiny models, PEFT adapters, merged weights, and what
llama.cpp's converter writes for them. Run through make_export_fixtures.py (it pins the versions).

Each family gets `models/<family>/`:

    base/      config.json, model.safetensors, generation_config.json, tokenizer files (transformers)
    adapter/   adapter_config.json, adapter_model.safetensors (peft, random non-zero A and B)
    merged.safetensors     the adapted tensors after peft's merge_and_unload, in the base's dtype
    merged_f32.safetensors the same merge done on an f32 copy of the base (families in F32_MERGE)
    llama_cpp.json         convert_hf_to_gguf.py on base/ for f32, f16, bf16, q8_0: metadata values,
                           tensor names, shapes, types and SHA-256 of each tensor's data

The tokenizers are trained here on a small fixed corpus (ByteLevel BPE with each family's
pre-tokenizer, or a SentencePiece BPE model with byte fallback), so the vocabularies are tiny.
llama.cpp recognises a BPE pre-tokenizer by hashing how the real tokenizer splits a test string, which
a tiny tokenizer cannot reproduce; `convert_hf_to_gguf.py` is therefore run with its
`get_vocab_base_pre` replaced by the family's name (`llama-bpe`, `qwen2`), which is the value it
would return for the real Llama 3 and Qwen2 tokenizers. Everything else is llama.cpp's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

CORPUS = [
    "The invoice total is wrong; please check line 4 of order 1234.",
    "I can't log in since the update. The app says my password expired!",
    "Refund request: the customer was charged twice for the annual plan.",
    "Feature request: dark mode and CSV export for the reports page.",
    "Bug: saving a draft on mobile deletes the attached photo (iOS 17.2).",
    "Hello! Could you route this ticket to billing, please?",
    "Das Konto wurde gesperrt. Können Sie helfen?",
    "Le paiement a échoué deux fois ; merci de vérifier.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 42%",
    "Symbols: {} [] () <> # @ $ & * + - = / \\ | ~ ` ^ _ \" '",
    "    indented code: for i in range(10): print(i)\n\tand a tab",
    "Emoji and CJK: 🙂 你好 こんにちは 안녕하세요",
    "We've been told they're sure it's done, and we'll see what you'd like.",
    "Extract: name=Ada Lovelace; date=1843-07-10; amount=EUR 35.00",
]

LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
}

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# family: (transformers config class, config overrides, tokenizer kind, dtype, adapter kwargs)
FAMILIES = {
    "llama": dict(
        cls="LlamaForCausalLM", cfg="LlamaConfig", tok="llama3", dtype=torch.float32,
        config=dict(vocab_size=320, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        lora=dict(r=8, lora_alpha=16, target_modules="all-linear"),
    ),
    "mistral": dict(
        cls="MistralForCausalLM", cfg="MistralConfig", tok="spm-llama", dtype=torch.bfloat16,
        config=dict(vocab_size=416, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    sliding_window=None),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    ),
    "qwen2": dict(
        cls="Qwen2ForCausalLM", cfg="Qwen2Config", tok="qwen2", dtype=torch.bfloat16,
        config=dict(vocab_size=320, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    use_sliding_window=False),
        lora=dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                  rank_pattern={"v_proj": 4, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"o_proj": 32}),
    ),
    "qwen3": dict(
        cls="Qwen3ForCausalLM", cfg="Qwen3Config", tok="qwen2", dtype=torch.bfloat16,
        config=dict(vocab_size=320, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False),
        lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                  use_dora=True),
    ),
    "phi3": dict(
        cls="Phi3ForCausalLM", cfg="Phi3Config", tok="spm-phi3", dtype=torch.bfloat16,
        config=dict(vocab_size=416, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    original_max_position_embeddings=64, sliding_window=128,
                    rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(8)],
                                  "long_factor": [1.5 + 0.25 * i for i in range(8)]}),
        lora=dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ),
    "gemma2": dict(
        cls="Gemma2ForCausalLM", cfg="Gemma2Config", tok="spm-gemma", dtype=torch.bfloat16,
        config=dict(vocab_size=416, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6),
        lora=dict(r=8, lora_alpha=16, target_modules="all-linear"),
    ),
    "gemma3": dict(
        cls="Gemma3ForCausalLM", cfg="Gemma3TextConfig", tok="spm-gemma", dtype=torch.bfloat16,
        config=dict(vocab_size=416, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6,
                    rope_theta=1000000.0, rope_local_base_freq=10000.0),
        lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                  use_dora=True),
    ),
}

# Families whose merge is also checked in f32 (`--dtype f32` from a bf16 base).
F32_MERGE = {"qwen3"}

GGUF_TYPES = ["f32", "f16", "bf16", "q8_0"]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------------------- tokenizers

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def write_bpe(kind: str, out: Path) -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
    regex = LLAMA3_RE if kind == "llama3" else QWEN2_RE
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIALS[kind])
    ids = {s: tok.token_to_id(s) for s in SPECIALS[kind]}
    if kind == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])])
        cfg = {"bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": TEMPLATES["llama3"],
               "clean_up_tokenization_spaces": True, "model_max_length": 256,
               "tokenizer_class": "PreTrainedTokenizerFast"}
        special = {"bos_token_id": ids[bos], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "chat_template": TEMPLATES["chatml"], "errors": "replace", "model_max_length": 256,
               "tokenizer_class": "PreTrainedTokenizerFast"}
        special = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return special


def write_spm(kind: str, out: Path) -> dict:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        # The model records its prefix: a fixed relative one keeps the file identical across runs.
        cwd = os.getcwd()
        os.chdir(tmp)
        prefix = "tokenizer"
        args = dict(sentence_iterator=iter(CORPUS * 4), model_prefix=prefix, vocab_size=400, model_type="bpe",
                    byte_fallback=True, character_coverage=1.0, num_threads=1, split_digits=True,
                    add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                    minloglevel=2)
        if kind == "spm-gemma":
            args.update(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                        bos_piece="<bos>", unk_piece="<unk>",
                        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
        else:
            args.update(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
            if kind == "spm-llama":
                args.update(control_symbols=["[INST]", "[/INST]"])
        try:
            spm.SentencePieceTrainer.train(**args)
        finally:
            os.chdir(cwd)
        shutil.copy(Path(tmp) / (prefix + ".model"), out / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    if kind == "spm-gemma":
        sot, eot = sp.piece_to_id("<start_of_turn>"), sp.piece_to_id("<end_of_turn>")
        cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               "add_bos_token": True, "add_eos_token": False, "chat_template": TEMPLATES["gemma"],
               "tokenizer_class": "GemmaTokenizer",
               "added_tokens_decoder": {
                   str(sot): {"content": "<start_of_turn>", "special": True, "lstrip": False, "rstrip": False,
                              "normalized": False, "single_word": False},
                   str(eot): {"content": "<end_of_turn>", "special": True, "lstrip": False, "rstrip": False,
                              "normalized": False, "single_word": False}}}
        special = {"bos_token_id": 2, "eos_token_id": [1, eot], "pad_token_id": 0}
    elif kind == "spm-phi3":
        n = sp.get_piece_size()
        added = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
        cfg = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
               "add_bos_token": False, "add_eos_token": False, "chat_template": TEMPLATES["phi3"],
               "tokenizer_class": "LlamaTokenizer",
               "added_tokens_decoder": {str(n + i): {"content": t, "special": i in (0, 2), "lstrip": False,
                                                     "rstrip": i != 0, "normalized": False, "single_word": False}
                                        for i, t in enumerate(added)}}
        special = {"bos_token_id": 1, "eos_token_id": [n, n + 2], "pad_token_id": n}
    else:
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
               "add_eos_token": False, "chat_template": TEMPLATES["mistral"], "tokenizer_class": "LlamaTokenizer",
               "legacy": False}
        special = {"bos_token_id": 1, "eos_token_id": 2}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # Hub repositories ship tokenizer.json next to tokenizer.model; transformers builds it from the
    # SentencePiece model. gemma3 keeps everything transformers saves (chat_template.jinja, its
    # tokenizer_config.json), the others keep the tokenizer_config.json written above.
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        AutoTokenizer.from_pretrained(out).save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            if f.name == "tokenizer.json" or family_keeps_all(kind, out):
                shutil.copy(f, out / f.name)
    return special


def family_keeps_all(kind: str, out: Path) -> bool:
    return kind == "spm-gemma" and out.parent.name == "gemma3"


# --------------------------------------------------------------------------------------- models


def build(family: str, spec: dict, out: Path) -> None:
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    seed = sum(map(ord, family))
    base_dir, adapter_dir = out / "base", out / "adapter"
    for d in (base_dir, adapter_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    tok = spec["tok"]
    special = write_bpe(tok, base_dir) if tok in SPECIALS else write_spm(tok, base_dir)

    config = getattr(transformers, spec["cfg"])(**COMMON, **special, **spec["config"])
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(config).to(spec["dtype"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms, so `1 + w` and friends are visible
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(base_dir, safe_serialization=True)
    gen = {"bos_token_id": special.get("bos_token_id"), "eos_token_id": special["eos_token_id"],
           "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (base_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    lcfg = LoraConfig(lora_dropout=0.0, init_lora_weights=False, **spec["lora"])
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA: a magnitude that is not the base's norm
                p.mul_(0.75 + 0.5 * torch.rand_like(p))
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's model-card template

    adapted = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
                      for k in load_file(adapter_dir / "adapter_model.safetensors")})
    merged = peft_model.merge_and_unload().state_dict()
    save_file({k: merged[k].contiguous() for k in adapted}, out / "merged.safetensors")

    if family in F32_MERGE:
        model32 = getattr(transformers, spec["cls"]).from_pretrained(base_dir, dtype=torch.float32).eval()
        from peft import PeftModel

        m32 = PeftModel.from_pretrained(model32, adapter_dir).merge_and_unload().state_dict()
        save_file({k: m32[k].float().contiguous() for k in adapted}, out / "merged_f32.safetensors")
    print(f"{family}: {len(adapted)} adapted tensors")


# --------------------------------------------------------------------------------------- llama.cpp

RUNNER = r"""
import runpy, sys
from pathlib import Path
llama = Path(sys.argv[1]); pre = sys.argv[2]
sys.path.insert(0, str(llama)); sys.path.insert(1, str(llama / "gguf-py"))
from conversion import base
if pre != "-":
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [str(llama / "convert_hf_to_gguf.py")] + sys.argv[3:]
runpy.run_path(str(llama / "convert_hf_to_gguf.py"), run_name="__main__")
"""


def value_json(field, reader_mod):
    """A gguf-py field as JSON: [type name, value]."""
    gv = reader_mod.GGUFValueType
    t = field.types[0]
    if t == gv.ARRAY:
        et = field.types[1]
        items = [field.contents(i) for i in range(len(field.data))]
        return ["ARRAY", et.name, items]
    return [t.name, field.contents()]


def llama_cpp_reference(llama_cpp: Path, family: str, out: Path) -> None:
    pre = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}.get(family, "-")
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import gguf as gg

    ref: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runner = Path(tmp) / "run.py"
        runner.write_text(RUNNER)
        for t in GGUF_TYPES:
            dst = Path(tmp) / f"{t}.gguf"
            subprocess.run([sys.executable, str(runner), str(llama_cpp), pre, str(out / "base"), "--outtype", t,
                            "--outfile", str(dst)], check=True, capture_output=True)
            r = gg.GGUFReader(dst)
            meta = {k: value_json(f, gg) for k, f in r.fields.items() if not k.startswith("GGUF.")}
            tensors = {}
            for ti in r.tensors:
                shape = [int(d) for d in reversed(ti.shape.tolist())]
                tensors[ti.name] = {"shape": shape, "type": ti.tensor_type.name,
                                    "sha256": sha256(bytes(ti.data.tobytes()))}
            ref[t] = {"metadata": meta, "tensors": tensors}
    (out / "llama_cpp.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")


def make_models(llama_cpp: Path, fixtures: Path) -> None:
    for family, spec in FAMILIES.items():
        out = fixtures / "models" / family
        out.mkdir(parents=True, exist_ok=True)
        build(family, spec, out)
        llama_cpp_reference(llama_cpp, family, out)
