"""Benchmarks of the ingester: throughput, CPU and memory, run by ``make bench``.

Micro benchmarks time the payload model and the spool in this process. The
system benchmarks run the real ``loadmeter run influx`` process against a
real Mosquitto and VictoriaMetrics on loopback and read its ``/metrics`` and
``/proc`` entries. Every process a benchmark starts is stopped when it ends,
whether it succeeded or not.
"""
