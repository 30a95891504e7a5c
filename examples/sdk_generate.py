"""The DeltaZip Python SDK: list models, generate, stream a chat answer.

    python examples/sdk_generate.py [--model smollm2-arith]

Talks gRPC to a scheduler at $DELTAZIP_SCHEDULER (default 127.0.0.1:50051): start one with
`python examples/local_stack.py` or `docker compose up`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltazip import Client  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="fine-tune name (default: the first registered fine-tune)")
    parser.add_argument("--prompt", default="Mia has 17 stickers and gets 25 more. How many stickers does she have?")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    with Client(timeout_s=300) as client:
        models = client.models()
        for m in models:
            print(f"{m.name:<24} {'base' if m.is_base else f'{m.compression} ({m.compression_ratio:.1f}x)'}")
        fine_tunes = [m.name for m in models if not m.is_base]
        model = args.model or (fine_tunes[0] if fine_tunes else models[0].name)

        done = client.generate(model, args.prompt, max_tokens=args.max_tokens, temperature=0.0)
        print(f"\n[{model}] generate -> {done.finish_reason}, {done.usage.completion_tokens} tokens, "
              f"TTFT {done.usage.ttft_ms:.0f} ms, on {done.worker_id}\n{done.text}")

        print(f"\n[{model}] streamed chat:")
        for token in client.stream(model, messages=[{"role": "user", "content": args.prompt}],
                                   max_tokens=args.max_tokens, temperature=0.0):
            print(token.text, end="", flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
