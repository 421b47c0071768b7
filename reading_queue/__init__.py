"""Hub domain: study registry, archive back-ends and (later) the reading worklist."""


class QueueError(Exception):
    """Base class for hub-side domain failures."""
