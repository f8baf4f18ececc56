"""Airflow operators for Shardline, one per pipeline step.

Each operator is thin glue: it resolves its (templated) arguments and the step's
URIs on the object store, calls one :mod:`tfjobs` function, and returns a small
dict (URIs, counts, metrics) for XCom. TensorFlow is imported only inside
``execute()``, so DAG files that use these operators parse fast.
"""

from operators.adapt import AdaptPreprocessingOperator
from operators.evaluate import EvaluateModelOperator
from operators.export import ExportServingModelOperator
from operators.fetch import FetchDatasetOperator
from operators.shard import ShardToTFRecordOperator
from operators.train import TrainModelOperator
from operators.validate import ValidateDatasetOperator

__all__ = [
    "AdaptPreprocessingOperator",
    "EvaluateModelOperator",
    "ExportServingModelOperator",
    "FetchDatasetOperator",
    "ShardToTFRecordOperator",
    "TrainModelOperator",
    "ValidateDatasetOperator",
]
