from pool.flapping import FlapGuard


def test_backoff_grows_then_gives_up() -> None:
    g = FlapGuard(attempts=4, window_s=60, base_delay_s=1, max_delay_s=3)
    assert g.failure(0.0) == 1
    assert g.failure(1.0) == 2
    assert g.failure(2.0) == 3  # capped
    assert g.failure(3.0) is None


def test_old_failures_leave_the_window() -> None:
    g = FlapGuard(attempts=2, window_s=10, base_delay_s=1)
    assert g.failure(0.0) == 1
    assert g.failure(20.0) == 1  # the first one is forgotten
    g.reset()
    assert g.failure(21.0) == 1
