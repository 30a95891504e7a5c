"""The official `openai` client against DeltaZip's OpenAI-compatible gateway: `model` is a fine-tune name.

    pip install openai
    python examples/openai_client.py [--model smollm2-python]

Uses $OPENAI_BASE_URL (default http://127.0.0.1:8000/v1); start a stack with `python examples/local_stack.py`
or `docker compose up`. No API key is checked.
"""

import argparse
import os
import sys

from openai import OpenAI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="fine-tune name (default: the first one listed that is not the base)")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                    api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    models = client.models.list().data
    for m in models:
        print(f"{m.id:<24} root={m.root}" if hasattr(m, "root") else m.id)
    model = args.model or next((m.id for m in models if m.id != getattr(m, "root", m.id)), models[0].id)

    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a Python function `is_even(n)`."}],
        max_tokens=args.max_tokens, temperature=0.0)
    print(f"\n[{model}] chat ({reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens):")
    print(reply.choices[0].message.content)

    print(f"\n[{model}] streamed completion:")
    stream = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=args.max_tokens,
                                       temperature=0.0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
        elif chunk.usage:
            print(f"\n[{chunk.usage.completion_tokens} tokens]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
