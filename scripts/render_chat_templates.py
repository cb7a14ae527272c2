#!/usr/bin/env python3
"""Writes the reference outputs the Rust tokenizer tests compare against.

Renders Qwen3's chat template and encodes a set of strings with Hugging Face transformers, and
writes them as JSON: nanovllm/tests/fixtures/chat_template_expected.json. The tests in
nanovllm/tests/tokenizer.rs check that nanovllm's tokenizer produces the same strings and ids.

Needs only transformers, jinja2 and tokenizers (no torch):

    python3 -m venv /tmp/venv-tok && /tmp/venv-tok/bin/pip install transformers jinja2 tokenizers
    /tmp/venv-tok/bin/python scripts/render_chat_templates.py /path/to/qwen3 \
        nanovllm/tests/fixtures/chat_template_expected.json

The model folder needs tokenizer.json and tokenizer_config.json (no weights).
"""

import json
import sys

import tokenizers
import transformers
from transformers import AutoTokenizer

SYSTEM = "You are a helpful assistant."

CHATS = [
    {
        "name": "two_turns",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Germany? Answer in 中文, please 🙂"},
        ],
        "add_generation_prompt": True,
    },
    {
        "name": "single_user",
        "messages": [{"role": "user", "content": "Write a haiku about Rust."}],
        "add_generation_prompt": True,
    },
    {
        # The last assistant turn carries its reasoning inline: the template splits it out of
        # the content on </think> (str.split, lstrip, rstrip, strip) and puts it back in a
        # normalised <think> block.
        "name": "assistant_reasoning_last",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\n\n  Simple sum.\n\n\n</think>\n\n\n4"},
        ],
        "add_generation_prompt": False,
    },
    {
        # An assistant turn before the last user query: its reasoning is dropped.
        "name": "assistant_reasoning_dropped",
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        "add_generation_prompt": True,
    },
    {
        # The backwards scan (messages[::-1]) skips user turns that wrap a tool response, so the
        # assistant turn counts as after the last query and keeps its reasoning; tool turns are
        # folded into a user turn.
        "name": "multi_step_tool",
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
            {"role": "user", "content": "<tool_response>not a tool</tool_response>"},
            {"role": "tool", "content": "{\"ok\": true}"},
        ],
        "add_generation_prompt": True,
    },
]

# Small templates that exercise what Qwen3's template does not: block tags without whitespace
# control (transformers' Jinja2 runs with trim_blocks and lstrip_blocks, and drops one trailing
# newline), Python methods, backward slices, namespaces, `is false`, and {% break %}.
CUSTOM_TEMPLATES = [
    {
        "name": "block_whitespace",
        "template": (
            "{% for message in messages %}\n"
            "    {% if message.role == 'user' %}\n"
            "        User: {{ message.content }}\n"
            "    {% else %}\n"
            "        {{ message.role | capitalize }}: {{ message.content }}\n"
            "    {% endif %}\n"
            "{% endfor %}\n"
            "{% if add_generation_prompt %}\n"
            "Assistant:\n"
            "{% endif %}\n"
        ),
    },
    {
        "name": "python_methods",
        "template": (
            "{%- set ns = namespace(last_user='') -%}\n"
            "{%- for m in messages[::-1] -%}\n"
            "  {%- if m.role == 'user' and ns.last_user == '' %}{% set ns.last_user = m.content %}{% endif -%}\n"
            "{%- endfor -%}\n"
            "{%- for m in messages -%}\n"
            "[{{ loop.index }}/{{ loop.length }} {{ m.role.upper() }}] {{ m.content.strip().replace('  ', ' ') }}"
            " | words={{ m.content.split() | length }}"
            " | hi={{ 'yes' if m.content.lstrip().startswith('Hi') else 'no' }}\n"
            "{% if loop.index >= 3 %}{% break %}{% endif %}\n"
            "{%- endfor -%}\n"
            "last user: {{ ns.last_user.rstrip('!?') }}; thinking={{ 'off' if enable_thinking is false else 'on' }};"
            " eos={{ eos_token }}; gen={{ add_generation_prompt }}; name={{ messages[0].get('name') }}"
        ),
    },
]

CUSTOM_MESSAGES = [
    {"role": "system", "content": "  Be  brief.  "},
    {"role": "user", "content": "Hi there, how are you?!"},
    {"role": "assistant", "content": "Fine,  thanks."},
    {"role": "user", "content": "  Hi again?"},
]

ROUND_TRIP = {
    "english": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。",
    "emoji": "I love 🦀 and 🐍! 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥",
    "code": 'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    "special": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|endoftext|>",
    "mixed": "  leading spaces, tabs\t\tand\r\nnewlines; numbers 1234567890, ünïcödé, русский, العربية, 日本語のテキスト",
}


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL_DIR OUT_JSON")
    model_dir, out_path = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(model_dir)

    chats = []
    for chat in CHATS:
        for enable_thinking in (True, False):
            rendered = tok.apply_chat_template(
                chat["messages"],
                tokenize=False,
                add_generation_prompt=chat["add_generation_prompt"],
                enable_thinking=enable_thinking,
            )
            chats.append(
                {
                    "name": chat["name"],
                    "messages": chat["messages"],
                    "add_generation_prompt": chat["add_generation_prompt"],
                    "enable_thinking": enable_thinking,
                    "expected": rendered,
                }
            )

    custom = []
    for case in CUSTOM_TEMPLATES:
        for add_generation_prompt, enable_thinking in ((True, True), (False, False)):
            rendered = tok.apply_chat_template(
                CUSTOM_MESSAGES,
                chat_template=case["template"],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
            )
            custom.append(
                {
                    "name": case["name"],
                    "template": case["template"],
                    "messages": CUSTOM_MESSAGES,
                    "add_generation_prompt": add_generation_prompt,
                    "enable_thinking": enable_thinking,
                    "expected": rendered,
                }
            )

    round_trip = []
    for name, text in ROUND_TRIP.items():
        ids = tok.encode(text, add_special_tokens=False)
        round_trip.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "ids_with_special": tok.encode(text, add_special_tokens=True),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )

    out = {
        "generated_by": "scripts/render_chat_templates.py",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "eos_token": tok.eos_token,
        "chats": chats,
        "custom_templates": custom,
        "round_trip": round_trip,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
