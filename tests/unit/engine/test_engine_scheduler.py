"""BatchScheduler policy without a model: delta limit, aging, token budget, KV pressure."""

from deltazip.model.sampling import SamplingParams
from services.worker.engine.batch_scheduler import BatchScheduler, SchedulerConfig
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.sequence import FinishReason, Sequence, SequenceStatus


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _seq(rid, delta, arrival, prompt_len=4):
    return Sequence(rid, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=100), delta, arrival_s=arrival)


def _complete(sched, batch, token=9):
    """Pretend the model ran: chunks computed, one token appended to sequences that reached the end."""
    for seq, n in batch.items:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(token)


def _scheduled(batch):
    return [s.request_id for s, _ in batch.items]


def test_aging_lets_a_blocked_delta_in():
    clock = Clock()
    sched = BatchScheduler(SchedulerConfig(max_deltas_per_batch=1, max_delta_wait_s=2.0),
                           BlockManager(100, 4), clock=clock)
    a1, c, a2, a3 = _seq("a1", "A", 0.0), _seq("c", "C", 0.1), _seq("a2", "A", 0.2), _seq("a3", "A", 3.0)
    for s in (a1, c, a2):
        sched.add(s)
    batch = sched.schedule()
    assert _scheduled(batch) == ["a1", "a2"]  # C is young: later A requests go ahead of it
    _complete(sched, batch)
    clock.now = 3.0  # C has now waited 2.9 s
    sched.add(a3)
    batch = sched.schedule()
    assert _scheduled(batch) == ["a1", "a2"]  # a3 is held back so that A drains
    _complete(sched, batch)
    sched.finish(a1, FinishReason.LENGTH)
    sched.finish(a2, FinishReason.LENGTH)
    batch = sched.schedule()
    assert _scheduled(batch) == ["c"] and c.status is SequenceStatus.RUNNING


def test_aging_drains_one_delta_while_the_others_keep_filling_the_batch():
    """Deep queues over many fine-tunes: an aged sequence waiting for a delta place makes one running delta (the
    one with the fewest running sequences) take no new sequences; the other running deltas keep being admitted,
    so the batch stays full. (Holding every running delta back shrank a 4-GPU scale-out run's batches to ~3
    sequences with 1500 requests queued over 64 fine-tunes.)"""
    clock = Clock()
    sched = BatchScheduler(SchedulerConfig(max_deltas_per_batch=2, max_delta_wait_s=2.0, max_num_seqs=4),
                           BlockManager(1000, 4), clock=clock)
    a1, a2, b1, c1 = _seq("a1", "A", 0.0), _seq("a2", "A", 0.1), _seq("b1", "B", 0.2), _seq("c1", "C", 0.3)
    for s in (a1, a2, b1, c1):
        sched.add(s)
    batch = sched.schedule()
    assert _scheduled(batch) == ["a1", "a2", "b1"]  # C: no delta place, and young
    _complete(sched, batch)
    clock.now = 3.0  # c1 has aged
    a3, b2 = _seq("a3", "A", 3.0), _seq("b2", "B", 3.0)
    sched.add(a3)
    sched.add(b2)
    batch = sched.schedule()
    assert _scheduled(batch) == ["a1", "a2", "b1", "a3"]  # B (1 running) drains; A still fills the batch
    _complete(sched, batch)
    sched.finish(a1, FinishReason.LENGTH)
    a4 = _seq("a4", "A", 3.5)
    sched.add(a4)
    batch = sched.schedule()
    assert "a4" in _scheduled(batch) and "b2" not in _scheduled(batch)
    _complete(sched, batch)
    sched.finish(b1, FinishReason.LENGTH)  # B has left: C takes its place ahead of later B requests
    batch = sched.schedule()
    assert "c1" in _scheduled(batch) and c1.status is SequenceStatus.RUNNING and "b2" not in _scheduled(batch)


def test_a_drain_ends_when_its_aged_sequence_goes_away():
    clock = Clock()
    sched = BatchScheduler(SchedulerConfig(max_deltas_per_batch=1, max_delta_wait_s=2.0), BlockManager(1000, 4),
                           clock=clock)
    a1, c = _seq("a1", "A", 0.0), _seq("c", "C", 0.1)
    sched.add(a1)
    sched.add(c)
    _complete(sched, sched.schedule())
    clock.now = 3.0
    a2 = _seq("a2", "A", 3.0)
    sched.add(a2)
    assert _scheduled(sched.schedule()) == ["a1"]  # C aged: A drains, a2 waits
    sched.finish(c, FinishReason.ABORT)  # the client went away
    sched.schedule()  # this pass finds nobody waiting for A's place: the drain ends
    assert sched._draining is None and "a2" in _scheduled(sched.schedule())


def test_swap_mode_preempted_sequence_of_the_active_model_does_not_drain_it():
    """KV pressure preempts a sequence of the running model: old enough to count as aged, but it is no other model
    waiting for the place, so the running model must keep taking sequences."""
    clock = Clock()
    sched = BatchScheduler(SchedulerConfig(max_deltas_per_batch=1, max_delta_wait_s=2.0, base_is_model=True),
                           BlockManager(3, 4), clock=clock)
    a1, a2 = _seq("a1", "A", 0.0), _seq("a2", "A", 0.1)
    sched.add(a1)
    sched.add(a2)
    _complete(sched, sched.schedule())
    clock.now = 5.0
    batch = sched.schedule()  # both decode and need a 2nd block, 1 free: a2 is preempted
    assert batch.preempted == [a2] and sched._draining is None


def test_base_requests_do_not_count_as_deltas():
    sched = BatchScheduler(SchedulerConfig(max_deltas_per_batch=1), BlockManager(100, 4))
    for s in (_seq("b1", None, 0), _seq("a", "A", 1), _seq("b2", None, 2), _seq("c", "C", 3)):
        sched.add(s)
    assert _scheduled(sched.schedule()) == ["b1", "a", "b2"]


def test_token_budget_chunks_prefill_and_serves_decodes_first():
    sched = BatchScheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(100, 4))
    short, long_ = _seq("short", None, 0, prompt_len=3), _seq("long", None, 1, prompt_len=20)
    sched.add(short)
    sched.add(long_)
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch.items] == [("short", 3), ("long", 5)]
    _complete(sched, batch)
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch.items] == [("short", 1), ("long", 7)]


def test_kv_pressure_preempts_newest_and_it_resumes_first():
    sched = BatchScheduler(SchedulerConfig(), BlockManager(3, 4))  # 12 token slots
    old, new = _seq("old", None, 0, prompt_len=4), _seq("new", None, 1, prompt_len=4)
    sched.add(old)
    sched.add(new)
    _complete(sched, sched.schedule())  # 2 blocks used, both decoding now (5 tokens each)
    batch = sched.schedule()  # each needs a 2nd block; only 1 free -> "new" is preempted
    assert _scheduled(batch) == ["old"] and batch.preempted == [new]
    assert new.status is SequenceStatus.PREEMPTED and new.num_computed_tokens == 0 and not new.block_table
    assert sched.waiting[0] is new
    sched.finish(old, FinishReason.STOP)
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch.items] == [("new", 5)]  # recompute prompt + output


def test_sequence_alone_without_room_ends_with_length():
    sched = BatchScheduler(SchedulerConfig(), BlockManager(1, 4))
    seq = _seq("s", None, 0, prompt_len=4)
    sched.add(seq)
    _complete(sched, sched.schedule())
    batch = sched.schedule()
    assert batch.ended == [seq] and seq.finish_reason is FinishReason.LENGTH and sched.blocks.num_free_blocks == 1


def test_prefill_first_alternates_prompt_steps_and_decode_steps():
    """prefill_first: with decodes running, a step with prompt work runs it alone, the next one the decodes alone;
    with no prompt work every step decodes; a prompt admitted while nothing decodes goes into the usual step."""
    sched = BatchScheduler(SchedulerConfig(prefill_first=True), BlockManager(100, 4))
    a, b = _seq("a", "A", 0.0), _seq("b", None, 0.1)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert _scheduled(batch) == ["a", "b"]  # nothing decodes yet: the usual step
    _complete(sched, batch)
    batch = sched.schedule()
    assert _scheduled(batch) == ["a", "b"] and all(n == 1 for _, n in batch.items)  # decodes, no prompt work
    _complete(sched, batch)
    c, d = _seq("c", "C", 1.0, prompt_len=6), _seq("d", "A", 1.1)
    sched.add(c)
    sched.add(d)
    batch = sched.schedule()
    assert _scheduled(batch) == ["c", "d"]  # the prompts alone: a and b wait one step
    _complete(sched, batch)
    sched.add(_seq("e", None, 2.0))
    batch = sched.schedule()
    assert _scheduled(batch) == ["a", "b", "c", "d"] and all(n == 1 for _, n in batch.items)  # decodes alone
    _complete(sched, batch)
    batch = sched.schedule()
    assert _scheduled(batch) == ["e"]  # the prompt that came meanwhile, alone again
    _complete(sched, batch)
    batch = sched.schedule()
    assert len(batch.items) == 5 and all(n == 1 for _, n in batch.items)


def test_prefill_first_keeps_chunked_prompts_in_prompt_steps_and_never_holds_decodes_for_nothing():
    """A prompt over the token budget runs chunk by chunk in the prompt turns, decodes in between; a prompt turn
    that can admit nothing (its delta not ready) gives the decodes the step instead of an empty one."""
    ready = {"A": True, "B": False}
    sched = BatchScheduler(SchedulerConfig(prefill_first=True, max_num_batched_tokens=8), BlockManager(100, 4),
                           is_delta_ready=lambda name: ready[name])
    a = _seq("a", "A", 0.0)
    sched.add(a)
    _complete(sched, sched.schedule())  # a decodes from now on
    long = _seq("long", "A", 1.0, prompt_len=20)
    sched.add(long)
    turns = []
    for _ in range(6):
        batch = sched.schedule()
        turns.append([(s.request_id, n) for s, n in batch.items])
        _complete(sched, batch)
    assert turns == [[("long", 8)], [("a", 1)], [("long", 8)], [("a", 1)], [("long", 4)], [("a", 1), ("long", 1)]]
    sched.add(_seq("b", "B", 2.0))  # its delta is not loaded: no prompt step can run it
    batch = sched.schedule()
    assert _scheduled(batch) == ["a", "long"] and all(n == 1 for _, n in batch.items)
    _complete(sched, batch)
    batch = sched.schedule()
    assert _scheduled(batch) == ["a", "long"]  # every step, while b waits for its delta
    ready["B"] = True
    _complete(sched, batch)
    batch = sched.schedule()
    assert _scheduled(batch) == ["b"]


def test_mixed_steps_by_default():
    """Without prefill_first decodes and new prompts share the step (decodes first)."""
    sched = BatchScheduler(SchedulerConfig(), BlockManager(100, 4))
    a = _seq("a", "A", 0.0)
    sched.add(a)
    _complete(sched, sched.schedule())
    sched.add(_seq("b", "B", 1.0))
    assert _scheduled(sched.schedule()) == ["a", "b"]
