"""deltazip/eval/tasks.py: which tokens a scored code line covers, and teacher-forced next-line accuracy."""

import torch

from deltazip.eval.tasks import _line_token_ranges, forced_next_line_accuracy


def test_line_ranges_skip_first_two_blank_and_last_lines():
    code = "```python\ndef f(x):\n    y = x\n\n    return y\n```"
    offsets = [(i, i + 1) for i in range(len(code))]  # one token per character
    ranges = _line_token_ranges(code, offsets)
    starts = [code.index("    y"), code.index("    return")]
    assert ranges == [(s, code.index("\n", s)) for s in starts]  # the line's characters and its newline


def test_line_ranges_include_tokens_shared_with_neighbours():
    code = "a\nb\n  c\nd"
    offsets = [(0, 1), (1, 4), (4, 7), (7, 8), (8, 9)]  # 'a', '\nb\n', '  c', '\n', 'd'
    assert _line_token_ranges(code, offsets) == [(2, 3)]  # line '  c' and its newline; line 'b' is index 1


class _Oracle(torch.nn.Module):
    """Predicts the true next token everywhere except at one position (to count one miss)."""

    def __init__(self, ids: list[int], wrong_at: int) -> None:
        super().__init__()
        self.ids, self.wrong_at = ids, wrong_at
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward_dense(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], 256)
        for p in range(ids.shape[1] - 1):
            nxt = int(ids[0, p + 1]) if p + 1 != self.wrong_at else (int(ids[0, p + 1]) + 1) % 256
            logits[:, p, nxt] = 1.0
        return logits


class _ByteTok:
    eos_token_ids = (0,)

    class tok:  # noqa: N801 - mimics tokenizers.Tokenizer.encode(...).ids / .offsets
        @staticmethod
        def encode(text, add_special_tokens=False):
            enc = type("Enc", (), {})()
            enc.ids, enc.offsets = list(text.encode()), [(i, i + 1) for i in range(len(text))]
            return enc

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "Q:" + messages[0]["content"] + "\nA:"

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())


def test_forced_accuracy_counts_a_wrong_token_as_a_missed_line():
    code = "```\nx = 1\ny = 2\nz = 3\n```"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": code}]}]
    tok = _ByteTok()
    prompt_len = len(tok.encode(tok.apply_chat_template(rows[0]["messages"][:-1])))
    ids = tok.encode(tok.apply_chat_template(rows[0]["messages"][:-1])) + list(code.encode())
    assert forced_next_line_accuracy(_Oracle(ids, wrong_at=-1), tok, rows) == 1.0  # lines 'y = 2', 'z = 3'
    wrong = prompt_len + code.index("z = 3") + 2  # a token inside the last scored line
    assert forced_next_line_accuracy(_Oracle(ids, wrong_at=wrong), tok, rows) == 0.5
