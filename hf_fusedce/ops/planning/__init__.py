"""How the chunk loop is sized: chunking (budgets, rows per chunk) and cost_model (the CUDA roofline's budget pick).
Imports nothing here so `python -m hf_fusedce.ops.planning.cost_model` loads only what it needs."""
