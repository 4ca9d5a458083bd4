"""Encoder scheduling, failures of one request's work, and the step in flight, against the
scheduler tests' fake runner (which fails any chunk that touches an image not encoded yet)."""

from __future__ import annotations

import numpy as np
from test_scheduler import EOS, Harness, expected_tokens

from ipc.messages import MultiModalItem, RequestError


def image(offset: int, h: int, w: int, name: str = "") -> MultiModalItem:
    """An image of h x w patches (merge 2: h * w / 4 placeholder tokens) at ``offset``."""
    return MultiModalItem(name or f"img-{offset}-{h}x{w}", "image", (1, h, w), offset, h * w // 4)


def encoded_per_step(h: Harness) -> list[list[tuple[str, int]]]:
    return [[(r.request.request_id, r.index) for r in refs] for refs in h.runner.encodes]


def test_chunk_stops_before_an_image_the_encoder_budget_cannot_take() -> None:
    h = Harness(max_num_encoder_patches=100, max_num_batched_tokens=256)
    h.add("a", 60, mm_items=[image(10, 8, 8)], max_tokens=2, ignore_eos=True)  # 64 patches
    h.add("b", 60, mm_items=[image(5, 8, 8, "other")], max_tokens=2, ignore_eos=True)
    first = h.step()
    assert [(c.request.request_id, c.start, len(c.token_ids)) for c in first] == [
        ("a", 0, 60),
        ("b", 0, 5),  # 36 patches left: b's image waits for the next step
    ]
    assert encoded_per_step(h) == [[("a", 0)]]
    second = h.step()
    assert ("b", 5, 55) in [(c.request.request_id, c.start, len(c.token_ids)) for c in second]
    assert encoded_per_step(h)[1] == [("b", 0)]
    h.run()
    assert h.tokens("a") == expected_tokens(60, "a", 2)
    assert h.tokens("b") == expected_tokens(60, "b", 2)


def test_images_are_encoded_ahead_of_their_chunks() -> None:
    h = Harness(max_num_batched_tokens=16, max_num_seqs=1, num_slots=1)
    h.add("first", 40, mm_items=[image(20, 4, 8)], max_tokens=2, ignore_eos=True)
    h.add("next", 30, mm_items=[image(2, 4, 4), image(12, 4, 4, "two")], max_tokens=1)
    h.step()
    # The running prefill's image (beyond this 16-token chunk) and both of the waiting
    # request's images are encoded in the first step, in one call.
    assert encoded_per_step(h)[0] == [("first", 0), ("next", 0), ("next", 1)]
    h.run()
    assert all(refs == [] for refs in h.runner.encodes[1:])
    assert h.tokens("first") == expected_tokens(40, "first", 2)


def test_encoding_ahead_for_waiting_requests_is_bounded_in_tokens() -> None:
    h = Harness(max_num_batched_tokens=16, max_num_seqs=1, num_slots=1)
    h.add("busy", 8, max_tokens=30, ignore_eos=True)
    for i in range(4):  # 8 image tokens each
        h.add(f"w{i}", 12, mm_items=[image(2, 4, 8)], max_tokens=1)
    h.step()
    # The first waiting request always; then 16 image tokens' worth (two more).
    assert encoded_per_step(h)[0] == [("w0", 0), ("w1", 0), ("w2", 0)]
    h.run()
    assert all(h.finish(f"w{i}").finish_reason in ("stop", "length") for i in range(4))


def test_image_over_the_encoder_budget_is_refused_at_admission() -> None:
    h = Harness(max_num_encoder_patches=63)
    assert not h.add("huge", 40, mm_items=[image(4, 8, 8)])
    out = h.finish("huge")
    assert out.finish_reason == "error" and out.error is not None and out.error.status == 400
    assert "64 patches" in out.error.message and "--max-num-encoder-patches" in out.error.message
    assert not h.scheduler.has_work() and h.runner.encodes == []


def test_preempted_request_encodes_its_images_again() -> None:
    h = Harness(
        max_num_seqs=1, num_slots=1, max_num_batched_tokens=64, scheduling_policy="priority"
    )
    h.add("low", 30, mm_items=[image(4, 4, 8)], max_tokens=6, ignore_eos=True, priority=1)
    for _ in range(3):
        h.step()
    h.add("urgent", 6, max_tokens=2, ignore_eos=True, priority=0)
    h.run()
    assert h.scheduler.stats()["num_preemptions"] == 1
    assert encoded_per_step(h).count([("low", 0)]) == 2  # the runner forgot it on release
    assert h.tokens("low") == expected_tokens(30, "low", 6)


def test_a_preempted_request_is_checked_again_once_before_it_runs() -> None:
    h = Harness(
        max_num_seqs=1, num_slots=1, max_num_batched_tokens=64, scheduling_policy="priority"
    )
    h.add("low", 10, max_tokens=8, ignore_eos=True, priority=1)
    h.step()
    h.add("urgent", 6, max_tokens=6, ignore_eos=True, priority=0)
    h.run()  # low waits several steps for its slot after the preemption
    assert h.runner.checks.count("low") == 2 and h.runner.checks.count("urgent") == 1
    assert h.tokens("low") == expected_tokens(10, "low", 8)


def test_a_failed_request_ends_alone_and_frees_everything() -> None:
    h = Harness(num_slots=3, max_num_seqs=3)
    h.add("ok-1", 9, max_tokens=5, ignore_eos=True)
    h.add("bad", 9, mm_items=[image(2, 4, 4)], max_tokens=5, ignore_eos=True)
    h.add("ok-2", 9, max_tokens=5, ignore_eos=True)
    h.runner.fail["bad"] = RequestError(413, "image does not fit")
    h.run()
    out = h.finish("bad")
    assert out.finish_reason == "error" and out.error == RequestError(413, "image does not fit")
    assert h.tokens("bad") == []
    for rid in ("ok-1", "ok-2"):
        assert h.tokens(rid) == expected_tokens(9, rid, 5)
    assert "bad" in h.runner.released
    assert h.scheduler.stats()["num_free_slots"] == 3


def test_a_waiting_request_whose_image_fails_ahead_ends_too() -> None:
    h = Harness(max_num_seqs=1, num_slots=1)
    h.add("busy", 8, max_tokens=4, ignore_eos=True)
    h.add("doomed", 12, mm_items=[image(2, 4, 8)], max_tokens=2)
    h.runner.fail["doomed"] = RequestError(500, "vision tower says no")
    h.step()  # doomed is waiting; its image is encoded ahead and fails
    h.step()
    assert h.finish("doomed").error == RequestError(500, "vision tower says no")
    assert [s.request_id for s in h.scheduler.waiting] == []
    h.run()
    assert h.tokens("busy") == expected_tokens(8, "busy", 4)


def test_a_stop_while_the_next_step_is_in_flight_emits_nothing_more() -> None:
    h = Harness()
    h.runner.eos_after["e"] = 9 + 2  # EOS is the 3rd token; the 4th is already asked for
    h.add("e", 9, max_tokens=8)
    h.run()
    assert h.tokens("e")[-1] == EOS and len(h.tokens("e")) == 3
    assert [o.finish_reason for o in h.outputs["e"]] == [None, None, "stop"]
    decodes = [c for chunks in h.runner.steps for c in chunks if c.request.request_id == "e"]
    # The prefill, then decodes of tokens 1, 2 and 3: the last was queued before EOS came back,
    # and its result dropped.
    assert len(decodes) == 4
    assert all(c.feeds_sampled for c in decodes[1:])


def test_an_abort_while_a_step_is_in_flight_drops_its_results() -> None:
    h = Harness(num_slots=1, max_num_seqs=1)
    h.add("gone", 6, max_tokens=50, ignore_eos=True)
    for _ in range(3):
        h.step()
    assert h.pipeline.is_busy
    before = len(h.outputs["gone"])
    assert h.scheduler.abort(["gone"]) == ["gone"]
    h.add("next", 7, max_tokens=3, ignore_eos=True)  # takes the freed slot
    h.run()
    assert len(h.outputs["gone"]) == before
    assert h.tokens("next") == expected_tokens(7, "next", 3)


def test_max_tokens_is_never_asked_past() -> None:
    h = Harness()
    h.add("n", 5, max_tokens=3, ignore_eos=True)
    h.run()
    rows = [c for chunks in h.runner.steps for c in chunks if c.wants_logits]
    assert len(rows) == 3 and len(h.tokens("n")) == 3
    assert np.all(h.scheduler.stats()["num_free_slots"] == 4)
