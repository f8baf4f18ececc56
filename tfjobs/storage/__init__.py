"""Storage and record formats: where bytes live and how records are laid out.

=========================  ============================================================
:mod:`.store`              one object-store interface: the local filesystem, or S3
:mod:`.s3`                 the S3 backend (boto3; AWS, MinIO or any S3 endpoint)
:mod:`.layout`             where each step's output lives on the store
:mod:`.raw_files`          raw data files: CSV as delivered, or Parquet for binary columns
:mod:`.image_folder`       an image folder (one sub-folder per class), read as record batches
:mod:`.examples`           ``tf.train.Example`` records encoded a whole column at a time
:mod:`.tfrecord`           TFRecord framing, CRC32C and GZIP for whole batches of records
:mod:`.input_pipeline`     tf.data pipelines over shards, on local disk or streamed from S3
=========================  ============================================================
"""
