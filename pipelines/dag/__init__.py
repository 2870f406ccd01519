"""The pipeline as a DAG of `Stage`s (`stage.py`): the executor (cache keys, resume, leases, the failure line),
`run.py --plan`, and lineage. The stages themselves are the entry points in `pipelines/`."""
