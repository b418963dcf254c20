"""Benchmarks of the tritonops ops and the plots of the performance report.

Run from the checkout root, as modules:

    python3 -m perf.bench ...         measure (results JSON)
    python3 -m perf.report ...        plot and tabulate results (never measures)
    python3 -m perf.replay ...        replay the tuner's search strategies over a timing table
    python3 -m perf.bench_lookup      the per-call cost of a tuned-config lookup
    python3 -m perf.compile_bench     compiling matmul candidates for sm90: serial against pooled
"""
