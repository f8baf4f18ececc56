"""Shardline's TensorFlow library: one module per pipeline step, each a command-line job.

``fetch -> validate -> shard -> adapt -> train -> evaluate -> export``; every step
reads and writes URIs through :mod:`tfjobs.store`. Nothing here imports Airflow,
and importing this package does not import TensorFlow.
"""
