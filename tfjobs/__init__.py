"""Shardline's TensorFlow library: one module per pipeline step, each a command-line job.

``fetch -> validate -> shard -> adapt -> train -> evaluate -> export`` (then ``predict``
and ``report``): the steps are the modules at this level, each ``python -m tfjobs.<step>``.
What they share lives in sub-packages:

- :mod:`tfjobs.storage`: the object store (local or S3), the layout of a run on it, and
  the record formats (Examples, TFRecord, the tf.data readers);
- :mod:`tfjobs.modeling`: model building blocks and training loops.

Nothing here imports Airflow, and importing this package does not import TensorFlow.
"""
