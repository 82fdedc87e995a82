"""Datasets: schema, converters, ADIOS2 readers, NVMe staging (never imports the model)."""
