"""How each op family chooses its configs: keys, heuristics, search spaces, runners, Tuners.

One module per family (matmul, softmax, norm, attention), plus `rows` (the tiling rule the
row-wise reductions share) and `common` (what every family's tuning needs). The ops in
`tritonops.ops` only call a key function and `TUNER.select(key)`; everything about which
config is good lives here. Importing a module registers its Tuners and its `autotune tune`
ops with `autotune`.
"""
