#!/usr/bin/env python3
"""Writes the chat-template fixtures: every real chat template in shared/assets/chat-templates rendered
by transformers for a set of conversations, so retort's renderer can be held to byte-for-byte equality.
It also records how the real tokenizers in shared/assets/tokenizers encode a few texts.

    /work/venv/bin/python scripts/make_template_fixtures.py   # rewrites crates/retort-data/tests/fixtures/

Reference versions: transformers==5.23.0 jinja2==3.1.6 tokenizers==0.23.3. The date is fixed through
`date_string` (the Llama 3 templates otherwise call strftime_now), so the output is deterministic.
"""

import gzip
import json
import shutil
from pathlib import Path

import jinja2
import tokenizers
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT.parent / "shared" / "assets"
OUT = ROOT / "crates" / "retort-data" / "tests" / "fixtures"

SPECIAL = {
    "meta-llama": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    "Qwen": dict(bos_token=None, eos_token="<|im_end|>"),
    "google": dict(bos_token="<bos>", eos_token="<eos>"),
    "microsoft": dict(bos_token="<s>", eos_token="<|endoftext|>"),
    "mistralai": dict(bos_token="<s>", eos_token="</s>"),
    "unsloth": dict(bos_token="<s>", eos_token="</s>"),
}

TOOLS = [{"type": "function", "function": {
    "name": "get_order_status", "description": "Look up an order by its number.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "description": "The order number"}},
                   "required": ["order_id"]}}}]

CASES = {
    "user_only": dict(messages=[{"role": "user", "content": "Where is my order?"}], add_generation_prompt=True),
    "system_multi_turn": dict(messages=[
        {"role": "system", "content": "You route support tickets. Answer with one label."},
        {"role": "user", "content": "I was charged twice."},
        {"role": "assistant", "content": "billing"},
        {"role": "user", "content": "  The app crashes when I upload a photo.  "},
    ], add_generation_prompt=True),
    "training_render": dict(messages=[
        {"role": "system", "content": "Extract the order as JSON."},
        {"role": "user", "content": "Order 17: 3 chairs, deliver 2024-05-01."},
        {"role": "assistant", "content": "{\"order_id\": \"17\", \"items\": [{\"name\": \"chair\", \"quantity\": 3}]}"},
    ], add_generation_prompt=False),
    "no_system_two_turns": dict(messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Résumé of my café bill, ça va? 日本語も 🙂"},
        {"role": "assistant", "content": "Sure."},
    ], add_generation_prompt=False),
    "tool_call": dict(messages=[
        {"role": "user", "content": "What's the status of order 42?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "abc123XYZ", "type": "function", "function": {
            "name": "get_order_status", "arguments": {"order_id": "42"}}}]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_order_status", "content": "{\"status\": \"shipped\"}"},
    ], tools=TOOLS, add_generation_prompt=True),
    "thinking_off": dict(messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "3+3?"},
    ], add_generation_prompt=True, enable_thinking=False),
}


def render(template: str, case: dict, special: dict) -> dict:
    kwargs = {k: v for k, v in case.items() if k not in ("messages", "tools", "add_generation_prompt")}
    kwargs.update(special)
    kwargs["date_string"] = "26 Jul 2024"
    try:
        out = render_jinja_template([case["messages"]], tools=case.get("tools"), chat_template=template,
                                    add_generation_prompt=case["add_generation_prompt"], **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        if isinstance(out, list):
            out = out[0]
        return {"expected": out}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # The tests must not depend on shared/ (CI has a clean clone): copy what they read.
    tdir = OUT / "chat-templates"
    if tdir.exists():
        shutil.rmtree(tdir)
    shutil.copytree(ASSETS / "chat-templates", tdir, copy_function=shutil.copyfile)
    qdir = OUT / "qwen2-tokenizer"
    qdir.mkdir(exist_ok=True)
    src = ASSETS / "tokenizers" / "qwen2-tokenizer"
    # mtime=0 keeps the gzip byte-identical across runs.
    with open(qdir / "tokenizer.json.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write((src / "tokenizer.json").read_bytes())
    shutil.copyfile(src / "tokenizer_config.json", qdir / "tokenizer_config.json")
    rows = []
    for path in sorted((ASSETS / "chat-templates").glob("*.jinja")):
        template = path.read_text()
        org = next(k for k in SPECIAL if path.name.startswith(k))
        special = SPECIAL[org]
        for name, case in CASES.items():
            if name == "thinking_off" and "enable_thinking" not in template:
                continue
            if name == "tool_call" and "tools" not in template:
                continue
            rows.append({"template": path.name, "case": name, **case, **special, "date_string": "26 Jul 2024",
                         **render(template, case, special)})
    (OUT / "chat_templates.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")

    texts = ["Hello world", "  leading spaces and trailing  ", "Résumé café 日本語 🙂", "<|im_start|>user\nhi<|im_end|>",
             "numbers 1234567 and code: fn main() { println!(\"x\"); }", "\n\n\ttabs\r\nCRLF", ""]
    tok_rows = []
    for name in ["qwen2-tokenizer"]:
        tok = tokenizers.Tokenizer.from_file(str(ASSETS / "tokenizers" / name / "tokenizer.json"))
        for t in texts:
            tok_rows.append({"tokenizer": name, "text": t, "ids": tok.encode(t, add_special_tokens=False).ids,
                             "ids_special": tok.encode(t, add_special_tokens=True).ids})
    (OUT / "tokenization.json").write_text(json.dumps(tok_rows, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(rows)} template renderings, {len(tok_rows)} tokenizations "
          f"(transformers {transformers.__version__}, jinja2 {jinja2.__version__}, tokenizers {tokenizers.__version__})")


if __name__ == "__main__":
    main()
