"""Module-level (picklable) stand-ins for the pool's check, for timeout and crash tests."""

import time


def sleeps_forever(answer: str, gold: str, timeout_s: float) -> bool:
    time.sleep(3600)
    return True


def crashes(answer: str, gold: str, timeout_s: float) -> bool:
    raise RuntimeError("parser exploded")
