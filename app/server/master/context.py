"""``server.master.context``: MindSpore Serving's master settings.

``set_max_enqueued_requests(n)``: the most requests waiting in the server at once
(10000 by default); more get ``Serving Error: enqueued requests count exceeds the
limit n``. It is the default of every RESTful and gRPC server started afterwards
(their own ``max_enqueued_requests`` wins), and it moves the limit of the servers of
this process already running on the default.
"""

from ...serving.enqueue_limit import ENQUEUE_LIMIT

__all__ = ["set_max_enqueued_requests"]


def set_max_enqueued_requests(max_enqueued_requests: int) -> None:
    """Set the most requests waiting to be processed (an int >= 1)."""
    ENQUEUE_LIMIT.set(max_enqueued_requests)
