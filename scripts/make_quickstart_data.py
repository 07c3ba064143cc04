#!/usr/bin/env python3
"""Writes the offline quickstart's inputs and its recorded "teacher" transcript.

The quickstart must run with no network and no API key, so its teacher is a transcript that the
`replay` provider serves. This script writes that transcript from simple rules: each ticket is made
from a template of a known label, and the "teacher" answers with that label. It stands in for a
frontier model; it is not one, and the README says so.

    python3 scripts/make_quickstart_data.py          # rewrites data/quickstart/{tickets,teacher}.jsonl

Deterministic: the same seed gives byte-identical files. Needs only the standard library (3.11+).
"""

import json
import random
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.toml"
OUT = ROOT / "data" / "quickstart"
COUNT = 360  # more than target_examples: dedup removes some

SLOTS = {
    "product": ["the mobile app", "the web dashboard", "the desktop client", "the API", "the browser extension"],
    "amount": ["$12.99", "$49.00", "$120", "$7.50", "$300", "EUR 35"],
    "month": ["January", "March", "June", "September", "November"],
    "feature": ["dark mode", "CSV export", "two-factor login with a hardware key", "a calendar view",
                "bulk editing", "offline mode", "keyboard shortcuts", "a Linux version"],
    "action": ["uploading a photo", "saving a draft", "opening settings", "logging out", "searching",
               "exporting a report", "sharing a link"],
    "error": ["it freezes", "it crashes", "I get error 500", "nothing happens", "the page goes blank",
              "it shows a spinner forever"],
    "topic": ["your office hours", "a job opening", "your privacy policy", "a partnership", "your address",
              "whether you sponsor events"],
    "tone_open": ["Hi,", "Hello team,", "Hey,", "Good morning,", "To whom it may concern,", ""],
    "tone_close": ["Thanks.", "Please help.", "Thanks in advance!", "Regards.", "", "This is urgent."],
}

TEMPLATES = {
    "billing": [
        "I was charged {amount} twice this month. Can you refund one of them?",
        "My invoice for {month} shows {amount} but my plan costs less. Why?",
        "How do I change the credit card you bill every month?",
        "I cancelled in {month} but you still charged me {amount}.",
        "Can I get a receipt with my company's VAT number for the {amount} payment?",
        "Your pricing page says one thing and my bill says {amount}. Which is right?",
        "Please switch me from monthly to yearly billing.",
        "The payment of {amount} failed but the money left my account.",
    ],
    "bug": [
        "When I try {action} in {product}, {error}.",
        "{product} broke after the last update: {action} no longer works and {error}.",
        "Every time I am {action}, {error}. Using {product}.",
        "Bug report: {action} in {product} -> {error}. Steps: open it, try again, same thing.",
        "{error} whenever I attempt {action}. This started today in {product}.",
        "Is {product} down? {action} fails and {error}.",
    ],
    "account": [
        "I can't log in to my account; the password reset email never arrives.",
        "How do I change the email address on my account?",
        "My account got locked after too many attempts. Please unlock it.",
        "I want to delete my account and all my data.",
        "Someone else may have access to my account. How do I sign out everywhere?",
        "Please add my colleague as an admin on our team account.",
        "I need to change my username.",
        "Two-factor codes are not accepted when I sign in from a new phone.",
    ],
    "feature_request": [
        "It would be great if {product} had {feature}.",
        "Any plans to add {feature}? We would use it every day.",
        "Feature request: {feature} in {product}.",
        "Please consider {feature}; the competitors have it.",
        "Could you add {feature}? It would save our team hours.",
        "I'd pay more for {feature}.",
    ],
    "other": [
        "I have a question about {topic}.",
        "Who should I contact about {topic}?",
        "Just wanted to say the support last week was excellent.",
        "Can you send me information about {topic}?",
        "Where can I read about {topic}?",
        "I'm writing a school report; can you tell me about {topic}?",
    ],
}


def fill(template: str, rng: random.Random) -> str:
    out = template
    for key, values in SLOTS.items():
        while "{" + key + "}" in out:
            out = out.replace("{" + key + "}", rng.choice(values), 1)
    body = out[0].upper() + out[1:]
    parts = [rng.choice(SLOTS["tone_open"]), body, rng.choice(SLOTS["tone_close"])]
    return " ".join(p for p in parts if p)


def render_prompt(template: str, text: str) -> str:
    # The quickstart's prompt is `{{ input }}` (the default); anything else needs a Jinja renderer.
    stripped = template.strip()
    if stripped not in ("{{ input }}", "{{input}}"):
        raise SystemExit(f"make_quickstart_data.py only renders the default prompt, not {template!r}")
    return text


def main() -> None:
    recipe = tomllib.loads(RECIPE.read_text())
    seed = recipe["project"]["seed"]
    distill = recipe["distill"]
    system = distill["system_prompt"]
    prompt = distill.get("prompt", "{{ input }}")
    labels = distill["output"]["labels"]
    assert sorted(labels) == sorted(TEMPLATES), "labels in the recipe and the script differ"

    rng = random.Random(seed)
    tickets, transcript = [], []
    for i in range(COUNT):
        label = labels[i % len(labels)]
        text = fill(rng.choice(TEMPLATES[label]), rng)
        tickets.append({"id": f"t{i:04d}", "text": text})
        messages = [{"role": "system", "content": system}, {"role": "user", "content": render_prompt(prompt, text)}]
        transcript.append({
            "request": {"model": recipe["teacher"]["model"], "messages": messages},
            "response": {"content": label, "finish_reason": "stop"},
        })
    order = list(range(COUNT))
    rng.shuffle(order)

    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "tickets.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps(tickets[i], ensure_ascii=False) + "\n")
    with open(OUT / "teacher.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps(transcript[i], ensure_ascii=False) + "\n")
    print(f"wrote {COUNT} tickets and {COUNT} transcript entries to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
