"""`make compile-check`: every kernel launch compiled by the real compilers of each target.

See README.md ("Accelerators: what is proven") and benchmarks/compile_check/__main__.py.
"""
