"""Benchmark cases shared by `fastdistill bench` and the pytest-benchmark suites in benchmarks/.

Each family module (kd, int8, sparse) exposes ``cases(quick: bool, device: str) -> list[Case]``.
"""
