"""Small helpers shared by test modules (imported by name: pytest puts tests/ on sys.path)."""


class Clock:
    """A clock the test moves by hand (for KMEs and pools, whose time is injected)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t
