"""Interoperability: the official openai Python SDK as a client of sheepdog.

Run by tests/openai_sdk.rs with SHEEPDOG_BASE_URL pointing at a gateway in front of `sheepdog mock`,
and EXPECTED_ANSWER set to the mock's deterministic answer.
"""
import os
import sys

import openai

base_url = os.environ["SHEEPDOG_BASE_URL"]
expected = os.environ["EXPECTED_ANSWER"]
client = openai.OpenAI(base_url=base_url, api_key="sk-client-not-needed", max_retries=0, timeout=20)
failures = []


def check(name, cond, detail=""):
    print(("PASS " if cond else "FAIL ") + name + (f": {detail}" if not cond else ""))
    if not cond:
        failures.append(name)


r = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "Say hello"}])
check("chat content", r.choices[0].message.content == expected, repr(r.choices[0].message.content))
check("chat usage", r.usage is not None and r.usage.completion_tokens > 0, repr(r.usage))

raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
check("x-sheepdog headers", raw.headers.get("x-sheepdog-endpoint") == "alpha" and raw.headers.get("x-sheepdog-attempts") == "1",
      dict(raw.headers))

stream = client.chat.completions.create(
    model="gpt-4.1", messages=[{"role": "user", "content": "Say hello"}], stream=True,
    stream_options={"include_usage": True},
)
parts, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
check("stream joined deltas", "".join(parts) == expected, repr("".join(parts)))
check("stream usage chunk", usage is not None and usage.completion_tokens == len(parts), repr(usage))

models = [m.id for m in client.models.list()]
check("models.list", models == ["gpt-4.1", "text-embedding-3-small"], repr(models))

e = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
check("embeddings", len(e.data) == 2 and len(e.data[0].embedding) == 8, repr(e.data[0].embedding))

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check("unknown model raises NotFoundError", False, "no exception")
except openai.NotFoundError as err:
    check("unknown model raises NotFoundError", err.body.get("code") == "model_not_found", repr(err.body))

try:
    client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}], temperature=3)
    check("bad temperature raises BadRequestError", False, "no exception")
except openai.BadRequestError as err:
    check("bad temperature raises BadRequestError", err.status_code == 400, repr(err))

print(f"{7 + 2 - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
