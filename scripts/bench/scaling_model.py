#!/usr/bin/env python3
"""Predicted step time and efficiency of data-parallel training on K nodes.

A ring all-reduce of S bytes over K nodes moves 2(K-1)/K * S bytes through each link and
takes K latencies:  T_ar = 2(K-1)/K * S / bandwidth + K * latency.
Without overlap (qkv today: the gradient sum starts after the backward), an update takes
T_step + T_ar; with bucketed all-reduce started while backward runs, only the part of T_ar
longer than the backward (about 2/3 of a step) is exposed. Efficiency = T_step / update time
(weak scaling: every node keeps its own batch, the global batch grows with K).

Usage: scripts/bench/scaling_model.py --step-s 10.6 --bytes 260e6 [--latency-us 50]
       [--ks 2,4,8,16,32,64] [--gbits 10,25,100]   # prints a Markdown table
"""
import argparse

p = argparse.ArgumentParser()
p.add_argument("--step-s", type=float, required=True, help="one node's forward+backward+step")
p.add_argument("--bytes", type=float, required=True, help="gradient bytes summed per update")
p.add_argument("--latency-us", type=float, default=50.0)
p.add_argument("--ks", default="2,4,8,16,32,64")
p.add_argument("--gbits", default="10,25,100")
p.add_argument("--backward-share", type=float, default=2 / 3)
a = p.parse_args()

print("| nodes K | link | all-reduce | update, no overlap | efficiency | update, overlapped | efficiency |")
print("|---:|---|---:|---:|---:|---:|---:|")
for g in (float(x) for x in a.gbits.split(",")):
    for k in (int(x) for x in a.ks.split(",")):
        t_ar = 2 * (k - 1) / k * a.bytes / (g * 1e9 / 8) + k * a.latency_us * 1e-6
        plain = a.step_s + t_ar
        over = a.step_s + max(0.0, t_ar - a.backward_share * a.step_s)
        print(f"| {k} | {g:g} Gbit/s | {t_ar * 1e3:,.0f} ms | {plain:,.2f} s | {a.step_s / plain:.1%} "
              f"| {over:,.2f} s | {a.step_s / over:.1%} |")
