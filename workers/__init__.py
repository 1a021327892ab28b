"""Streaming ingestion: the Kafka message contract (``messages``), clients (``kafka_io``), the local broker
(``broker``), and the Ray actors that consume a topic, encode documents and write them to the store (``consumer``,
``encoder``, ``ingest``). Imports only :mod:`pipeline` below it."""
