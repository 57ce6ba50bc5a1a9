"""Tools around training, each run from the repository root as `python -m tools.<name>`:
bench (timings), ablations (the paper's ablations), visualize (pictures), op_count, bench_gpu.sh."""
