"""Instruments around the training step, not part of it: `bench` (timed steps), `lowering` (what a
step compiles to), `plan` (the step compiled for a TPU slice without one: HBM per chip, FLOPs,
collectives) and `hlo_stats` (reading those from compiled HLO)."""
