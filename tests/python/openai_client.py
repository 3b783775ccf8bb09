"""Drives the official `openai` Python client against Envoy (called by
tests/tests/e2e_tokens.rs). Prints one JSON object on stdout.

usage: openai_client.py BASE_URL MODE TENANT
  complete  one chat completion, no retries (a 429 is reported, not raised)
  stream    one streamed chat completion with usage in the final chunk
  retry     one chat completion with retries on: the client must wait our
            Retry-After and succeed once the window has turned
"""
import json
import sys
import time

import openai  # a missing package fails the test: `make deps` installs it


def main():
    base_url, mode, tenant = sys.argv[1:4]
    client = openai.OpenAI(
        base_url=base_url,
        api_key="sk-sluice-test",
        max_retries=2 if mode == "retry" else 0,
        timeout=30,
        default_headers={"x-tenant-id": tenant},
    )
    messages = [{"role": "user", "content": "Say hello."}]
    started = time.monotonic()
    try:
        if mode == "stream":
            content, usage = "", None
            for chunk in client.chat.completions.create(
                model="gpt-3.5-turbo", messages=messages, max_tokens=20, stream=True,
                stream_options={"include_usage": True},
            ):
                for choice in chunk.choices:
                    content += choice.delta.content or ""
                if chunk.usage is not None:
                    usage = chunk.usage.total_tokens
            out = {"content": content, "usage": usage}
        else:
            if mode == "retry":
                # Take the hour's room first (23 of 30 tokens).
                client.chat.completions.create(
                    model="gpt-3.5-turbo", messages=messages, max_tokens=20,
                    extra_headers={"x-demo-usage-total": "300"},
                )
                started = time.monotonic()
            r = client.chat.completions.create(model="gpt-3.5-turbo", messages=messages, max_tokens=20)
            out = {"content": r.choices[0].message.content, "usage": r.usage.total_tokens}
    except openai.RateLimitError as e:
        out = {
            "error": type(e).__name__,
            "status": e.status_code,
            "retry_after": e.response.headers.get("retry-after"),
            # The whole JSON body Sluice sent (the SDK's e.body keeps only
            # its `error` member).
            "body": e.response.json(),
            "message": e.message,
        }
    out["elapsed_s"] = time.monotonic() - started
    print(json.dumps(out))


if __name__ == "__main__":
    main()
