"""`hf-fusedce bench`: timing and memory of the fused loss head vs stock, peers and the 3-GEMM floor.

impls.py: one entry per implementation; runner.py: timing and memory of one measurement; reference.py:
float64 references without materialized logits; report.py: JSON, markdown, PNG; e2e.py: one training step,
stock vs patched; verify.py: large-shape correctness; profiling.py: profiler traces. See README.md.
"""
