"""The default model's chat template (our own, Qwen-style layout).

Each message renders as ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n``; an image part renders as
``<|vision_start|><|image_pad|><|vision_end|>``, which the processor later widens to one
``<|image_pad|>`` per merged patch.  Every newline is written inside a ``{{ '...' }}``
expression because HF renders templates with ``trim_blocks``/``lstrip_blocks`` and ``{%- -%}``
would otherwise swallow the newlines the layout needs.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unsupported message role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- else -%}"
    "{{ raise_exception('unsupported content part type: ' ~ part['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)
