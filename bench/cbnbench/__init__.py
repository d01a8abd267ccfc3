"""Helpers of cbn's benchmark suite (``bench/compare.py`` and ``bench/test_bench.py``).

``cases``: the shapes and the arrays they use; ``impls``: every implementation
timed (cbn, its peers, the compiled memory-bound limit); ``timing``: interleaved
medians; ``machine``: what the run ran on; ``report``: the tables.
"""
