"""Chat templates and tool-call syntaxes of the families: our rendering equals transformers' for templates written
the way each family's are (tools, tool results, assistant tool calls, strftime_now, raise_exception, extra variables
such as Qwen3's enable_thinking), and each family's tool-call syntax parses into OpenAI-style calls."""

from types import SimpleNamespace

import pytest

from agentopt_compiler.runtime.chat import ChatTemplateError, render_chat
from agentopt_compiler.runtime.tools import parse_tool_calls

# In the style of Qwen3's template: tools as JSON lines in <tools>, calls as <tool_call>, results as <tool_response>
QWEN3 = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}{% for message in messages %}{% if message.role == 'user' %}<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content or '' }}{% for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

# In the style of Llama 3.1's: a dated system turn (strftime_now), tools as JSON in the user turn, ipython results
LLAMA31 = """{{- bos_token }}{%- set date_string = strftime_now("%d %b %Y") %}<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: {{ date_string }}
{% if tools %}
Respond with a JSON for a function call: {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}{% endif %}<|eot_id|>{% for message in messages %}{% if message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content | tojson }}<|eot_id|>{% elif message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}{% endfor %}<|eot_id|>{% else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# In the style of Mistral's: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS], strict role alternation
MISTRAL = """{{ bos_token }}{% for message in messages %}{% if message.role == 'user' %}{% if tools and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson(separators=(',', ':')) }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ message.content }}[/INST]{% elif message.role == 'assistant' %}{% if message.tool_calls %}[TOOL_CALLS]{{ message.tool_calls | map(attribute='function') | list | tojson }}{% else %}{{ message.content }}{% endif %}{{ eos_token }}{% elif message.role == 'tool' %}[TOOL_RESULTS]{{ message.content }}[/TOOL_RESULTS]{% else %}{{ raise_exception('Only user, assistant and tool roles are supported!') }}{% endif %}{% endfor %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "{\"celsius\": 4}"},
    {"role": "user", "content": "And in °F?"},
]


def _tokenizer(template):
    return SimpleNamespace(chat_template=template, config={"bos_token": "<s>", "eos_token": {"content": "</s>"}})


@pytest.mark.parametrize("template, messages, variables", [
    (QWEN3, MESSAGES, {}),  # the last user turn holds "°F": non-ASCII stays as is in both
    (QWEN3, MESSAGES[1:2], {"enable_thinking": False}),
    (LLAMA31, MESSAGES[1:], {}),
    (MISTRAL, MESSAGES[1:], {}),
])
def test_rendering_equals_transformers(template, messages, variables):
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = render_chat(_tokenizer(template), messages, TOOLS, **variables)
    theirs = render_jinja_template([messages], tools=TOOLS, chat_template=template, add_generation_prompt=True,
                                   bos_token="<s>", eos_token="</s>", **variables)[0][0]
    assert ours == theirs and "Oslo" in ours


def test_template_refusals_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="Only user, assistant and tool roles"):
        render_chat(_tokenizer(MISTRAL), MESSAGES, TOOLS)  # the system turn


@pytest.mark.parametrize("text, content", [
    ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "Let me check."),
    ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]<|/tool_call|>', ""),  # Phi-4-mini
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]</s>', ""),  # Mistral v3
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', ""),  # Mistral v11+
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eom_id|>', ""),  # Llama 3.1 ipython
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', ""),  # Llama 3.x JSON call
])
def test_each_familys_tool_call_syntax_parses(text, content):
    parsed = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", {"city": "Oslo"})]
    assert parsed.content == content and parsed.errors == []


def test_several_calls_and_malformed_ones():
    parsed = parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("a", {}), ("b", {"x": 1})]
    parsed = parse_tool_calls('[TOOL_CALLS]get_weather[ARGS]{"city": Oslo}')
    assert parsed.calls == [] and "not valid JSON" in parsed.errors[0]
    parsed = parse_tool_calls('<|tool_call|>[{"name": "a", "arguments": {}}, {"arguments": {}}]<|/tool_call|>')
    assert [c.name for c in parsed.calls] == ["a"] and "malformed" in parsed.errors[0]
