"""Conversation rendering: the chat template the artifact ships, the prompted baseline's
system prompt, and tokenisation with an assistant-token mask for training.

The shipped template renders system/user/assistant/tool turns in SmolLM2's ChatML form and
injects **no default system prompt** (DESIGN.md §4): SmolLM2's own template adds
"You are a helpful AI assistant named SmolLM" when none is given, which fights the persona.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from baking.spec import PersonaSpec, ToolSpec

# ChatML without a default system turn. Assistant `tool_calls` (OpenAI style) render in the
# <tool_call> format so clients that pass structured history get what the model was trained on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set ns = namespace(content=message['content'] if message['content'] is string else '') -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call.get('function') else call -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -%}"
    "{%- set ns.content = ns.content + ('\\n' if ns.content else '') + '<tool_call>\\n{\"name\": \"'"
    " + fn['name'] + '\", \"arguments\": ' + args + '}\\n</tool_call>' -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + ns.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

Message = dict[str, Any]

STYLE_WORDS = {
    "formal": "formal and precise",
    "casual": "relaxed and conversational",
    "technical": "technical and exact",
    "friendly": "warm and friendly",
    "professional": "professional and concise",
}


def render_persona_prompt(persona: PersonaSpec) -> str:
    if persona.system_prompt:
        return persona.system_prompt
    lines = [
        f"You are {persona.name}, an {persona.expertise}-level assistant specialised in {persona.domain}.",
        f"Your name is {persona.name}. Your tone is {STYLE_WORDS.get(persona.style, persona.style)}.",
    ]
    if persona.guidelines:
        lines.append("Follow these guidelines:")
        lines.extend(f"- {g}" for g in persona.guidelines)
    return "\n".join(lines)


def render_tools_prompt(tools: Sequence[ToolSpec]) -> str:
    schemas = [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]
    return (
        "You can call these tools:\n"
        + "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
        + "\nWhen a tool is needed, reply with only the call, exactly like this:\n"
        '<tool_call>\n{"name": "<tool name>", "arguments": {<arguments as JSON>}}\n</tool_call>\n'
        "When no tool fits, answer directly without a tool call."
    )


def render_system_prompt(persona: PersonaSpec | None, tools: Sequence[ToolSpec]) -> str:
    """The full prompt the original model needs (what baking removes): persona + tool schemas."""
    parts = []
    if persona is not None:
        parts.append(render_persona_prompt(persona))
    if tools:
        parts.append(render_tools_prompt(tools))
    return "\n\n".join(parts)


_SYSTEM_TURN = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


def template_default_system(tokenizer: Any) -> str | None:
    """The system turn the base model's *own* chat template adds to a conversation that has none.

    SmolLM2's adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face". The
    artifact ships CHAT_TEMPLATE, which adds nothing, but a client that renders prompts with the
    base model's template (the one it used for the original) sends that turn to the baked model,
    so training draws a share of its items under it (baking.pipeline.TEMPLATE_SYSTEM_SHARE).
    None when the template adds no system turn, or is not ChatML.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or template == CHAT_TEMPLATE:
        return None
    question = "What is the coolant temperature?"
    try:
        text = str(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False))
    except Exception:  # a template that cannot render a plain user turn adds nothing we can use
        return None
    found = _SYSTEM_TURN.search(text)
    if found is None or found.start() > text.find(question):
        return None
    return found.group(1) or None


def with_system(system: str | None, messages: Sequence[Message]) -> list[Message]:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    target_mask: list[bool]  # True where the token is supervised (assistant content + end of turn)


def render(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=CHAT_TEMPLATE
        )
    )


def encode_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation so far plus the assistant header, ready to generate."""
    return list(
        tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    )


def encode_conversation(tokenizer: Any, messages: Sequence[Message], *, train_turns: Sequence[int]) -> Encoded:
    """Tokenise turn by turn; the assistant turns listed in `train_turns` (message indices) are targets.

    A target covers the assistant's content and its <|im_end|>, not the role header, so the
    model learns what to say and when to stop, never to predict the user's turn.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for i, message in enumerate(messages):
        header = f"<|im_start|>{message['role']}\n"
        body = render(tokenizer, [message])[len(header) :]  # content + "<|im_end|>\n"
        h = tokenizer(header, add_special_tokens=False)["input_ids"]
        b = tokenizer(body, add_special_tokens=False)["input_ids"]
        ids += h + b
        supervised = i in train_turns and message["role"] == "assistant"
        # the trailing "\n" after <|im_end|> is not supervised: generation stops at <|im_end|>
        mask += [False] * len(h) + [supervised] * (len(b) - 1) + [False]
    return Encoded(ids, mask)
