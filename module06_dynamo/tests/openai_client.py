"""Drives the frontend with the official OpenAI Python client.

Run by tests/http.rs as `python openai_client.py URL`; prints one JSON object
with what the client received, which the Rust test checks against the
engine's own greedy output.
"""

import json
import sys

import openai

url = sys.argv[1]
client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
messages = [{"role": "user", "content": "What is a KV cache? Answer in one sentence."}]

models = [m.id for m in client.models.list()]
model = models[0]

whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0
)
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, stream_usage, stream_finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        stream_usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            stream_finish = choice.finish_reason

completion = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=4, temperature=0
)

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=0)
    bad_status = None
except openai.BadRequestError as e:
    bad_status = e.status_code

print(
    json.dumps(
        {
            "models": models,
            "chat_text": whole.choices[0].message.content,
            "chat_finish": whole.choices[0].finish_reason,
            "chat_usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens],
            "stream_text": "".join(pieces),
            "stream_finish": stream_finish,
            "stream_usage": stream_usage,
            "completion_text": completion.choices[0].text,
            "bad_request_status": bad_status,
        }
    )
)
