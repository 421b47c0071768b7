"""Hub HTTP surface: ingest (upload protocol), health and metrics; radiologist API later."""
