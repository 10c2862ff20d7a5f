"""Built-in workloads: models and data used by the CLI, the demo and the benchmarks.

>>> from slipstream.workloads import WORKLOADS
>>> sorted(WORKLOADS)
['digits-cnn', 'images-cnn', 'mlp-784', 'sequence-lstm', 'text-clf']
"""

from slipstream.workloads import _digits, _images, _mlp, _sequence, _text
from slipstream.workloads._base import Data, Goal, Workload

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (_digits.WORKLOAD, _images.WORKLOAD, _mlp.WORKLOAD, _sequence.WORKLOAD, _text.WORKLOAD)
}

__all__ = ["WORKLOADS", "Data", "Goal", "Workload"]
