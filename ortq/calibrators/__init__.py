"""Calibrators: observers that stream tensor statistics into ranges, and the collector that feeds them.

Importing the package registers the observers of every :class:`~ortq.config.CalibrationMethod`.
"""

from ortq.calibrators.base import Observer, TensorRange, make_observer
from ortq.calibrators.collect import CalibrationState, RangeCollector
from ortq.calibrators.entropy import EntropyObserver
from ortq.calibrators.minmax import MinMaxObserver
from ortq.calibrators.percentile import PercentileObserver

__all__ = [
    "CalibrationState",
    "EntropyObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "RangeCollector",
    "TensorRange",
    "make_observer",
]
