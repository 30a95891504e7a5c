"""Build the offline fine-tuning datasets: arithmetic word problems, Python stdlib functions, technical English.

Writes JSON lines `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` into
OUT/<task>/{train,eval}.jsonl. Deterministic for a given seed and Python installation.

    python scripts/make_datasets.py -o data
"""

import argparse
import ast
import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path

NAMES = ["Tom", "Ava", "Liam", "Mia", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Kenji", "Ines"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cards", "shells", "cookies", "stamps"]


def _add(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return q, f"{a} + {b} = {a + b}. The answer is {a + b}."


def _sub(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 99)
    b = rng.randint(1, a - 1)
    q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    return q, f"{a} - {b} = {a - b}. The answer is {a - b}."


def _mul(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 12), rng.randint(2, 15)
    q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?"
    return q, f"{a} * {b} = {a * b}. The answer is {a * b}."


def _two_step(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b - 1)
    q = f"{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have?"
    return q, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."


def arithmetic(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Word problems whose answer ends in 'The answer is N.'; eval questions never appear in train."""
    makers = [_add, _sub, _mul, _two_step]
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < num_train + num_eval:
        q, a = rng.choice(makers)(rng)
        if q in seen:
            continue
        seen.add(q)
        rows.append(_chat(q, a))
    return rows[num_eval:], rows[:num_eval]


def python_functions(max_chars: int) -> tuple[list[dict], list[dict]]:
    """(docstring summary -> source) pairs from the stdlib; modules split train/eval by name hash."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train: list[dict] = []
    held: list[dict] = []
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if skip & set(rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        is_eval = int(hashlib.sha256(str(rel).encode()).hexdigest(), 16) % 10 == 0
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            code = ast.get_source_segment(source, node)
            if not doc or not code or len(code) > max_chars:
                continue
            summary = doc.strip().splitlines()[0]
            args = ast.unparse(node.args)
            q = f"Write a Python function `{node.name}({args})`: {summary}"
            (held if is_eval else train).append(_chat(q, f"```python\n{code}\n```"))
    return train, held


CMAKE_HELP = Path("/usr/share/cmake-3.25/Help")  # CMake's reStructuredText manual (Debian package cmake-data)
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)*:`(?:[^`<]*<)?([^`>]+)>?`")
_UNDERLINE = re.compile(r"^([=\-^~*#\"'`+.])\1{2,}$")


def _clean_rst(text: str) -> list[str]:
    """Paragraphs of an .rst page in plain-ish text: roles -> `name`, no directives, labels or underlines."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if _UNDERLINE.match(stripped) or stripped.startswith(".. ") or stripped.startswith(":") and line == stripped:
            continue
        lines.append(_ROLE.sub(r"`\1`", line.rstrip()))
    paragraphs = "\n".join(lines).split("\n\n")
    return [p.strip("\n") for p in paragraphs if p.strip()]


def _chunks(paragraphs: list[str], max_chars: int) -> list[str]:
    """Consecutive paragraphs packed into chunks of at most max_chars (a longer paragraph is cut at a line)."""
    out, cur = [], ""
    for p in paragraphs:
        p = p[:max_chars].rsplit("\n", 1)[0] if len(p) > max_chars and "\n" in p[:max_chars] else p[:max_chars]
        if cur and len(cur) + 2 + len(p) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    return out + ([cur] if cur else [])


def technical_english(max_chars: int, max_train_bytes: int, max_eval_rows: int) -> tuple[list[dict], list[dict]]:
    """(page title + preceding text -> next chunk) pairs from the CMake manual; pages split train/eval by hash."""
    if not CMAKE_HELP.is_dir():
        raise FileNotFoundError(f"{CMAKE_HELP} not found: install the Debian package cmake-data (CMake 3.25's manual)")
    train: list[dict] = []
    held: list[dict] = []
    train_bytes = 0
    for path in sorted(CMAKE_HELP.rglob("*.rst")):
        rel = path.relative_to(CMAKE_HELP)
        if rel.parts[0] in ("release", "include") or path.name == "index.rst":
            continue
        paragraphs = _clean_rst(path.read_text(encoding="utf-8"))
        if len(paragraphs) < 2:
            continue
        title, body = paragraphs[0].splitlines()[0], paragraphs[1:]
        is_eval = int(hashlib.sha256(str(rel).encode()).hexdigest(), 16) % 10 == 0
        prev = "(start of page)"
        for chunk in _chunks(body, max_chars):
            if len(chunk) >= 200:
                q = f"CMake documentation, {rel.parts[0]} page `{title}`. Continue the text after:\n{prev}"
                row = _chat(q, chunk)
                if is_eval:
                    held.append(row)
                elif train_bytes < max_train_bytes:
                    train.append(row)
                    train_bytes += len(json.dumps(row)) + 1
            prev = chunk[-200:]
    return train, held[:max_eval_rows]


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--arith-train", type=int, default=20000)
    parser.add_argument("--arith-eval", type=int, default=500)
    parser.add_argument("--max-function-chars", type=int, default=1500)
    parser.add_argument("--english-chunk-chars", type=int, default=800)
    parser.add_argument("--english-train-bytes", type=int, default=1_000_000, help="keeps data/ under 8 MB")
    parser.add_argument("--english-eval", type=int, default=150)
    args = parser.parse_args()
    train, held = arithmetic(args.arith_train, args.arith_eval, args.seed)
    _write(train, args.out / "arith" / "train.jsonl")
    _write(held, args.out / "arith" / "eval.jsonl")
    train, held = python_functions(args.max_function_chars)
    _write(train, args.out / "python" / "train.jsonl")
    _write(held, args.out / "python" / "eval.jsonl")
    train, held = technical_english(args.english_chunk_chars, args.english_train_bytes, args.english_eval)
    _write(train, args.out / "english" / "train.jsonl")
    _write(held, args.out / "english" / "eval.jsonl")
    for task in ("arith", "python", "english"):
        counts = {s: sum(1 for _ in open(args.out / task / f"{s}.jsonl")) for s in ("train", "eval")}
        print(json.dumps({"task": task, **counts}))


if __name__ == "__main__":
    main()
