from __future__ import annotations

from telerad.core.backoff import backoff_delay


def test_doubles_from_the_base_up_to_the_cap_without_jitter() -> None:
    delays = [backoff_delay(n, base_s=10.0, cap_s=3600.0, jitter=False) for n in range(12)]
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0]
    assert delays[-1] == 3600.0 and max(delays) == 3600.0


def test_equal_jitter_keeps_half_of_the_delay_fixed() -> None:
    assert backoff_delay(3, base_s=1.0, cap_s=300.0, rand=lambda: 0.0) == 4.0
    assert backoff_delay(3, base_s=1.0, cap_s=300.0, rand=lambda: 1.0) == 8.0


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert backoff_delay(10_000, base_s=1.0, cap_s=300.0, jitter=False) == 300.0
    assert backoff_delay(-1, base_s=1.0, cap_s=300.0, jitter=False) == 1.0
