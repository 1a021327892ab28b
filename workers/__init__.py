"""Ray ingestion: Kafka consumer actors, encoder actors, the store owner (issue [ingest]; not built yet)."""
