"""Training on Ray Train: the one loop both stages run (`loop.py`), each stage's step (`steps.py`), per-rank pieces
(`rank.py`), DDP settings, rank 0's MLflow logger and the GPU memory budget."""
