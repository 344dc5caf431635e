"""The opt-in stage timer: nothing outside a record, a stage inside itself counted once, the selection span."""

from __future__ import annotations

import time

from sentilens.mllm.sweep import tokens_per_layer
from sentilens.stages import SELECT, record_stages, selection, stage


def test_a_stage_counts_only_inside_a_record_and_once_when_nested():
    with stage("vision"):
        time.sleep(0.01)
    with record_stages() as times:
        with stage("vision"):
            with selection():
                time.sleep(0.02)
                with selection():  # a selection step inside another (choose inside reduce_image) counts once
                    time.sleep(0.02)
            time.sleep(0.02)
    assert set(times) == {"vision", SELECT}
    assert 0.04 <= times[SELECT] < times["vision"]
    assert times["vision"] >= 0.06
    assert times[SELECT] < 0.06, "the nested span was added twice"


def test_a_stage_closes_on_an_exception_and_counts_again_after():
    with record_stages() as times:
        try:
            with selection():
                raise ValueError("boom")
        except ValueError:
            pass
        with selection():
            time.sleep(0.01)
    assert times[SELECT] >= 0.01


def test_lm_stage_tokens_per_layer_are_whole_up_to_k_and_kept_after():
    assert tokens_per_layer(144, 29, 0, 4) == [144, 29, 29, 29]
    assert tokens_per_layer(144, 29, 2, 4) == [144, 144, 144, 29]
    assert tokens_per_layer(36, 36, 1, 3) == [36, 36, 36]


def test_on_a_gpu_the_selection_span_is_timed_by_events_without_a_synchronisation(monkeypatch):
    """The selection stage opens inside every scored tower layer: on CUDA it records events, read once when the
    record closes, where the coarse stages synchronise at their boundaries (faked here: no GPU needed)."""
    import torch

    from sentilens import stages

    synchronised = []

    class Event:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = time.perf_counter()

        def elapsed_time(self, end) -> float:
            assert synchronised, "an event is read only after a synchronisation"
            return (end.at - self.at) * 1000

    monkeypatch.setattr(stages, "_cuda_active", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synchronised.append(time.perf_counter()))
    with record_stages() as times:
        with stage("vision"):
            for _ in range(3):  # three scored layers
                with selection():
                    time.sleep(0.01)
        assert len(synchronised) == 2, "only the vision stage's two boundaries synchronise"
        assert SELECT not in times, "the events are read when the record closes"
    assert len(synchronised) == 3
    assert 0.03 <= times[SELECT] < times["vision"]
