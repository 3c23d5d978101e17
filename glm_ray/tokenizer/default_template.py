"""GLM-4.5/4.6 chat template (glm-spec §4.2), written for this project.

Every tag strips its surrounding whitespace and all literal text is emitted from string expressions,
so the output is the same with or without trim_blocks/lstrip_blocks. The rendered format:

    [gMASK]<sop>[<|system|> tools block][<|system|>\\n..][<|user|>\\n..[/nothink]]
    [<|assistant|>\\n<think>..</think>\\n..content..\\n<tool_call>..</tool_call>][<|observation|>..]
    [<|assistant|>[\\n<think></think>]]

Reasoning is rendered only for assistant messages after the last user message (the current agentic
turn); earlier turns get an empty `<think></think>`. No end-of-turn token: the next role token ends a turn.
"""

DEFAULT_CHAT_TEMPLATE = r"""
{#- Plain text of a message's content: a string, or the text parts of an OpenAI content list. -#}
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part is mapping and part.type == 'text' -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}
        {{- content -}}
    {%- endif -%}
{%- endmacro -%}

{%- set thinking_off = enable_thinking is defined and not enable_thinking -%}
{%- set ns = namespace(last_user_index=-1) -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}
        {%- set ns.last_user_index = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}

{{- '[gMASK]<sop>' -}}
{%- if tools -%}
    {{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}
    {%- for tool in tools -%}
        {{- tool | tojson(ensure_ascii=False) -}}
        {{- '\n' -}}
    {%- endfor -%}
    {{- '</tools>\n\nFor each function call, output the function name and arguments ' -}}
    {{- 'within the following XML format:\n' -}}
    {{- '<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n' -}}
    {{- '<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>' -}}
{%- endif -%}

{%- for m in messages -%}
    {%- if m.role == 'system' -%}
        {{- '<|system|>\n' ~ text_of(m.content) -}}
    {%- elif m.role == 'user' -%}
        {%- set text = text_of(m.content) -%}
        {{- '<|user|>\n' ~ text -}}
        {%- if thinking_off and not text.endswith('/nothink') -%}
            {{- '/nothink' -}}
        {%- endif -%}
    {%- elif m.role == 'assistant' -%}
        {%- set content = text_of(m.content) -%}
        {%- set reasoning = '' -%}
        {%- if m.reasoning_content is string -%}
            {%- set reasoning = m.reasoning_content -%}
        {%- elif '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {{- '<|assistant|>' -}}
        {%- if loop.index0 > ns.last_user_index and reasoning.strip() -%}
            {{- '\n<think>' ~ reasoning.strip() ~ '</think>' -}}
        {%- else -%}
            {{- '\n<think></think>' -}}
        {%- endif -%}
        {%- if content.strip() -%}
            {{- '\n' ~ content.strip() -}}
        {%- endif -%}
        {%- for tool_call in m.tool_calls or [] -%}
            {%- set call = tool_call.function if tool_call.function else tool_call -%}
            {{- '\n<tool_call>' ~ call.name ~ '\n' -}}
            {%- for key, value in (call.arguments or {}).items() -%}
                {{- '<arg_key>' ~ key ~ '</arg_key>\n<arg_value>' -}}
                {{- value if value is string else value | tojson(ensure_ascii=False) -}}
                {{- '</arg_value>\n' -}}
            {%- endfor -%}
            {{- '</tool_call>' -}}
        {%- endfor -%}
    {%- elif m.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|observation|>' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' ~ text_of(m.content) ~ '\n</tool_response>' -}}
    {%- else -%}
        {{- raise_exception("Unsupported message role '" ~ m.role ~ "': expected system, user, assistant or tool") -}}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
    {%- if thinking_off -%}
        {{- '\n<think></think>' -}}
    {%- endif -%}
{%- endif -%}
""".strip()
