"""Event sinks, the dashboard, the weight store and serving (issue: real-time training).

Nothing here is imported by ``train``: the trainer talks to :class:`Live` through the ``Feed``
protocol in ``slipstream._core.events``.
"""

from slipstream.live._live import Live
from slipstream.live._serve import Server, serve
from slipstream.live._weights import WeightFiles, WeightStore

__all__ = ["Live", "Server", "WeightFiles", "WeightStore", "serve"]
